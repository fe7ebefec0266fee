"""What the store accepts from a client: size limits, flags and complete rankings.

Everything a page, script or command sends is checked here before it reaches SQL, and every
refusal is a :class:`~annotation_app.errors.StoreError` with a code the API returns.
"""

from __future__ import annotations

from collections.abc import Iterable

from annotation_app.errors import StoreError
from rlhf.rankings import Ranking, parse_ranking

FLAGS = ("all_bad",)

# Server-side size limits: everything a client sends is checked against these.
MAX_RANKING_CHARS = 200
MAX_COMMENT_CHARS = 5_000
MAX_TOKEN_CHARS = 100
MAX_PROMPT_ID_CHARS = 256


def check_text(value, what: str, limit: int, *, allow_empty: bool = True) -> str:
    """``value`` as text ("" for None); refuses non-text (``bad_input``) and text over ``limit`` (``too_long``)."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise StoreError(f"{what} must be text, got {type(value).__name__}", code="bad_input")
    if len(value) > limit:
        raise StoreError(f"{what} is {len(value)} characters long; the limit is {limit}", code="too_long")
    if not allow_empty and not value.strip():
        raise StoreError(f"{what} is empty", code="bad_input")
    return value


def check_flags(flags: Iterable[str] | None) -> list[str]:
    """Normalise flags (``all-bad`` == ``all_bad``); unknown flags raise ``bad_flag``."""
    out: list[str] = []
    for flag in flags or []:
        if not isinstance(flag, str):
            raise StoreError(f"flags must be text, got {flag!r}", code="bad_flag")
        name = flag.strip().lower().replace("-", "_")
        if name not in FLAGS:
            raise StoreError(f"unknown flag {flag!r}; valid flags: {', '.join(FLAGS)}", code="bad_flag")
        if name not in out:
            out.append(name)
    return out


def parse_for_submit(ranking_text: str, labels: list[str], flags: list[str]) -> Ranking:
    """The complete :class:`rlhf.rankings.Ranking` of a submit (raises ``RankingError``).

    With the ``all_bad`` flag an empty ranking means "no preference": every label tied.
    """
    if "all_bad" in flags and not ranking_text.strip():
        return Ranking.from_tiers([tuple(labels)], labels)
    return parse_ranking(ranking_text, labels, complete=True)
