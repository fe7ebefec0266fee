"""What each control of the annotation page and each named API endpoint does, without Gradio.

Every handler is a function of ``(page, user, inputs...)``: ``page`` holds the store and what
the served page shows, ``user`` is the logged-in user name (``app.py`` takes it from the login
session, never from the page's inputs), the inputs are the values the event sends. A page
handler answers a dict keyed by component — the component's ``elem_id`` (``"message"``,
``"board"``, ...), ``"slot-X"`` for the column that holds response X, ``"admin-tab"`` for the
admin tab:

* a plain value sets the component's value;
* a :class:`Props` changes its properties (``visible``, ``choices``, or ``value`` with them);
* a :class:`Table` fills a data frame;
* a component the dict does not name is left as it is.

``app.py`` lays out the components and turns these answers into Gradio updates; the tests call
the handlers directly on a real store. The ``api_*`` handlers return the JSON that scripts
receive from ``/next``, ``/submit`` and ``/skip``.
"""

from __future__ import annotations

import html
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from annotation_app import dashboard, exports
from annotation_app.board import board_ranking, board_value
from annotation_app.control import canonical_partial, single_best
from annotation_app.io import export_rankings
from annotation_app.records import Item
from annotation_app.store import Store
from annotation_app.text import safe_markdown, visible_text
from rlhf.contracts import content_text
from rlhf.errors import UserError
from rlhf.rankings import ALL_LABELS

ALL_DONE = (
    "All done: there is nothing left for you to rank right now. Press Next later to check for new prompts."
)
# Column names of the history table (in the order history_rows fills it) and the admin tables.
HISTORY_COLUMNS = ["prompt_id", "status", "ranking", "flags", "revisions", "updated"]
PROMPT_COLUMNS = ["prompt_id", "project", "quorum", "submitted", "skipped", "leased", "gold"]


class Props(dict):
    """Properties of a component to change (``visible``, ``choices``, ``value``), not only its value."""


@dataclass(frozen=True)
class Table:
    """The contents of a data frame: column names and rows."""

    columns: list[str]
    rows: list[list] = field(default_factory=list)


@dataclass(frozen=True)
class Page:
    """What every handler of one served page shares: the store, the project it serves (None: all
    projects) and the response labels it has a slot for, in page order."""

    store: Store
    project: str | None = None
    slots: tuple[str, ...] = tuple(ALL_LABELS[:4])

    @classmethod
    def for_store(cls, store: Store, project: str | None = None, max_k: int | None = None) -> Page:
        """One slot per label up to ``max_k`` (default: the largest K stored, at least 4).

        Fewer slots keep the page config small: with all 26 it is ~145 kB, built on every page
        load and every scripted client's login.
        """
        n_slots = max(2, min(len(ALL_LABELS), max_k or max(4, store.max_k())))
        return cls(store, project, tuple(ALL_LABELS[:n_slots]))


def slot_keys(label: str) -> tuple[str, str, str]:
    """The keys of response ``label``'s column, text box and rendered view."""
    return f"slot-{label}", f"response-{label}", f"rendered-{label}"


def page_labels(shown: str | None) -> list[str]:
    """The labels the page says its item has (a hidden field, so a hand-made call can send anything:
    only the lab's single-letter labels are kept)."""
    return [label for label in (shown or "").split() if label in ALL_LABELS]


def explain(err: Exception) -> str:
    """The message an annotator sees for a refused request (only user errors say what went wrong)."""
    if isinstance(err, UserError):
        return f"Error: {err}"
    return "Error: something went wrong on the server; your draft is kept. Please try again."


# ----------------------------------------------------------------------------- annotate tab


def load(page: Page, user: str) -> dict:
    """The page as it opens: the caller's next item (their draft restored), history, admin tab."""
    role = page.store.role(user)
    try:
        item = page.store.next_item(user, page.project)
        values = item_view(page, user, item, "Draft restored." if item and item.draft else "")
    except UserError as err:
        values = item_view(page, user, None, explain(err))
    return {
        **values,
        **history(page, user),
        "show-proposals": page.store.shows_proposals(user),
        "admin-tab": Props(visible=role == "admin"),
    }


def next_item(page: Page, user: str) -> dict:
    """The caller's current or next item (Next / refresh)."""
    try:
        return item_view(page, user, page.store.next_item(user, page.project), "")
    except UserError as err:
        return item_view(page, user, None, explain(err))


