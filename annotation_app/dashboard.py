"""The admin dashboard's figures: headline numbers with intervals, and the tables behind its charts.

Pure functions of the store's admin views (:meth:`Store.stats`, :meth:`Store.submitted_rankings`),
so they are tested without a server. Agreement statistics come from
:mod:`annotation_app.agreement`; their 95 % intervals are percentile bootstraps over prompts (the
unit annotators are sampled on: all rankings of a prompt are resampled together, so the interval
reflects which prompts happened to be ranked, Efron & Tibshirani 1993, ch. 13). Accuracy on gold
items comes from :mod:`annotation_app.gold`, its interval over each annotator's gold items.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from annotation_app import agreement
from annotation_app.gold import GoldAccuracy, gold_accuracy, gold_accuracy_text
from rlhf.reliability import fit_reliability

BOOTSTRAP_RESAMPLES = 300
PER_ANNOTATOR_COLUMNS = [
    "annotator",
    "submitted",
    "skipped",
    "items_per_hour",
    "median_seconds",
    "agreement_with_others",
    "agreement_95ci",
    "pairs_compared",
    "reliability",
    "training_weight",
]


# Added after PER_ANNOTATOR_COLUMNS when the project has gold items (per_annotator_columns).
GOLD_COLUMNS = ["gold_items", "gold_pair_accuracy", "gold_all_right"]


def per_annotator_columns(gold: Mapping[str, str] | None) -> list[str]:
    """The per-annotator table's columns: the gold ones only when there are gold items."""
    return PER_ANNOTATOR_COLUMNS + (GOLD_COLUMNS if gold else [])


HEADLINE_COLUMNS = ["figure", "value", "95 % interval"]


def headline(stats: Mapping, rankings: Sequence[Mapping], *, seed: int = 0) -> list[list]:
    """``[[figure, value, 95 % interval], ...]``: the numbers an admin checks first, rounded.
    Progress counts the prompts that need a quorum: gold items (``gold`` true) are outside it."""
    prompts = [p for p in stats["prompts"] if not p.get("gold")]
    needed = sum(p["quorum"] for p in prompts)
    done = sum(min(p["submitted"], p["quorum"]) for p in prompts)
    report = agreement.agreement_report(rankings)
    tau_ci, alpha_ci = bootstrap_over_prompts(rankings, _tau_and_alpha, seed=seed)
    return [
        ["rankings done / needed", f"{done} / {needed}{_percent(done, needed)}", ""],
        [
            "prompts complete",
            f"{stats['complete_prompts']} / {len(prompts)}{_percent(stats['complete_prompts'], len(prompts))}",
            "",
        ],
        ["tie rate (tied pairs)", _fmt(report["tie_rate"]), ""],
        ["Kendall τ-b between annotators", _fmt(report["kendall_tau_b_mean"]), _fmt_ci(tau_ci)],
        ["Krippendorff α (ordinal)", _fmt(report["krippendorff_alpha_ordinal"]), _fmt_ci(alpha_ci)],
        ["pairwise win/tie/loss agreement", _fmt(report["pairwise_agreement"]), ""],
        ["prompts ranked by 2+ annotators", str(report["prompts_with_2plus"]), ""],
        ["median seconds per item", _fmt(stats["median_seconds_per_item"], 1), ""],
    ]


def _tau_and_alpha(rankings: list[Mapping]) -> tuple[float, float]:
    report = agreement.agreement_report(rankings)
    return report["kendall_tau_b_mean"], report["krippendorff_alpha_ordinal"]


