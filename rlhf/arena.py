"""Arena votes and leaderboards (docs/arena.md): no models, no database; the one file written is a PNG.

- :func:`arena_pairs`: every pair of policies' answers to a prompt, in a random order, blind;
- :func:`votes_from_rankings`: votes (:class:`rlhf.arena_fit.Vote`) from ranking records of two
  responses that name their ``model`` (what voters write, what the app stores);
- :func:`fit_leaderboard`, :func:`leaderboards_by_voter`: one :class:`Leaderboard` per voter,
  Bradley–Terry–Davidson ratings with intervals over prompts and length-controlled win rates
  against a baseline (:mod:`rlhf.arena_fit`); a voter whose votes cannot rate the models is set
  aside with the reason;
- :func:`leaderboard_table`, :func:`format_leaderboards`, :func:`leaderboard_figure`,
  :func:`leaderboard_metrics`: the same for W&B, the terminal, a PNG and a run summary.

The ``rlhf arena`` command that samples policies and lets voters vote is :mod:`experiments.arena`;
the app's Arena tab fits its votes with these functions.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from rlhf.arena_fit import Ratings, Vote, fit_bradley_terry_davidson, length_controlled_win_rates
from rlhf.contracts import prompt_text
from rlhf.errors import UserError
from rlhf.rankings import parse_ranking

LABELS = ("A", "B")  # an arena pair's two responses, in the order shown
HUMAN = "human"  # the voter of a vote that names none: a person (the app's votes)


# ----------------------------------------------------------------------------- pairs and votes


def arena_pairs(responses: Sequence[Mapping], seed: int = 0) -> list[dict]:
    """Every pair of models' responses to each prompt, as candidates records of two responses.

    ``responses``: ``{prompt_id, prompt, responses: {model: {text, n_tokens, finished}}}`` per prompt.
    Which model is A is drawn per pair (seeded): position says nothing about the model. The pair id
    ``<prompt_id>-p<n>`` numbers the model pairs and names no model."""
    rng = random.Random(f"arena-order:{seed}")
    out = []
    for rec in responses:
        models = sorted(rec["responses"])
        for n, (x, y) in enumerate(itertools.combinations(models, 2), 1):
            shown = [x, y] if rng.random() < 0.5 else [y, x]
            out.append(
                {
                    "prompt_id": f"{rec['prompt_id']}-p{n}",
                    "prompt": rec["prompt"],
                    "candidates": [
                        {
                            "label": label,
                            "text": rec["responses"][model]["text"],
                            "model": model,
                            "gen": {k: v for k, v in rec["responses"][model].items() if k != "text"},
                        }
                        for label, model in zip(LABELS, shown)
                    ],
                }
            )
    return out


def votes_from_rankings(records: Iterable[Mapping]) -> list[Vote]:
    """Arena votes (:class:`rlhf.arena_fit.Vote`) from ranking records of two responses that name
    their ``model``. The vote's prompt is the prompt's text (all pairs of a prompt are one bootstrap
    cluster); lengths are characters, as AlpacaEval measures them. A record that does not compare
    two different named models is refused with its number."""
    votes = []
    for n, rec in enumerate(records, 1):
        cands = rec["candidates"]
        models = [str(c.get("model") or "") for c in cands]
        if len(cands) != 2 or not all(models) or models[0] == models[1]:
            raise UserError(
                f"vote {n} ({rec.get('prompt_id')!r}) is not an arena vote: it must rank two responses of "
                f"two different named models, got models {models}",
                code="not_arena_vote",
            )
        tiers = rec.get("tiers") or [list(t) for t in parse_ranking(rec["ranking"], list(LABELS)).tiers]
        first = cands[0]["label"]
        outcome = "tie" if len(tiers) == 1 else ("a" if tiers[0] == [first] else "b")
        votes.append(
            Vote(
                models[0],
                models[1],
                outcome,
                prompt_text(rec["prompt"]),
                float(len(cands[0]["text"])),
                float(len(cands[1]["text"])),
            )
        )
    return votes


# ----------------------------------------------------------------------------- leaderboards


@dataclass
class Leaderboard:
    """One voter's arena: ratings with intervals, the tie parameter, win rates against the baseline."""

    voter: str
    ratings: Ratings
    baseline: str
    win_rates: dict[str, Any] = field(default_factory=dict)  # model → LengthControlledWinRate
    tie_rate: float = 0.0

    def rows(self) -> list[dict]:
        """Best first: ``model, rating, ci_low, ci_high, win_rate, win_rate_low, win_rate_high,
        lc_win_rate, lc_low, lc_high, lc_extrapolated`` (the win rates against the baseline; None for
        the baseline itself)."""
        out = []
        for row in self.ratings.table():
            lc = self.win_rates.get(row["model"])
            out.append(
                {
                    **row,
                    "win_rate": None if lc is None else lc.win_rate,
                    "win_rate_low": None if lc is None else lc.win_rate_interval[0],
                    "win_rate_high": None if lc is None else lc.win_rate_interval[1],
                    "lc_win_rate": None if lc is None else lc.lc_win_rate.value,
                    "lc_low": None if lc is None else lc.lc_win_rate.low,
                    "lc_high": None if lc is None else lc.lc_win_rate.high,
                    "lc_extrapolated": None if lc is None else lc.extrapolated,
                }
            )
        return out

    def as_dict(self) -> dict:
        return {
            "voter": self.voter,
            "baseline": self.baseline,
            "n_votes": self.ratings.n_votes,
            "n_prompts": self.ratings.n_prompts,
            "tie_rate": self.tie_rate,
            "nu": {"value": self.ratings.nu.value, "low": self.ratings.nu.low, "high": self.ratings.nu.high},
            "failed_bootstrap": self.ratings.failed_boot,
            "models": self.rows(),
        }