def board_changed(
    page: Page, user: str, prompt_id: str, board: str, all_bad: bool, comment: str, edit: str, shown: str
) -> dict:
    """A chip moved on the rank board (which has already written the ranking field): keep the draft."""
    return _save_draft(page, user, prompt_id, board_ranking(board), all_bad, comment, edit, shown)[1]


def ranking_text_changed(
    page: Page,
    user: str,
    prompt_id: str,
    labels: str,
    text: str,
    all_bad: bool,
    comment: str,
    edit: str,
    shown: str,
) -> dict:
    """The typed ranking changed: move the board's chips to match and keep the draft."""
    canonical, error = canonical_partial(text or "", page_labels(labels))
    stale, message = _save_draft(page, user, prompt_id, text, all_bad, comment, edit, shown)
    if stale:
        return {}
    if error:  # keep the board as it was while the text is half typed
        return {"message": f"Error: {error}"}
    return {"board": board_value(page_labels(labels), canonical), **message}


def extras_changed(
    page: Page, user: str, prompt_id: str, text: str, all_bad: bool, comment: str, edit: str, shown: str
) -> dict:
    """The "all bad" box, the comment or the edit changed: keep the draft."""
    return _save_draft(page, user, prompt_id, text, all_bad, comment, edit, shown)[1]


def start_edit(page: Page, user: str, prompt_id: str, labels: str, text: str) -> dict:
    """Copy the best-ranked response into the edit box, to correct it (one best response only)."""
    best, why_not = single_best(text or "", page_labels(labels))
    if best is None:
        return {"message": f"Error: {why_not}"}
    try:
        texts = {c["label"]: c["text"] for c in page.store.leased_candidates(user, prompt_id or "")}
    except UserError as err:
        return {"message": explain(err)}
    if best not in texts:  # labels sent by a hand-made call that are not this prompt's
        return {"message": f"Error: prompt {prompt_id!r} has no response {best}"}
    return {
        "edit": texts[best],
        "message": f"Editing response {best}: your version is saved with the ranking.",
    }


def _save_draft(
    page: Page, user: str, prompt_id: str, text: str, all_bad: bool, comment: str, edit: str, shown: str
) -> tuple[bool, dict]:
    """``(stale, message values)``. A draft event that arrives after its prompt was submitted is
    stale: it must not touch the page, which already shows the next prompt."""
    if not prompt_id:
        return False, {}
    try:
        saved = page.store.save_draft(
            user, prompt_id, text, ["all_bad"] if all_bad else [], comment or "", edit=edit or None
        )
    except UserError as err:
        return False, {"message": explain(err)}
    # Clear an earlier error, keep any other message (e.g. "Saved your ranking ...").
    return not saved, ({"message": ""} if (shown or "").startswith("Error") else {})


def submit(
    page: Page, user: str, prompt_id: str, token: str, text: str, all_bad: bool, comment: str, edit: str = ""
) -> dict:
    """Store the ranking (and the edit of the best response, if any) and show the next item; on a
    refusal keep the page and say why."""
    if not prompt_id:
        return next_item(page, user)
    try:
        res = page.store.submit(
            user,
            prompt_id,
            text,
            ["all_bad"] if all_bad else [],
            comment or "",
            token or None,
            edit=edit or None,
        )
    except UserError as err:
        return {"progress": progress_text(page.store, user), "message": explain(err)}
    item = page.store.next_item(user, page.project)
    return item_view(page, user, item, f"Saved your ranking of {res.prompt_id}: {res.ranking}.")


def skip(page: Page, user: str, prompt_id: str, token: str, comment: str) -> dict:
    """Skip the item and show the next one; on a refusal keep the page and say why."""
    if not prompt_id:
        return next_item(page, user)
    try:
        page.store.skip(user, prompt_id, comment or "", token or None)
    except UserError as err:
        return {"progress": progress_text(page.store, user), "message": explain(err)}
    return item_view(page, user, page.store.next_item(user, page.project), f"Skipped {prompt_id}.")


