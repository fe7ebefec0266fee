"""The arena's ratings from pairwise votes (docs/arena.md): pure numpy/scipy, no UI.

- :func:`fit_bradley_terry_davidson`: maximum-likelihood Bradley–Terry strengths with Davidson's
  (1970) tie parameter ν, on an Elo-like scale, with cluster-bootstrap intervals over prompts;
- :func:`length_controlled_win_rates`: each model's win rate against a baseline at zero length
  difference, AlpacaEval 2's length control (Dubois et al. 2024), with intervals over prompts.

A vote is ``(model_a, model_b, outcome, prompt_id, length_a, length_b)`` (:class:`Vote`; the last
three optional): ``outcome`` is ``"a"``, ``"b"`` or ``"tie"`` (Chatbot Arena's spellings
``"model_a"``, ``"model_b"`` and ``"tie (bothbad)"`` are read too). Votes of one prompt are not
independent (the same question favours the same answers), so the bootstrap resamples prompts with
all their votes; a vote without a prompt id is its own prompt.

The model. Model i has strength π_i = exp(θ_i). A vote between i and j ends

    i wins:  π_i / D,      j wins:  π_j / D,      tie:  ν √(π_i π_j) / D,
    D = π_i + π_j + ν √(π_i π_j),

which is a softmax over the three log-weights θ_i, θ_j and log ν + (θ_i + θ_j)/2: a multinomial
logit, so the negative log-likelihood is convex in (θ, log ν) and Newton's method with a
backtracking line search finds its minimum from any start. Every pair of models is one "cell"
holding its three outcome counts; a bootstrap replicate is the same cells with re-weighted
counts, so all replicates are fitted at once as one batch of small Newton problems.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.special import expit, log_expit, logsumexp, softmax

from rlhf.stats import Estimate

# Outcome columns of a cell (i, j), i the model listed first in `models`: i wins, j wins, tie.
I_WINS, J_WINS, TIE = 0, 1, 2
OUTCOMES = {"a": "a", "model_a": "a", "b": "b", "model_b": "b", "tie": "tie", "tie (bothbad)": "tie"}

ELO_SCALE = 400 / math.log(10)  # Elo's convention: 400 points = a factor of 10 in the odds
ELO_OFFSET = 1000.0  # the rating of log-strength 0 (the mean model, or the anchor)
DEFAULT_PRIOR = 0.01  # L2 precision on log-strengths: a N(0, 10²) prior, ≈ ±1700 Elo points
# ν = 0 exactly when no vote was a tie (the maximum-likelihood value, on the boundary): log ν is
# then held at this value, where P(tie) ≈ 2e-22 and Davidson's model is Bradley–Terry's.
FROZEN_LOG_NU = -50.0
MAX_ITER = 100
# Length control predicts the win rate at zero length difference. Where fewer than this share of a
# model's votes lie on the other side of zero from the rest (its answers shorter, or longer, in
# nearly every pair), no vote is near that point: the prediction is an extrapolation that the
# length term and the prior decide, not the votes (a policy trained on a length gold answered
# shorter than SFT in 99 of 100 pairs and got 0.006 against a raw win rate of 0.865).
MIN_LENGTH_OVERLAP = 0.1
MAX_HALVINGS = 40


class Vote(NamedTuple):
    """One comparison: which model won (``outcome``: ``"a"``, ``"b"`` or ``"tie"``), on which
    prompt, and (for length control) how long each response was, in any unit (characters in
    AlpacaEval)."""

    model_a: str
    model_b: str
    outcome: str
    prompt_id: str | None = None
    length_a: float | None = None
    length_b: float | None = None


@dataclass(frozen=True)
class Ratings:
    """A fitted arena: per model its log-strength θ and Elo-like rating with a bootstrap interval.

    ``log_strengths`` have mean 0, or 0 at ``anchor``; ``ratings`` = 400/ln 10 · θ + 1000.
    ``bootstrap`` holds every replicate's ratings (``[n_boot, models]``; NaN where a replicate's
    fit did not converge, counted in ``failed_boot``), for intervals of other statistics.
    """

    models: tuple[str, ...]
    log_strengths: np.ndarray
    ratings: tuple[Estimate, ...]
    nu: Estimate
    anchor: str | None
    n_votes: int
    n_prompts: int
    bootstrap: np.ndarray
    failed_boot: int

    def rating(self, model: str) -> Estimate:
        return self.ratings[self.models.index(model)]

    def table(self) -> list[dict[str, Any]]:
        """Rows ``model, rating, ci_low, ci_high``, best first."""
        rows = [
            {"model": m, "rating": r.value, "ci_low": r.low, "ci_high": r.high}
            for m, r in zip(self.models, self.ratings)
        ]
        return sorted(rows, key=lambda row: -row["rating"])


@dataclass(frozen=True)
class LengthControlledWinRate:
    """One model against the baseline: the raw win rate (ties ½), the length-controlled one with
    its bootstrap interval, the fitted length coefficient φ, and how much the two sides' lengths
    overlap (the share of votes on the rarer side of zero length difference; equal lengths count
    for both sides). ``win_rate_interval``: the raw rate's interval over the same resamples."""

    model: str
    baseline: str
    n_votes: int
    win_rate: float
    win_rate_interval: tuple[float, float]
    lc_win_rate: Estimate
    length_coef: float
    length_overlap: float

    @property
    def extrapolated(self) -> bool:
        """The length-controlled rate lies beyond the votes (:data:`MIN_LENGTH_OVERLAP`)."""
        return self.length_overlap < MIN_LENGTH_OVERLAP


