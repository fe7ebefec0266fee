"""``solver: lbfgs``: a reward model's head solved exactly over fixed features.

When nothing below the head trains and the head reads several layers' response means
(``read_layers``, :class:`rlhf.reward_model.RewardModel`), every candidate's input to the head is
computed once, and fitting a linear head with any of the ranking losses is a convex problem in its
weights (plus the tie parameter, for the tie-aware losses). So instead of epochs of AdamW and a
validation slice that picks a step, :func:`solve_head` minimises, over all training rankings at
once,

    mean ranking loss(z · w) + λ / k · ‖w‖²

where ``z`` are the features standardised on the training candidates (each feature centred and
divided by its standard deviation, so the penalty treats every feature alike whatever its layer's
scale) and ``k`` is the number of layers read (λ then means the same per layer). L-BFGS with a
strong-Wolfe line search finds the minimum from ``w = 0``; the standardisation is then folded
into the head (``weight = w / σ``, ``bias = −(w / σ) · μ``), so the saved model scores raw features
exactly as the solution scored standardised ones.

With ``length_control`` the response's token count is one more column of the fit, unpenalised, and
is dropped from the head afterwards: the length preference the rankings show is explained by that
column rather than by whatever in the features also tracks length, so the reward pays for length
only as far as the features carry it beyond a straight line in the token count (the idea of
length-disentangled reward heads, Chen et al. 2024, ODIN, arXiv 2402.07319).

With ``length_discount: attenuation`` the solved head then has the length its features carry
discounted until its length correlation over the training answers is ρ times its own, ρ its
agreement with what the annotators follow, estimated from prompts ranked twice with the
cross-validation's out-of-fold scores (:mod:`reward_models.length_discount`).

λ is ``l2``, or with ``l2_search`` the candidate with the least held-out loss in a
``cv_folds``-fold cross-validation over the training prompts (folds by a hash of the prompt id; each
fold's model standardised and solved on the other folds alone). The held-out prompts never enter
the choice. The measurements behind the recipe (``experiments/benchmarks/bench_rm_heads.py``)
are in docs/reward-models.md.

Under ``accelerate launch`` each process holds its own shard of the training prompts: the
standardisation's sums, the loss and its gradient are summed over processes at every evaluation,
so every process takes the same L-BFGS steps and ends with the same head.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from reward_models import losses as L
from reward_models.groups import Group, make_batch, ranking_grid
from reward_models.length_discount import (
    LengthDiscount,
    attenuation_corrected_agreement,
    discount_for_correlation,
    length_direction,
)
from reward_models.train_config import RMTrainConfig
from rlhf.errors import UserError

MAX_ITERATIONS = 500


@dataclass
class HeadSolution:
    """What the solve did: λ, L-BFGS iterations, the objective at the end, seconds, whether the
    iterations stopped before their limit, and the cross-validated loss of each λ tried."""

    l2: float
    iterations: int
    objective: float
    seconds: float
    converged: bool
    cv_loss: dict[float, float] = field(default_factory=dict)
    length_discount: LengthDiscount | None = None


@dataclass
class _Fit:
    """One solution in standardised coordinates: reward = ((x − mean) / std) · w."""

    w: torch.Tensor
    tie: torch.Tensor | None  # the raw tie parameter (None: the loss has none)
    mean: torch.Tensor
    std: torch.Tensor
    iterations: int
    objective: float


class _Shard:
    """This process's rankings of some prompts, their features as one batch (None when it has none)."""

    def __init__(self, groups: list[Group], pad_id: int, cache: dict, length_control: bool = False):
        self.batch = make_batch(groups, pad_id, cache) if groups else None
        self.x = self.batch.features.double() if self.batch is not None else None
        if self.x is not None and length_control:  # the response's token count, a last column
            tokens = [len(ids) - start for g in groups for ids, start in zip(g.ids, g.starts)]
            self.x = torch.cat([self.x, torch.tensor(tokens, dtype=torch.float64)[:, None]], dim=1)

    def loss_sum(self, cfg: RMTrainConfig, fit_w, fit_tie, mean, std) -> tuple[torch.Tensor, float]:
        """The loss times the rankings it used (sums over processes then give the mean), and that count."""
        if self.batch is None:
            return torch.zeros((), dtype=torch.float64), 0.0
        rewards = ranking_grid(((self.x - mean) / std) @ fit_w, self.batch)
        loss, used = L.ranking_loss(
            cfg.loss,
            rewards,
            self.batch.tiers,
            margin=cfg.margin,
            tie_param=L.tie_log_param(cfg.loss, fit_tie),
            weights=self.batch.weights,
        )
        loss = loss + L.reward_centering(rewards, self.batch.tiers, cfg.center_coef)
        return loss * used, float(used)