def show_proposals_changed(page: Page, user: str, on: bool, prompt_id: str) -> dict:
    """The annotator opted into (or out of) seeing the model's suggested ranking: keep the choice
    and show or hide the current item's suggestion at once."""
    try:
        page.store.set_show_proposals(user, bool(on))
        proposal = page.store.leased_proposal(user, prompt_id) if prompt_id else None
    except UserError as err:
        return {"message": explain(err)}
    shown = "shown above the board when there is one" if on else "hidden"
    return {"proposal": proposal_view(proposal), "message": f"The model's suggested ranking is {shown}."}


def proposal_view(proposal: str | None) -> Props:
    """The model's suggested ranking as a line of literal text (hidden when there is none to show)."""
    if proposal is None:
        return Props(visible=False, value="")
    return Props(visible=True, value=f"Model's suggestion: {proposal}")


def rendered_views(page: Page, show: bool, labels: str) -> dict:
    """Show the rendered (Markdown) view of each response of the item, or hide them all."""
    present = set(page_labels(labels))
    return {slot_keys(label)[2]: Props(visible=bool(show) and label in present) for label in page.slots}


def item_view(page: Page, user: str, item: Item | None, message: str) -> dict:
    """Every component of the annotate tab showing ``item`` (None: nothing left to rank)."""
    if item is None:
        return {
            "prompt-id": "",
            "labels": "",
            "client-token": "",
            "prompt": Props(visible=True, value=ALL_DONE),
            "conversation": Props(visible=False, value=[]),
            "proposal": proposal_view(None),
            "board": board_value([], ""),
            **{key: value for label in page.slots for key, value in _hidden_slot(label).items()},
            **_form(page.store, user, message, draft={}, guidelines=""),
        }
    labels = item.labels
    if len(labels) > len(page.slots):
        return item_view(
            page,
            user,
            None,
            f"Error: prompt {item.prompt_id} has {len(labels)} responses but this page was started with "
            f"{len(page.slots)} slots; ask your admin to restart `rlhf annotate serve` after the import.",
        )
    draft = item.draft or {}
    canonical, _ = canonical_partial(draft.get("ranking", ""), labels)
    texts = {c["label"]: c["text"] for c in item.candidates}
    slots: dict = {}
    for label in page.slots:
        if label not in texts:
            slots.update(_hidden_slot(label))
            continue
        column, text, rendered = slot_keys(label)
        slots[column] = Props(visible=True)
        slots[text] = visible_text(texts[label])
        slots[rendered] = safe_markdown(texts[label])
    return {
        "prompt-id": item.prompt_id,
        "labels": " ".join(labels),
        "client-token": secrets.token_hex(16),
        # A conversation is shown as a chat transcript instead of the flattened prompt text.
        "prompt": Props(visible=item.conversation is None, value=visible_text(item.prompt)),
        "conversation": conversation_view(item.conversation),
        "proposal": proposal_view(item.proposal),  # None unless the annotator opted in
        "board": board_value(labels, canonical or ""),
        **slots,
        **_form(page.store, user, message, draft=draft, guidelines=item.guidelines),
    }


def conversation_view(messages: list[dict] | None) -> Props:
    """A multi-turn prompt as a chat transcript (hidden for a plain prompt, shown in the prompt box).

    Turns are shown as literal text (the chat component renders no Markdown or HTML here), with
    invisible characters made visible like every response.
    """
    if not messages:
        return Props(visible=False, value=[])
    # The chat component treats a message as HTML (sanitised), which would drop a tag a user typed;
    # escaped, every character shows as typed.
    turns = [
        {"role": m["role"], "content": html.escape(visible_text(content_text(m["content"])))}
        for m in messages
    ]
    return Props(
        visible=True,
        value=[t for t in turns if t["role"] in ("user", "assistant")],
        label=_system_line(turns),
    )


def _system_line(turns: list[dict]) -> str:
    system = " ".join(t["content"] for t in turns if t["role"] == "system")
    return f"Conversation so far (system: {system[:200]})" if system else "Conversation so far"


def _hidden_slot(label: str) -> dict:
    column, text, rendered = slot_keys(label)
    return {column: Props(visible=False), text: "", rendered: ""}


def _form(store: Store, user: str, message: str, *, draft: dict, guidelines: str) -> dict:
    progress = store.progress(user)
    return {
        "ranking": draft.get("ranking", ""),
        "all-bad": "all_bad" in draft.get("flags", []),
        "comment": draft.get("comment", ""),
        "edit": draft.get("edit") or "",
        "progress": progress_text(store, user, progress),
        "message": message,
        "guidelines": guidelines,
        # Open for someone who has not submitted anything yet, so the rules are read first.
        "guidelines-box": Props(open=not progress["submitted"]),
    }


