"""How reliable each annotator is, estimated from the rankings alone (and gold answers, when some exist).

Real annotation pools hold careless members (rankings unrelated to the responses) and adversarial
ones (the order reversed). This module fits a Dawid–Skene model (Dawid & Skene 1979) to the
pairwise outcomes of the rankings, with ties, and turns each annotator's fitted confusion into a
training weight. The annotation app and ``rlhf rm train`` (``annotator_weights: reliability``)
both use it. Pure Python and numpy.

**Items and labels.** Every unordered candidate pair {x, y} of a prompt (x before y in label order)
is one item. Its true outcome z is one of ``x better``, ``tie``, ``y better``; an annotator's ranking
of the prompt gives their label of the item in the same three classes (docs/rankings.md, derived
pairs).

**The model.** Each annotator j has a *symmetric* confusion with three numbers:

- on a strict pair they report the true order with probability a_j, the reversed order with r_j,
  a tie with 1 − a_j − r_j;
- on a true tie they report the tie with probability e_j, and either order with (1 − e_j) / 2.

The true outcomes follow a prior π: a tie with probability π_tie, each strict order with
(1 − π_tie) / 2 (the labels A, B, ... are shown in an arbitrary order, so neither order is
favoured). Annotators label independently given z.

**Fitting.** EM (Dawid & Skene 1979): the E-step computes each item's posterior over z from the
prior and the labels; the M-step re-estimates a_j, r_j, e_j and π_tie from the expected counts.
It starts from the soft majority vote (each item's share of labels in each class) and stops when
no parameter moves by more than ``tol``, or after ``max_iter`` rounds. Weak Dirichlet priors
(:class:`ReliabilityPrior`, pseudo-counts added to the expected counts: the MAP estimate) keep an
annotator with few labels near a prior that favours competence (a = 4/6, r = 1/6, e = 2/3) and
break the model's mirror symmetry (every annotator reversed and every truth reversed fit the labels
equally well) towards the competent reading.

**Gold anchors.** Items with a known answer (a full or partial gold ranking per ``prompt_id``) have
z fixed to the gold's outcome for every pair the gold ranking names both candidates of, in every
E-step. With anchors, the first annotator estimates come from the anchored items alone: started
from the majority vote, a pool whose majority is adversarial would converge to the mirrored
solution, and the anchors alone would not pull it back.

**The training weight** is w_j = max(0, a_j − r_j). For a pairwise logistic loss, a label that is
right with probability a and reversed with probability r pushes the reward difference the right way
with expected signal proportional to a − r (the reversed share cancels as much of the right share;
reported ties carry no strict-order signal). A careless annotator (a ≈ r) gets weight near 0, an
adversarial one (r > a) weight 0. Their labels could instead be flipped and used with weight
r − a, but that is not done: a systematically reversed annotator is a problem for people to look
into, not a signal to recycle.

**Reported per annotator** (:class:`AnnotatorReliability`): a_j, r_j, e_j, the expected accuracy
(1 − π_tie) · a_j + π_tie · e_j (the chance that their label of a random item is right), the number
of pairs they labelled, and w_j.

**Assumptions worth knowing.**

- Pairs from one ranking are not independent (a ranking is transitive: A > B and B > C force
  A > C); the model treats them as independent, as Dawid–Skene applications to multi-label data
  do. This over-counts the evidence of one ranking (the posteriors are too confident) but does not
  bias which annotators look reliable.
- Why Dawid–Skene and not MACE (Hovy et al. 2013): MACE models an annotator as either reporting
  the truth or "spamming" from a distribution independent of the truth, so it cannot represent an
  annotator who systematically reports the reversed order; a per-annotator confusion can.
- Why not item-response theory (item difficulty × annotator ability): estimating a difficulty per
  item needs many labels per item, and rankings with a quorum of 3 give three per pair.

References: A. P. Dawid and A. M. Skene, "Maximum likelihood estimation of observer error-rates
using the EM algorithm", Applied Statistics 28(1), 1979. D. Hovy, T. Berg-Kirkpatrick, A. Vaswani
and E. Hovy, "Learning whom to trust with MACE", NAACL 2013.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from rlhf.rankings import ALL_LABELS, Ranking, parse_ranking

# The three outcomes of an item {x, y}, x before y in label order.
FIRST_BETTER, TIE, SECOND_BETTER = 0, 1, 2


@dataclass(frozen=True)
class ReliabilityPrior:
    """Dirichlet pseudo-counts added to the expected counts of the M-step (a MAP estimate).

    On a strict pair: ``strict_correct`` : ``strict_reversed`` : ``strict_tied`` = 4 : 1 : 1, a
    prior mean of a = 4/6, r = 1/6 (weight 0.5), worth six pairs: an annotator with a few pairs stays
    near it, one with hundreds is judged by their labels. On a true tie, ``tie_kept`` :
    ``tie_broken`` = 2 : 1 (e = 2/3). The class prior π_tie gets one pseudo-item each way.
    """

    strict_correct: float = 4.0
    strict_reversed: float = 1.0
    strict_tied: float = 1.0
    tie_kept: float = 2.0
    tie_broken: float = 1.0
    items_tied: float = 1.0
    items_strict: float = 1.0


@dataclass(frozen=True)
class PairLabels:
    """The rankings as labelled items: one row per (annotator, item) label.

    ``items`` are ``(prompt_id, x, y)`` with x before y; ``annotators`` sorted names. ``item``,
    ``annotator`` and ``outcome`` ``[N]`` index them per label. ``anchor`` ``[I]`` holds an item's
    gold outcome, -1 where it has none.
    """

    items: list[tuple[str, str, str]]
    annotators: list[str]
    item: np.ndarray
    annotator: np.ndarray
    outcome: np.ndarray
    anchor: np.ndarray

    @property
    def anchored(self) -> np.ndarray:
        return self.anchor >= 0


@dataclass(frozen=True)
class Confusions:
    """The model's parameters: per annotator ``strict_correct`` (a), ``strict_reversed`` (r),
    ``tie_kept`` (e), each ``[J]``, and the class prior ``prior_tie`` (π_tie)."""

    strict_correct: np.ndarray
    strict_reversed: np.ndarray
    tie_kept: np.ndarray
    prior_tie: float

    def matrices(self) -> np.ndarray:
        """``[J, 3, 3]``: P(reported outcome | true outcome) per annotator, rows = true outcome."""
        a, r, e = self.strict_correct, self.strict_reversed, self.tie_kept
        tied, broken = 1 - a - r, (1 - e) / 2
        return np.stack(
            [
                np.stack([a, tied, r], axis=1),  # truly first better
                np.stack([broken, e, broken], axis=1),  # truly tied
                np.stack([r, tied, a], axis=1),  # truly second better
            ],
            axis=1,
        )

    def class_prior(self) -> np.ndarray:
        strict = (1 - self.prior_tie) / 2
        return np.array([strict, self.prior_tie, strict])

    def largest_change(self, other: Confusions) -> float:
        return max(
            float(np.max(np.abs(self.strict_correct - other.strict_correct), initial=0.0)),
            float(np.max(np.abs(self.strict_reversed - other.strict_reversed), initial=0.0)),
            float(np.max(np.abs(self.tie_kept - other.tie_kept), initial=0.0)),
            abs(self.prior_tie - other.prior_tie),
        )


@dataclass(frozen=True)
class AnnotatorReliability:
    """One annotator's fitted confusion and what follows from it (module docstring)."""

    annotator: str
    strict_correct: float  # a: reports a strict pair's true order
    strict_reversed: float  # r: reports it reversed
    tie_kept: float  # e: reports a true tie as a tie
    expected_accuracy: float  # (1 - π_tie) a + π_tie e
    pairs: int  # items they labelled
    weight: float  # max(0, a - r)


