"""Sampling from a policy: the lab's one sampling loop (PPO rollouts, candidate generation, evaluation).

:func:`sample_responses` is the one sampling loop of the lab (PPO rollouts, candidate generation,
evaluation). It is a plain loop instead of ``model.generate`` because on a CPU ``generate``
spends most of its time in per-step bookkeeping (logits processors, stopping criteria, mask
rebuilding, the full-vocabulary logits of every prompt position): here generation ran at about a
third of the forward-pass rate. The loop:

1. one prefill forward over the left-padded batch, with ``position_ids`` from the attention mask
   and only the last position's logits computed;
2. per step, one forward of the last sampled token per row against the KV cache;
3. **batch shrinking**: rows that sampled EOS stop sampling at once; they leave the batch (their
   KV cache rows are dropped) once a share :data:`SHRINK_AT` of it has finished, since a shrink
   copies the whole cache, so the cost of a step falls as responses finish, and the loop stops
   when all are done; the
   one-token steps run the lab's own attention over the key/value heads (:func:`_decode_attention`);
4. sampling is inverse-CDF sampling from ``softmax(logits / temperature)`` (optionally top-k /
   top-p filtered); the returned log-prob of each sampled token is ``log_softmax(logits /
   temperature)`` of the *unfiltered* distribution, i.e. exactly what a training forward
   computes. Under pure sampling (the default, and the only setting PPO may use for its old
   log-probs, docs/ppo.md item 3) these are the sampling log-probs and PPO's first-minibatch ratio is 1.

Deviation from ``model.generate``: none in distribution (same logits, same sampling rule); the
random stream differs, so the same seed gives different (equally distributed) samples.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlhf.adapters import num_virtual_tokens


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


def _decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of one new token per row against the KV cache; anything else is transformers' SDPA.

    A decoding step of a grouped-query model (SmolLM2: 9 query heads share 3 key/value heads) has
    one query per head. When the batch has no padding, transformers passes no mask and asks
    PyTorch's SDPA for ``enable_gqa``; on a CPU that kernel took 5.7 ms a layer in bf16 (batch 128,
    90 cached tokens; its packed path with a mask 1.8 ms) against 1.0 ms for the two matmuls here,
    which group each key/value head's queries together. The scores are computed as keys ·
    queriesᵀ, not queries · keysᵀ: bmm copies a cache view (the preallocated buffers leave a gap
    after the filled part) into a contiguous batch either way, and a transposed view's copy cost
    about twice a straight one (a generate batch of 128 rows × 48 tokens 1.11× faster, the same
    answers). Scores and softmax are in fp32; the output is the same function as SDPA's, rounded
    differently.
    """
    if query.shape[2] != 1 or dropout or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    # Head h reads key/value head h // groups: each key/value head's queries as one [groups, dim] matrix.
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scale = dim**-0.5 if scaling is None else scaling
    scores = torch.matmul(key, grouped.transpose(-1, -2)).transpose(-1, -2).float() * scale
    if attention_mask is not None:
        mask = attention_mask[..., -1:, :kv_len]  # [B, 1, 1, S]: the new token's row
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    return out.reshape(batch, 1, heads, dim), None


_DECODE_ATTENTION = "rlhf_decode"


@functools.cache
def _register_decode_attention() -> str:
    AttentionInterface.register(_DECODE_ATTENTION, _decode_attention)
    AttentionMaskInterface.register(_DECODE_ATTENTION, sdpa_mask)  # the masks SDPA gets
    return _DECODE_ATTENTION


# False inside transformers_decoding(): the sampler then leaves the model's attention as it is.
_OWN_DECODING = contextvars.ContextVar("rlhf_own_decoding", default=True)


@contextlib.contextmanager
def transformers_decoding():
    """Within the block the sampler decodes with transformers' own SDPA, as it did before it had
    :func:`_decode_attention`: the baseline of ``experiments/benchmarks/bench_decode_attention.py``."""
    token = _OWN_DECODING.set(False)
    try:
        yield
    finally:
        _OWN_DECODING.reset(token)


