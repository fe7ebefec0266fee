"""Agreement between annotators who ranked the same prompts (docs/rankings.md, "Agreement").

Pure functions over tiers (a ranking is a list of tiers, best first, each a list of labels):

* :func:`kendall_tau_b` — scipy's τ-b between two rankings of one prompt (ties handled); an
  all-tied ranking has no order, so τ is NaN: it is counted and reported, never averaged in.
* :func:`krippendorff_alpha_ordinal` — written here (no extra dependency): coincidence matrix
  and the ordinal distance of Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability",
  §B and §E. Unit = (prompt, candidate), value = tier index.
* :func:`pair_classes` / :func:`pairwise_agreement` — agreement on derived pairs with three
  classes (first wins / tie / second wins).
* :func:`tie_rate` — share of candidate pairs put in the same tier.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

Tiers = Sequence[Sequence[str]]


def tier_index(tiers: Tiers) -> dict[str, int]:
    """``{label: tier number}`` (0 = best)."""
    return {label: i for i, tier in enumerate(tiers) for label in tier}


def kendall_tau_b(a: Tiers, b: Tiers) -> float:
    """Kendall τ-b between two rankings of the same labels; NaN when either is all tied."""
    # Lazy: scipy.stats takes ~2 s to import, and `rlhf annotate` loads this module for every action.
    from scipy.stats import kendalltau

    ia, ib = tier_index(a), tier_index(b)
    labels = sorted(set(ia) & set(ib))
    if len(labels) < 2 or len(set(ia[x] for x in labels)) < 2 or len(set(ib[x] for x in labels)) < 2:
        return math.nan
    res = kendalltau([ia[x] for x in labels], [ib[x] for x in labels], variant="b")
    return float(res.statistic)


def pair_classes(tiers: Tiers) -> dict[tuple[str, str], int]:
    """For each unordered pair (x, y), x < y alphabetically: +1 x better, 0 tie, -1 y better."""
    idx = tier_index(tiers)
    out = {}
    for x, y in itertools.combinations(sorted(idx), 2):
        out[(x, y)] = 0 if idx[x] == idx[y] else (1 if idx[x] < idx[y] else -1)
    return out


def pairwise_agreement(a: Tiers, b: Tiers) -> tuple[int, int]:
    """``(agreeing pairs, compared pairs)`` between two rankings on the win/tie/loss classes."""
    ca, cb = pair_classes(a), pair_classes(b)
    common = set(ca) & set(cb)
    return sum(ca[p] == cb[p] for p in common), len(common)


def tie_rate(rankings: Iterable[Tiers]) -> float:
    """Tied pairs / all candidate pairs, over every ranking (NaN when there are no pairs)."""
    ties = total = 0
    for tiers in rankings:
        classes = pair_classes(tiers)
        ties += sum(1 for c in classes.values() if c == 0)
        total += len(classes)
    return ties / total if total else math.nan


def krippendorff_alpha_ordinal(units: Mapping[object, Sequence[float]]) -> float:
    """Krippendorff's α at the ordinal level.

    ``units`` maps a unit to the values its coders gave (missing codes simply absent); units
    with fewer than two values are not pairable and are dropped. With values v, coincidences
    ``o[c][k] = Σ_u (number of c-k pairs of coders in u) / (m_u - 1)``, ``n_c = Σ_k o[c][k]``,
    ordinal distance ``δ²(c, k) = (Σ_{g between c and k} n_g - (n_c + n_k) / 2)²`` and
    ``α = 1 - (n - 1) Σ o[c][k] δ²(c, k) / Σ n_c n_k δ²(c, k)``.
    NaN when fewer than two pairable values or no variation at all (α undefined).
    """
    o: dict[tuple[float, float], float] = defaultdict(float)
    for values in units.values():
        m = len(values)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            o[(values[i], values[j])] += 1.0 / (m - 1)
    if not o:
        return math.nan
    levels = sorted({c for c, _ in o})
    n_c = {c: sum(v for (a, _), v in o.items() if a == c) for c in levels}
    n = sum(n_c.values())
    if len(levels) < 2:
        return math.nan
    pos = {c: i for i, c in enumerate(levels)}

    def delta2(c: float, k: float) -> float:
        lo, hi = sorted((pos[c], pos[k]))
        between = sum(n_c[levels[g]] for g in range(lo, hi + 1))
        return (between - (n_c[c] + n_c[k]) / 2.0) ** 2

    observed = sum(v * delta2(c, k) for (c, k), v in o.items())
    expected = sum(n_c[c] * n_c[k] * delta2(c, k) for c in levels for k in levels)
    if expected == 0:
        return math.nan
    return 1.0 - (n - 1) * observed / expected


def agreement_report(rankings: Iterable[Mapping]) -> dict:
    """Agreement over records with ``prompt_id``, ``annotator`` and ``tiers`` (the rankings contract).

    Returns τ-b (mean over annotator pairs of a prompt with a defined τ, plus the count of NaN
    pairs), Krippendorff's α ordinal over (prompt, candidate) units, win/tie/loss agreement, the
    tie rate and the number of prompts with at least two annotators.
    """
    by_prompt: dict[str, list[Mapping]] = defaultdict(list)
    all_tiers = []
    for rec in rankings:
        by_prompt[str(rec["prompt_id"])].append(rec)
        all_tiers.append(rec["tiers"])
    taus: list[float] = []
    nan_pairs = 0
    agree = compared = 0
    units: dict[tuple[str, str], list[float]] = defaultdict(list)
    for pid, recs in by_prompt.items():
        for rec in recs:
            for label, t in tier_index(rec["tiers"]).items():
                units[(pid, label)].append(float(t))
        for x, y in itertools.combinations(recs, 2):
            tau = kendall_tau_b(x["tiers"], y["tiers"])
            if math.isnan(tau):
                nan_pairs += 1
            else:
                taus.append(tau)
            a, c = pairwise_agreement(x["tiers"], y["tiers"])
            agree += a
            compared += c
    return {
        "prompts_with_2plus": sum(1 for recs in by_prompt.values() if len(recs) >= 2),
        "kendall_tau_b_mean": sum(taus) / len(taus) if taus else math.nan,
        "kendall_tau_b_pairs": len(taus),
        "kendall_tau_b_nan_pairs": nan_pairs,
        "krippendorff_alpha_ordinal": krippendorff_alpha_ordinal(units),
        "pairwise_agreement": agree / compared if compared else math.nan,
        "pairs_compared": compared,
        "tie_rate": tie_rate(all_tiers),
    }


def cohen_kappa(pairs: Iterable[tuple[int, int]]) -> float:
    """Cohen's κ between two raters over ``(class_a, class_b)`` pairs (any hashable classes):
    (p_o − p_e) / (1 − p_e), p_e from each rater's own class frequencies (Cohen 1960). NaN when
    there is nothing to compare or chance agreement is already perfect."""
    pairs = list(pairs)
    if not pairs:
        return math.nan
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    count_a, count_b = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(count_a[c] * count_b[c] for c in count_a) / n**2
    return math.nan if expected == 1 else (observed - expected) / (1 - expected)


def proposal_outcomes(proposal: Tiers, human: Tiers) -> list[tuple[int, int]]:
    """``(model's class, human's class)`` for every response pair both rank (win/tie/loss, as
    :func:`pair_classes`): the units of the pre-ranking κ."""
    model, person = pair_classes(proposal), pair_classes(human)
    return [(model[p], person[p]) for p in sorted(set(model) & set(person))]