@dataclass(frozen=True)
class ReliabilityFit:
    """The fitted model: every annotator's reliability, the class prior and how EM ended."""

    annotators: dict[str, AnnotatorReliability]
    prior_tie: float
    items: int
    anchored_items: int
    shared_items: int  # items labelled by two or more annotators: what reliability is learned from
    iterations: int
    converged: bool
    log_posterior: float

    # the columns of the annotators table (rows, annotators.json, the tracker's table)
    COLUMNS: ClassVar[tuple[str, ...]] = (
        "annotator",
        "weight",
        "expected_accuracy",
        "strict_correct",
        "strict_reversed",
        "tie_kept",
        "pairs",
    )

    def weights(self) -> dict[str, float]:
        return {name: a.weight for name, a in self.annotators.items()}

    def rows(self) -> list[list]:
        """One row per annotator in :attr:`COLUMNS` order, the least reliable first (a table)."""
        ordered = sorted(self.annotators.values(), key=lambda a: (a.expected_accuracy, a.annotator))
        return [[getattr(a, c) for c in self.COLUMNS] for a in ordered]

    def as_dict(self) -> dict:
        fit = {k: v for k, v in asdict(self).items() if k != "annotators"}
        return {**fit, "annotators": [dict(zip(self.COLUMNS, row)) for row in self.rows()]}


