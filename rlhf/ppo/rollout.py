"""Queries in, sampled and truncated responses out: the pieces of a rollout shared by PPO and ``rlhf eval``,
and :class:`UpdateBatch`, a PPO update's episodes once scored (what its epochs train on)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.models import format_prompt
from rlhf.ppo.math import truncate_after_stop
from rlhf.sampling import response_text, sample_responses


def encode_queries(tokenizer, prompts: list, max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt as the policy sees it (chat template + generation prompt).

    Long prompts keep their *last* ``max_prompt_tokens`` tokens, so the generation prompt
    (``<|im_start|>assistant\\n``) is never cut off.
    """
    out = []
    for p in prompts:
        ids = tokenizer(format_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
        out.append(ids[-max_prompt_tokens:] if max_prompt_tokens > 0 else ids)
    return out


def left_pad(seqs: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists → ``(ids [B, L], mask [B, L])`` (docs/ppo.md item 2: generation needs left padding)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s) :] = 1
    return ids, mask


@dataclass
class Rollout:
    """Responses of a batch, truncated after the first stop token.

    tokens [B, T] (pad after the stop), mask [B, T] (1 on kept tokens, the stop included),
    logprobs [B, T] (sampling log-probs at the temperature, 0 on padding), has_stop [B],
    values [B, T] (0 on padding) when a value head was given to :func:`sample_rollout`, else None.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    has_stop: torch.Tensor
    values: torch.Tensor | None = None


@dataclass
class UpdateBatch:
    """The episodes of one PPO update on this process, scored: what the PPO epochs train on and the
    update's metrics describe.

    query, query_mask [B, Q] (left-padded); response, response_mask [B, T]; per response token
    [B, T], 0 on padding: mask (float), old_logprobs, values, advantages (whitened when asked),
    returns, kl, non_score_rewards (−β·kl); per episode [B]: has_stop, raw_scores (the reward
    function's), scores (clipped and penalised), disagreement (a reward ensemble's spread, else None).
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    mask: torch.Tensor
    has_stop: torch.Tensor
    old_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    non_score_rewards: torch.Tensor
    disagreement: torch.Tensor | None


@torch.no_grad()
def sample_rollout(
    model,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    stop_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None,
    batch_size: int = 0,
    value_head: torch.nn.Module | None = None,
    row_seeds: list[int] | None = None,
    on_batch: Callable[[int], object] | None = None,
) -> Rollout:
    """Pure sampling (top_k = 0, top_p = 1: docs/ppo.md item 3), in chunks of ``batch_size`` rows.

    Every chunk is padded to ``max_new_tokens`` columns so chunks concatenate. With a
    ``value_head`` (PPO's shared value model) the values come from the sampling forwards.
    ``row_seeds`` (one per query): each row samples from its own random stream, so a row's
    response does not depend on the chunking (evaluation); otherwise ``generator`` is used.
    ``on_batch(n)`` is called after each chunk of ``n`` rows (a progress bar's ``update``).
    """
    B = query.shape[0]
    step = batch_size or B
    toks, lps, vals = [], [], []
    for i in range(0, B, step):
        s = sample_responses(
            model,
            query[i : i + step],
            query_mask[i : i + step],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=stop_token_id,
            pad_token_id=pad_token_id,
            generator=generator,
            top_k=0,
            top_p=1.0,
            value_head=value_head,
            row_seeds=row_seeds[i : i + step] if row_seeds is not None else None,
        )
        pad = max_new_tokens - s.tokens.shape[1]
        toks.append(torch.nn.functional.pad(s.tokens, (0, pad), value=pad_token_id))
        lps.append(torch.nn.functional.pad(s.logprobs, (0, pad), value=0.0))
        if s.values is not None:
            vals.append(torch.nn.functional.pad(s.values, (0, pad), value=0.0))
        if on_batch is not None:
            on_batch(s.tokens.shape[0])
    tokens, mask = truncate_after_stop(torch.cat(toks), stop_token_id, pad_token_id)
    logprobs = torch.cat(lps) * mask
    values = torch.cat(vals) * mask if vals else None
    has_stop = (tokens == stop_token_id).any(-1)
    # Drop columns that are padding in every row (all responses stopped early): shorter passes.
    width = max(int(mask.sum(-1).max()), 1)
    return Rollout(
        tokens[:, :width],
        mask[:, :width],
        logprobs[:, :width],
        has_stop,
        values[:, :width] if values is not None else None,
    )


def decode_responses(
    tokenizer, tokens: torch.Tensor, mask: torch.Tensor, has_stop: torch.Tensor
) -> list[str]:
    """Text of each response for the reward function and scorers, exactly as ``rlhf generate``
    writes candidates (:func:`rlhf.sampling.response_text`); whether a response ended is passed
    along separately (``has_stop``)."""
    lengths = mask.sum(-1).tolist()
    return [
        response_text(tokenizer, tokens[i, : int(n)].tolist(), bool(stop))
        for i, (n, stop) in enumerate(zip(lengths, has_stop.tolist()))
    ]
