"""The Arena tab: annotators vote blind on two policies' answers to one prompt; admins see the
leaderboard.

Arena pairs are the prompts of an ``arena`` project (``rlhf arena import``, docs/arena.md): two
responses labelled A and B, each candidate naming its policy in the ``model`` column. A vote is
stored as an ordinary ranking of the pair, ``A > B``, ``A = B`` (tie) or ``B > A``
(:data:`CHOICES`), through the same store calls as the ranking screen (leases, quorum, client
tokens against double submission).

Blindness: an annotator's page never receives a model name. The pair comes from
:meth:`Store.next_item`, whose :class:`~annotation_app.records.Item` carries labels and texts
only; the models are read only by the admin handlers (:func:`leaderboard`,
:func:`export_votes`), which check the caller's role on every call.

Handlers follow :mod:`annotation_app.handlers`: ``(page, user, inputs...)`` → a dict keyed by
component (``"arena-..."`` elem ids), laid out and wired in :mod:`annotation_app.app`. The
keyboard (:data:`KEYS_JS`) clicks the vote buttons, so keys and mouse take one path.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from dataclasses import dataclass

from annotation_app import exports
from annotation_app.errors import StoreError
from annotation_app.handlers import Page, Props, Table, conversation_view, explain
from annotation_app.records import Item
from annotation_app.text import visible_text
from rlhf.arena import (
    HUMAN,
    LABELS,
    Leaderboard,
    fit_leaderboard,
    lc_text,
    leaderboard_figure,
    people_votes,
    votes_from_rankings,
)
from rlhf.arena_fit import Vote
from rlhf.errors import UserError
from rlhf.export import build_export, write_export

N_BOOT = 1000  # bootstrap replicates of the leaderboard's intervals (rlhf arena's default)
LOWEST_RATED = ("lowest rated (default)", "")  # the baseline choice that lets the fit pick it


@dataclass(frozen=True)
class Choice:
    """One vote button: the ranking it stores, its words, and the keys that press it (the first
    shown on the button)."""

    ranking: str
    words: str
    keys: tuple[str, ...]

    def button_text(self) -> str:
        return f"{self.words}  [{' / '.join(self.keys)}]"


# Keyed by the button's elem_id.
CHOICES = {
    "arena-a": Choice("A > B", "A is better", ("A", "1")),
    "arena-tie": Choice("A = B", "Tie", ("T", "=", "2")),
    "arena-b": Choice("B > A", "B is better", ("B", "3")),
}
SKIP = Choice("", "Skip", ("S",))
VOTE_WORDS = {c.ranking: c.words for c in CHOICES.values()}

# Keys → buttons. Acts only while the buttons are on screen (the Arena tab is selected: Gradio
# hides the other tabs' contents) and enabled (a pair is shown), and never while the focus is in
# a text field or with a modifier held (Alt+S is the ranking screen's skip). A held key's repeats
# are ignored, so one press is one vote; the client token stops a double vote that gets through.
KEYS_JS = """
() => {
  const buttons = BUTTONS;
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.altKey || e.metaKey || e.repeat || e.defaultPrevented || e.key.length !== 1) return;
    const id = buttons[e.key.toUpperCase()];
    const field = e.target && e.target.closest && e.target.closest('input, textarea, select, [contenteditable]:not([contenteditable="false"])');
    const button = id && document.getElementById(id);
    if (!button || field || button.disabled || button.offsetParent === null) return;
    e.preventDefault();
    button.click();
  });
}
""".replace(
    "BUTTONS",
    json.dumps({k: elem_id for elem_id, c in {**CHOICES, "arena-skip": SKIP}.items() for k in c.keys}),
)

NO_ARENA = (
    "There is no arena here yet, so nothing to vote on. An admin adds pairs of answers with "
    "`rlhf arena import --pairs pairs.jsonl --db DB`."
)
ALL_VOTED = (
    "All done: there are no pairs left for you to vote on right now. Press Next / refresh later to "
    "check for new ones."
)
VIEW_KEYS = (
    "arena-prompt-id",
    "arena-token",
    "arena-prompt",
    "arena-conversation",
    *(f"arena-response-{label}" for label in LABELS),
    *CHOICES,
    "arena-skip",
    "arena-guidelines",
    "arena-progress",
    "arena-message",
)
LEADERBOARD_KEYS = ("arena-leaderboard", "arena-figure", "arena-baseline", "arena-admin-message")
EXPORT_KEYS = ("arena-download", "arena-admin-message")


# ----------------------------------------------------------------------------- voting


def open_arena(page: Page, user: str) -> dict:
    """The tab was opened: the caller's pair, and the leaderboard section for admins only."""
    return {**next_pair(page, user), "arena-admin": Props(visible=page.store.role(user) == "admin")}


