"""Gold items: prompts with a known answer, served unannounced, that measure each annotator.

A project marks a prompt as a gold (or attention) item by importing it with a ``gold`` field: the
known answer as ranking text over the prompt's labels, full or partial, ties allowed
(``"B > A = C"``, or ``"B > D"`` when only that order is certain). The store keeps its canonical
text in ``prompts.gold`` and serves gold items at the project's ``gold_rate`` (``Store._choose``);
annotators are never told which items are gold. This module is the one home of what a gold
answer is and how an annotator scores against it:

* :func:`gold_ranking` reads one answer (a clear one-line error for a bad one),
  :func:`gold_problems` checks the records of an import, row by row;
* :func:`serve_gold` is the deterministic draw that decides whether an annotator's next item is
  a gold one;
* :func:`gold_accuracy` scores each annotator's submitted rankings of gold items: pair accuracy
  (with a bootstrap interval over their gold items) and the share of items answered fully right.

**Which pairs count.** A gold answer decides the pairs whose two labels it names; the
annotator's call on such a pair (win, tie or loss) must equal the gold's. A tie in the gold is an
answer too: the annotator must tie that pair. Pairs the gold leaves out (a label it does not
name) are not scored.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rlhf.errors import UserError
from rlhf.rankings import Ranking, RankingError, parse_ranking
from rlhf.reliability import pair_outcomes
from rlhf.stats import Estimate, bootstrap_ci


class GoldError(UserError):
    """A gold answer that is not a ranking of at least two of its prompt's responses."""

    code = "bad_gold"


def gold_ranking(value: object, labels: Sequence[str]) -> Ranking | None:
    """The known answer ``value`` as a :class:`Ranking` over ``labels``; None when there is none.

    ``value`` is ranking text (a full or partial ranking, ties allowed) naming at least two labels:
    an answer naming one decides no pair. Null counts as absent, as everywhere in the contracts.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        # The rankings contract's `gold` is a score per candidate (rlhf simulate); that is not a
        # known answer, and a silent conversion would turn simulated scores into gold items.
        scores = (
            " (scores per response, as `rlhf simulate` writes, are not one)"
            if isinstance(value, dict | list)
            else ""
        )
        raise GoldError(
            f"gold must be the known answer as ranking text such as {' > '.join(labels[:2])!r}, "
            f"got {type(value).__name__}{scores}"
        )
    shown = repr(value if len(value) <= 60 else value[:60] + "…")  # one line, even for a huge value
    try:
        ranking = parse_ranking(value, labels, complete=False)
    except RankingError as err:
        raise GoldError(f"gold {shown}: {err}") from None
    if len(ranking.ranked) < 2:
        raise GoldError(f"gold {shown} names one response; a known answer orders or ties at least two")
    return ranking


def gold_problems(records: Iterable[Mapping]) -> list[str]:
    """``"row N: ..."`` (1-based) for every candidates record whose ``gold`` is not a valid answer."""
    problems = []
    for row, rec in enumerate(records, start=1):
        try:
            gold_ranking(rec.get("gold"), [c["label"] for c in rec["candidates"]])
        except GoldError as err:
            problems.append(f"row {row}: {err}")
    return problems


def serve_gold(username: str, items_done: int, gold_rate: float) -> bool:
    """Whether the annotator's next item is a gold one: a draw uniform in [0, 1) below ``gold_rate``.

    The draw is a hash of (user, how many items they have submitted or skipped), not a random
    number: the same call gives the same answer (asking again, or from another app process,
    cannot dodge or add a gold item), each new item gets a fresh draw, and over many items the
    share of gold ones approaches ``gold_rate``."""
    digest = hashlib.sha256(f"{username}\n{items_done}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < gold_rate


@dataclass(frozen=True)
class GoldAccuracy:
    """One annotator's answers on gold items.

    ``pair_accuracy``: right pairs / decided pairs, over all their gold items, with a 95 %
    percentile-bootstrap interval over those items (NaN bounds with fewer than two items);
    ``all_right``: the share of gold items with every decided pair right."""

    annotator: str
    items: int
    pairs: int
    pair_accuracy: Estimate
    all_right: float


def gold_accuracy(
    rankings: Iterable[Mapping], gold: Mapping[str, str], *, resamples: int = 1000, seed: int = 0
) -> dict[str, GoldAccuracy]:
    """``{annotator: GoldAccuracy}`` for every annotator with a submitted ranking of a gold item.

    ``rankings`` are submitted ranking records (``prompt_id``, ``annotator``, ``tiers`` best first,
    ``candidates`` for the labels), ``gold`` maps ``prompt_id`` to its known answer's text.
    Rankings of other prompts are ignored."""
    per_item: dict[str, list[tuple[int, int]]] = defaultdict(list)  # annotator -> [(right, decided)]
    for rec in rankings:
        answer = gold.get(str(rec["prompt_id"]))
        if answer is None:
            continue
        labels = [c["label"] for c in rec["candidates"]]
        expected = pair_outcomes(gold_ranking(answer, labels))
        given = pair_outcomes(Ranking.from_tiers(rec["tiers"], labels, complete=False))
        right = sum(given.get(pair) == outcome for pair, outcome in expected.items())
        per_item[str(rec["annotator"])].append((right, len(expected)))
    return {
        name: GoldAccuracy(
            annotator=name,
            items=len(items),
            pairs=sum(decided for _, decided in items),
            # The interval resamples whole items: one ranking's pairs are not independent.
            pair_accuracy=bootstrap_ci(items, _pair_share, n_resamples=resamples, seed=seed),
            all_right=sum(right == decided for right, decided in items) / len(items),
        )
        for name, items in sorted(per_item.items())
    }


def gold_accuracy_text(acc: GoldAccuracy) -> str:
    """``"0.83 [0.70, 0.93]"``, or the value alone when one gold item gives no interval."""
    estimate = acc.pair_accuracy
    return f"{estimate.value:.2f}" if math.isnan(estimate.low) else estimate.fmt(2)


def _pair_share(items: Sequence[tuple[int, int]]) -> float:
    decided = sum(d for _, d in items)
    return sum(r for r, _ in items) / decided if decided else math.nan