# ----------------------------------------------------------------------------- reading votes


def as_votes(votes: Iterable[Any]) -> list[Vote]:
    """Votes as :class:`Vote`: from tuples ``(model_a, model_b, outcome[, prompt_id, length_a,
    length_b])`` or mappings with those keys; outcomes checked and spelled ``a``, ``b``, ``tie``."""
    out = []
    for n, raw in enumerate(votes, 1):
        if isinstance(raw, Mapping):
            vote = Vote(**{k: raw[k] for k in Vote._fields if k in raw})
        else:
            vote = Vote(*raw)
        outcome = OUTCOMES.get(vote.outcome)
        if outcome is None:
            raise ValueError(f"vote {n}: outcome {vote.outcome!r} is not one of 'a', 'b', 'tie'")
        if vote.model_a == vote.model_b:
            raise ValueError(f"vote {n}: {vote.model_a!r} against itself")
        out.append(vote._replace(outcome=outcome))
    if not out:
        raise ValueError("no votes")
    return out


def _cluster_ids(votes: Sequence[Vote]) -> np.ndarray:
    """Each vote's prompt as an index 0..K-1; a vote without a prompt id is a prompt of its own."""
    index: dict[Any, int] = {}
    return np.array(
        [
            index.setdefault(v.prompt_id if v.prompt_id is not None else ("vote", n), len(index))
            for n, v in enumerate(votes)
        ]
    )


def _bootstrap_weights(clusters: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n_votes]``: how often each vote is drawn when K prompts are drawn with
    replacement (every vote of a drawn prompt comes along)."""
    k = int(clusters.max()) + 1
    draws = np.random.default_rng(seed).multinomial(k, np.full(k, 1.0 / k), size=n_boot)
    return draws[:, clusters].astype(float)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of bootstrap ``values`` (NaNs, the failed replicates, left out)."""
    if values.size == 0 or np.all(np.isnan(values)):
        return math.nan, math.nan
    alpha = (1 - level) / 2
    low, high = np.nanquantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


# ----------------------------------------------------------------------------- Bradley–Terry–Davidson