def progress_text(store: Store, user: str, p: dict | None = None) -> str:
    p = p or store.progress(user)
    return (
        f"{user}: {p['submitted']} submitted, {p['skipped']} skipped — "
        f"{p['prompts_needing_rankings']} of {p['prompts']} prompts still need rankings"
    )


# ----------------------------------------------------------------------------- history tab


def history(page: Page, user: str) -> dict:
    """The caller's submitted and skipped prompts; the submitted ones can be opened to revise."""
    rows = history_rows(page.store, user)
    return {"history": rows, "history-prompt": Props(choices=[r[0] for r in rows if r[1] == "submitted"])}


def history_rows(store: Store, user: str) -> list[list]:
    return [
        [
            h["prompt_id"],
            h["status"],
            h["ranking"],
            ", ".join(h["flags"]),
            h["revision"],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(h["updated_at"])),
        ]
        for h in store.history(user)
    ]


def open_submission(page: Page, user: str, prompt_id: str) -> dict:
    """One of the caller's own submissions, ready to revise (another user's is refused)."""
    try:
        row = page.store.own_ranking(user, prompt_id or "")
    except UserError as err:
        return {
            "history-item": "",
            "history-ranking": "",
            "history-all-bad": False,
            "history-comment": "",
            "history-token": "",
            "history-message": explain(err),
        }
    body = "\n\n".join(
        [f"Prompt {prompt_id}:\n{visible_text(row['prompt'])}"]
        + [f"Response {c['label']}:\n{visible_text(c['text'])}" for c in row["candidates"]]
    )
    return {
        "history-item": body,
        "history-ranking": row["ranking"],
        "history-all-bad": "all_bad" in row["flags"],
        "history-comment": row["comment"],
        "history-token": secrets.token_hex(16),
        "history-message": "",
    }


def revise(page: Page, user: str, prompt_id: str, text: str, all_bad: bool, comment: str, token: str) -> dict:
    """Change one of the caller's own submissions; the history table shows the result either way.

    An edit of the best response stays with the ranking while that response stays first; if the
    revision puts another response first, the edit no longer fits and is dropped (the audit log
    keeps it), and the message says so."""
    try:
        before = page.store.own_ranking(user, prompt_id or "")
        labels = [c["label"] for c in before["candidates"]]
        keep = before.get("edit") if single_best(text or "", labels)[0] == before.get("edit_of") else None
        res = page.store.revise(
            user,
            prompt_id or "",
            text,
            ["all_bad"] if all_bad else [],
            comment or "",
            token or None,
            edit=keep,
        )
    except UserError as err:
        return {"history": history_rows(page.store, user), "history-message": explain(err)}
    dropped = (
        f" Your edit of response {before['edit_of']} was dropped: it is no longer first."
        if before.get("edit") and not keep
        else ""
    )
    return {
        "history": history_rows(page.store, user),
        "history-message": f"Revised {res.prompt_id}: {res.ranking} (revision {res.revision}).{dropped}",
    }


# ----------------------------------------------------------------------------- admin tab (role checked per call)


ADMIN_FIGURES = (
    "admin-headline",
    "admin-progress",
    "admin-throughput",
    "admin-agreement",
    "admin-seconds",
    "admin-annotators",
    "admin-prompts",
    "admin-proposals",
)