def fit_leaderboard(
    votes: Sequence[Vote], voter: str, baseline: str | None = None, *, n_boot: int = 1000, seed: int = 0
) -> Leaderboard:
    """Ratings and win rates of one voter's votes; ``baseline`` defaults to the lowest-rated model."""
    if not votes:
        raise UserError(f"{voter}: no votes to rate", code="no_votes")
    try:
        ratings = fit_bradley_terry_davidson(votes, n_boot=n_boot, seed=seed)
    except ValueError as err:  # only ties, or a disconnected arena: the data cannot rate the models
        raise UserError(f"{voter}: the votes cannot rate the models: {err}", code="no_rating") from None
    if baseline is None:
        baseline = ratings.table()[-1]["model"]
    elif baseline not in ratings.models:
        raise UserError(
            f"baseline {baseline!r} is not in the arena of {voter}; models: {', '.join(ratings.models)}",
            code="bad_baseline",
        )
    return Leaderboard(
        voter=voter,
        ratings=ratings,
        baseline=baseline,
        win_rates=length_controlled_win_rates(votes, baseline, n_boot=n_boot, seed=seed),
        tie_rate=sum(v.outcome == "tie" for v in votes) / len(votes),
    )


def people_votes(records: Iterable[Mapping]) -> list[dict]:
    """Ranking records of two responses (the app's arena votes) as votes of voter :data:`HUMAN`."""
    return [{**r, "voter": HUMAN} for r in records]


def leaderboards_by_voter(
    records: Sequence[Mapping], baseline: str | None, *, n_boot: int = 1000, seed: int = 0
) -> tuple[list[Leaderboard], dict[str, str]]:
    """One leaderboard per ``voter`` of the vote records (``human`` where a record names none), in
    the order voters first appear, and ``{voter: reason}`` for each voter whose votes cannot rate
    the models (only ties, as when two policies answer every prompt alike; a disconnected arena):
    set aside with the fit's one-line reason, so that one such voter does not stop the others."""
    groups: dict[str, list[Mapping]] = {}
    for rec in records:
        groups.setdefault(str(rec.get("voter") or HUMAN), []).append(rec)
    boards, unrated = [], {}
    for voter, recs in groups.items():
        try:
            boards.append(
                fit_leaderboard(votes_from_rankings(recs), voter, baseline, n_boot=n_boot, seed=seed)
            )
        except UserError as err:
            if err.code != "no_rating":
                raise
            unrated[voter] = str(err)
    return boards, unrated


def leaderboard_table(boards: Sequence[Leaderboard]) -> tuple[list[str], list[list]]:
    """Columns and rows of every leaderboard side by side (W&B table, terminal, the app)."""
    columns = [
        "voter",
        "model",
        "rating",
        "ci_low",
        "ci_high",
        "win_rate_vs_baseline",
        "lc_win_rate",
        "lc_low",
        "lc_high",
        "lc_extrapolated",
        "baseline",
        "votes",
    ]
    rows = [
        [
            b.voter,
            r["model"],
            r["rating"],
            r["ci_low"],
            r["ci_high"],
            r["win_rate"],
            r["lc_win_rate"],
            r["lc_low"],
            r["lc_high"],
            r["lc_extrapolated"],
            b.baseline,
            b.ratings.n_votes,
        ]
        for b in boards
        for r in b.rows()
    ]
    return columns, rows


def format_leaderboards(boards: Sequence[Leaderboard]) -> str:
    """The leaderboards as text, one block per voter."""

    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = []
    for b in boards:
        lines.append(
            f"{b.voter}: {b.ratings.n_votes} votes on {b.ratings.n_prompts} prompts, ties {b.tie_rate:.0%}, "
            f"nu {b.ratings.nu.value:.2f}; win rates against {b.baseline}"
        )
        lines.append(f"  {'model':<24} {'rating [95%]':>22} {'win rate':>9} {'LC win rate [95%]':>24}")
        for r in b.rows():
            rating = f"{r['rating']:.0f} [{r['ci_low']:.0f}, {r['ci_high']:.0f}]"
            lines.append(f"  {r['model']:<24} {rating:>22} {num(r['win_rate'], '.3f'):>9} {lc_text(r):>24}")
    return "\n".join(lines)


