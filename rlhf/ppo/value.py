"""The policy and its value function as one trainable module, plus the scoring forward passes.

Two value models (docs/ppo.md item 14):

- ``critic``: a separate backbone with a scalar head, initialised from the reward model's
  backbone (the N+ default) when the reward model shares the policy's tokenizer, else from a
  copy of the policy's backbone. One extra forward/backward per micro-batch.
- ``shared``: a scalar head on the policy's own last hidden state. The value costs one linear
  layer on a forward the policy does anyway — the cheap choice on a CPU.

The head is zero-initialised (values start at 0, so the first advantages are the rewards
themselves and the value loss starts small). Dropout is off in every model (the lab's loaders
set it to 0): with dropout, the first-minibatch ratio would not be 1 and the KL would be noise.

Every forward here takes a left-padded query and a right-padded response and computes
``position_ids`` from the attention mask (docs/ppo.md item 2), and only the logits of the response
positions (``logits_to_keep``, as :func:`rlhf.sampling.last_positions`), which skips the large vocabulary projection over the prompt.
The prompt prefix all queries share runs once per forward (:func:`forward_query_response`).
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from rlhf.models import FrozenLinearsInBF16
from rlhf.ppo.math import logprobs_from_logits
from rlhf.sampling import last_positions, shared_prefix_cache, split_common_prefix


def concat_query_response(
    query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, Q]`` + ``[B, T]`` → ``(input_ids, attention_mask, position_ids)`` each ``[B, Q+T]``."""
    input_ids = torch.cat([query, response], dim=1)
    attn = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attn, position_ids


def forward_query_response(
    model: nn.Module,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
    lm: bool = True,
    **kwargs,
):
    """``model`` over query + response; outputs cover the last positions only (see below).

    The token prefix every query shares (the chat template's system prompt: 24 of ~36 prompt
    tokens on SmolLM2) runs once at batch 1 and its KV cache is repeated for every row, then the
    rest of each query plus its response runs against it: the same function of the inputs (and,
    through the repeated cache, the same gradients), with far fewer token forwards. The outputs
    (logits, hidden states) cover the rest + response positions, so callers index them from the
    end (the last ``T + 1`` positions are always there: each row keeps ≥ 1 query token).
    ``lm``: the model is a causal LM (takes ``logits_to_keep``) rather than a bare backbone.
    """
    split = split_common_prefix(query, query_mask)
    if split is None:
        input_ids, attn, pos = concat_query_response(query, query_mask, response, response_mask)
        return model(input_ids=input_ids, attention_mask=attn, position_ids=pos, **kwargs)
    prefix, rest, rest_mask = split
    n_pre = prefix.shape[1]
    cache = shared_prefix_cache(model, prefix, query.shape[0], lm=lm)
    tail_mask = torch.cat([rest_mask.long(), response_mask.long()], dim=1)
    attn = torch.cat([tail_mask.new_ones(query.shape[0], n_pre), tail_mask], dim=1)
    pos = n_pre + (tail_mask.cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=torch.cat([rest, response], dim=1),
        attention_mask=attn,
        position_ids=pos,
        past_key_values=cache,
        **kwargs,
    )