def bootstrap_over_prompts(
    rankings: Sequence[Mapping],
    statistic: Callable[[list[Mapping]], Sequence[float]],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    min_per_prompt: int = 2,
) -> list[tuple[float, float] | None]:
    """95 % percentile intervals of each number ``statistic`` returns, over prompts resampled
    with replacement.

    A prompt drawn twice enters as two prompts (its id gets a copy number), so within-prompt
    comparisons never pair rankings of different copies. Only prompts with ``min_per_prompt`` or
    more rankings are resampled (2 for agreement between annotators); an interval is None when
    fewer than 2 such prompts exist, or when its number is undefined in most resamples.
    """
    by_prompt: dict[str, list[Mapping]] = defaultdict(list)
    for rec in rankings:
        by_prompt[str(rec["prompt_id"])].append(rec)
    shared = [pid for pid, recs in by_prompt.items() if len(recs) >= min_per_prompt]
    n_values = len(statistic(list(rankings)))
    if len(shared) < 2:
        return [None] * n_values
    rng = random.Random(seed)
    draws: list[list[float]] = [[] for _ in range(n_values)]
    for _ in range(resamples):
        sample = [
            {**rec, "prompt_id": f"{pid}#{copy}", "resampled_from": pid}
            for copy, pid in enumerate(rng.choices(shared, k=len(shared)))
            for rec in by_prompt[pid]
        ]
        for i, value in enumerate(statistic(sample)):
            if not math.isnan(value):
                draws[i].append(value)
    return [_percentile_interval(values, resamples) for values in draws]


def _percentile_interval(values: list[float], resamples: int) -> tuple[float, float] | None:
    if len(values) < resamples / 2:
        return None
    values = sorted(values)
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]


def progress_over_time(rankings: Sequence[Mapping]) -> list[list]:
    """``[[time, rankings submitted so far], ...]`` in submission order (the progress chart)."""
    times = sorted(_when(rec) for rec in rankings)
    return [[t, i + 1] for i, t in enumerate(times)]


def per_annotator(
    stats: Mapping, rankings: Sequence[Mapping], *, gold: Mapping[str, str] | None = None, seed: int = 0
) -> list[list]:
    """One row per annotator (columns: :func:`per_annotator_columns`): throughput, time per item,
    agreement with the others, reliability and, when there are ``gold`` answers
    (``{prompt_id: ranking text}``), accuracy on gold items.

    Agreement with others is the share of response pairs on which the annotator's win/tie/loss
    call matches another annotator's on the same prompt, over every such comparison, with a
    bootstrap interval over prompts. The reliability fit takes the gold answers as anchors.
    Gold accuracy (:func:`annotation_app.gold.gold_accuracy`): how many gold items they ranked,
    their pair accuracy with its 95 % interval over those items, the share of items fully right.
    """
    mine: dict[str, list[Mapping]] = defaultdict(list)
    for rec in rankings:
        mine[rec["annotator"]].append(rec)
    reliability = _reliability(rankings, gold)
    on_gold = gold_accuracy(rankings, gold, resamples=BOOTSTRAP_RESAMPLES, seed=seed) if gold else {}
    names = [user["username"] for user in stats["annotators"]]
    counts = _agreement_with_others(rankings)
    # One bootstrap for every annotator at once: each resample is grouped and compared once.
    intervals = bootstrap_over_prompts(rankings, lambda rs: _agreement_shares(names, rs), seed=seed)
    rows = []
    for user, ci in zip(stats["annotators"], intervals):
        name = user["username"]
        recs = mine.get(name, [])
        agree, compared = counts.get(name, (0, 0))
        seconds = [r["time_spent"] for r in recs if r.get("time_spent") is not None]
        rows.append(
            [
                name,
                user["submitted"] or 0,
                user["skipped"] or 0,
                _items_per_hour(recs),
                round(statistics.median(seconds), 1) if seconds else None,
                round(agree / compared, 3) if compared else None,
                _fmt_ci(ci),
                compared,
                *reliability.get(name, (None, None)),
                *(_gold_cells(on_gold.get(name)) if gold else []),
            ]
        )
    return rows


def _gold_cells(acc: GoldAccuracy | None) -> list:
    """``[gold items, "0.83 [0.70, 0.93]", share fully right]`` (blank for no gold item ranked)."""
    if acc is None:
        return [0, "", None]
    return [acc.items, gold_accuracy_text(acc), round(acc.all_right, 3)]