def lc_text(row: dict) -> str:
    """A leaderboard row's length-controlled win rate with its interval, as people read it: "—" for
    the baseline, marked where the lengths barely overlapped and the rate is an extrapolation."""
    if row["lc_win_rate"] is None:
        return "—"
    text = f"{row['lc_win_rate']:.3f} [{row['lc_low']:.3f}, {row['lc_high']:.3f}]"
    return text + " (extrapolated)" if row["lc_extrapolated"] else text


def leaderboard_figure(boards: Sequence[Leaderboard]):
    """A figure with a column per voter: ratings with their intervals (top), length-controlled win
    rates against the baseline with theirs (bottom). Same model order in every column."""
    order = [r["model"] for r in boards[0].rows()][::-1]  # best at the top
    for b in boards[1:]:
        order += [m for m in b.ratings.models if m not in order]
    # A Figure of its own, not pyplot's: no global state and no backend to choose, in a script or
    # in the app's server alike.
    fig = Figure(figsize=(4.2 * len(boards), 1.2 + 1.1 * len(order)))
    axes = fig.subplots(2, len(boards), squeeze=False)
    for col, board in enumerate(boards):
        rows = {r["model"]: r for r in board.rows()}
        models = [m for m in order if m in rows]
        y = range(len(models))
        top, bottom = axes[0][col], axes[1][col]
        value = [rows[m]["rating"] for m in models]
        top.errorbar(
            value,
            y,
            xerr=[
                [v - rows[m]["ci_low"] for m, v in zip(models, value)],
                [rows[m]["ci_high"] - v for m, v in zip(models, value)],
            ],
            fmt="o",
            capsize=4,
        )
        top.set_yticks(list(y), models)
        top.set_title(f"{board.voter}\n{board.ratings.n_votes} votes, ties {board.tie_rate:.0%}", fontsize=9)
        top.set_xlabel("rating (Elo scale, 95 % CI over prompts)", fontsize=8)
        others = [m for m in models if rows[m]["lc_win_rate"] is not None]
        lc = [rows[m]["lc_win_rate"] for m in others]
        bottom.errorbar(
            lc,
            range(len(others)),
            xerr=[
                [v - rows[m]["lc_low"] for m, v in zip(others, lc)],
                [rows[m]["lc_high"] - v for m, v in zip(others, lc)],
            ],
            fmt="s",
            color="tab:orange",
            capsize=4,
        )
        bottom.axvline(0.5, color="grey", lw=0.8, ls="--")
        bottom.set_xlim(0, 1)
        # a rate beyond the votes (lengths barely overlapped) is labelled so, not read as a result
        labels = [f"{m} (extrapolated)" if rows[m]["lc_extrapolated"] else m for m in others]
        bottom.set_yticks(list(range(len(others))), labels)
        bottom.set_xlabel(f"length-controlled win rate vs {board.baseline}", fontsize=8)
    fig.tight_layout()
    return fig


def write_leaderboard_png(boards: Sequence[Leaderboard], path) -> None:
    """:func:`leaderboard_figure` saved as a PNG."""
    leaderboard_figure(boards).savefig(path, dpi=120)


def leaderboard_metrics(boards: Sequence[Leaderboard]) -> dict[str, float]:
    """Flat figures with their intervals, as the other stages report theirs (``KEY``, ``KEY_ci_low``,
    ``KEY_ci_high``): ``arena/<voter>/<model>/rating`` and, against the baseline,
    ``.../win_rate`` (raw), ``.../lc_win_rate`` and ``.../lc_extrapolated`` (1 where the
    length-controlled rate lies beyond the votes)."""
    out: dict[str, float] = {}
    for b in boards:
        for r in b.rows():
            key = f"arena/{b.voter}/{r['model']}"
            out |= {
                f"{key}/rating": r["rating"],
                f"{key}/rating_ci_low": r["ci_low"],
                f"{key}/rating_ci_high": r["ci_high"],
            }
            if r["lc_win_rate"] is not None:
                out |= {
                    f"{key}/win_rate": r["win_rate"],
                    f"{key}/win_rate_ci_low": r["win_rate_low"],
                    f"{key}/win_rate_ci_high": r["win_rate_high"],
                    f"{key}/lc_win_rate": r["lc_win_rate"],
                    f"{key}/lc_win_rate_ci_low": r["lc_low"],
                    f"{key}/lc_win_rate_ci_high": r["lc_high"],
                    f"{key}/lc_extrapolated": float(r["lc_extrapolated"]),
                }
    return out