def solve_head(
    cfg: RMTrainConfig, model, groups: list[Group], pad_id: int, cache: dict, accelerator
) -> HeadSolution:
    """Fit ``model.head`` (and a learned tie parameter) to the rankings of ``groups`` exactly, in
    place, choosing λ by cross-validation when ``cfg.l2_search`` names candidates (module
    docstring). ``cache`` holds every sequence's features (``model.caches_features``)."""
    t0 = time.time()
    discounting = cfg.length_discount == "attenuation"
    if discounting and accelerator is not None and accelerator.num_processes > 1:
        raise UserError(
            "length_discount: attenuation runs in one process (it needs every prompt's rankings at once); "
            "train without accelerate launch, or with length_discount: none",
            code="config",
        )
    candidates = list(cfg.l2_search) or ([cfg.l2] if discounting else [])
    cv_loss, out_of_fold = _cross_validated_losses(cfg, model, groups, pad_id, cache, accelerator, candidates)
    l2 = min(cv_loss, key=cv_loss.get) if cfg.l2_search else cfg.l2
    shard = _Shard(groups, pad_id, cache, cfg.length_control)
    fit = _fit(cfg, model, shard, accelerator, l2)
    discount = None
    if discounting:
        discount = _discount_length(fit, shard, groups, out_of_fold[l2])
    learn_tie = model.tie_param is not None and model.tie_param.requires_grad
    width = model.head.weight.shape[1]  # a length column, if any, is the last one: it is dropped here
    with torch.no_grad():
        weight = fit.w[:width] / fit.std[:width]
        model.head.weight.copy_(weight[None].to(model.head.weight.dtype))
        model.head.bias.fill_(float(-(weight * fit.mean[:width]).sum()))
        if learn_tie:
            model.tie_param.copy_(fit.tie.to(model.tie_param.dtype))
    return HeadSolution(
        l2,
        fit.iterations,
        fit.objective,
        time.time() - t0,
        fit.iterations < MAX_ITERATIONS,
        cv_loss if cfg.l2_search else {},
        discount,
    )


def _discount_length(fit: _Fit, shard: _Shard, groups: list[Group], out_of_fold: dict[int, torch.Tensor]):
    """Subtract from ``fit.w`` (in place) the length its features carry, by the ρ the out-of-fold
    scores and the twice-ranked prompts give (module docstring); UserError without such prompts."""
    scores = [out_of_fold[id(g)] for g in groups]
    try:
        rho, reliability, agreement, shared = attenuation_corrected_agreement(
            [g.rankings for g in groups], scores
        )
    except ValueError as e:
        raise UserError(
            f"length_discount: attenuation: {e} (rlhf simulate --per_prompt 2, or two annotators on some "
            "prompts)",
            code="config",
        ) from None
    # the length in words, the length `rlhf rm eval` reports the reward's lean against, in the
    # shard's row order (group by group, candidate by candidate)
    words = torch.tensor([len(t.split()) for g in groups for t in g.texts], dtype=torch.float64)
    z = (shard.x - fit.mean) / fit.std
    v = length_direction(z, words)
    # β is set on the out-of-fold scores: the head's scores of answers it did not fit, as PPO's will be
    beta, before, after = discount_for_correlation(torch.cat(scores), words, z @ v, rho)
    fit.w -= beta * v
    return LengthDiscount(reliability, agreement, rho, before, after, beta, shared)


