"""The math of PPO for RLHF, as small pure functions (no models, no I/O).

Shapes use ``B`` = batch (sequences), ``T`` = response tokens, ``V`` = vocabulary. ``mask`` is a
``[B, T]`` tensor of 1 (valid response token, the stop token included) and 0 (padding after it).

Sources: OpenAI lm-human-preferences (``policy.py``, ``train_policy.py``), "The N Implementation
Details of RLHF with PPO" (Huang et al. 2023), "The N+ Implementation Details ... TL;DR"
(arXiv:2403.17031), Schulman et al. 2015 (GAE), Ziegler et al. 2019 (adaptive KL), Schulman's
"Approximating KL divergence" note (k1/k3 estimators).

Deviations from the N+ reference code, on purpose:
- GAE is computed in closed form (a discount matrix) instead of a Python loop over time; the loop
  version is kept as :func:`gae_reference` and the tests check they agree.
- Losses are *sums* over valid tokens divided by a caller-given token count (``n_tokens``), so a
  minibatch split into micro-batches gives exactly the same gradient as the whole minibatch
  (the reference code averages per micro-batch, which is only equal when lengths are equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over entries where ``mask`` is 1. ``x``, ``mask``: same shape."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid entries (``[B, T]`` → scalar, or reduced along ``dim``).

    An all-masked input gives 0 rather than NaN (an empty micro-batch must not poison a run).
    """
    mask = mask.to(x.dtype)
    total = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / total.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over valid entries (scalar). Bessel-corrected when ``unbiased``."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n <= 1:
            return var
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x - mean) / std`` with statistics over valid entries only; padded entries become 0.

    ``shift_mean=False`` only rescales (used for rewards in some recipes; advantages shift too).
    Whitening over padding would pull the mean towards 0 and shrink the std (docs/ppo.md item 12).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over valid tokens (scalar; 1 = perfect critic).

    Returns 0 when the returns have no variance (nothing to explain).
    """
    var_ret = masked_var(returns, mask, unbiased=False)
    if var_ret <= 0:
        return torch.zeros((), dtype=values.dtype)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_ret


# ----------------------------------------------------------------------------- log-probs, entropy, KL


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each ``tokens[b, t]`` under ``softmax(logits[b, t] / temperature)``.

    ``logits``: ``[B, T, V]``; ``tokens``: ``[B, T]`` → ``[B, T]``. The temperature must be the
    sampling temperature in every pass (rollout, reference, training: docs/ppo.md item 4), otherwise the
    ratio and the KL compare two different distributions.
    """
    return logprobs_and_entropy(logits, tokens, temperature, entropy=False)[0]


def logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`logprobs_from_logits` and the entropy of ``softmax(logits / temperature)`` at each
    position (``[B, T]``, without grad: a statistic), from one log-softmax over the vocabulary. The
    entropy used to repeat the cast, the division and the log-softmax over ``[B, T, V]``: on
    SmolLM2 that cost about 0.7 s of a 16 s PPO training phase (2 cores), for the same numbers.
    ``entropy=False``: None in its place.
    """
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = torch.gather(logp_all, 2, tokens.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logp, None
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) from samples of the policy. ``[B, T]`` → ``[B, T]``.

    - ``k1`` = ``logp - ref_logp``: unbiased, can be negative per token (docs/ppo.md item 9 default).
    - ``k3`` = ``(r - 1) - log r`` with ``r = exp(ref_logp - logp)``: unbiased, always ≥ 0, lower
      variance (Schulman's note).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


# ----------------------------------------------------------------------------- responses


def first_true_index(x: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, or the length when there is none. ``[B, T]`` → ``[B]``."""
    T = x.shape[-1]
    idx = torch.arange(T, device=x.device).expand_as(x)
    return torch.where(x, idx, torch.full_like(idx, T)).min(-1).values