def admin_statistics(page: Page, user: str) -> dict:
    """The dashboard: headline figures with intervals, the charts' data and the tables (admins only)."""
    try:
        page.store.require_admin(user)
    except UserError as err:
        return {**dict.fromkeys(ADMIN_FIGURES), "admin-message": explain(err)}
    stats = page.store.stats()
    rankings = page.store.submitted_rankings(page.project, kind="ranking")
    proposals = page.store.proposals(page.project)
    gold = page.store.gold_answers(page.project)  # admin only: annotators never see these
    annotators = dashboard.per_annotator(stats, rankings, gold=gold)
    prompts = [
        [
            p["prompt_id"],
            p["project_id"],
            p["quorum"],
            p["submitted"],
            p["skipped"],
            p["leased"],
            p["gold"] or "",
        ]
        for p in stats["prompts"]
    ]
    return {
        "admin-headline": Table(
            dashboard.HEADLINE_COLUMNS,
            dashboard.headline(stats, rankings) + dashboard.proposal_headline(proposals, rankings),
        ),
        "admin-proposals": Table(dashboard.PROPOSAL_COLUMNS, dashboard.proposal_rows(proposals, rankings)),
        "admin-progress": Table(["time", "rankings"], dashboard.progress_over_time(rankings)),
        "admin-throughput": Table(["annotator", "submitted"], [row[:2] for row in annotators]),
        "admin-agreement": Table(
            ["annotator", "agreement"], [[row[0], row[5]] for row in annotators if row[5] is not None]
        ),
        "admin-seconds": Table(["seconds", "rankings"], dashboard.seconds_histogram(rankings)),
        "admin-annotators": Table(dashboard.per_annotator_columns(gold), annotators),
        "admin-prompts": Table(PROMPT_COLUMNS, prompts),
        "admin-message": f"Updated {time.strftime('%H:%M:%S')}: {len(rankings)} submitted rankings.",
    }


def admin_export(page: Page, user: str, fmt: str) -> dict:
    """Export the submitted rankings as JSONL behind a private download link (admins only).

    ``admin-download`` is Markdown with the link: it works for this admin only, once, for
    :data:`exports.EXPORT_LIFETIME_S` seconds (:mod:`annotation_app.exports`).
    """
    try:
        page.store.require_admin(user)
        with exports.REGISTRY.new(user) as export:
            out = export.folder / f"{fmt}.jsonl"
            # the ranking items only: the Arena tab exports its votes itself
            res = export_rankings(page.store, str(out), fmt=fmt, project=page.project, kind="ranking")
    except UserError as err:
        return {"admin-download": "", "admin-message": explain(err)}
    files = [(Path(res["out"]).name, f"{res['records']} records")]
    if "ties_out" in res:  # format trl: the tied pairs in a file of their own
        files.append((Path(res["ties_out"]).name, f"{res['ties']} tied pairs"))
    if "annotators_out" in res:  # the annotators' reliability, fitted on these rankings
        files.append((Path(res["annotators_out"]).name, "annotators' reliability"))
    return {
        "admin-download": exports.REGISTRY.links(export, files),
        "admin-message": f"Exported {res['records']} {fmt} records.",
    }


# ----------------------------------------------------------------------------- named API for scripts


def refusal(err: UserError) -> dict:
    """The API's answer to a refused request: its code for scripts, its message for people."""
    return {"ok": False, "code": err.code, "message": str(err)}


def api_next(page: Page, user: str) -> dict:
    """The caller's next assigned item, or ``prompt_id`` None when nothing is left."""
    t0 = time.perf_counter()
    try:
        item = page.store.next_item(user, page.project)
    except UserError as err:
        return refusal(err)
    if item is None:
        return {"ok": True, "prompt_id": None, "message": "nothing left to rank"}
    return {"ok": True, **item.to_dict(), "server_ms": _ms_since(t0)}


def api_submit(
    page: Page,
    user: str,
    prompt_id: str,
    ranking: str,
    flags: list[str],
    comment: str,
    client_token: str,
    edit: str | None = None,
) -> dict:
    """Submit a complete ranking, and optionally an edit of the response ranked first; the same
    ``client_token`` again returns the stored result."""
    t0 = time.perf_counter()
    try:
        res = page.store.submit(
            user, prompt_id, ranking, flags or [], comment or "", client_token or None, edit=edit or None
        )
    except UserError as err:
        return refusal(err)
    # server_ms: time in the handler (validation + the SQLite transaction, waits for the
    # write lock included) — separates the store's cost from transport and client overhead.
    return {**res.to_dict(), "server_ms": _ms_since(t0)}


def api_skip(page: Page, user: str, prompt_id: str, client_token: str) -> dict:
    """Skip a prompt leased to the caller (it is not offered to them again)."""
    try:
        res = page.store.skip(user, prompt_id, "", client_token or None)
    except UserError as err:
        return refusal(err)
    return res.to_dict()


def _ms_since(t0: float) -> float:
    return round(1000 * (time.perf_counter() - t0), 3)