def _cross_validated_losses(
    cfg, model, groups, pad_id, cache, accelerator, candidates: list[float]
) -> tuple[dict[float, float], dict[float, dict[int, torch.Tensor]]]:
    """For each λ of ``candidates``: the mean loss over every training ranking of the model solved
    without its fold, and every candidate's score under that model (by ``id`` of its group: the
    out-of-fold scores). Each fold's shards are built once, for every λ."""
    fold = {g.prompt_id: _fold(cfg.seed, g.prompt_id, cfg.cv_folds) for g in groups}
    held_groups = [[g for g in groups if fold[g.prompt_id] == f] for f in range(cfg.cv_folds)]
    splits = [
        (
            _Shard([g for g in groups if fold[g.prompt_id] != f], pad_id, cache, cfg.length_control),
            _Shard(held_groups[f], pad_id, cache, cfg.length_control),
        )
        for f in range(cfg.cv_folds)
    ]
    losses, scores = {}, {}
    for l2 in candidates:
        total, used = torch.zeros((), dtype=torch.float64), 0.0
        scores[l2] = {}
        for (train, held), members in zip(splits, held_groups):
            fit = _fit(cfg, model, train, accelerator, l2)
            with torch.no_grad():  # held out as the model will score: without the length column
                w = fit.w.clone()
                w[model.head.weight.shape[1] :] = 0
                loss, n = held.loss_sum(cfg, w, fit.tie, fit.mean, fit.std)
                if held.x is not None:
                    flat = ((held.x - fit.mean) / fit.std) @ w
                    for g, part in zip(members, flat.split([g.k for g in members])):
                        scores[l2][id(g)] = part
            total, used = total + loss, used + n
        total = _sum(torch.stack([total, torch.tensor(used, dtype=torch.float64)]), accelerator)
        losses[l2] = float(total[0] / total[1].clamp(min=1.0))
    return losses, scores


def _fold(seed: int, prompt_id: str, folds: int) -> int:
    """A prompt's cross-validation fold, from a hash of its id (the same in every process)."""
    digest = hashlib.sha256(f"cv:{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def _fit(cfg: RMTrainConfig, model, shard: _Shard, accelerator, l2: float) -> _Fit:
    """The exact minimum for ``shard``'s rankings (all processes' shards together) with penalty ``l2``."""
    width = model.head.weight.shape[1] + int(cfg.length_control)
    mean, std = _standardisation(shard.x, width, accelerator)
    w = torch.zeros(width, dtype=torch.float64, requires_grad=True)
    learn_tie = model.tie_param is not None and model.tie_param.requires_grad
    tie = None
    if model.tie_param is not None:
        tie = model.tie_param.detach().double().clone().requires_grad_(learn_tie)
    params = [w] + ([tie] if learn_tie else [])
    penalty = l2 / len(model.read_layers)
    penalised = torch.ones(width, dtype=torch.float64)  # the length column, if any, goes free
    penalised[model.head.weight.shape[1] :] = 0
    with torch.no_grad():
        used = float(
            _sum(torch.tensor(shard.loss_sum(cfg, w, tie, mean, std)[1], dtype=torch.float64), accelerator)
        )
    if used == 0:
        raise ValueError("no training ranking carries evidence for the loss")  # read_data rules this out
    optimizer = torch.optim.LBFGS(
        params,
        max_iter=MAX_ITERATIONS,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )
    last = {"objective": float("nan")}

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        local = shard.loss_sum(cfg, w, tie, mean, std)[0] / used
        if local.requires_grad:  # a process without rankings here contributes zeros
            local.backward()
        value = _sum(local.detach(), accelerator) + penalty * (w.detach() * penalised).pow(2).sum()
        for p in params:  # the gradient of the whole objective, the same in every process
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = _sum(grad, accelerator)
        w.grad += 2 * penalty * w.detach() * penalised
        last["objective"] = float(value)
        return value

    optimizer.step(objective)
    iterations = int(optimizer.state[w].get("n_iter", 0))
    return _Fit(w.detach(), None if tie is None else tie.detach(), mean, std, iterations, last["objective"])


def _standardisation(x: torch.Tensor | None, width: int, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of every feature over all processes' candidates (a constant
    feature gets deviation 1: it is then centred to 0 and its weight only pays the penalty)."""
    if x is None:
        x = torch.zeros((0, width), dtype=torch.float64)
    count = _sum(torch.tensor(float(x.shape[0]), dtype=torch.float64), accelerator)
    mean = _sum(x.sum(0), accelerator) / count
    var = _sum((x - mean).pow(2).sum(0), accelerator) / count
    std = var.sqrt()
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def _sum(t: torch.Tensor, accelerator) -> torch.Tensor:
    """``t`` summed over the processes of a launch (itself in a single process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return t
    return accelerator.reduce(t.contiguous(), reduction="sum")
