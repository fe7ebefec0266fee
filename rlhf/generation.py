"""Sampling from a policy: the fast rollout sampler and ``rlhf generate`` (K candidates per prompt).

:func:`sample_responses` is the one sampling loop of the lab (PPO rollouts, candidate generation,
evaluation). It is a plain loop instead of ``model.generate`` because on a CPU ``generate``
spends most of its time in per-step bookkeeping (logits processors, stopping criteria, mask
rebuilding, the full-vocabulary logits of every prompt position): here generation ran at about a
third of the forward-pass rate. The loop:

1. one prefill forward over the left-padded batch, with ``position_ids`` from the attention mask
   and only the last position's logits computed;
2. per step, one forward of the last sampled token per row against the KV cache;
3. **batch shrinking**: rows that sampled EOS leave the batch (their KV cache rows are dropped),
   so the cost of a step falls as responses finish, and the loop stops when all are done;
4. sampling is inverse-CDF sampling from ``softmax(logits / temperature)`` (optionally top-k /
   top-p filtered); the returned log-prob of each sampled token is ``log_softmax(logits /
   temperature)`` of the *unfiltered* distribution, i.e. exactly what a training forward
   computes. Under pure sampling (the default, and the only setting PPO may use for its old
   log-probs, docs/ppo.md item 3) these are the sampling log-probs and PPO's first-minibatch ratio is 1.

Deviation from ``model.generate``: none in distribution (same logits, same sampling rule); the
random stream differs, so the same seed gives different (equally distributed) samples.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.adapters import num_virtual_tokens
from rlhf.cli import progress_bar
from rlhf.config import add_config_arguments, config_from_args, option
from rlhf.contracts import load_prompts, prompt_text
from rlhf.datafiles import write_jsonl
from rlhf.errors import ConfigError, UserError
from rlhf.models import (
    MIXED_PRECISION,
    MIXED_PRECISION_HELP,
    format_prompt,
    load_policy,
    resolve_model_path,
    use_bf16,
)
from rlhf.tracking import RunFields, stage_run_dir, start_stage


@dataclass
class Samples:
    """Sampled responses of one batch.

    tokens:   [B, T] long. Response tokens; everything after a row's first EOS is ``pad_token_id``
              (the EOS itself is kept). T ≤ max_new_tokens: the loop stops once every row ended.
    logprobs: [B, T] float32. ``log_softmax(logits / temperature)`` of each sampled token, 0 on pad.
    lengths:  [B] long. Response length per row including its EOS (the real tokens are
              ``tokens[i, :lengths[i]]``). Use this, not ``tokens != pad``, to build masks: a
              model may legitimately sample its pad token before stopping.
    finished: [B] bool. True when the row ended with EOS (False: cut off at max_new_tokens).
    values:   [B, T] float32 or None. With a ``value_head``: the head applied to the last hidden
              state that produced each token's logits (the value of the state before token t), 0 on pad.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    values: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] bool, True on real response tokens (up to and including the first EOS)."""
        t = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return t[None, :] < self.lengths[:, None]


