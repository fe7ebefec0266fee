"""The ranking control's logic: the typed ranking text <-> the rank board, the best response, and
a ranking from scores (simulated annotators, a model's proposed ranking).

Pure functions, so the page only wires them. The board (:mod:`annotation_app.board`) shows a
possibly partial ranking: labels in rank slots, ties in one slot, the rest unranked (kept as a
draft). Both directions go through the canonical text of :func:`rlhf.rankings.format_tiers`.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.rankings import RankingError, format_tiers, parse_ranking


def canonical_partial(text: str, labels: Sequence[str]) -> tuple[str | None, str]:
    """``(canonical text, error)`` for what the annotator typed; a partial ranking is fine.

    ``canonical_partial("c > b = d", "ABCD") == ("C > B = D", "")``; on an error the text is
    None and the message says what is wrong in plain words (the board then keeps its state).
    """
    if not text.strip():
        return "", ""
    if not labels:
        return None, "there is no item to rank on this page; press Next"
    try:
        ranking = parse_ranking(text, list(labels), complete=False)
    except RankingError as err:
        return None, str(err)
    return format_tiers(ranking.tiers), ""


def single_best(text: str, labels: Sequence[str]) -> tuple[str | None, str]:
    """``(label, "")`` of the one best response of a ranking, or ``(None, why not)``.

    Editing the best response needs exactly one response in the top tier.
    """
    canonical, error = canonical_partial(text, labels)
    if not canonical:
        return None, error or "rank the responses first: the edit starts from the best one"
    top = canonical.split(" > ")[0].split(" = ")
    if len(top) > 1:
        return None, f"the best rank is a tie ({' = '.join(top)}); put one response first to edit it"
    return top[0], ""


def ranking_from_scores(labels: Sequence[str], scores: Sequence[float], tie_threshold: float = 0.0) -> str:
    """Ranking text best first; neighbours within ``tie_threshold`` of the tier's best are tied.

    ``ranking_from_scores("ABC", [0.1, 0.9, 0.12], 0.05) == "B > A = C"``.
    """
    order = sorted(zip(labels, scores), key=lambda x: -x[1])
    tiers: list[list[str]] = []
    top = None
    for label, score in order:
        if tiers and top - score <= tie_threshold:
            tiers[-1].append(label)
        else:
            tiers.append([label])
            top = score
    return " > ".join(" = ".join(sorted(t)) for t in tiers)