def _reliability(
    rankings: Sequence[Mapping], gold: Mapping[str, str] | None = None
) -> dict[str, tuple[float, float]]:
    """``{annotator: (expected accuracy, training weight)}`` from the tie-aware Dawid–Skene model
    (:mod:`rlhf.reliability`, the weights ``rlhf rm train --annotator_weights reliability`` uses),
    with ``gold`` answers as anchors; empty until it has evidence: a pair ranked by two
    annotators, or a ranked gold item."""
    if not rankings:
        return {}
    fit = fit_reliability(rankings, gold=gold)
    if not (fit.shared_items or fit.anchored_items):
        return {}
    return {name: (round(a.expected_accuracy, 3), round(a.weight, 3)) for name, a in fit.annotators.items()}


PROPOSAL_COLUMNS = ["prompt_id", "proposed", "human_rankings", "pair_agreement", "kappa", "saw_proposal"]


def proposal_headline(
    proposals: Mapping[str, Mapping], rankings: Sequence[Mapping], *, seed: int = 0
) -> list[list]:
    """Rows for the headline: how well the model's proposed rankings agree with the annotators.

    Cohen's κ on the win/tie/loss call of every response pair that a proposal and a human ranking
    both order (chance-corrected, so a model that always says "tie" scores 0, not its tie rate),
    and Kendall τ-b averaged over (proposal, human ranking) pairs; 95 % bootstrap over prompts.
    Empty when no proposal has been made (``rlhf annotate propose``).

    When some annotators saw the proposal as they ranked (they opted in; ``proposal_shown``),
    both figures follow again for those rankings ("shown": agreement there may be anchoring) and
    for the others ("hidden": the annotator opted out, or the prompt had no proposal yet), each
    with its count of rankings; together the two are the rankings of the overall figures. The
    overall and "hidden" figures judge the current proposals; the "shown" ones judge each ranking
    against the proposal its annotator saw (``seen_proposal``), which a later ``propose`` may have
    replaced.
    """
    compared = [rec for rec in rankings if rec["prompt_id"] in proposals]
    if not proposals:
        return []
    source = next(iter(proposals.values()))["source"]
    rows = _proposal_agreement_rows(proposals, compared, f" — {source}", "", seed)
    shown = [rec for rec in compared if rec.get("proposal_shown")]
    if shown:
        hidden = [rec for rec in compared if not rec.get("proposal_shown")]
        for subset, which in ((shown, "shown"), (hidden, "hidden")):
            rows += _proposal_agreement_rows(
                proposals,
                subset,
                f", suggestion {which} ({len(subset)} rankings)",
                f", suggestion {which}",
                seed,
                as_seen=which == "shown",
            )
    return rows


def _proposal_agreement_rows(
    proposals: Mapping[str, Mapping],
    rankings: Sequence[Mapping],
    kappa_note: str,
    tau_note: str,
    seed: int,
    as_seen: bool = False,
) -> list[list]:
    """The κ and τ-b headline rows of the model's proposals against ``rankings``, with intervals
    (``as_seen``: each ranking against the proposal its annotator saw, where it was kept)."""
    kappa, tau = _proposal_figures(proposals, rankings, as_seen)
    kappa_ci, tau_ci = bootstrap_over_prompts(
        rankings, lambda rs: _proposal_figures(proposals, rs, as_seen), seed=seed, min_per_prompt=1
    )
    return [
        [f"model pre-ranking vs annotators: Cohen κ (pairs){kappa_note}", _fmt(kappa), _fmt_ci(kappa_ci)],
        [f"model pre-ranking vs annotators: Kendall τ-b{tau_note}", _fmt(tau), _fmt_ci(tau_ci)],
    ]


def proposal_rows(proposals: Mapping[str, Mapping], rankings: Sequence[Mapping]) -> list[list]:
    """One row per proposed prompt: the proposal, how many humans ranked it, their agreement with
    it, and how many of them saw it as they ranked (``saw_proposal``)."""
    by_prompt: dict[str, list[Mapping]] = defaultdict(list)
    for rec in rankings:
        by_prompt[str(rec["prompt_id"])].append(rec)
    rows = []
    for pid, proposal in proposals.items():
        recs = by_prompt.get(pid, [])
        outcomes = [
            o for rec in recs for o in agreement.proposal_outcomes(_tiers(proposal["ranking"]), rec["tiers"])
        ]
        share = sum(a == b for a, b in outcomes) / len(outcomes) if outcomes else None
        kappa = agreement.cohen_kappa(outcomes)
        rows.append(
            [
                pid,
                proposal["ranking"],
                len(recs),
                None if share is None else round(share, 3),
                None if math.isnan(kappa) else round(kappa, 3),
                sum(1 for rec in recs if rec.get("proposal_shown")),
            ]
        )
    return rows