@functools.cache
def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A KV-cache layer that writes into buffers sized for the whole rollout.

        transformers' ``DynamicLayer`` concatenates every new key/value onto the cache, copying
        the whole cache each step (10 % of a SmolLM2 decoding step at batch 32 with ~70 cached
        tokens, growing with length). Here keys/values live in ``[B, H, capacity, D]`` buffers
        and attention sees a view of the filled part. Installed only where every layer of the
        model's cache is a plain ``DynamicLayer`` (no sliding windows); otherwise the default
        cache is used.
        """

        is_croppable = False

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            b, h, _, d = key_states.shape
            self.dtype, self.device = key_states.dtype, key_states.device
            self._k = key_states.new_empty(b, h, self.capacity, d)
            self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            self.is_initialized = True

        def _views(self) -> None:
            self.keys = self._k[:, :, : self.length]
            self.values = self._v[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self.length + n > self.capacity:
                raise RuntimeError(f"KV cache capacity {self.capacity} exceeded")
            self._k[:, :, self.length : self.length + n] = key_states
            self._v[:, :, self.length : self.length + n] = value_states
            self.length += n
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def reset(self) -> None:
            self.length = 0
            super().reset()

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self._views()

    return PreallocatedLayer


def response_text(tokenizer, token_ids: list[int], finished: bool) -> str:
    """The text of a sampled response, as reward models train on it and score it.

    The stop token that ended a finished response is dropped (the reward model appends EOS back to
    finished responses only: docs/reward-models.md); special tokens the policy sampled mid-response
    are kept, so the text is what the policy wrote. ``rlhf generate`` and PPO's rollouts both decode
    through here, so training and scoring see the same bytes.
    """
    body = token_ids[:-1] if finished and token_ids else token_ids
    return tokenizer.decode(body, skip_special_tokens=False)


def _new_cache(model, capacity: int):
    """A DynamicCache for ``model``, with preallocated layers where that is safe (see above).
    ``capacity`` counts the caller's tokens; a virtual-token policy's own positions are added."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    capacity += num_virtual_tokens(model)

    config = getattr(model, "config", None)
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config the cache cannot read: let the model build its own cache
        return None
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer for layer in layers):
        layer_cls = _preallocated_layer_class()
        cache.layers = [layer_cls(capacity) for _ in layers]
    return cache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: tokens outside are set to -inf. logits: [B, V].

    top_k = 0 and top_p = 1.0 (the defaults) return ``logits`` unchanged (pure sampling).
    """
    if top_k and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass *before* it already reaches top_p (the top token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` [B, V]; return (tokens [B], logprobs [B]).

    ``uniform [B]`` in [0, 1): the random number of each row, given by the caller (per-row
    streams, see :func:`row_uniforms`); otherwise drawn from ``generator``.

    The log-prob is ``log_softmax(logits / temperature)`` of the sampled token under the
    *unfiltered* distribution (what a training forward computes). Sampling is by inverse CDF
    (one uniform per row, a cumulative sum and a binary search) instead of ``torch.multinomial``:
    on CPU ``multinomial`` draws an exponential variate for every vocabulary entry, which made it
    cost as much as the model's whole decoding step at batch 64 (94 ms vs 9 ms here, V = 49152).
    """
    scaled = logits.float() / temperature
    vmax = scaled.max(dim=-1, keepdim=True).values
    unnorm = (scaled - vmax).exp_()  # [B, V], in (0, 1]
    log_z = unnorm.sum(dim=-1, keepdim=True).log_()  # log-partition relative to vmax
    if top_k or top_p < 1.0:
        weights = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    else:
        weights = unnorm
    cdf = weights.cumsum_(dim=-1) if weights is unnorm else weights.cumsum(dim=-1)
    # u in (0, total]: the first index with cdf >= u always has positive weight.
    if uniform is None:
        uniform = torch.rand(cdf.shape[0], generator=generator, device=cdf.device)
    u = (1.0 - uniform.to(cdf.device, cdf.dtype)[:, None]) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)
    logp = scaled.gather(1, tok) - vmax - log_z
    return tok.squeeze(1), logp.squeeze(1)


def row_uniforms(row_seeds, steps: int) -> torch.Tensor:
    """``[B, steps]`` uniforms in [0, 1), row ``i`` from its own generator seeded ``row_seeds[i]``.

    A row's samples then depend only on its own seed and its own logits, never on which rows share
    its batch or how the rows are split into batches: evaluation gives the same responses at any
    batch size, and two policies sampled with the same seeds per prompt draw the same random
    numbers (common random numbers: their comparison has less variance).
    """
    return torch.stack(
        [torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in row_seeds]
    )


MIN_SHARED_PREFIX = 4  # shorter shared prefixes are not worth a second forward call