def next_pair(page: Page, user: str, message: str = "") -> dict:
    """The caller's current or next pair (Next / refresh, and after a vote or a skip)."""
    try:
        return pair_view(page, user, page.store.next_item(user, page.project, kind="arena"), message)
    except UserError as err:
        return pair_view(page, user, None, f"{message} {explain(err)}".strip())


def vote(page: Page, user: str, prompt_id: str, token: str, button: str) -> dict:
    """Store the vote of ``button`` (a key of :data:`CHOICES`) and show the next pair; on a
    refusal keep the page and say why. The same token again returns the stored vote."""
    if not prompt_id:
        return next_pair(page, user)
    try:
        res = page.store.submit(user, prompt_id, CHOICES[button].ranking, [], "", token or None)
    except UserError as err:
        return {"arena-progress": progress_text(page, user), "arena-message": explain(err)}
    message = f"Saved your vote on {res.prompt_id}: {VOTE_WORDS.get(res.ranking, res.ranking)}."
    return next_pair(page, user, message)


def skip(page: Page, user: str, prompt_id: str, token: str) -> dict:
    """Skip the pair (it is not offered to the caller again) and show the next one."""
    if not prompt_id:
        return next_pair(page, user)
    try:
        page.store.skip(user, prompt_id, "", token or None)
    except UserError as err:
        return {"arena-progress": progress_text(page, user), "arena-message": explain(err)}
    return next_pair(page, user, f"Skipped {prompt_id}.")


def pair_view(page: Page, user: str, item: Item | None, message: str) -> dict:
    """Every component of the voting part showing ``item`` (None: nothing to vote on).

    Texts are shown as the ranking screen shows them: literal, invisible characters made
    visible, a conversation as a transcript. Only labels and texts are read from the item."""
    if item is None:
        return {
            "arena-prompt-id": "",
            "arena-token": "",
            "arena-prompt": Props(visible=True, value=ALL_VOTED if _has_arena(page) else NO_ARENA),
            "arena-conversation": Props(visible=False, value=[]),
            **{f"arena-response-{label}": "" for label in LABELS},
            **_buttons(votes=False, skip=False),
            "arena-guidelines": "",
            "arena-progress": progress_text(page, user),
            "arena-message": message,
        }
    texts = {c["label"]: c["text"] for c in item.candidates}
    is_pair = sorted(texts) == list(LABELS)
    if not is_pair:  # imported into an arena project by hand: it can only be skipped
        message = (
            f"Error: {item.prompt_id} has responses {', '.join(sorted(texts))}, but an arena pair has "
            "exactly A and B; skip it and tell your admin."
        )
    return {
        "arena-prompt-id": item.prompt_id,
        "arena-token": secrets.token_hex(16),
        "arena-prompt": Props(visible=item.conversation is None, value=visible_text(item.prompt)),
        "arena-conversation": conversation_view(item.conversation),
        **{f"arena-response-{label}": visible_text(texts.get(label, "")) for label in LABELS},
        **_buttons(votes=is_pair, skip=True),
        "arena-guidelines": item.guidelines,
        "arena-progress": progress_text(page, user),
        "arena-message": message,
    }


