"""Policy adapters (peft), chosen by one config field, ``adapter``, in sft, ppo, dpo and kto.

Two families, which the lab runs differently (docs/adapters.md):

- **Weight adapters** — ``lora`` (low-rank updates) and ``ia3`` (learned rescaling). They merge
  into the base weights: a trained policy can be sampled as a plain model, a stage that starts
  from one folds it in first, and ``disable_adapter()`` gives the reference.
- **Virtual tokens** — ``prompt_tuning`` (Lester et al. 2021: P learned input embeddings before
  the prompt) and ``prefix_tuning`` (Li & Liang 2021: P learned keys and values in every layer).
  They cannot be merged: the policy *is* base + virtual tokens. peft puts them in front of the
  sequence inside its own ``forward``, which neither the lab's KV-cached sampler nor its
  shared-prefix scoring pass goes through, so :class:`VirtualTokenPolicy` presents such a model
  as an ordinary causal LM: it writes the virtual tokens into the KV cache at positions
  ``0..P-1`` the first time it sees an empty cache and shifts every position and mask the caller
  passes by ``P``. Same function as peft's forward (tested), one code path for every caller.

:func:`rlhf.models.policy_to_train` is the one place a training stage gets its policy and its
reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from rlhf.config import option
from rlhf.errors import ConfigError

MERGEABLE_ADAPTERS = ("lora", "ia3")
VIRTUAL_TOKEN_ADAPTERS = ("prompt_tuning", "prefix_tuning")
ADAPTERS = MERGEABLE_ADAPTERS + VIRTUAL_TOKEN_ADAPTERS
ADAPTER_HELP = (
    "the adapter trained when lora=true: lora (low-rank updates of the lora_target_modules, rank "
    "lora_r); ia3 (IA3, Liu et al. 2022: learned rescaling of the attention keys and values and of "
    "the feed-forward input, 57,600 weights for SmolLM2-135M); prompt_tuning (num_virtual_tokens "
    "learned input embeddings before the prompt, 576 weights each on SmolLM2-135M); prefix_tuning "
    "(num_virtual_tokens learned keys and values in every layer, 11,520 weights each on "
    "SmolLM2-135M). lora and ia3 merge into the weights; the virtual-token kinds stay an adapter "
    "(docs/adapters.md)"
)
_PEFT_TYPES = {"PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning"}


@dataclasses.dataclass
class LoraFields:
    """LoRA's settings, one block for every stage that trains LoRA adapters: the policy stages
    (through :class:`AdapterFields`) and the reward model (``trainable: lora``), which keeps its own
    smaller defaults by redeclaring the two numbers."""

    lora_r: int = option(16, help="LoRA rank (adapter: lora)")
    lora_alpha: int = option(32, help="LoRA alpha, scale = alpha / r (adapter: lora)")
    lora_target_modules: list[str] = option(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        help="module names that get LoRA adapters (adapter: lora)",
    )


@dataclasses.dataclass
class AdapterFields(LoraFields):
    """The adapter fields every policy-training stage shares (each stage keeps its own ``lora``
    switch, whose default differs: full SFT, LoRA DPO)."""

    adapter: str = option("lora", help=ADAPTER_HELP, choices=ADAPTERS)
    num_virtual_tokens: int = option(
        8, help="learned positions in front of every sequence (adapter: prompt_tuning or prefix_tuning)"
    )
    lora_layers: int = option(
        0,
        help="LoRA in the last N transformer layers only (0: every layer; adapter: lora). The "
        "backward pass then stops at the lowest adapted layer: the last 15 of SmolLM2-135M's 30 made "
        "a PPO training step 1.34x faster on a CPU, but the quickstart's policy learned less (docs/adapters.md)",
    )

    def validate_adapter(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens: {self.num_virtual_tokens} must be >= 1")
        if self.lora_layers < 0:
            raise ConfigError(f"lora_layers: {self.lora_layers} must be >= 0 (0: every layer)")
        if self.lora_layers and self.adapter != "lora":
            raise ConfigError(
                f"lora_layers: {self.lora_layers} applies to adapter: lora, not {self.adapter}; "
                "set lora_layers: 0 or adapter: lora"
            )


def adapter_config(fields: AdapterFields, model):
    """The peft config of ``fields.adapter`` for the causal-LM policy ``model``.

    Prefix tuning starts from zero keys and values (peft's ``init_weights="zero"``): the prefix
    then only adds P zero-valued slots to each softmax, a small perturbation of the start policy,
    where peft's random default starts far from it. Prompt tuning starts from the embeddings of P
    random vocabulary tokens (the vocabulary's own scale, not N(0, 1))."""
    import peft

    kind = fields.adapter
    if kind == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM")  # peft's targets for the model's architecture
    if kind == "prompt_tuning":
        return peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=fields.num_virtual_tokens,
            prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB,
        )
    if kind == "prefix_tuning":
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=fields.num_virtual_tokens, init_weights="zero"
        )
    if kind != "lora":
        raise ConfigError(f"adapter: {kind!r} is not valid; choose one of {', '.join(ADAPTERS)}")
    return lora_config(
        fields.lora_r,
        fields.lora_alpha,
        fields.lora_target_modules,
        last_layers(fields.lora_layers, num_layers(model)),
    )


def last_layers(n: int, n_layers: int) -> list[int] | None:
    """The indices of the last ``n`` of ``n_layers`` layers (None: every layer, for ``n`` 0)."""
    if not n:
        return None
    if n > n_layers:
        raise ConfigError(f"lora_layers: {n} is more than the model's {n_layers} layers")
    return list(range(n_layers - n, n_layers))