def truncate_after_stop(
    tokens: torch.Tensor, stop_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first stop token; pad the rest (docs/ppo.md item 6).

    ``tokens``: ``[B, T]`` → ``(truncated [B, T], mask [B, T])``; the mask marks the kept tokens
    (computed from positions, so a sampled pad id before the stop still counts as a token).
    """
    stop_at = first_true_index(tokens == stop_token_id)  # T when the response never stopped
    lengths = torch.clamp(stop_at + 1, max=tokens.shape[-1])
    mask = torch.arange(tokens.shape[-1], device=tokens.device)[None, :] < lengths[:, None]
    return torch.where(mask, tokens, torch.full_like(tokens, pad_token_id)), mask.long()


def apply_missing_eos_penalty(scores: torch.Tensor, has_stop: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract ``penalty`` from the score of every response that never emitted the stop token (docs/ppo.md item 8).

    ``scores``: ``[B]``, ``has_stop``: ``[B]`` bool → ``[B]``.
    """
    return torch.where(has_stop, scores, scores - penalty)


def kl_penalized_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-β·kl_t``, plus the score at the last valid token (docs/ppo.md items 7, 9).

    ``scores``: ``[B]``; ``kl``, ``mask``: ``[B, T]`` → ``(rewards [B, T], non_score_reward [B, T])``.
    Padded positions get reward 0. A row with no valid token is not expected (the stop token is
    itself a valid token) and would put its score at position 0.
    """
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards = non_score.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, non_score


# ----------------------------------------------------------------------------- advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised. ``[B, T]`` ×3 → ``(advantages, returns)`` ``[B, T]``.

    ``δ_t = r_t + γ V_{t+1} - V_t`` and ``A_t = Σ_{l≥0} (γλ)^l δ_{t+l}``, with ``V`` = 0 after the
    last valid token (the episode ends there). Computed as ``δ @ D`` with the upper-triangular
    discount matrix ``D[s, t] = (γλ)^(s-t)`` for ``s ≥ t``. Returns ``A + V`` are computed here, before
    any whitening of ``A`` (docs/ppo.md item 12). Padded positions get 0.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[-1]
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = (rewards + gamma * next_values - values) * mask
    s = torch.arange(T, device=values.device, dtype=values.dtype)
    power = s[:, None] - s[None, :]  # [s, t] = s - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    adv = (deltas @ discount) * mask
    return adv, (adv + values) * mask


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with the textbook backward loop (the lm-human-preferences form), for testing :func:`gae`."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask.to(values.dtype)


# ----------------------------------------------------------------------------- losses


@dataclass
class PolicyLossStats:
    approxkl: torch.Tensor  # 0.5 · E[(logp - old_logp)²] over valid tokens
    clipfrac: torch.Tensor  # fraction of valid tokens where the clipped term was chosen
    ratio_mean: torch.Tensor
    ratio_var: torch.Tensor


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped surrogate ``max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))`` averaged over valid tokens (docs/ppo.md item 13).

    All inputs ``[B, T]``. ``n_tokens``: divide the masked sum by this count instead of the
    micro-batch's own (the minibatch's token count, for exact gradient accumulation).
    """
    mask_f = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(loss1, loss2)
    denom = mask_f.sum().clamp(min=1.0) if n_tokens is None else n_tokens
    loss = masked_sum(per_token, mask_f) / denom
    with torch.no_grad():
        stats = PolicyLossStats(
            approxkl=0.5 * masked_mean(log_ratio**2, mask_f),
            clipfrac=masked_mean((loss2 > loss1).to(logp.dtype), mask_f),
            ratio_mean=masked_mean(ratio, mask_f),
            ratio_var=masked_var(ratio, mask_f, unbiased=False),
        )
    return loss, stats


def value_loss(
    vpred: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 · max((V - R)², (clip(V, V_old ± ε) - R)²)`` over valid tokens.

    All inputs ``[B, T]`` → ``(loss, clipfrac)``. The caller multiplies by the value coefficient.
    """
    mask_f = mask.to(vpred.dtype)
    vclipped = old_values + torch.clamp(vpred - old_values, -clip, clip)
    l1 = (vpred - returns) ** 2
    l2 = (vclipped - returns) ** 2
    denom = mask_f.sum().clamp(min=1.0) if n_tokens is None else n_tokens
    loss = 0.5 * masked_sum(torch.maximum(l1, l2), mask_f) / denom
    with torch.no_grad():
        clipfrac = masked_mean((l2 > l1).to(vpred.dtype), mask_f)
    return loss, clipfrac


# ----------------------------------------------------------------------------- KL coefficient


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No change (kept so the loop calls both controllers the same way)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: steer β so the KL tracks ``target`` over ``horizon`` episodes.

    ``e = clip(KL/target - 1, -0.2, 0.2)``; ``β ← β · (1 + e · n_steps / horizon)``
    (lm-human-preferences ``train_policy.py`` ``AdaptiveKLController``).
    """

    def __init__(self, init: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        self.value, self.target, self.horizon = float(init), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target, self.horizon = float(state["target"]), float(state["horizon"])


def is_finite(*xs: torch.Tensor | float) -> bool:
    """True when every value (tensor or number) is finite."""
    for x in xs:
        if isinstance(x, torch.Tensor):
            if not bool(torch.isfinite(x).all()):
                return False
        elif not math.isfinite(float(x)):
            return False
    return True