class PolicyAndValue(nn.Module):
    """Policy LM + value head (+ optional separate critic backbone), trained by one optimiser."""

    def __init__(self, policy: nn.Module, value_head: nn.Linear, critic: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic = critic

    def forward(self, query, query_mask, response, response_mask, need_logits: bool = True):
        """Response logits ``[B, T, V]`` (None when not needed) and values ``[B, T]``.

        Position ``t`` of the outputs is the state *before* response token ``t`` (the logits that
        sampled it and the value of that state).
        """
        T = response.shape[1]
        keep = last_positions(T + 1 if need_logits else 1)
        qr = (query, query_mask, response, response_mask)
        if self.critic is None:
            out = forward_query_response(self.policy, *qr, output_hidden_states=True, logits_to_keep=keep)
            hidden = out.hidden_states[-1]
        else:
            out = forward_query_response(self.policy, *qr, logits_to_keep=keep) if need_logits else None
            hidden = forward_query_response(self.critic, *qr, lm=False).last_hidden_state
        values = self.value_head(hidden[:, -(T + 1) : -1]).squeeze(-1).float()
        logits = out.logits[:, :-1] if need_logits else None
        return logits, values


def make_value_head(hidden_size: int) -> nn.Linear:
    """A zero-initialised scalar head (values start at exactly 0)."""
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


@torch.no_grad()
def response_logprobs(
    model: nn.Module,
    query,
    query_mask,
    response,
    response_mask,
    temperature: float,
    micro_batch_size: int = 0,
) -> torch.Tensor:
    """Log-probs ``[B, T]`` of the response tokens under ``model`` at ``temperature`` (0 on padding)."""
    B = query.shape[0]
    step = micro_batch_size or B
    parts = []
    for i in range(0, B, step):
        q, qm, r, rm = (
            query[i : i + step],
            query_mask[i : i + step],
            response[i : i + step],
            response_mask[i : i + step],
        )
        logits = forward_query_response(
            model, q, qm, r, rm, logits_to_keep=last_positions(r.shape[1] + 1)
        ).logits[:, :-1]
        parts.append(logprobs_from_logits(logits, r, temperature) * rm.to(torch.float32))
    return torch.cat(parts, dim=0)


@torch.no_grad()
def values_and_logprobs(
    pv: PolicyAndValue,
    query,
    query_mask,
    response,
    response_mask,
    order: torch.Tensor,
    micro_batch_size: int,
    temperature: float,
    need_logprobs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and (when ``need_logprobs``) log-probs ``[B, T]`` of every response through ``pv``'s
    training forward, in micro-batches of the rows ``order`` lists, in that order (PPO passes its first
    epoch's shuffle: a micro-batch's padding depends on its rows and bf16 rounds by grouping, so only
    the same grouping as training's reproduces training's numbers). Log-probs are 0 when not needed.
    """
    values = torch.zeros_like(response, dtype=torch.float32)
    logprobs = torch.zeros_like(response, dtype=torch.float32)
    for i in range(0, len(order), micro_batch_size):
        rows = order[i : i + micro_batch_size]
        logits, v = pv(
            query[rows], query_mask[rows], response[rows], response_mask[rows], need_logits=need_logprobs
        )
        values[rows] = v.float()
        if need_logprobs:
            logprobs[rows] = logprobs_from_logits(logits, response[rows], temperature)
    return values, logprobs


def hidden_size_of(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)


class merged_lora:
    """Context manager: the adapter (LoRA or IA3) folded into the base weights, then the base restored *exactly*.

    Sampling through unmerged LoRA layers costs an extra pair of small matmuls per layer and step,
    which on a CPU more than doubled rollout time; merged, generation runs at the plain model's
    speed. PEFT's ``unmerge_adapter`` subtracts the delta again, which leaves float rounding in the
    base weights — and the base *is* the reference policy — so each merge goes into a copy of the
    base weight and the base's own tensor is put back afterwards (bit-identical reference for the
    whole run). With ``frozen`` (the base kept in bf16 under autocast,
    :class:`rlhf.models.FrozenLinearsInBF16`) the adapter is merged into the fp32 weight and the sum
    rounded to bf16 once, as autocast would round the fp32 merged weight: the same samples as an
    fp32 base under autocast, bit for bit. A model without LoRA layers passes through unchanged.
    """

    def __init__(self, model: nn.Module, frozen: FrozenLinearsInBF16 | None = None):
        self.model = model
        self.frozen = frozen
        self.layers = []
        if hasattr(model, "peft_config"):
            self.layers = [m.get_base_layer() for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        if self.layers:
            self.saved = [layer.weight.data for layer in self.layers]
            for layer, weight in zip(self.layers, self.saved):
                fp32 = self.frozen.fp32_weight(layer) if self.frozen is not None else None
                layer.weight.data = (fp32 if fp32 is not None else weight).clone()
            self.model.merge_adapter()
            for layer, weight in zip(self.layers, self.saved):
                layer.weight.data = layer.weight.data.to(weight.dtype)
        return self.model

    def __exit__(self, *exc):
        if self.layers:
            with (
                warnings.catch_warnings()
            ):  # IA3's "unmerge can be inaccurate": putting the tensors back makes it exact
                warnings.filterwarnings("ignore", message="Unmerge result can be inaccurate")
                self.model.unmerge_adapter()  # bookkeeping (merged_adapters) ...
            for layer, weight in zip(self.layers, self.saved):  # ... and the base's own tensors
                layer.weight.data = weight
            self.saved = []
        return False