def _buttons(*, votes: bool, skip: bool) -> dict:
    # Disabled buttons also stop the keys (KEYS_JS clicks only enabled ones).
    return {**{key: Props(interactive=votes) for key in CHOICES}, "arena-skip": Props(interactive=skip)}


def _has_arena(page: Page) -> bool:
    return any(
        p["kind"] == "arena" and page.project in (None, p["project_id"]) for p in page.store.projects()
    )


def progress_text(page: Page, user: str) -> str:
    return f"{user}: {page.store.progress(user, kind='arena')['submitted']} voted"


# ----------------------------------------------------------------------------- admins (role checked per call)


def leaderboard(page: Page, user: str, baseline: str = "", *, n_boot: int = N_BOOT) -> dict:
    """The leaderboard of the app's votes (admins only): ratings with 95 % intervals, win rates
    against ``baseline`` ("": the lowest rated), the figure. Votes that cannot rate the models
    (none, only ties, a disconnected arena) get the fit's one-line reason instead of a table."""
    try:
        page.store.require_admin(user)
        votes = votes_from_rankings(page.store.submitted_rankings(page.project, kind="arena"))
        if not votes:
            raise StoreError(
                "no arena votes yet: the leaderboard appears once annotators have voted", code="no_votes"
            )
        board = fit_leaderboard(votes, HUMAN, baseline or None, n_boot=n_boot, seed=0)
    except UserError as err:
        return {
            "arena-leaderboard": Table(leaderboard_columns(None)),
            "arena-figure": None,
            "arena-admin-message": explain(err),
        }
    models = sorted(board.ratings.models)
    return {
        "arena-leaderboard": Table(leaderboard_columns(board), leaderboard_rows(board, votes)),
        "arena-figure": leaderboard_figure([board]),
        "arena-baseline": Props(choices=[LOWEST_RATED, *((m, m) for m in models)], value=baseline or ""),
        "arena-admin-message": (
            f"{board.ratings.n_votes} votes on {board.ratings.n_prompts} prompts, ties {board.tie_rate:.0%}; "
            f"intervals: 95 % bootstrap over prompts; win rates against {board.baseline}."
        ),
    }


def leaderboard_columns(board: Leaderboard | None) -> list[str]:
    against = f"vs {board.baseline}" if board is not None else "vs baseline"
    return [
        "model",
        "rating [95% CI]",
        f"win rate {against}",
        f"length-controlled win rate {against} [95% CI]",
        "votes",
    ]


def leaderboard_rows(board: Leaderboard, votes: list[Vote]) -> list[list]:
    """The board's rows, best first, rounded as ``rlhf arena`` prints them: ratings to the point,
    win rates to three decimals; "—" for the baseline against itself."""
    per_model = Counter(m for v in votes for m in (v.model_a, v.model_b))
    return [
        [
            r["model"],
            f"{r['rating']:.0f} [{r['ci_low']:.0f}, {r['ci_high']:.0f}]",
            "—" if r["win_rate"] is None else f"{r['win_rate']:.3f}",
            lc_text(r),
            per_model[r["model"]],
        ]
        for r in board.rows()
    ]


def export_votes(page: Page, user: str) -> dict:
    """The app's arena votes as preference data (the rankings format: rankings of two responses,
    with their models), behind a private download link (admins only; :mod:`annotation_app.exports`)."""
    try:
        page.store.require_admin(user)
        records = people_votes(page.store.submitted_rankings(page.project, kind="arena"))
        if not records:
            raise StoreError("there are no arena votes to export yet", code="nothing_to_export")
        with exports.REGISTRY.new(user) as export:
            path, _ = write_export(build_export(records, "rankings"), export.folder / "arena_votes.jsonl")
    except UserError as err:
        return {"arena-download": "", "arena-admin-message": explain(err)}
    return {
        "arena-download": exports.REGISTRY.links(export, [(path.name, f"{len(records)} votes")]),
        "arena-admin-message": f"Exported {len(records)} arena votes.",
    }