# The attention implementations the sampler replaces with its own while it decodes: SDPA, and the
# eager attention PPO may train through (rlhf.models.attention_if_faster). Calls other than a
# one-token decoding step (the prompt's prefill) then run SDPA, so a model samples the same either way.
_REPLACED_WHILE_DECODING = ("sdpa", "eager")


@contextlib.contextmanager
def _decode_attention_for(model):
    """Within the block, a model that runs transformers' SDPA (or eager attention) runs
    :func:`_decode_attention`; the model's own setting comes back afterwards."""
    config = getattr(model, "config", None)
    own = getattr(config, "_attn_implementation", None)
    if not _OWN_DECODING.get() or own not in _REPLACED_WHILE_DECODING:
        yield
        return
    config._attn_implementation = _register_decode_attention()
    try:
        yield
    finally:
        config._attn_implementation = own


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


class SamplingWorkspace:
    """Float buffers for :func:`sample_from_logits`, reused across the steps of one sampling loop.

    Each step's float copy of the logits and its exponentials are ``[B, V]`` (25 MB at batch 128 and
    SmolLM2's 49,152 tokens). Allocated anew every step, such tensors come fresh from the operating
    system and every page faults on first touch: with bf16 weights that made the sampling 12 % of a
    decoding step, against 5–6 % with these buffers (the same numbers, bit for bit). The batch only
    shrinks during a loop, so a step uses the first rows of the buffers. Without a workspace each
    call allocates its own, as before.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A float32 tensor of ``like``'s shape: the first rows of the named buffer."""
        rows, cols = like.shape
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(rows, cols, dtype=torch.float32, device=like.device)
        return buf[:rows]

    def as_float(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` as float32: itself when it already is (never written to), else a buffer copy."""
        if logits.dtype == torch.float32:
            return logits
        return self.buffer("scaled", logits).copy_(logits)


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
    workspace: SamplingWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` [B, V]; return (tokens [B], logprobs [B]).

    ``uniform [B]`` in [0, 1): the random number of each row, given by the caller (per-row
    streams, see :func:`row_uniforms`); otherwise drawn from ``generator``. ``workspace``: buffers
    the float copies of the logits are written into instead of new tensors (the same numbers).

    The log-prob is ``log_softmax(logits / temperature)`` of the sampled token under the
    *unfiltered* distribution (what a training forward computes). Sampling is by inverse CDF
    (one uniform per row, a cumulative sum and a binary search) instead of ``torch.multinomial``:
    on CPU ``multinomial`` draws an exponential variate for every vocabulary entry, which made it
    cost as much as the model's whole decoding step at batch 64 (94 ms vs 9 ms here, V = 49152).
    """
    ws = workspace or SamplingWorkspace()
    scaled = ws.as_float(logits)
    if temperature != 1.0:  # x / 1 is x: skip a pass over [B, V] (about a tenth of the sampling's time)
        scaled = scaled / temperature
    vmax = scaled.max(dim=-1, keepdim=True).values
    unnorm = torch.sub(scaled, vmax, out=ws.buffer("unnorm", scaled)).exp_()  # [B, V], in (0, 1]
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

    A row's random numbers then depend only on its own seed, never on which rows share its batch or
    how the rows are split into batches, and two policies sampled with the same seeds per prompt
    draw the same random numbers (common random numbers: their comparison has less variance). Its
    logits are another matter: the kernels round a row by the shape of its batch (padding, matrix
    sizes). In fp32 that rarely moves a sample (the tiny model: the same responses at any batch
    size, tested; SmolLM2: 46 of 48 identical between batches of 48 and 16), with bf16 weights it
    moves most of them (0 of 48): other batches then sample other answers from the same
    distribution (docs/ppo.md, "Evaluation").
    """
    return torch.stack(
        [torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in row_seeds]
    )


# The share of the batch that must have finished before the finished rows leave it
# (:func:`sample_responses`, step 3). A shrink copies every layer's whole KV cache: done at each
# finish it was a fifth of a SmolLM2 generate batch's time (128 rows × 48 tokens, bf16 weights, AMX
# Xeon), while a finished row left in the batch costs little (the weights are read for the batch
# anyway). 128 prompts × 4 answers took 23.9–25.6 s at 0.1 against 27.2–29.0 s shrinking at every
# finish (0.25: 25.1 s; never: 26.5 s), the same answers byte for byte (docs/environment.md).
SHRINK_AT = 0.1

MIN_SHARED_PREFIX = 4  # shorter shared prefixes are not worth a second forward call


def last_positions(n: int) -> torch.Tensor:
    """``logits_to_keep`` for a model's last ``n`` positions: an index tensor rather than the int ``n``.

    Given an int, transformers slices the hidden states (``h[:, -n:]``), a strided view. When the
    output layer's weight does not require grad (a frozen or merged policy, as every policy the lab
    samples from or scores with), PyTorch's matmul does not fold a strided 3-D input into one matrix
    product: it broadcasts the output layer to every row, copying the whole vocabulary matrix once
    per row. SmolLM2's last position for 32 prompts took 1.6 s instead of 9 ms with bf16 weights on 2
    cores, 8 responses' 49 positions 421 ms instead of 68 ms (autocast hides it: its cast of the
    input is a contiguous copy). Indexing makes the slice a contiguous copy and the projection one
    matrix product. Negative indices count from the end, as the int does.
    """
    return torch.arange(-n, 0)


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
        **({"logits_to_keep": last_positions(1)} if lm else {}),
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
    (:func:`row_uniforms`) instead of ``generator``, so its random numbers do not depend on the
    batch (its rounding may: see there).
    """
    uniforms = None
    if row_seeds is not None:
        if len(row_seeds) != query_ids.shape[0] * num_samples:
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {query_ids.shape[0] * num_samples} rows")
        uniforms = row_uniforms(row_seeds, max(max_new_tokens, 0)).to(query_ids.device)
    with torch.inference_mode(), _decode_attention_for(model):
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
        logits_to_keep=last_positions(1),
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
    rows = torch.arange(bsz, device=device)  # original row index of each row in the batch
    live = None  # the batch positions of the rows still sampling, while finished ones stay in it
    workspace = SamplingWorkspace()
    steps = max_new_tokens

    def of_live(x: torch.Tensor) -> torch.Tensor:
        """``x``'s rows of the rows still sampling (all of ``x`` when every row in the batch is)."""
        return x if live is None else x[live]

    for t in range(max_new_tokens):
        live_rows = of_live(rows)
        u = uniforms[live_rows, t] if uniforms is not None else None
        tok, lp = sample_from_logits(
            of_live(logits), temperature, top_k, top_p, generator, uniform=u, workspace=workspace
        )
        tokens[live_rows, t] = tok
        logprobs[live_rows, t] = lp
        if values is not None:
            values[live_rows, t] = of_live(v)
        done = tok == eos_token_id
        if bool(done.any()):
            finished[live_rows[done]] = True
            lengths[live_rows[done]] = t + 1
            still = (~done).nonzero().squeeze(1)
            if still.numel() == 0:
                steps = t + 1
                break
            live = still if live is None else live[still]
            tok = tok[still]
            # 3. batch shrinking: finished rows leave the batch and the KV cache, once enough of
            # them have (each shrink copies the whole cache).
            if rows.shape[0] - live.numel() >= max(1, int(rows.shape[0] * SHRINK_AT)):
                rows, mask, next_pos = rows[live], mask[live], next_pos[live]
                cache.batch_select_indices(live)
                live = None
        if t == max_new_tokens - 1:
            break
        if live is not None:  # finished rows still in the batch take a pad token, their outputs unread
            tok = tok.new_full((rows.shape[0],), pad_token_id).index_copy_(0, live, tok)
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