def fit_bradley_terry_davidson(
    votes: Iterable[Any],
    models: Sequence[str] | None = None,
    *,
    anchor: str | None = None,
    prior: float = DEFAULT_PRIOR,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Ratings:
    """Bradley–Terry strengths with Davidson's tie parameter, by maximum likelihood.

    Maximises Σ log P(vote) (module docstring; Davidson 1970) − prior/2 · Σ θ_i² over the
    log-strengths θ and log ν, by Newton's method with the analytic gradient and Hessian.

    - Identifiability: P(vote) depends only on differences of θ. The prior (a Gaussian with
      precision ``prior`` on each θ) is smallest when the θ have mean 0, so the fit has mean 0;
      with ``prior=0`` the term ½(Σθ)² is added instead, which fixes the mean at 0 and changes
      nothing else. ``anchor`` then moves the zero to that model (its rating is 1000).
    - Separation: when some group of models never lost (nor tied) against the rest, the
      likelihood grows without bound as their θ grow, and no maximum exists. The default prior
      keeps such a model finite, far ahead but not at infinity; its effect on a model with tens
      of votes is a fraction of an Elo point. ``prior=0`` (the exact MLE) raises ValueError on
      separated data; a bootstrap replicate that separates fails to converge and is left out
      (``failed_boot``).
    - ν: with no tie among the votes, ν̂ = 0 (the maximum sits on the boundary) and the fit is
      Bradley–Terry's. With only ties, nothing separates the models: ValueError.
    - Intervals: ``n_boot`` replicates resampling prompts (all votes of a prompt together),
      seeded by ``seed``; percentile intervals at ``level``. Each replicate starts from the
      point estimate, and all are fitted at once.

    ``models`` fixes the order of the result (default: sorted names); every one needs a vote.
    For two models and ``prior=0`` the estimate is closed-form: π_a/π_b = w_a/w_b and
    ν = t/√(w_a w_b), for w_a, w_b wins and t ties (derived in docs/arena.md).
    """
    votes = as_votes(votes)
    models = tuple(models) if models is not None else tuple(sorted({m for v in votes for m in v[:2]}))
    index = {m: i for i, m in enumerate(models)}
    unknown = sorted({m for v in votes for m in v[:2]} - set(index))
    if unknown:
        raise ValueError(f"votes name models that are not in `models`: {', '.join(unknown)}")
    if anchor is not None and anchor not in index:
        raise ValueError(f"anchor {anchor!r} is not one of the models")

    cells, cell_of, outcome_of = _cells(votes, index)
    counts = np.zeros((len(cells), 3))
    np.add.at(counts, (cell_of, outcome_of), 1.0)
    _check_estimable(models, cells, counts, prior)
    design = _design(cells, len(models))

    point, converged = _fit_cells(counts[None], design, prior, _start(counts, len(models))[None])
    if not converged[0]:
        raise ValueError("the rating fit did not converge; try a larger `prior`")
    point = point[0]

    clusters = _cluster_ids(votes)
    boot = np.empty((0, len(models) + 1))
    if n_boot > 0:
        # Per-vote indicator of (cell, outcome), so replicate counts are (draws of each vote) @ it.
        by_vote = sparse.csr_matrix(
            (np.ones(len(votes)), (np.arange(len(votes)), cell_of * 3 + outcome_of)),
            shape=(len(votes), 3 * len(cells)),
        )
        weights = _bootstrap_weights(clusters, n_boot, seed)
        boot_counts = (by_vote.T @ weights.T).T.reshape(n_boot, len(cells), 3)
        boot, ok = _fit_cells(boot_counts, design, prior, np.repeat(point[None], n_boot, axis=0))
        boot[~ok] = np.nan

    m = len(models)
    shift = point[index[anchor]] if anchor is not None else 0.0
    theta = point[:m] - shift
    boot_theta = boot[:, :m] - (boot[:, [index[anchor]]] if anchor is not None else 0.0)
    boot_ratings = ELO_SCALE * boot_theta + ELO_OFFSET
    n_prompts = int(clusters.max()) + 1
    ratings = tuple(
        Estimate(float(ELO_SCALE * theta[i] + ELO_OFFSET), *_interval(boot_ratings[:, i], level), n_prompts)
        for i in range(m)
    )
    has_ties = counts[:, TIE].sum() > 0
    nu = math.exp(point[m]) if has_ties else 0.0
    boot_nu = np.where(boot[:, m] <= FROZEN_LOG_NU, 0.0, np.exp(boot[:, m]))
    return Ratings(
        models=models,
        log_strengths=theta,
        ratings=ratings,
        nu=Estimate(nu, *_interval(boot_nu, level), n_prompts),
        anchor=anchor,
        n_votes=len(votes),
        n_prompts=n_prompts,
        bootstrap=boot_ratings,
        failed_boot=int(np.isnan(boot[:, 0]).sum()),
    )


def _cells(
    votes: Sequence[Vote], index: Mapping[str, int]
) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """The pairs of models that met (``(i, j)``, i < j) and, per vote, its cell and outcome column.

    A vote is turned to face its cell: "a wins" is ``I_WINS`` when a is i and ``J_WINS`` when a
    is j, so which side a model was shown on does not matter.
    """
    cell_index: dict[tuple[int, int], int] = {}
    cell_of, outcome_of = [], []
    for v in votes:
        a, b = index[v.model_a], index[v.model_b]
        i, j = min(a, b), max(a, b)
        cell_of.append(cell_index.setdefault((i, j), len(cell_index)))
        if v.outcome == "tie":
            outcome_of.append(TIE)
        else:
            winner = a if v.outcome == "a" else b
            outcome_of.append(I_WINS if winner == i else J_WINS)
    return list(cell_index), np.array(cell_of), np.array(outcome_of)


def _design(cells: Sequence[tuple[int, int]], m: int) -> np.ndarray:
    """``[3 · cells, m + 1]``: each cell's three log-weights θ_i, θ_j, log ν + (θ_i + θ_j)/2 as
    linear functions of the parameters (θ_1..θ_m, log ν)."""
    design = np.zeros((3 * len(cells), m + 1))
    for c, (i, j) in enumerate(cells):
        design[3 * c + I_WINS, i] = 1.0
        design[3 * c + J_WINS, j] = 1.0
        design[3 * c + TIE, [i, j, m]] = [0.5, 0.5, 1.0]
    return design


def _start(counts: np.ndarray, m: int) -> np.ndarray:
    """Equal strengths and the ν at which two equal models tie as often as the data's votes do:
    ν/(2 + ν) = tie rate (the reward models' tie start, docs/rankings.md)."""
    rate = min(max(counts[:, TIE].sum() / counts.sum(), 1e-3), 0.9)
    return np.concatenate([np.zeros(m), [math.log(2 * rate / (1 - rate))]])


def _check_estimable(
    models: Sequence[str], cells: Sequence[tuple[int, int]], counts: np.ndarray, prior: float
) -> None:
    """Fail with a reason where the estimate cannot exist (see :func:`fit_bradley_terry_davidson`)."""
    seen = {i for cell in cells for i in cell}
    unseen = [m for i, m in enumerate(models) if i not in seen]
    if unseen:
        raise ValueError(f"no votes for {', '.join(unseen)}: nothing to rate them on")
    if counts[:, [I_WINS, J_WINS]].sum() == 0:
        raise ValueError("every vote is a tie: nothing tells the models apart")
    if prior > 0:
        return
    # The MLE exists when every model can be reached from every other along "lost to" edges, a
    # strongly connected graph (Ford 1957, for Bradley–Terry). A tie bounds the gap both ways, as
    # P(tie) → 0 when either strength runs away, so it links both ways.
    edges = []  # (loser, winner): a path leads from every model to every model that beat it
    for (i, j), (i_wins, j_wins, ties) in zip(cells, counts):
        if i_wins or ties:
            edges.append((j, i))
        if j_wins or ties:
            edges.append((i, j))
    losers, winners = zip(*edges)
    graph = sparse.csr_matrix((np.ones(len(edges)), (losers, winners)), shape=(len(models), len(models)))
    n_parts, part = connected_components(graph, directed=True, connection="strong")
    if n_parts > 1:
        groups = [sorted(models[i] for i in np.flatnonzero(part == p)) for p in range(n_parts)]
        raise ValueError(
            "separation: some models never lost (nor tied) against the others, so their strengths "
            f"have no maximum-likelihood value (groups {groups}); use prior > 0"
        )


def _fit_cells(
    counts: np.ndarray, design: np.ndarray, prior: float, start: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Newton's method on R problems at once: ``counts [R, cells, 3]`` → parameters ``[R, m + 1]``
    (θ_1..θ_m, log ν) and whether each converged."""
    r, n_cells, _ = counts.shape
    m = design.shape[1] - 1
    n = counts.sum(-1)  # votes per cell
    flat = counts.reshape(r, 3 * n_cells)
    blocks = design.reshape(n_cells, 3, m + 1)
    frozen = counts[..., TIE].sum(-1) == 0  # no tie drawn: ν̂ = 0, log ν held (FROZEN_LOG_NU)
    params = start.astype(float)
    params[frozen, m] = FROZEN_LOG_NU
    penalty_hess = prior * np.eye(m) + (0.0 if prior > 0 else 1.0) * np.ones((m, m))

    def objective(p: np.ndarray) -> np.ndarray:
        eta = (p @ design.T).reshape(r, n_cells, 3)
        nll = (n * logsumexp(eta, axis=-1)).sum(-1) - (flat * eta.reshape(r, -1)).sum(-1)
        theta = p[:, :m]
        return nll + 0.5 * prior * (theta**2).sum(-1) + (0.0 if prior > 0 else 0.5) * theta.sum(-1) ** 2

    scale = np.maximum(n.sum(-1), 1.0)
    converged = np.zeros(r, dtype=bool)
    for _ in range(MAX_ITER):
        eta = (params @ design.T).reshape(r, n_cells, 3)
        prob = softmax(eta, axis=-1)
        grad = (n[..., None] * prob - counts).reshape(r, -1) @ design
        theta = params[:, :m]
        grad[:, :m] += theta @ penalty_hess
        # Hessian of the negative log-likelihood: designᵀ · blockdiag(n (diag p − p pᵀ)) · design
        cov = n[..., None, None] * (prob[..., :, None] * np.eye(3) - prob[..., :, None] * prob[..., None, :])
        hess = design.T @ np.einsum("rckl,clp->rckp", cov, blocks).reshape(r, 3 * n_cells, m + 1)
        hess[:, :m, :m] += penalty_hess
        grad[frozen, m] = 0.0
        hess[frozen, m, :] = hess[frozen, :, m] = 0.0
        hess[frozen, m, m] = 1.0
        converged = np.abs(grad).max(-1) <= 1e-9 * scale
        if converged.all():
            break
        step = -np.linalg.solve(hess + 1e-12 * np.eye(m + 1), grad[..., None])[..., 0]
        step[converged] = 0.0
        params = _line_search(objective, params, step)
    return params, converged


def _line_search(objective, params: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Backtracking: halve each problem's Newton step until its objective does not increase."""
    before = objective(params)
    t = np.ones(len(params))
    for _ in range(MAX_HALVINGS):
        after = objective(params + t[:, None] * step)
        worse = ~(after <= before + 1e-12 * np.abs(before))
        if not worse.any():
            break
        t[worse] /= 2
    else:
        t[worse] = 0.0  # no decrease along the step: the problem stays where it is
    return params + t[:, None] * step


# ----------------------------------------------------------------------------- length-controlled win rate


def length_controlled_win_rates(
    votes: Iterable[Any],
    baseline: str,
    *,
    prior: float = DEFAULT_PRIOR,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, LengthControlledWinRate]:
    """Every model's win rate against ``baseline`` had their responses been equally long.

    AlpacaEval 2's length control (Dubois et al. 2024, "Length-Controlled AlpacaEval: A Simple
    Way to Debias Automatic Evaluators", arXiv:2404.04475), without its instruction-difficulty
    term. For one model, over its votes v against the baseline:

        y_v   = 1 if the model won, ½ for a tie, 0 if the baseline won;
        Δ_v   = length of the model's response − length of the baseline's;
        x_v   = tanh(Δ_v / sd(Δ)), sd the sample standard deviation (ddof 1) of Δ over these
                votes, not centred (AlpacaEval's ``std_delta_len``);
        P(model beats baseline | v) = σ(θ + φ x_v), σ the logistic function;

    θ and φ maximise Σ_v [y_v log σ(η_v) + (1 − y_v) log σ(−η_v)] − prior/2 · (θ² + φ²), a
    logistic regression with fractional outcomes, by Newton's method. The length-controlled win
    rate is the prediction at zero length difference, σ(θ); the raw win rate is the mean of y.
    When Δ does not vary (or there is one vote) the length term is dropped (φ = 0) and, with
    ``prior=0``, the length-controlled rate equals the raw one. A model that won (or lost) every
    vote has no finite θ with ``prior=0``: ValueError. The interval resamples the model's prompts
    (all votes of a prompt together, standardisation included) ``n_boot`` times, seeded. Where the
    two sides' lengths barely overlap the rate is an extrapolation, and the result says so
    (``extrapolated``, :data:`MIN_LENGTH_OVERLAP`).

    Votes need ``length_a`` and ``length_b`` where the baseline plays; votes without the baseline
    are left out. Returns one result per model that met the baseline (the baseline itself is not
    in it: its rate against itself is ½ by definition).
    """
    votes = as_votes(votes)
    if not any(baseline in v[:2] for v in votes):
        raise ValueError(f"no votes against the baseline {baseline!r}")
    out = {}
    opponents = sorted({m for v in votes if baseline in v[:2] for m in v[:2]} - {baseline})
    for model in opponents:
        mine = [v for v in votes if {v.model_a, v.model_b} == {model, baseline}]
        y, delta = _oriented(mine, model)
        if prior == 0 and np.all(y == y[0]) and y[0] != 0.5:
            side = "won" if y[0] == 1 else "lost"
            raise ValueError(
                f"{model} {side} every vote against {baseline}: no finite estimate; use prior > 0"
            )
        beta, ok = _fit_length_glm(np.ones((1, len(mine))), y, delta, prior)
        if not ok[0]:
            raise ValueError(f"the length-controlled fit of {model} did not converge; try a larger `prior`")
        clusters = _cluster_ids(mine)
        low = high = raw_low = raw_high = math.nan
        if n_boot > 0:
            weights = _bootstrap_weights(clusters, n_boot, seed)
            boot, boot_ok = _fit_length_glm(weights, y, delta, prior)
            rates = np.where(boot_ok, expit(boot[:, 0]), np.nan)
            low, high = _interval(rates, level)
            raw_low, raw_high = _interval(weights @ y / weights.sum(-1), level)  # the same resamples
        out[model] = LengthControlledWinRate(
            model=model,
            baseline=baseline,
            n_votes=len(mine),
            win_rate=float(y.mean()),
            win_rate_interval=(raw_low, raw_high),
            lc_win_rate=Estimate(float(expit(beta[0, 0])), low, high, int(clusters.max()) + 1),
            length_coef=float(beta[0, 1]),
            length_overlap=length_overlap(delta),
        )
    return out


def length_overlap(delta: np.ndarray) -> float:
    """The share of length differences on the rarer side of zero; a zero lies on both sides."""
    zero = float(np.mean(delta == 0))
    return min(float(np.mean(delta > 0)), float(np.mean(delta < 0))) + zero


def _oriented(votes: Sequence[Vote], model: str) -> tuple[np.ndarray, np.ndarray]:
    """``y`` (1 win, ½ tie, 0 loss, from ``model``'s side) and the length differences Δ."""
    y, delta = [], []
    for v in votes:
        if v.length_a is None or v.length_b is None:
            raise ValueError(f"a vote of {v.model_a} against {v.model_b} has no response lengths")
        mine_is_a = v.model_a == model
        y.append({"tie": 0.5, "a": float(mine_is_a), "b": float(not mine_is_a)}[v.outcome])
        delta.append((v.length_a - v.length_b) * (1 if mine_is_a else -1))
    return np.array(y), np.array(delta, dtype=float)


def _fit_length_glm(
    weights: np.ndarray, y: np.ndarray, delta: np.ndarray, prior: float
) -> tuple[np.ndarray, np.ndarray]:
    """Newton's method for R weightings of the votes at once (``weights [R, votes]``): ``[R, 2]``
    coefficients (θ, φ) and whether each converged."""
    total = weights.sum(-1)
    sd = np.sqrt(
        (weights * (delta - (weights @ delta / total)[:, None]) ** 2).sum(-1) / np.maximum(total - 1, 1)
    )
    no_length = ~(sd > 0) | (total < 2)  # nothing to standardise by: the length term is dropped
    x = np.tanh(delta / np.where(no_length, 1.0, sd)[:, None])
    x[no_length] = 0.0

    def objective(beta: np.ndarray) -> np.ndarray:
        eta = beta[:, :1] + beta[:, 1:] * x
        nll = -(weights * (y * log_expit(eta) + (1 - y) * log_expit(-eta))).sum(-1)
        return nll + 0.5 * prior * (beta**2).sum(-1)

    beta = np.zeros((len(weights), 2))
    converged = np.zeros(len(weights), dtype=bool)
    for _ in range(MAX_ITER):
        p = expit(beta[:, :1] + beta[:, 1:] * x)
        resid, curv = weights * (p - y), weights * p * (1 - p)
        grad = np.stack([resid.sum(-1), (resid * x).sum(-1)], axis=-1) + prior * beta
        h01 = (curv * x).sum(-1)
        hess = np.stack(
            [np.stack([curv.sum(-1), h01], -1), np.stack([h01, (curv * x * x).sum(-1)], -1)], axis=-2
        ) + prior * np.eye(2)
        grad[no_length, 1] = 0.0
        hess[no_length, 1, :] = hess[no_length, :, 1] = 0.0
        hess[no_length, 1, 1] = 1.0
        converged = np.abs(grad).max(-1) <= 1e-9 * np.maximum(total, 1.0)
        if converged.all():
            break
        step = -np.linalg.solve(hess + 1e-12 * np.eye(2), grad[..., None])[..., 0]
        step[converged] = 0.0
        beta = _line_search(objective, beta, step)
    return beta, converged