# ----------------------------------------------------------------------------- rankings → labelled items


def annotator_of(record: Mapping) -> str:
    """Who ranked ``record``: its ``annotator`` field (``"unknown"`` when absent, as the contract reads it)."""
    return str(record.get("annotator", "unknown"))


def _labels_of(record: Mapping) -> tuple[str, ...]:
    candidates = record.get("candidates") or []
    return tuple(str(c["label"]) for c in candidates) or ALL_LABELS


def _ranking_of(record: Mapping) -> Ranking:
    """The record's ranking, from ``tiers`` or the ``ranking`` text (drafts allowed: only the pairs
    it names count)."""
    labels = _labels_of(record)
    if record.get("tiers"):
        return Ranking.from_tiers(record["tiers"], labels, complete=False)
    return parse_ranking(str(record.get("ranking", "")), labels, complete=False)


def _gold_ranking(answer, labels: Sequence[str]) -> Ranking:
    if isinstance(answer, Ranking):
        return answer
    if isinstance(answer, str):
        return parse_ranking(answer, labels, complete=False)
    return Ranking.from_tiers(answer, labels, complete=False)


def pair_outcomes(ranking: Ranking) -> dict[tuple[str, str], int]:
    """``{(x, y): outcome}`` for every pair of labels the ranking names, x before y."""
    tier_of = {lab: t for t, tier in enumerate(ranking.tiers) for lab in tier}
    named = sorted(tier_of)
    out = {}
    for i, x in enumerate(named):
        for y in named[i + 1 :]:
            d = tier_of[x] - tier_of[y]
            out[(x, y)] = FIRST_BETTER if d < 0 else TIE if d == 0 else SECOND_BETTER
    return out


def label_items(records: Iterable[Mapping], gold: Mapping[str, object] | None = None) -> PairLabels:
    """Every ranking record's pairwise labels, and the gold outcome of the items ``gold`` names.

    ``gold`` maps ``prompt_id`` to a ranking (text like ``"C > B = D > A"``, tiers best first, or a
    :class:`~rlhf.rankings.Ranking`), full or partial, over that prompt's candidate labels.
    """
    labels_of_prompt: dict[str, tuple[str, ...]] = {}
    rows: list[tuple[tuple[str, str, str], str, int]] = []
    for record in records:
        prompt_id, annotator = str(record["prompt_id"]), annotator_of(record)
        labels_of_prompt.setdefault(prompt_id, _labels_of(record))
        for (x, y), outcome in pair_outcomes(_ranking_of(record)).items():
            rows.append(((prompt_id, x, y), annotator, outcome))
    rows.sort()  # a canonical order: the fit does not depend on the order of the records
    items = sorted({item for item, _, _ in rows})
    annotators = sorted({annotator for _, annotator, _ in rows})
    item_index = {item: i for i, item in enumerate(items)}
    annotator_index = {name: j for j, name in enumerate(annotators)}
    anchor = np.full(len(items), -1, dtype=np.int64)
    for prompt_id, answer in (gold or {}).items():
        prompt_id = str(prompt_id)
        if prompt_id not in labels_of_prompt:
            continue  # no annotator ranked it: nothing to anchor
        for (x, y), outcome in pair_outcomes(_gold_ranking(answer, labels_of_prompt[prompt_id])).items():
            i = item_index.get((prompt_id, x, y))
            if i is not None:
                anchor[i] = outcome
    return PairLabels(
        items=items,
        annotators=annotators,
        item=np.array([item_index[item] for item, _, _ in rows], dtype=np.int64),
        annotator=np.array([annotator_index[name] for _, name, _ in rows], dtype=np.int64),
        outcome=np.array([outcome for _, _, outcome in rows], dtype=np.int64),
        anchor=anchor,
    )