def common_prefix_length(seqs) -> int:
    """Length of the token prefix all ``seqs`` (token lists) share, leaving each ≥ 1 token of its own."""
    if not seqs:
        return 0
    first, n = seqs[0], max(min(len(s) for s in seqs) - 1, 0)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def split_common_prefix(
    query_ids: torch.Tensor, query_mask: torch.Tensor, min_len: int = MIN_SHARED_PREFIX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Split left-padded queries ``[B, L]`` into the prefix every row shares and the rest.

    Returns ``(prefix [1, P], rest [B, S], rest_mask [B, S])`` with the rest left-padded again, or
    None when fewer than ``min_len`` tokens are shared or there is only one row. Every row keeps at
    least one token in the rest (the prefill must end on each row's own last token).
    """
    if query_ids.shape[0] < 2:
        return None
    lengths = query_mask.long().sum(-1).tolist()
    rows = [ids[len(ids) - n :] for ids, n in zip(query_ids.tolist(), lengths)]  # real tokens
    n_pre = common_prefix_length(rows)
    if n_pre < min_len:
        return None
    s_width = max(lengths) - n_pre
    rest = query_ids.new_full((len(rows), s_width), rows[0][0])  # any valid id: masked out
    rest_mask = query_mask.new_zeros((len(rows), s_width))
    for i, row in enumerate(rows):
        n = len(row) - n_pre
        rest[i, s_width - n :] = query_ids[i, query_ids.shape[1] - n :]
        rest_mask[i, s_width - n :] = 1
    return query_ids.new_tensor([rows[0][:n_pre]]), rest, rest_mask


def shared_prefix_cache(model, prefix: torch.Tensor, n_rows: int, cache=None, lm: bool = True):
    """The KV cache of ``prefix [1, P]`` (positions 0..P-1), run once and repeated for ``n_rows`` rows.

    ``cache``: an empty cache to fill (e.g. preallocated), else the model makes one. The repeat is
    differentiable, so a training forward on top of it gets the gradients of the full sequences.
    ``lm``: ``model`` is a causal LM (only the last position's logits are computed) rather than a
    bare backbone.
    """
    n_pre = prefix.shape[1]
    out = model(
        input_ids=prefix,
        attention_mask=torch.ones_like(prefix),
        position_ids=torch.arange(n_pre, device=prefix.device)[None],
        past_key_values=cache,
        use_cache=True,
        **({"logits_to_keep": 1} if lm else {}),
    )
    cache = out.past_key_values
    cache.batch_repeat_interleave(n_rows)
    return cache


def sample_responses(
    model,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    value_head: torch.nn.Module | None = None,
    share_prefix: bool = True,
    row_seeds=None,
) -> Samples:
    """Sample responses for a left-padded batch of queries (see the module docstring).

    query_ids, query_mask: [B, L] (left padding: real tokens at the right end of each row).
    ``num_samples`` = n > 1 samples n responses per query from one prefill (the prompt's KV
    cache is copied n times): rows of the result are ``query 0 sample 0..n-1, query 1 ...``.
    Returns :class:`Samples` with tokens/logprobs [B·n, T], T ≤ max_new_tokens. The returned
    tensors are ordinary tensors (not inference-mode tensors), so a training pass may use them.

    ``value_head`` (a scalar head on the model's last hidden state, as PPO's shared value model):
    the values of every sampled state come out of the sampling forwards themselves, the same
    hidden states a full forward over query + response computes (up to float rounding of the
    KV-cached attention), so PPO needs no separate value pass over the rollout.

    ``share_prefix``: the token prefix all queries share is computed once (see
    :func:`split_common_prefix`); same distribution, less prefill.

    ``row_seeds`` (one int per output row, ``B·n``): each row draws from its own random stream
    (:func:`row_uniforms`) instead of ``generator``, so its response does not depend on the batch.
    """
    uniforms = None
    if row_seeds is not None:
        if len(row_seeds) != query_ids.shape[0] * num_samples:
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {query_ids.shape[0] * num_samples} rows")
        uniforms = row_uniforms(row_seeds, max(max_new_tokens, 0)).to(query_ids.device)
    with torch.inference_mode():
        s = _sample_loop(
            model,
            query_ids,
            query_mask,
            max_new_tokens,
            temperature,
            eos_token_id,
            pad_token_id,
            generator,
            top_k,
            top_p,
            num_samples,
            value_head,
            share_prefix,
            uniforms,
        )
    # Cloning outside inference mode turns inference tensors into normal ones: PPO feeds these
    # tokens to an autograd forward, which may not save inference tensors for backward.
    return Samples(
        *(t.clone() for t in (s.tokens, s.logprobs, s.lengths, s.finished)),
        values=s.values.clone() if s.values is not None else None,
    )


def _sample_loop(
    model,
    query_ids,
    query_mask,
    max_new_tokens,
    temperature,
    eos_token_id,
    pad_token_id,
    generator,
    top_k,
    top_p,
    num_samples,
    value_head=None,
    share_prefix=True,
    uniforms=None,
) -> Samples:
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use a small value such as 1e-4 for near-greedy)")
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    was_training = model.training
    model.eval()
    device = query_ids.device
    bsz = query_ids.shape[0] * num_samples
    mask = query_mask.to(device=device, dtype=torch.long)
    tokens = torch.full((bsz, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((bsz, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.full((bsz,), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    values = (
        torch.zeros((bsz, max_new_tokens), dtype=torch.float32, device=device)
        if value_head is not None
        else None
    )
    if max_new_tokens <= 0 or bsz == 0:
        return Samples(tokens[:, :0], logprobs[:, :0], lengths.zero_(), finished, values)
    hidden_kw = {"output_hidden_states": True} if value_head is not None else {}

    def state_values(out) -> torch.Tensor:
        return value_head(out.hidden_states[-1][:, -1, :]).squeeze(-1).float()

    # 1. prefill: positions count real tokens only, so left padding does not shift them.
    split = split_common_prefix(query_ids, mask) if share_prefix else None
    if split is None:
        input_ids, position_ids = query_ids, (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(model, capacity=query_ids.shape[1] + max_new_tokens)
    else:
        # The prompt prefix every row shares (the chat template's system prompt: 24 of ~36 tokens
        # on SmolLM2) runs once at batch 1 and its KV cache is copied to every row; then the rest
        # of each prompt runs against it. Layout [prefix | left-padded rest]: the mask carries the
        # padding in the middle and positions still count real tokens only.
        prefix, input_ids, rest_mask = split
        n_pre = prefix.shape[1]
        cache = _new_cache(model, capacity=n_pre + input_ids.shape[1] + max_new_tokens)
        cache = shared_prefix_cache(model, prefix, input_ids.shape[0], cache)
        mask = torch.cat([mask.new_ones(input_ids.shape[0], n_pre), rest_mask], dim=1)
        position_ids = n_pre + (rest_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        **hidden_kw,
    )
    cache = out.past_key_values
    logits = out.logits[:, -1, :]
    v = state_values(out) if value_head is not None else None
    next_pos = position_ids[:, -1:] + 1
    if num_samples > 1:
        v = v.repeat_interleave(num_samples, dim=0) if v is not None else None
        logits = logits.repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
        next_pos = next_pos.repeat_interleave(num_samples, dim=0)
        cache.batch_repeat_interleave(num_samples)
    rows = torch.arange(bsz, device=device)  # original row index of each row still sampling
    steps = max_new_tokens
    for t in range(max_new_tokens):
        u = uniforms[rows, t] if uniforms is not None else None
        tok, lp = sample_from_logits(logits, temperature, top_k, top_p, generator, uniform=u)
        tokens[rows, t] = tok
        logprobs[rows, t] = lp
        if values is not None:
            values[rows, t] = v
        done = tok == eos_token_id
        if bool(done.any()):
            finished[rows[done]] = True
            lengths[rows[done]] = t + 1
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                steps = t + 1
                break
            # 3. batch shrinking: finished rows leave the batch and the KV cache.
            rows, tok, mask, next_pos = rows[keep], tok[keep], mask[keep], next_pos[keep]
            cache.batch_select_indices(keep)
        if t == max_new_tokens - 1:
            break
        # 2. one decoding step for the rows still running.
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
            **hidden_kw,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        if value_head is not None:
            v = state_values(out)
        next_pos = next_pos + 1
    if was_training:
        model.train()
    return Samples(
        tokens[:, :steps],
        logprobs[:, :steps],
        lengths,
        finished,
        values[:, :steps] if values is not None else None,
    )


# ----------------------------------------------------------------------------- candidates


def _labels(k: int) -> list[str]:
    # Same labels as rlhf.rankings.labels_for (A, B, C, ...); K ≤ 26 is checked by the config.
    return [chr(ord("A") + i) for i in range(k)]


def generate_candidates(
    model,
    tokenizer,
    prompts: list[dict],
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    model_name: str = "",
    progress: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
    stats: dict | None = None,
) -> list[dict]:
    """K sampled responses per prompt, as records of the candidates contract.

    ``prompts`` are prompt records (``prompt_id``, ``prompt`` as text or chat messages).
    ``batch_size`` counts sequences: each sampler call takes ``max(1, batch_size // k)`` prompts
    and samples K responses for each from one prefill. Prompts are grouped by length (less
    padding) but the output keeps the input order. Same seed, same inputs and batch size →
    identical candidates. ``stats`` (optional dict) receives ``n_tokens`` and ``seconds``.
    """

    if not 1 <= k <= 26:
        raise UserError(f"k must be between 1 and 26 (one label per letter), got {k}", code="config")
    labels = _labels(k)
    gen = torch.Generator().manual_seed(seed)
    encoded = [
        tokenizer(format_prompt(tokenizer, p["prompt"]), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    per_call = max(1, batch_size // k)
    results: list[list[dict] | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    n_tokens, t0 = 0, time.perf_counter()
    bar = progress_bar(len(prompts) * k, "generate", "resp", enabled=progress)
    for start in range(0, len(order), per_call):
        idx = order[start : start + per_call]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[r, width - len(encoded[i]) :] = 1
        s = sample_responses(
            model,
            ids.to(device),
            mask.to(device),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            generator=gen,
            top_k=top_k,
            top_p=top_p,
            num_samples=k,
        )
        tokens, lengths, finished = s.tokens.cpu(), s.lengths.tolist(), s.finished.tolist()
        for r, i in enumerate(idx):
            cands = []
            for j in range(k):
                row = r * k + j
                n = lengths[row]
                cands.append(
                    {
                        "label": labels[j],
                        "text": response_text(tokenizer, tokens[row, :n].tolist(), finished[row]),
                        "model": model_name,
                        "gen": {
                            "temperature": temperature,
                            "max_new_tokens": max_new_tokens,
                            "seed": seed,
                            "finished": bool(finished[row]),
                            "n_tokens": int(n),
                        },
                    }
                )
                n_tokens += int(n)
            results[i] = cands
        bar.update(len(idx) * k)
        bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    if stats is not None:
        stats.update(n_tokens=n_tokens, seconds=time.perf_counter() - t0)
    return [
        {"prompt_id": p["prompt_id"], "prompt": p["prompt"], "candidates": results[i]}
        for i, p in enumerate(prompts)
    ]


# ----------------------------------------------------------------------------- `rlhf generate`


@dataclass
class GenerateConfig(RunFields):
    model: str = option(
        "smollm2-135m-instruct",
        help="policy to sample from: alias (smollm2-135m-instruct, tiny), model/policy dir or Hub id",
    )
    prompts: str = option(
        "lab:prompts",
        help="prompts: .jsonl/.json/.parquet file, saved dataset dir, Hub id "
        "or lab:prompts (the shipped prompts)",
    )
    split: str | None = option("train", help="only prompts of this split (null: all)")
    limit: int | None = option(None, help="use only the first N prompts (null: all)")
    k: int = option(4, help="candidates per prompt (2..26; labelled A, B, C, ...)")
    max_new_tokens: int = option(64, help="maximum response length in tokens")
    temperature: float = option(1.0, help="sampling temperature (> 0)")
    top_p: float = option(1.0, help="nucleus sampling mass (1.0 = off: pure sampling)")
    top_k: int = option(0, help="sample only from the k most likely tokens (0 = off: pure sampling)")
    batch_size: int = option(16, help="sequences per sampling batch (prompts per batch = batch_size // k)")
    mixed_precision: str = option(
        "auto",
        help="sample with the weights cast to bf16 (2.2× faster than fp32 on an AMX CPU at batch 64; "
        "autocast over fp32 weights was slower than fp32 there). " + MIXED_PRECISION_HELP,
        choices=MIXED_PRECISION,
    )
    seed: int = option(0, help="random seed: the same seed gives the same candidates")
    out: str | None = option(None, help="output JSONL (default: <run_dir>/candidates.jsonl)")

    def validate(self) -> None:
        if not 2 <= self.k <= 26:
            raise ConfigError(f"k: {self.k} is out of range; K must be between 2 and 26 (labels A..Z)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: {self.max_new_tokens} must be at least 1")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: {self.temperature} must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k: {self.top_k} must be >= 0 (0 = off)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: {self.batch_size} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: {self.limit} must be at least 1 (or null for all prompts)")
        if self.out is not None and not self.out.endswith(".jsonl"):
            raise ConfigError(f"out: {self.out!r} must be a .jsonl path")


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """The ``generate`` stage: K candidates per prompt → ``candidates.jsonl`` (+ W&B run)."""

    cfg.validate()
    # Inputs are checked before anything is written or loaded: bad prompts → one line, no run dir.
    prompts = load_prompts(cfg.prompts, split=cfg.split)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise UserError(
            f"no prompts in {cfg.prompts!r}" + (f" with split {cfg.split!r}" if cfg.split else ""),
            code="no_prompts",
        )
    resolve_model_path(cfg.model)  # unknown model / corrupt cache fail here, before the run starts
    out = Path(cfg.out) if cfg.out else stage_run_dir(cfg, "generate") / "candidates.jsonl"
    tracker = start_stage(cfg, "generate")
    try:
        if Path(cfg.prompts).exists():
            tracker.use_artifact(cfg.prompts, name="prompts", type="dataset")
        model, tokenizer = load_policy(cfg.model, merged=True)
        bf16 = use_bf16(cfg.mixed_precision, next(model.parameters()).device)
        if bf16:
            model = model.to(torch.bfloat16)
        stats: dict[str, float] = {}
        records = generate_candidates(
            model,
            tokenizer,
            prompts,
            k=cfg.k,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            model_name=cfg.model,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            stats=stats,
        )
        write_jsonl(out, records)
        cands = [c for r in records for c in r["candidates"]]
        metrics = {
            "gen/tokens_per_s": stats["n_tokens"] / max(stats["seconds"], 1e-9),
            "gen/n_tokens": stats["n_tokens"],
            "gen/seconds": stats["seconds"],
            "gen/n_prompts": len(records),
            "gen/n_candidates": len(cands),
            "gen/eos_rate": sum(c["gen"]["finished"] for c in cands) / len(cands),
            "gen/bf16": int(bf16),
            "gen/length_mean": sum(c["gen"]["n_tokens"] for c in cands) / len(cands),
        }
        tracker.log(metrics)

        tracker.log_table(
            "gen/samples",
            ["prompt_id", "prompt", "label", "response", "n_tokens", "finished"],
            [
                [
                    r["prompt_id"],
                    prompt_text(r["prompt"]),
                    c["label"],
                    c["text"],
                    c["gen"]["n_tokens"],
                    c["gen"]["finished"],
                ]
                for r in records[:8]
                for c in r["candidates"]
            ],
        )
        tracker.log_artifact(
            out,
            name=f"{cfg.experiment}-candidates",
            type="dataset",
            metadata={
                "model": cfg.model,
                "k": cfg.k,
                "n_prompts": len(records),
                "seed": cfg.seed,
                "temperature": cfg.temperature,
            },
        )
        tracker.summary(metrics)
        print(
            f"generate: {len(records)} prompts × {cfg.k} candidates → {out} "
            f"({metrics['gen/tokens_per_s']:.1f} tokens/s, EOS rate {metrics['gen/eos_rate']:.2f})"
        )
        return {"run_dir": str(tracker.run_dir), "candidates": str(out), **metrics}
    finally:
        tracker.finish()


def _cmd_generate(args: argparse.Namespace) -> int:

    run_generate(config_from_args(args, GenerateConfig))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:

    parser = subparsers.add_parser(
        "generate",
        help="sample K candidate responses per prompt from a policy",
        description=(
            "Sample K candidate responses per prompt from a policy (batched, KV cache, pure sampling "
            "by default, seeded) and write them as candidates JSONL (prompt_id, prompt, candidates "
            "[{label, text, model, gen}]) for annotation or simulated rankings. Shows a progress bar "
            "with tokens/s; logs tokens/s and a sample table to W&B (offline unless configured) and "
            "the candidates file as a dataset artifact."
        ),
    )
    add_config_arguments(parser, GenerateConfig)
    parser.set_defaults(func=_cmd_generate)
    return parser
