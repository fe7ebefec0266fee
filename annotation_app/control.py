"""The ranking control's logic: rank selectors (one per response) <-> the ranking text field.

Pure functions, so the page only wires them. A selector holds a rank number as text ("1" is
best); responses with equal numbers are tied; responses without a number are not ranked yet
(a partial ranking, kept as a draft). Gaps are fine: ranks 1, 1, 3 and 1, 1, 2 mean the same.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.rankings import RankingError, format_tiers, parse_ranking


def ranks_to_text(labels: Sequence[str], ranks: Sequence[str | int | None]) -> str:
    """Canonical (possibly partial) ranking text from rank numbers; ``""`` when none is set.

    ``ranks_to_text("ABCD", ["3", "2", "1", "2"]) == "C > B = D > A"``.
    """
    by_rank: dict[int, list[str]] = {}
    for label, rank in zip(labels, ranks):
        if rank in (None, ""):
            continue
        by_rank.setdefault(int(rank), []).append(label)
    return format_tiers([sorted(by_rank[r]) for r in sorted(by_rank)]) if by_rank else ""


def text_to_ranks(text: str, labels: Sequence[str]) -> tuple[list[str | None], str]:
    """``(rank per label, error message)`` for what the annotator typed (partial allowed).

    Rank numbers are tier positions (1 = best); unnamed labels get None. On an error the ranks
    are all None and the message says what is wrong in plain words.
    """
    if not text.strip():
        return [None] * len(labels), ""
    try:
        ranking = parse_ranking(text, list(labels), complete=False)
    except RankingError as err:
        return [None] * len(labels), str(err)
    named = {label for tier in ranking.tiers for label in tier}
    return [str(ranking.tier_of(lab) + 1) if lab in named else None for lab in labels], ""