def _proposal_figures(
    proposals: Mapping[str, Mapping], rankings: Sequence[Mapping], as_seen: bool = False
) -> tuple[float, float]:
    outcomes, taus = [], []
    for rec in rankings:
        pid = rec.get("resampled_from", rec["prompt_id"])  # a bootstrap copy keeps its prompt's proposal
        seen = rec.get("seen_proposal") if as_seen else None
        proposed = _tiers(seen or proposals[pid]["ranking"])
        outcomes.extend(agreement.proposal_outcomes(proposed, rec["tiers"]))
        tau = agreement.kendall_tau_b(proposed, rec["tiers"])
        if not math.isnan(tau):
            taus.append(tau)
    return agreement.cohen_kappa(outcomes), (sum(taus) / len(taus) if taus else math.nan)


def _tiers(ranking: str) -> list[list[str]]:
    return [tier.split(" = ") for tier in ranking.split(" > ")]


SECONDS_BINS = (0, 10, 20, 30, 60, 120, 300)
SECONDS_BIN_NAMES = [f"{lo}–{hi} s" for lo, hi in zip(SECONDS_BINS, SECONDS_BINS[1:])] + [
    f"{SECONDS_BINS[-1]}+ s"
]


def seconds_histogram(rankings: Sequence[Mapping]) -> list[list]:
    """``[[bin, rankings], ...]``: how long submitted items took (recorded seconds per item)."""
    counts = [0] * len(SECONDS_BINS)
    for rec in rankings:
        seconds = rec.get("time_spent")
        if seconds is not None:
            counts[max(i for i, edge in enumerate(SECONDS_BINS) if seconds >= edge)] += 1
    return [[name, n] for name, n in zip(SECONDS_BIN_NAMES, counts)]


# ----------------------------------------------------------------------------- helpers


def _agreement_with_others(rankings: Sequence[Mapping]) -> dict[str, tuple[int, int]]:
    """``{annotator: (agreeing pairs, compared pairs)}`` against every other annotator's ranking of
    the same prompt, all annotators in one pass (each pair of rankings is compared once and counts
    for both annotators: the win/tie/loss agreement is symmetric)."""
    by_prompt: dict[str, list[Mapping]] = defaultdict(list)
    for rec in rankings:
        by_prompt[str(rec["prompt_id"])].append(rec)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for recs in by_prompt.values():
        for a, b in itertools.combinations(recs, 2):
            if a["annotator"] == b["annotator"]:
                continue
            n_agree, n_compared = agreement.pairwise_agreement(a["tiers"], b["tiers"])
            for who in (a["annotator"], b["annotator"]):
                counts[who][0] += n_agree
                counts[who][1] += n_compared
    return {who: (agree, compared) for who, (agree, compared) in counts.items()}


def _agreement_shares(names: Sequence[str], rankings: Sequence[Mapping]) -> tuple[float, ...]:
    counts = _agreement_with_others(rankings)
    pairs = [counts.get(name, (0, 0)) for name in names]
    return tuple(agree / compared if compared else math.nan for agree, compared in pairs)


def _items_per_hour(recs: Sequence[Mapping]) -> float | None:
    """Submissions per hour of the annotator's active time (sum of recorded seconds per item)."""
    seconds = sum(r["time_spent"] for r in recs if r.get("time_spent"))
    return round(3600 * len(recs) / seconds, 1) if seconds else None


def _when(rec: Mapping) -> datetime:
    return datetime.strptime(rec["created_at"], "%Y-%m-%dT%H:%M:%SZ")


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _percent(part: int, whole: int) -> str:
    return f" ({100 * part / whole:.0f} %)" if whole else ""