# ----------------------------------------------------------------------------- EM


def _per_item(labels: PairLabels, values: np.ndarray) -> np.ndarray:
    """Sum ``values [N, 3]`` of every label into its item: ``[I, 3]``."""
    n_items = len(labels.items)
    return np.stack(
        [np.bincount(labels.item, weights=values[:, z], minlength=n_items) for z in range(3)], axis=1
    )


def _pin_anchors(labels: PairLabels, posterior: np.ndarray) -> np.ndarray:
    """Items with a gold outcome get all their posterior on it."""
    anchored = labels.anchored
    posterior[anchored] = np.eye(3)[labels.anchor[anchored]]
    return posterior


def majority_vote(labels: PairLabels) -> np.ndarray:
    """The soft majority vote ``[I, 3]``: each item's share of labels in each outcome (gold outcome
    where there is one). EM starts from it."""
    votes = _per_item(labels, np.eye(3)[labels.outcome])
    return _pin_anchors(labels, votes / votes.sum(axis=1, keepdims=True))


def label_log_likelihoods(params: Confusions, labels: PairLabels) -> np.ndarray:
    """``[N, 3]``: log P(this label | true outcome z) for every label and z."""
    per_annotator = np.log(params.matrices())  # [J, z, reported]
    return per_annotator[labels.annotator, :, labels.outcome]


def e_step(params: Confusions, labels: PairLabels) -> np.ndarray:
    """Each item's posterior over its true outcome ``[I, 3]``: ∝ prior(z) · Π_labels P(label | z)."""
    joint = np.log(params.class_prior()) + _per_item(labels, label_log_likelihoods(params, labels))
    joint -= joint.max(axis=1, keepdims=True)
    posterior = np.exp(joint)
    return _pin_anchors(labels, posterior / posterior.sum(axis=1, keepdims=True))


def m_step(
    posterior: np.ndarray, labels: PairLabels, prior: ReliabilityPrior, use: np.ndarray | None = None
) -> Confusions:
    """MAP estimates from the expected counts under ``posterior`` ``[I, 3]``, plus the pseudo-counts.

    ``use`` ``[I]`` bool restricts the counts to some items (the anchored ones, for the first
    estimates when there are gold answers)."""
    q = posterior[labels.item]  # [N, 3]: each label's item posterior
    if use is not None:
        q = q * use[labels.item, None]
    said = np.eye(3)[labels.outcome]  # [N, 3] one-hot of the reported outcome
    strict = q[:, FIRST_BETTER] + q[:, SECOND_BETTER]
    right = q[:, FIRST_BETTER] * said[:, FIRST_BETTER] + q[:, SECOND_BETTER] * said[:, SECOND_BETTER]
    reversed_ = q[:, FIRST_BETTER] * said[:, SECOND_BETTER] + q[:, SECOND_BETTER] * said[:, FIRST_BETTER]
    tied_strict = strict * said[:, TIE]
    kept = q[:, TIE] * said[:, TIE]
    broken = q[:, TIE] * (1 - said[:, TIE])

    def per_annotator(values: np.ndarray) -> np.ndarray:
        return np.bincount(labels.annotator, weights=values, minlength=len(labels.annotators))

    right, reversed_, tied_strict = per_annotator(right), per_annotator(reversed_), per_annotator(tied_strict)
    kept, broken = per_annotator(kept), per_annotator(broken)
    strict_total = (
        right + reversed_ + tied_strict + prior.strict_correct + prior.strict_reversed + prior.strict_tied
    )
    item_weight = np.ones(len(labels.items)) if use is None else use.astype(float)
    tied_items = float((posterior[:, TIE] * item_weight).sum())
    return Confusions(
        strict_correct=(right + prior.strict_correct) / strict_total,
        strict_reversed=(reversed_ + prior.strict_reversed) / strict_total,
        tie_kept=(kept + prior.tie_kept) / (kept + broken + prior.tie_kept + prior.tie_broken),
        prior_tie=(tied_items + prior.items_tied)
        / (float(item_weight.sum()) + prior.items_tied + prior.items_strict),
    )


