"""A reward model: a scalar head on a causal-LM backbone, reading the response.

The weights live in an ordinary ``AutoModelForSequenceClassification`` (``num_labels=1``), so a
saved reward-model dir loads anywhere transformers does (TRL, vLLM, ...); ``rlhf_reward.json``
says how to read it (``pooling``, ``layers``, ``normalization``). The forward pass is our own, in
:class:`RewardModel`, for three reasons:

1. **Pooling.** ``mean`` (the lab's default): the head reads the mean of the final states over the
   response tokens (EOS included when the response ended) — a per-token reward, averaged. On the
   lab's data it learned every gold preference tried far better than ``last``, the state at the
   last real token (InstructGPT's head), which transformers' own sequence-classification forward
   reads (docs/reward-models.md). In the lab, :func:`rlhf.rewards.load_reward_fn` scores as
   trained; outside it, :func:`score_like_the_lab` does the same with plain transformers.
2. **Any padding.** We pad on the right, so every real token keeps the positions it has when scored
   alone: the same text scores the same alone and in a padded batch (tested).
3. **Frozen lower layers are computed once.** With ``trainable="top"`` only the top N decoder
   layers (+ final norm + head) learn; the lower layers' output for a text never changes, so
   :meth:`RewardModel.lower_hidden` computes it once and :meth:`RewardModel.forward` takes it as
   ``hidden`` on every later epoch. On a 2-core CPU this removes most of the compute. ``layers``
   keeps only the backbone's first decoder layers (they carry more of a response's content than
   the last ones, and a shallower model scores faster in PPO).

4. **Several layers' means.** With ``read_layers`` (e.g. ``[0, 2, 4, 6, 8]``; 0 = the token
   embeddings) the head reads the concatenated means over the response tokens of the raw states
   after each of those layers (no final norm), through a linear head of its own (with a bias,
   saved in :data:`HEAD_FILE`). Lexical signal sits in the early layers and meaning in the later
   ones; with everything frozen the features are fixed, so ``rlhf rm train`` can solve the head
   exactly (``solver: lbfgs``; docs/reward-models.md has the measurements).

Splitting the layer stack relies on the decoder layout shared by Llama, Mistral, Qwen2 and SmolLM
(``backbone.layers``, ``backbone.norm``, ``inputs_embeds`` accepted); the stack is swapped for a
slice of itself for the duration of a call, so transformers' own mask and rotary code still run.

Text is formatted with :func:`rlhf.models.format_conversation` (the same chat template and the
same text the policy produced; EOS only after a response that ended), and truncated from the
*left* (the prompt side) when longer than ``max_length``: the response, which is what is being
judged, is kept whole when it fits.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf.contracts import prompt_text
from rlhf.errors import UserError
from rlhf.fsio import atomic_dir, check_output_dir, recover_dir
from rlhf.models import disable_dropout, format_conversation, format_prompt, load_tokenizer
from rlhf.sampling import MIN_SHARED_PREFIX, common_prefix_length, shared_prefix_cache

META_FILE = "rlhf_reward.json"
HEAD_FILE = "rlhf_head.safetensors"  # the head over several layers' means (``read_layers``)
ENSEMBLE_FILE = "rlhf_ensemble.json"  # an ensemble dir's manifest (:func:`save_ensemble`)
# a reward-model save may replace a directory holding one of these: a reward model or an ensemble
REWARD_DIR_MARKERS = (META_FILE, ENSEMBLE_FILE)
TRAINABLE = ("top", "full", "lora")
POOLING = ("mean", "last")


# ----------------------------------------------------------------------------- the module


class RewardModel(nn.Module):
    """Scalar reward ``[N]`` for ``N`` sequences; see the module docstring.

    ``seq_model`` is an ``AutoModelForSequenceClassification`` with one label (possibly with LoRA
    adapters injected). ``tie_param`` is the learned log θ (Rao–Kupper) or log ν (Davidson), kept
    here so it trains and syncs across processes with the rest. ``read_layers``: the head reads the
    concatenated response means of the raw states after these layers (module docstring, point 4)
    through a new linear head with a bias; empty: the pooled final states through the backbone's
    own ``score`` head.
    """

    def __init__(
        self,
        seq_model: nn.Module,
        trainable: str = "top",
        top_layers: int = 2,
        tie_param: float | None = None,
        learn_tie_param: bool = True,
        pooling: str = "last",
        read_layers: Sequence[int] = (),
    ):
        super().__init__()
        if pooling not in POOLING:
            raise UserError(f"pooling={pooling!r}; choose one of {', '.join(POOLING)}", code="config")
        self.pooling = pooling
        self.seq_model = seq_model
        base = _unwrap_peft(seq_model)
        self.backbone = getattr(base, base.base_model_prefix)
        self.trainable = trainable
        n_layers = len(self.backbone.layers) if hasattr(self.backbone, "layers") else None
        self.read_layers = _check_read_layers(read_layers, pooling, n_layers)
        if self.read_layers:
            width = len(self.read_layers) * base.score.weight.shape[1]
            self.head = nn.Linear(width, 1, bias=True, dtype=base.score.weight.dtype)
            nn.init.zeros_(self.head.weight)  # a new head; the exact solver (or training) sets it
            nn.init.zeros_(self.head.bias)
        else:
            self.head = base.score
        if trainable == "top":
            if n_layers is None or not hasattr(self.backbone, "norm"):
                raise UserError(
                    "trainable=top needs a decoder backbone with .layers and .norm "
                    "(Llama, Mistral, Qwen2, SmolLM); use trainable=full or lora",
                    code="bad_model",
                )
            if not 0 <= top_layers <= n_layers:
                raise UserError(
                    f"top_layers={top_layers} but the model has {n_layers} layers (choose 0..{n_layers})",
                    code="config",
                )
        self.n_layers = n_layers
        self.top_layers = top_layers if trainable == "top" else n_layers
        if tie_param is not None:
            self.tie_param = nn.Parameter(torch.tensor(float(tie_param)), requires_grad=learn_tie_param)
        else:
            self.tie_param = None
        self._set_trainable()

    # ------------------------------------------------------------------ trainability
    def _set_trainable(self) -> None:
        if self.trainable == "full":
            for p in self.seq_model.parameters():
                p.requires_grad_(True)
            return
        if self.trainable == "lora":
            # peft froze everything but the adapters; the head is new and must learn too.
            for p in self.head.parameters():
                p.requires_grad_(True)
            return
        for p in self.seq_model.parameters():
            p.requires_grad_(False)
        start = self.n_layers - self.top_layers
        for layer in self.backbone.layers[start:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        # the final norm is part of what the head reads, except for raw states of several layers
        norm = [] if self.read_layers else list(self.backbone.norm.parameters())
        for p in [*norm, *self.head.parameters()]:
            p.requires_grad_(True)

    @property
    def caches_lower_layers(self) -> bool:
        """True when the lower layers are frozen, so their outputs can be computed once."""
        return self.trainable == "top"

    @property
    def caches_features(self) -> bool:
        """True when everything below the head is frozen and the head reads several layers' means:
        then each sequence's whole input to the head (:meth:`layer_features`) is computed once."""
        return bool(self.read_layers) and self.trainable == "top" and self.top_layers == 0

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the parameters that train (small checkpoints for top/LoRA)."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _stack(self, start: int, end: int, norm: bool):
        """Temporarily make the backbone run only layers ``[start, end)`` (and its norm or not)."""
        layers, final_norm = self.backbone.layers, self.backbone.norm
        self.backbone.layers = nn.ModuleList(list(layers)[start:end])
        if not norm:
            self.backbone.norm = nn.Identity()
        try:
            yield
        finally:
            self.backbone.layers = layers
            self.backbone.norm = final_norm

    @property
    def frozen_layers(self) -> int:
        """How many lower layers are frozen (the ones :meth:`lower_hidden` runs)."""
        return self.n_layers - self.top_layers

    @torch.no_grad()
    def lower_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden: torch.Tensor | None = None,
        from_layer: int = 0,
    ) -> torch.Tensor:
        """Output of the frozen lower layers ``[N, T, H]`` (input to the top ``top_layers``).

        ``hidden``: the same sequences' states after the first ``from_layer`` of those layers
        (from a shallower model of the same backbone); only the layers above them run."""
        assert self.caches_lower_layers and 0 <= from_layer <= self.frozen_layers
        start, inputs = (
            (0, {"input_ids": input_ids}) if hidden is None else (from_layer, {"inputs_embeds": hidden})
        )
        with self._stack(start, self.frozen_layers, norm=False):
            out = self.backbone(**inputs, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def layer_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor,
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[N, len(read_layers) · H]``: the means over ``pool_mask``'s tokens of the raw states after
        each layer of ``read_layers`` (0: the embeddings), concatenated in that order. Only the
        layers up to the deepest one read run. ``past_key_values``: a shared prefix's cache
        (``attention_mask`` then covers the prefix too; ``pool_mask`` the rows' own tokens).

        The states are taken by forward hooks of our own, not transformers' ``output_hidden_states``:
        transformers 5 installs its capturing hooks once, on the layers present at the first such
        call, so a stack swapped for a slice of itself (:meth:`_stack`) would be recorded wrongly."""
        states: dict[int, torch.Tensor] = {}

        def keep(layer: int):
            def hook(module, args, output):
                states[layer] = output[0] if isinstance(output, tuple) else output

            return hook

        modules = {layer: self.backbone.layers[layer - 1] for layer in self.read_layers if layer > 0}
        if 0 in self.read_layers:
            modules[0] = self.backbone.get_input_embeddings()
        handles = [module.register_forward_hook(keep(layer)) for layer, module in modules.items()]
        try:
            with self._stack(0, max(self.read_layers), norm=False):
                self.backbone(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    past_key_values=past_key_values,
                    position_ids=position_ids,
                    use_cache=past_key_values is not None,
                )
        finally:
            for handle in handles:
                handle.remove()
        w = pool_mask.to(states[self.read_layers[0]].dtype)[..., None]
        count = w.sum(1).clamp(min=1.0)
        return torch.cat([(states[layer] * w).sum(1) / count for layer in self.read_layers], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        pool_mask: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards ``[N]`` (float32) from token ids ``[N, T]``, cached lower hidden states
        ``[N, T, H]``, or (with ``read_layers``) cached :meth:`layer_features` ``[N, F]``.

        ``pool_mask [N, T]`` marks the response tokens (EOS included) that mean pooling averages;
        last-token pooling ignores it.
        """
        if features is not None:
            return self.head(features).squeeze(-1).float()
        if self.read_layers:
            return self.forward(features=self.layer_features(input_ids, attention_mask, pool_mask))
        if hidden is not None:
            with self._stack(self.frozen_layers, self.n_layers, norm=True):
                h = self.backbone(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
        else:
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.pool_and_score(h.last_hidden_state, attention_mask, pool_mask)

    def pool_and_score(
        self, h: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The head on the pooled final hidden states ``h [N, T, H]`` → rewards ``[N]`` (float32).

        ``last``: the state at the last real token (InstructGPT's reward head). ``mean``: the mean
        of the states over the response tokens, i.e. (the head being linear) the mean of a
        per-token reward over the response. On the lab's data the mean reads the preference off
        far better than the last token, for every gold scorer tried (docs/reward-models.md).
        """
        if self.pooling == "mean":
            if pool_mask is None:
                raise ValueError("mean pooling needs pool_mask (the response tokens)")
            w = pool_mask.to(h.dtype)[..., None]
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
        else:
            last = last_token_index(attention_mask)
            pooled = h[torch.arange(h.shape[0], device=h.device), last]
        return self.head(pooled).squeeze(-1).float()

    @torch.no_grad()
    def score_batch(self, batch: PrefixedBatch) -> torch.Tensor:
        """Rewards ``[N]`` of a batch laid out by :func:`batch_with_prefix`. A shared prefix (the chat
        template's system prompt and turn header) runs once and its KV cache is repeated for every
        row: the same rewards as :meth:`forward` on the full sequences, with fewer token forwards.
        Inference only."""
        if self.read_layers:
            return self.forward(features=self.batch_features(batch))
        if batch.prefix is None:
            return self(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, pool_mask=batch.pool_mask
            )
        cache, attn, pos = self._prefix_inputs(batch.prefix, batch.input_ids, batch.attention_mask)
        h = self.backbone(
            input_ids=batch.input_ids,
            attention_mask=attn,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        return self.pool_and_score(h, batch.attention_mask, batch.pool_mask)

    @torch.no_grad()
    def batch_features(self, batch: PrefixedBatch) -> torch.Tensor:
        """:meth:`layer_features` of a batch laid out by :func:`batch_with_prefix`, its shared prefix
        run once (as :meth:`score_batch`). Inference only."""
        if batch.prefix is None:
            return self.layer_features(batch.input_ids, batch.attention_mask, batch.pool_mask)
        cache, attn, pos = self._prefix_inputs(batch.prefix, batch.input_ids, batch.attention_mask)
        return self.layer_features(batch.input_ids, attn, batch.pool_mask, cache, pos)

    def _prefix_inputs(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The prefix's KV cache repeated for every row, and the rows' attention mask and positions
        after it: ``(cache, attention_mask [N, P + S], position_ids [N, S])``."""
        n_pre, (n, width) = prefix.shape[1], input_ids.shape
        # several layers' means: the prefix's cache must come from the same slice of the stack
        stack = contextlib.nullcontext()
        if self.read_layers:
            stack = self._stack(0, max(self.read_layers), norm=False)
        with stack:
            cache = shared_prefix_cache(self.backbone, prefix, n, lm=False)
        attn = torch.cat([attention_mask.new_ones(n, n_pre), attention_mask], dim=1)
        pos = (n_pre + torch.arange(width, device=input_ids.device))[None].expand(n, -1)
        return cache, attn, pos


def _check_read_layers(read_layers: Sequence[int], pooling: str, n_layers: int | None) -> list[int]:
    """``read_layers`` as a list, after checking it against the pooling and the backbone's depth."""
    layers = [int(x) for x in read_layers]
    if not layers:
        return []
    if pooling != "mean":
        raise UserError(f"read_layers={layers} reads response means; it needs pooling=mean", code="config")
    if n_layers is None:
        raise UserError(
            "read_layers needs a decoder backbone with .layers (Llama, Qwen2, SmolLM)", code="bad_model"
        )
    if len(set(layers)) != len(layers) or not all(0 <= x <= n_layers for x in layers):
        raise UserError(
            f"read_layers={layers}: each a different layer in 0..{n_layers} (0 = the embeddings)",
            code="config",
        )
    return layers


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index ``[N]`` of the last position with mask 1 in ``attention_mask [N, T]`` (any padding side)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (pos * attention_mask.long()).argmax(dim=-1)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (peft injects adapters into it in place)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


# ----------------------------------------------------------------------------- building and loading


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report ("score.weight MISSING": expected, the head is new) and bars."""
    from transformers.utils import logging as hf_logging

    level, bars_were_on = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars_were_on:  # restore, never force on: `rlhf` hides library bars by default
            hf_logging.enable_progress_bar()


def _load_seq_model(path: str, tokenizer) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path)
        for key, value in list(vars(config).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)  # deterministic forward: caching and eval need it
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=torch.float32
            )
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load {path!r} as a reward-model backbone: {str(err).splitlines()[0]}",
            code="model_not_found",
        ) from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return disable_dropout(model)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``rlhf_reward.json`` of a reward-model dir; every reader of such a dir starts here, so this is
    where a save killed between its two renames is undone (:func:`rlhf.fsio.recover_dir`)."""
    p = recover_dir(path) / META_FILE
    if not p.is_file() and is_ensemble_dir(path):
        members = read_ensemble(path)["members"]
        raise UserError(
            f"{path} is an ensemble of {len(members)} reward models; this takes one of them, e.g. "
            f"{members[0]} (as a reward, the ensemble dir works whole)",
            code="bad_reward_model",
        )
    if not p.is_file():
        raise UserError(f"{path} is not a reward-model directory (no {META_FILE})", code="bad_reward_model")
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise UserError(f"{p} is not valid JSON", code="bad_reward_model") from None


def load_reward_model(path: str | os.PathLike, device: str = "cpu"):
    """``(RewardModel, tokenizer, meta)`` from a reward-model dir written by :func:`save_reward_model`."""
    meta = read_meta(path)
    tokenizer = load_tokenizer(str(path), padding_side="right")
    seq_model = _load_seq_model(str(path), tokenizer)
    model = RewardModel(
        seq_model,
        trainable="full",
        tie_param=meta.get("tie_param"),
        learn_tie_param=False,
        pooling=meta.get("pooling", "last"),
        read_layers=meta.get("read_layers") or (),
    )
    if model.read_layers:
        _load_head(model, Path(path))
    return model.to(device).eval().requires_grad_(False), tokenizer, meta


def _load_head(model: RewardModel, path: Path) -> None:
    """The head over several layers' means from :data:`HEAD_FILE` (its shape checked)."""
    file = path / HEAD_FILE
    if not file.is_file():
        raise UserError(
            f"{path}: rlhf_reward.json names read_layers but {HEAD_FILE} is missing", code="bad_reward_model"
        )
    state = load_file(str(file))
    found = {k: tuple(v.shape) for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    if found != expected:
        raise UserError(
            f"{file}: a head of shapes {found} where read_layers={model.read_layers} needs {expected}",
            code="bad_reward_model",
        )
    model.head.load_state_dict(state)


def is_ensemble_dir(path: str | os.PathLike) -> bool:
    """A dir written by ``rlhf rm train --ensemble N``: member-0..N-1 and :data:`ENSEMBLE_FILE`."""
    return (recover_dir(path) / ENSEMBLE_FILE).is_file()


def read_ensemble(path: str | os.PathLike) -> dict[str, Any]:
    """An ensemble dir's manifest, with ``members`` as paths (they are stored relative to it)."""
    root = recover_dir(path)
    manifest = json.loads((root / ENSEMBLE_FILE).read_text())
    return {**manifest, "members": [str(Path(path) / m) for m in manifest["members"]]}


def save_ensemble(
    member_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, manifest: dict
) -> Path:
    """One dir holding trained reward models as ``member-<i>/`` and the manifest, written atomically
    (a crash leaves the old dir or the new one). Members are hard-linked where the file system
    allows (no second copy of the weights on disk), else copied."""
    import shutil

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    names = [f"member-{i}" for i in range(len(member_dirs))]
    with atomic_dir(out_dir, replaces=REWARD_DIR_MARKERS) as tmp:
        for name, member in zip(names, member_dirs):
            shutil.copytree(member, tmp / name, copy_function=link_or_copy)
        (tmp / ENSEMBLE_FILE).write_text(json.dumps({**manifest, "members": names}, indent=2, default=str))
    return Path(out_dir)


def reward_out_dir(out: str, run_dir: str | os.PathLike) -> Path:
    """Where ``rm train`` writes its reward model: ``out``, else ``<run_dir>/model``. Checked before
    any work starts (:func:`rlhf.fsio.check_output_dir`): never the run's own directory or a folder
    holding it, never an existing directory other than a reward-model or ensemble dir."""
    return check_output_dir(out or Path(run_dir) / "model", run_dir, REWARD_DIR_MARKERS, "out")


def save_reward_model(
    model: RewardModel, tokenizer, out_dir: str | os.PathLike, meta: dict[str, Any]
) -> Path:
    """Write HF model (LoRA merged in) + tokenizer + ``rlhf_reward.json``, atomically
    (:func:`rlhf.fsio.atomic_dir`: a crash leaves the old reward-model dir or the new one)."""
    seq_model = model.seq_model
    if hasattr(seq_model, "merge_and_unload"):
        import copy

        seq_model = copy.deepcopy(seq_model).merge_and_unload()
    seq_model.config.pad_token_id = tokenizer.pad_token_id
    meta = dict(meta)
    if model.tie_param is not None:
        meta["tie_param"] = float(model.tie_param.detach())
    if model.read_layers:
        meta["read_layers"] = list(model.read_layers)
    with atomic_dir(out_dir, replaces=REWARD_DIR_MARKERS) as tmp:
        with _quiet_transformers():
            seq_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.read_layers:
            save_file(
                {k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, str(tmp / HEAD_FILE)
            )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return Path(out_dir)


# ----------------------------------------------------------------------------- text → tokens


prompt_as_text = prompt_text  # its name before the lab had one prompt → text rule (rlhf.contracts)


@dataclass
class Encoded:
    """Token ids of formatted conversations, where each response starts, and what truncation did."""

    ids: list[list[int]]
    starts: list[int] = field(default_factory=list)  # index of each response's first token in ids
    truncated: int = 0  # sequences whose prompt side was cut
    response_truncated: int = 0  # sequences where even the response did not fit


def encode_conversations(
    tokenizer,
    prompts: Sequence[Any],
    responses: Sequence[str],
    max_length: int,
    finished: Sequence[bool] | None = None,
) -> Encoded:
    """Chat-format and tokenize each (prompt, response); keep the *last* ``max_length`` tokens.

    ``prompts`` are text or chat messages (as in the data contracts). ``finished[i]`` says whether
    response ``i`` ended with EOS (the policy stopped) or was cut at the length limit: EOS is
    appended only to finished ones, so a truncated response is scored as the policy left it, the
    same way in training and in PPO (default: every response finished).
    """
    enc = Encoded(ids=[])
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        eos = True if finished is None else bool(finished[i])
        ids = tokenizer(format_conversation(tokenizer, prompt, response, eos=eos), add_special_tokens=False)[
            "input_ids"
        ]
        start = _response_start(
            ids, tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        )
        if len(ids) > max_length:
            enc.truncated += 1
            cut = len(ids) - max_length
            if start < cut:
                enc.response_truncated += 1
            ids, start = ids[cut:], max(start - cut, 0)
        enc.ids.append(ids)
        enc.starts.append(start)
    return enc


def _response_start(ids: list[int], prompt_ids: list[int]) -> int:
    """Where the response begins in ``ids``: after the prompt's tokens, or after the longest common
    prefix where the tokenizer merged across the boundary (never past the last token)."""
    n = 0
    for a, b in zip(ids, prompt_ids):
        if a != b:
            break
        n += 1
    return min(n, max(len(ids) - 1, 0))


def response_mask(starts: Sequence[int], attention_mask: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` mask of the response tokens: positions ≥ ``starts[i]`` that are real tokens."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None]
    first = torch.as_tensor(list(starts), device=attention_mask.device)[:, None]
    return (pos >= first).long() * attention_mask


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [N, T], attention_mask [N, T])``, right-padded to the longest sequence."""
    n, t = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_hidden(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached per-sequence hidden states ``[T_i, H]`` → ``([N, T, H], mask [N, T])``, right-padded."""
    n, t, h = len(states), max(s.shape[0] for s in states), states[0].shape[1]
    out = states[0].new_zeros((n, t, h))
    mask = torch.zeros((n, t), dtype=torch.long)
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return out, mask


@dataclass
class PrefixedBatch:
    """Sequences laid out for a reward-model forward: ``prefix [1, P]`` (the tokens every row shares,
    run once; None when too few are shared) and the rows' own tokens right-padded after it, with the
    mask of their response tokens."""

    prefix: torch.Tensor | None
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pool_mask: torch.Tensor


def batch_with_prefix(
    seqs: Sequence[Sequence[int]],
    starts: Sequence[int],
    pad_id: int,
    pooling: str,
    share_prefix: bool = True,
    device: str | torch.device = "cpu",
) -> PrefixedBatch:
    """One batch of token sequences (``starts[i]``: where sequence ``i``'s response begins), split
    after the prefix they all share (the chat template's system prompt) when ``share_prefix`` and
    at least :data:`rlhf.sampling.MIN_SHARED_PREFIX` tokens are shared. Under mean pooling the
    prefix ends before every response starts (each response token needs its own state). Training's
    feature cache and every scoring pass lay their batches out here, so both compute the same way."""
    n_pre = common_prefix_length(seqs) if share_prefix and len(seqs) > 1 else 0
    if pooling == "mean":
        n_pre = min(n_pre, *starts)
    if n_pre < MIN_SHARED_PREFIX:
        n_pre = 0
    input_ids, mask = pad_right([s[n_pre:] for s in seqs], pad_id)
    pool = response_mask([f - n_pre for f in starts], mask)
    prefix = torch.tensor([seqs[0][:n_pre]], dtype=torch.long, device=device) if n_pre else None
    return PrefixedBatch(prefix, input_ids.to(device), mask.to(device), pool.to(device))


@torch.no_grad()
def score_ids(
    model: RewardModel,
    ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    share_prefix: bool = True,
    starts: Sequence[int] | None = None,
    on_batch: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Rewards ``[N]`` for token sequences, batched by length (sorted, then restored to input order).

    ``starts[i]`` is where sequence ``i``'s response begins (mean pooling averages from there;
    default 0). Within a batch, the token prefix every sequence shares (the system prompt) runs
    once (:meth:`RewardModel.score_batch`) when it ends before every response starts;
    ``share_prefix=False`` runs every sequence whole. ``on_batch(n)`` is called after each batch
    of ``n`` sequences (a progress bar's ``update``).
    """

    starts = list(starts) if starts is not None else [0] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), dtype=torch.float32)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        b = batch_with_prefix(
            [ids[i] for i in chunk], [starts[i] for i in chunk], pad_id, model.pooling, share_prefix, device
        )
        out[chunk] = model.score_batch(b).float().cpu()
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def score_texts(
    model: RewardModel,
    tokenizer,
    prompts: Sequence[Any],
    responses: Sequence[str],
    max_length: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    finished: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, Encoded]:
    """Raw (unnormalised) rewards ``[N]`` of (prompt, response) texts and the truncation counts.

    ``finished`` as in :func:`encode_conversations` (default: every response ended with EOS).
    """
    if not responses:
        return torch.empty(0), Encoded(ids=[])
    enc = encode_conversations(tokenizer, prompts, responses, max_length, finished)
    was_training = model.training
    model.eval()
    try:
        scores = score_ids(model, enc.ids, tokenizer.pad_token_id, batch_size, device, starts=enc.starts)
    finally:
        model.train(was_training)
    return scores, enc


# ----------------------------------------------------------------------------- outside the lab


def score_like_the_lab(
    model_dir: str | os.PathLike,
    prompts: Sequence[Any],
    responses: Sequence[str],
    finished: Sequence[bool] | None = None,
) -> list[float]:
    """The lab's normalised rewards from a reward-model dir with plain torch and transformers.

    For people outside the lab: it imports nothing from the lab and reads only the dir, so it can
    be copied into any project; it gives the numbers :func:`rlhf.rewards.load_reward_fn` gives
    (tested). ``AutoModelForSequenceClassification``'s own forward does not: it reads the last
    token, and normalises nothing. What the lab does, step by step:

    1. Text: the chat template with the generation prompt, the response, then EOS only when the
       response ended (``finished[i]``; default: all did), tokenized without special tokens.
    2. Length: keep the last ``max_length`` tokens (``rlhf_reward.json``), cutting the prompt side.
    3. Pooling (``pooling`` in ``rlhf_reward.json``): ``mean`` averages the final hidden states
       over the response's tokens, then applies the head; ``last`` reads the last token (what
       ``model(input_ids).logits`` is). The dir holds only the decoder layers the lab kept
       (``layers``), so the backbone needs no cutting. With ``read_layers`` the head is not
       ``model.score`` but the weight and bias in ``rlhf_head.safetensors``, reading the
       concatenated response means of the raw states after each listed layer (0: the
       embeddings; the final norm is not applied).
    4. Normalisation: ``(reward - offset) / scale`` with ``normalization`` from ``rlhf_reward.json``.

    ``prompts`` are text (one user turn) or chat messages. One sequence at a time, no padding.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    meta = json.loads((Path(model_dir) / META_FILE).read_text())
    norm = meta.get("normalization") or {}
    offset, scale = float(norm.get("offset", 0.0)), float(norm.get("scale", 1.0)) or 1.0
    max_length = int(meta.get("max_length", 512))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    backbone = getattr(model, model.base_model_prefix)  # the decoder without its head (`model.score`)
    read_layers = meta.get("read_layers") or []
    if read_layers:
        from safetensors.torch import load_file

        head = load_file(str(Path(model_dir) / "rlhf_head.safetensors"))
        backbone.norm = torch.nn.Identity()  # the raw states of every layer, the last one too
    rewards = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ended = True if finished is None else bool(finished[i])
        text = prompt_text + response + (tokenizer.eos_token if ended else "")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        # The response starts where the tokens stop matching the prompt's alone (a tokenizer may
        # merge across the boundary); at least the last token is the response's.
        start = next(
            (j for j, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids))
        )
        start = min(start, len(ids) - 1)
        cut = max(len(ids) - max_length, 0)
        ids, start = ids[cut:], max(start - cut, 0)
        with torch.no_grad():
            out = backbone(input_ids=torch.tensor([ids]), output_hidden_states=bool(read_layers))
            if read_layers:
                pooled = torch.cat([out.hidden_states[layer][0, start:].mean(0) for layer in read_layers])
                reward = float(pooled @ head["weight"][0] + head["bias"][0])
            else:
                hidden = out.last_hidden_state[0]
                pooled = hidden[start:].mean(0) if meta.get("pooling", "last") == "mean" else hidden[-1]
                reward = float(model.score(pooled))
        rewards.append((reward - offset) / scale)
    return rewards
