"""Rankings with ties: the grammar of ``docs/rankings.md``.

A ranking orders the K candidates of one prompt (labels ``A``, ``B``, ... in the order shown)
from best to worst; ``=`` ties labels into one tier::

    ranking := tier ( ">" tier )*        tier := label ( "=" label )*        label := A–Z

Input is case-insensitive and white space anywhere is ignored. :func:`parse_ranking` returns an
immutable :class:`Ranking` whose ``str()`` is the canonical form (``C > B = D > A``: tiers best
first, labels sorted inside a tier, single spaces), so ``parse_ranking(str(r), r.labels) == r``.
Every mistake raises :class:`RankingError` with a stable ``code`` (``empty``, ``syntax``,
``unknown_label``, ``duplicate_label``, ``missing_label``) and a message naming the bad part.

Pure logic: no I/O, no Gradio, no W&B.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rlhf.errors import UserError

ALL_LABELS = tuple(string.ascii_uppercase)
MIN_K, MAX_K = 2, len(ALL_LABELS)

RANKING_ERROR_CODES = ("empty", "syntax", "unknown_label", "duplicate_label", "missing_label")


class RankingError(UserError):
    """A ranking that does not parse or does not fit the candidates.

    ``code`` is one of :data:`RANKING_ERROR_CODES`; ``position`` is the 1-based character
    position of a syntax error (else None); ``offending`` holds the labels at fault (unknown,
    duplicated or missing), so a UI can highlight them.
    """

    code = "syntax"

    def __init__(self, message: str, code: str, position: int | None = None, offending: Sequence[str] = ()):
        super().__init__(message, code=code)
        self.position = position
        self.offending = tuple(offending)


def labels_for(k: int) -> list[str]:
    """The labels of ``k`` candidates: ``["A", "B", ...]`` (2 ≤ k ≤ 26)."""
    if isinstance(k, bool) or not isinstance(k, int) or not MIN_K <= k <= MAX_K:
        raise UserError(
            f"K (candidates per prompt) must be an integer from {MIN_K} to {MAX_K}, got {k!r}", code="k_range"
        )
    return list(ALL_LABELS[:k])


def format_tiers(tiers: Iterable[Iterable[str]]) -> str:
    """Canonical text of ``tiers`` (best first): ``[["C"], ["D", "b"], ["A"]]`` → ``"C > B = D > A"``.

    No validation; see :meth:`Ranking.from_tiers` for that.
    """
    return " > ".join(" = ".join(sorted(str(x).upper() for x in tier)) for tier in tiers)


def _check_labels(labels: Sequence[str] | int) -> tuple[str, ...]:
    if isinstance(labels, int) and not isinstance(labels, bool):
        return tuple(labels_for(labels))
    labs = tuple(labels)
    bad = [x for x in labs if not (isinstance(x, str) and len(x) == 1 and x in ALL_LABELS)]
    if bad or len(set(labs)) != len(labs) or not labs:
        # A caller bug (labels come from validated candidates), not a user mistake.
        raise ValueError(f"labels must be distinct upper-case letters A–Z, got {list(labs)!r}")
    return labs


def _label_list(labels: Iterable[str]) -> str:
    return ", ".join(labels)


@dataclass(frozen=True)
class Ranking:
    """An immutable ranking: ``tiers`` best first (labels sorted inside each), over ``labels``.

    ``labels`` are all candidate labels (the universe). A complete ranking names each exactly
    once; a partial one (a draft) names a subset. Equality and hashing are on the canonical form.
    """

    tiers: tuple[tuple[str, ...], ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", tuple(tuple(sorted(t)) for t in self.tiers))
        object.__setattr__(self, "labels", tuple(self.labels))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tiers(
        cls, tiers: Iterable[Iterable[str]], labels: Sequence[str] | int, complete: bool = True
    ) -> Ranking:
        """Build and validate a ranking from tiers (lists of labels, best first).

        Raises :class:`RankingError` (``empty``, ``syntax`` for a malformed tier,
        ``unknown_label``, ``duplicate_label``, ``missing_label`` when ``complete``).
        """
        labs = _check_labels(labels)
        if isinstance(tiers, (str, bytes)):
            raise RankingError(f"tiers must be a list of label lists, got the string {tiers!r}", "syntax")
        clean: list[tuple[str, ...]] = []
        for i, tier in enumerate(tiers):
            if isinstance(tier, (str, bytes)) or not isinstance(tier, Iterable):
                raise RankingError(f"tier {i + 1} must be a list of labels, got {tier!r}", "syntax")
            tier = list(tier)
            if not tier:
                raise RankingError(f"tier {i + 1} is empty: every tier holds at least one label", "syntax")
            for x in tier:
                if not (
                    isinstance(x, str) and len(x.strip()) == 1 and x.strip().isascii() and x.strip().isalpha()
                ):
                    raise RankingError(f"tier {i + 1} holds {x!r}; a label is one letter A–Z", "syntax")
            clean.append(tuple(x.strip().upper() for x in tier))
        if not clean:
            raise RankingError(
                f"the ranking is empty: rank the candidates best first, e.g. {' > '.join(labs)}", "empty"
            )
        _check_members([x for t in clean for x in t], labs, complete)
        return cls(tuple(clean), labs)

    # ------------------------------------------------------------------ views
    def __str__(self) -> str:
        return format_tiers(self.tiers)

    @property
    def ranked(self) -> tuple[str, ...]:
        """The labels this ranking names, best tier first."""
        return tuple(x for t in self.tiers for x in t)

    @property
    def complete(self) -> bool:
        return len(self.ranked) == len(self.labels)

    @property
    def all_tied(self) -> bool:
        """True for a complete ranking with a single tier (``A = B = C``): no strict preference."""
        return len(self.tiers) == 1 and self.complete

    def tier_of(self, label: str) -> int:
        """0-based tier index of ``label`` (0 = best). KeyError if the ranking does not name it."""
        lab = label.upper()
        for i, tier in enumerate(self.tiers):
            if lab in tier:
                return i
        raise KeyError(f"label {label!r} is not in the ranking {self}")

    def pairs(self) -> list[tuple[str, str]]:
        """Strict ``(winner, loser)`` pairs: every label against every label in a later tier.

        ``C > B = D > A`` → ``[(C, B), (C, D), (C, A), (B, A), (D, A)]``.
        """
        out = []
        for i, tier in enumerate(self.tiers):
            for w in tier:
                for later in self.tiers[i + 1 :]:
                    out.extend((w, lo) for lo in later)
        return out

    def ties(self) -> list[tuple[str, str]]:
        """Tied pairs ``(a, b)`` with ``a < b`` inside each tier: ``C > B = D > A`` → ``[(B, D)]``."""
        return [(a, b) for tier in self.tiers for i, a in enumerate(tier) for b in tier[i + 1 :]]


def _check_members(
    named: list[str], labels: tuple[str, ...], complete: bool, positions: list[int] | None = None
) -> None:
    """unknown → duplicate → missing, each naming the labels at fault."""
    where = (lambda i: f" (position {positions[i]})") if positions else (lambda i: "")
    valid = set(labels)
    unknown = [(i, x) for i, x in enumerate(named) if x not in valid]
    if unknown:
        names = list(dict.fromkeys(x for _, x in unknown))
        i0 = unknown[0][0]
        noun = "label" if len(names) == 1 else "labels"
        raise RankingError(
            f"unknown {noun} {_label_list(names)}{where(i0)}; the valid labels are {_label_list(labels)}",
            "unknown_label",
            position=positions[i0] if positions else None,
            offending=names,
        )
    seen: dict[str, int] = {}
    dups: list[str] = []
    first_dup = None
    for i, x in enumerate(named):
        if x in seen:
            if x not in dups:
                dups.append(x)
            if first_dup is None:
                first_dup = (seen[x], i)
        else:
            seen[x] = i
    if dups:
        a, b = first_dup
        at = f" (positions {positions[a]} and {positions[b]})" if positions else ""
        noun = "label" if len(dups) == 1 else "labels"
        raise RankingError(
            f"{noun} {_label_list(dups)} appear{'s' if len(dups) == 1 else ''} more than once{at}; "
            "name each candidate exactly once",
            "duplicate_label",
            position=positions[b] if positions else None,
            offending=dups,
        )
    if complete:
        missing = [x for x in labels if x not in seen]
        if missing:
            noun = "label" if len(missing) == 1 else "labels"
            raise RankingError(
                f"missing {noun} {_label_list(missing)}: a complete ranking names every candidate "
                f"({_label_list(labels)}) exactly once",
                "missing_label",
                offending=missing,
            )


def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _char_hint(ch: str, prev_op: str | None) -> str:
    """Why ``ch`` is not allowed here, with the right thing to type where we can tell."""
    if ch == "<":
        return "rank best first with > (write B > A rather than A < B)"
    if ch == "=" and prev_op == ">":
        return "'>=' is not an operator: use > for 'better than' or = for 'tied with'"
    if ch == ">" and prev_op == "=":
        return "'=>' is not an operator: use > for 'better than' or = for 'tied with'"
    if ch in ">=" and prev_op:
        return f"two operators in a row: put a label between {prev_op!r} and {ch!r}"
    if ch in ",;/|&":
        return f"use > (better than) or = (tied with) between labels, not {ch!r}"
    if ch in "≥≧⩾":
        return "use > for 'better than' or = for 'tied with'"
    if ch.isdigit():
        return "labels are letters (A, B, C, ...), not numbers"
    norm = unicodedata.normalize("NFKC", ch)
    if norm != ch and len(norm) == 1 and norm.isascii() and (norm.isalpha() or norm in "<>="):
        name = unicodedata.name(ch, "")
        wide = "full-width " if "FULLWIDTH" in name else ""
        return f"{ch!r} is a {wide}look-alike of {norm!r} (U+{ord(ch):04X} {name}): type the plain ASCII {norm.upper()!r}"
    if ch.isalpha():
        return "labels are the ASCII letters A–Z"
    return "only letters, '>' and '=' are allowed"


def _reversed_suggestion(text: str, labels: tuple[str, ...]) -> str:
    """For a worst-first ranking written with ``<`` only, the same ranking best first."""
    if ">" in text:
        return ""
    flipped = " > ".join(part.strip() for part in reversed(text.split("<")))
    try:
        return f"; did you mean {str(parse_ranking(flipped, labels, complete=False))!r}?"
    except RankingError:
        return ""


def _syntax(text: str, pos: int, ch: str, why: str) -> RankingError:
    return RankingError(
        f"syntax error at position {pos + 1}: unexpected {ch!r} in {_show(text)}; {why}",
        "syntax",
        position=pos + 1,
        offending=(),
    )


def parse_ranking(text: str, labels: Sequence[str] | int, complete: bool = True) -> Ranking:
    """Parse ``text`` (e.g. ``"c > b = d > a"``) into a :class:`Ranking` over ``labels``.

    ``labels`` is the list of candidate labels (or K, meaning ``labels_for(K)``). With
    ``complete=True`` every label must appear; with ``complete=False`` a subset is a valid draft.
    Errors are checked in the order empty → syntax → unknown → duplicate → missing.
    """
    labs = _check_labels(labels)
    if not isinstance(text, str):
        raise RankingError(
            f"a ranking is text like {' > '.join(labs)!r}, got {type(text).__name__} {text!r}", "syntax"
        )
    if not text.strip():
        raise RankingError(
            f"the ranking is empty: rank the candidates best first, e.g. {' > '.join(labs)}", "empty"
        )
    tiers: list[list[str]] = [[]]
    named: list[str] = []
    positions: list[int] = []
    expect_label = True
    last_op: tuple[str, int] | None = None  # the operator awaiting a label, and its index
    for i, ch in enumerate(text):
        if ch.isspace():
            continue
        if expect_label:
            if ch.isascii() and ch.isalpha():
                lab = ch.upper()
                tiers[-1].append(lab)
                named.append(lab)
                positions.append(i + 1)
                expect_label, last_op = False, None
                continue
            if last_op is None and ch in "<>=":
                raise _syntax(text, i, ch, f"a ranking starts with a label, e.g. {' > '.join(labs)}")
            raise _syntax(text, i, ch, _char_hint(ch, last_op[0] if last_op else None))
        if ch == ">":
            tiers.append([])
        elif ch == "=":
            pass
        elif ch.isascii() and ch.isalpha():
            raise _syntax(
                text, i, ch, "a label is a single letter: put > (better than) or = (tied with) between labels"
            )
        else:
            why = _char_hint(ch, None)
            if ch == "<":
                why += _reversed_suggestion(text, labs)
            raise _syntax(text, i, ch, why)
        expect_label, last_op = True, (ch, i)
    if last_op is not None:
        op, i = last_op
        raise RankingError(
            f"syntax error at position {i + 1}: {_show(text)} ends with {op!r}; a label must follow it",
            "syntax",
            position=i + 1,
        )
    _check_members(named, labs, complete, positions)
    return Ranking(tuple(tuple(t) for t in tiers), labs)