def log_posterior(params: Confusions, labels: PairLabels, prior: ReliabilityPrior) -> float:
    """The objective EM climbs: log P(labels | params) (z summed out, or fixed by gold) plus the log
    density of the Dirichlet priors (up to a constant). It never decreases from one round to the next."""
    joint = np.log(params.class_prior()) + _per_item(labels, label_log_likelihoods(params, labels))
    anchored = labels.anchored
    top = joint.max(axis=1)
    likelihood = float((top + np.log(np.exp(joint - top[:, None]).sum(axis=1)))[~anchored].sum())
    likelihood += float(joint[anchored, labels.anchor[anchored]].sum())
    a, r, e, t = params.strict_correct, params.strict_reversed, params.tie_kept, params.prior_tie
    density = (
        prior.strict_correct * np.log(a).sum()
        + prior.strict_reversed * np.log(r).sum()
        + prior.strict_tied * np.log(1 - a - r).sum()
        + prior.tie_kept * np.log(e).sum()
        + prior.tie_broken * np.log(1 - e).sum()
        + prior.items_tied * np.log(t)
        + prior.items_strict * np.log(1 - t)
    )
    return likelihood + float(density)


def fit_reliability(
    records: Iterable[Mapping],
    gold: Mapping[str, object] | None = None,
    *,
    prior: ReliabilityPrior = ReliabilityPrior(),
    tol: float = 1e-6,
    max_iter: int = 500,
) -> ReliabilityFit:
    """Fit the Dawid–Skene model of the module docstring to ranking records.

    Args:
        records: ranking records (``prompt_id``, ``annotator``, ``tiers`` best first or ``ranking``
            text, ``candidates`` for the labels).
        gold: optional ``prompt_id`` → gold ranking (text, tiers or a Ranking; partial allowed): the
            pairs it orders are anchored to its outcome.
        prior: the pseudo-counts (:class:`ReliabilityPrior`).
        tol: stop when no parameter moves by more than this in one round.
        max_iter: at most this many EM rounds.
    """
    labels = label_items(records, gold)
    posterior = majority_vote(labels)
    anchored = labels.anchored
    first_use = anchored if anchored.any() else None  # see "Gold anchors" in the module docstring
    params = m_step(posterior, labels, prior, use=first_use)
    iterations, converged = 0, False
    while iterations < max_iter and not converged:
        posterior = e_step(params, labels)
        new = m_step(posterior, labels, prior)
        iterations += 1
        converged = new.largest_change(params) <= tol
        params = new
    return _summarise(params, labels, prior, iterations, converged)


def _summarise(
    params: Confusions, labels: PairLabels, prior: ReliabilityPrior, iterations: int, converged: bool
) -> ReliabilityFit:
    pairs = np.bincount(labels.annotator, minlength=len(labels.annotators))
    labels_per_item = np.bincount(labels.item, minlength=len(labels.items))
    t = params.prior_tie
    annotators = {}
    for j, name in enumerate(labels.annotators):
        a, r, e = (
            float(params.strict_correct[j]),
            float(params.strict_reversed[j]),
            float(params.tie_kept[j]),
        )
        annotators[name] = AnnotatorReliability(
            annotator=name,
            strict_correct=a,
            strict_reversed=r,
            tie_kept=e,
            expected_accuracy=(1 - t) * a + t * e,
            pairs=int(pairs[j]),
            weight=max(0.0, a - r),
        )
    return ReliabilityFit(
        annotators=annotators,
        prior_tie=float(t),
        items=len(labels.items),
        anchored_items=int(labels.anchored.sum()),
        shared_items=int((labels_per_item >= 2).sum()),
        iterations=iterations,
        converged=converged,
        log_posterior=log_posterior(params, labels, prior) if labels.items else 0.0,
    )