def num_layers(model) -> int:
    """How many transformer layers a causal LM has."""
    config = model.config
    return int(getattr(config, "num_hidden_layers", None) or config.get_text_config().num_hidden_layers)


def lora_config(
    r: int,
    alpha: int,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    layers: list[int] | None = None,
):
    """The lab's LoRA adapter for a causal-LM policy (no dropout, no bias), shared by SFT, PPO and
    the TRL baselines so the three train the same kind of adapter; ``layers``: the indices of the
    layers that get it (None: every layer)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def virtual_token_kind(model) -> str | None:
    """``prompt_tuning`` / ``prefix_tuning`` for a peft model of that kind, else None."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    peft_type = getattr(next(iter(configs.values())), "peft_type", None)
    return _PEFT_TYPES.get(str(getattr(peft_type, "value", peft_type)))


def num_virtual_tokens(model) -> int:
    """How many cache positions ``model`` adds in front of a sequence (0 for a plain model)."""
    return model.num_virtual_tokens if isinstance(model, VirtualTokenPolicy) else 0


class VirtualTokenPolicy(nn.Module):
    """A peft prompt-tuning or prefix-tuning model called like a plain causal LM (module docstring).

    The caller passes positions and masks of its own tokens only (counted from 0, as for the base
    model); the virtual tokens take cache positions ``0..P-1`` and everything the caller passes
    moves up by ``P``. With the adapter disabled the base model runs untouched: the reference.
    """

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        self.kind = virtual_token_kind(peft_model)
        if self.kind is None:
            raise ValueError("VirtualTokenPolicy wraps a prompt-tuning or prefix-tuning peft model")
        self.num_virtual_tokens = int(peft_model.active_peft_config.num_virtual_tokens)
        self._adapter_off = False

    # --- what callers use of a causal LM / PeftModel
    @property
    def config(self):
        return self.base_model.config

    @property
    def generation_config(self):
        return self.base_model.generation_config

    @property
    def peft_config(self):
        return self.peft_model.peft_config

    @property
    def base_model(self) -> nn.Module:
        return self.peft_model.get_base_model()

    def get_input_embeddings(self):
        return self.base_model.get_input_embeddings()

    def get_decoder(self):
        return self.base_model.get_decoder()

    def save_pretrained(self, path, state_dict=None, **kwargs):
        # ``state_dict`` (a gathered full-model state) does not apply: the adapter saves itself
        self.peft_model.save_pretrained(path, **kwargs)

    def print_trainable_parameters(self):
        self.peft_model.print_trainable_parameters()

    @contextlib.contextmanager
    def disable_adapter(self):
        """The base model alone (the reference of a run that added these virtual tokens)."""
        was_off, self._adapter_off = self._adapter_off, True
        try:
            yield
        finally:
            self._adapter_off = was_off

    # --- the forward
    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        base = self.base_model
        if self._adapter_off:
            return base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                **kwargs,
            )
        n_rows, n_new = input_ids.shape
        n_virtual = self.num_virtual_tokens
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            past_key_values = self._virtual_cache(n_rows, past_key_values)
        n_before = past_key_values.get_seq_length() - n_virtual  # the caller's tokens already cached
        if attention_mask is None:
            attention_mask = input_ids.new_ones(n_rows, n_before + n_new)
        if position_ids is None:
            position_ids = n_before + torch.arange(n_new, device=input_ids.device)[None].expand(n_rows, -1)
        attention_mask = torch.cat([attention_mask.new_ones(n_rows, n_virtual), attention_mask], dim=1)
        return base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids + n_virtual,
            past_key_values=past_key_values,
            **kwargs,
        )

    def _virtual_cache(self, n_rows: int, cache=None):
        """``cache`` (or a new one) holding the virtual tokens at positions 0..P-1, for ``n_rows``
        rows: computed once at batch 1 and repeated (differentiably, so every row's gradient
        reaches the one set of virtual tokens)."""
        from transformers import DynamicCache

        base = self.base_model
        if cache is None:
            cache = DynamicCache(config=base.config)
        n_virtual = self.num_virtual_tokens
        device = next(base.parameters()).device
        if self.kind == "prompt_tuning":
            embeds = self.peft_model.get_prompt(batch_size=1).to(device=device, dtype=base.dtype)
            base(
                inputs_embeds=embeds,
                attention_mask=torch.ones(1, n_virtual, dtype=torch.long, device=device),
                position_ids=torch.arange(n_virtual, device=device)[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        else:
            prefix = self.peft_model.get_prompt(batch_size=1)  # peft's cache of the learned keys/values
            for layer_idx, layer in enumerate(prefix.layers):
                cache.update(layer.keys.to(device), layer.values.to(device), layer_idx)
        if n_rows > 1:
            cache.batch_repeat_interleave(n_rows)
        return cache


def with_adapter(model, fields: AdapterFields):
    """``model`` with a new trainable ``fields.adapter`` (base weights frozen); virtual-token
    adapters come wrapped in :class:`VirtualTokenPolicy`."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, adapter_config(fields, model))
    return VirtualTokenPolicy(peft_model) if fields.adapter in VIRTUAL_TOKEN_ADAPTERS else peft_model


def is_virtual_token_dir(path: str) -> bool:
    """A policy dir holding a prompt- or prefix-tuning adapter."""
    config = Path(path, "adapter_config.json")
    return config.is_file() and json.loads(config.read_text()).get("peft_type") in _PEFT_TYPES
