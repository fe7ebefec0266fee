"""The annotation page (Gradio 6.31): layout and wiring only.

Everything that decides something lives elsewhere: what each control does in
:mod:`annotation_app.handlers` (plain functions, tested without a server), storage, leases,
validation and idempotency in :mod:`annotation_app.store`, login in :mod:`annotation_app.auth`,
the rank-selector logic in :mod:`annotation_app.control`, how untrusted text is shown in
:mod:`annotation_app.text`, statistics in :mod:`annotation_app.agreement`, export in
:mod:`annotation_app.io`. Each event here is a thin adapter: the user from the login session,
one handler call, its answer (a dict keyed by component) turned into Gradio updates.

Security:

* login through ``launch(auth=...)`` checking the store's scrypt hashes (off the event loop,
  5 wrong passwords per user name per 5 minutes, then refused): every Gradio route that serves the app
  (``/config``, ``/gradio_api/info``, the queue, ``/call``, file routes, uploads) answers 401
  without a session cookie;
* identity only from ``gr.Request.username`` (the server-side session); prompt ids and tokens
  sent by the page are checked against the caller's own leases and rows;
* responses are shown as literal text in non-interactive text boxes (never ``gr.HTML``); the
  optional rendered view escapes HTML and turns Markdown images into links;
* admin handlers check the caller's role on every call, not just the tab's visibility;
* bound to 127.0.0.1 unless told otherwise, analytics off, request bodies over 1 MB refused
  (413) before any route runs, text sizes limited in the store.

The named API endpoints for scripts are declared in :mod:`annotation_app.api`; serving (login,
request limits, launch) is :mod:`annotation_app.server`.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from annotation_app import handlers
from annotation_app.api import wire_api
from annotation_app.auth import session_user
from annotation_app.handlers import Page, Props, Table, slot_keys
from annotation_app.store import Store
from rlhf.export import EXPORT_FORMATS

# Keyboard shortcuts on top of the native ones (Tab / arrow keys / Enter in the ranking field):
# Alt+R focuses the ranking field, Ctrl+Enter submits, Alt+S skips.
KEYS_JS = """
() => {
  document.addEventListener('keydown', (e) => {
    const click = (id) => { const b = document.getElementById(id); if (b) b.click(); };
    if (e.altKey && (e.key === 'r' || e.key === 'R')) {
      const t = document.querySelector('#ranking textarea, #ranking input'); if (t) { t.focus(); e.preventDefault(); }
    } else if (e.ctrlKey && e.key === 'Enter') { click('submit'); e.preventDefault(); }
    else if (e.altKey && (e.key === 's' || e.key === 'S')) { click('skip'); e.preventDefault(); }
  });
}
"""

HELP = (
    "Rank the responses best first. Type a ranking such as `C > B = D > A` in the ranking field "
    "(`=` is a tie) and press Enter to submit, or pick a rank number for each response (equal "
    "numbers are a tie). Keys: Alt+R jumps to the ranking field, Ctrl+Enter submits, Alt+S skips. "
    "Your work is saved as a draft as you go."
)


PRIVATE = {"api_visibility": "private"}  # page events: not part of the scripts' API


def build_app(store: Store, *, project: str | None = None, max_k: int | None = None) -> gr.Blocks:
    """The Blocks app over ``store`` (optionally restricted to one project).

    The page has one response slot per label up to ``max_k`` (default: the largest K stored,
    at least 4); see :meth:`annotation_app.handlers.Page.for_store`.
    """
    page = Page.for_store(store, project, max_k)
    with gr.Blocks(title="RLHF Lab — annotation", analytics_enabled=False) as demo:
        with gr.Tabs():
            ui = {**_annotate_tab(page.slots), **_history_tab(), **_admin_tab()}
        _wire_annotate(demo, page, ui)
        _wire_history(page, ui)
        _wire_admin(page, ui)
        wire_api(page)
    return demo


# ----------------------------------------------------------------------------- layout
# Each tab returns its components keyed as the handlers name them (the elem_id, "slot-X" for the
# group of response X, "admin-tab"); creation order is the page order.


def _annotate_tab(slots: tuple[str, ...]) -> dict:
    ui: dict = {}
    with gr.Tab("Annotate", id="annotate"):
        with gr.Accordion("Guidelines", open=False):
            # Guidelines come from the admin's project config (trusted), so Markdown is fine.
            ui["guidelines"] = gr.Markdown(elem_id="guidelines")
            gr.Markdown(HELP)
        ui["progress"] = gr.Textbox(label="Progress", interactive=False, elem_id="progress")
        ui["message"] = gr.Textbox(label="Message", interactive=False, elem_id="message")
        ui["prompt-id"] = gr.Textbox(
            label="Prompt id", interactive=False, elem_id="prompt-id", visible="hidden"
        )
        ui["labels"] = gr.Textbox(visible="hidden", elem_id="labels")
        ui["client-token"] = gr.Textbox(visible="hidden", elem_id="client-token")
        ui["prompt"] = gr.Textbox(label="Prompt", interactive=False, elem_id="prompt", lines=2, max_lines=20)
        ui["rendered-toggle"] = gr.Checkbox(
            label="Also show a rendered view (Markdown; HTML shown as text, images as links)",
            elem_id="rendered-toggle",
        )
        for label in slots:
            group_key, text_key, rendered_key, rank_key = slot_keys(label)
            with gr.Group(visible=False) as ui[group_key]:
                ui[text_key] = gr.Textbox(
                    label=f"Response {label}", interactive=False, elem_id=text_key, lines=2, max_lines=30
                )
                ui[rendered_key] = gr.Markdown(visible=False, elem_id=rendered_key)
                ui[rank_key] = gr.Radio(
                    choices=[], label=f"Rank of {label} (1 = best, equal numbers = tie)", elem_id=rank_key
                )
        ui["ranking"] = gr.Textbox(
            label="Ranking, best first (e.g. C > B = D > A) — Enter submits",
            elem_id="ranking",
            max_length=200,
        )
        ui["all-bad"] = gr.Checkbox(label="All responses are bad", elem_id="all-bad")
        ui["comment"] = gr.Textbox(label="Comment (optional)", elem_id="comment", lines=1, max_length=5000)
        with gr.Row():
            ui["submit"] = gr.Button("Submit", variant="primary", elem_id="submit")
            ui["skip"] = gr.Button("Skip", elem_id="skip")
            ui["next"] = gr.Button("Next / refresh", elem_id="next")
    return ui


def _history_tab() -> dict:
    ui: dict = {}
    with gr.Tab("My history", id="history"):
        ui["history"] = gr.Dataframe(
            headers=handlers.HISTORY_COLUMNS, interactive=False, elem_id="history", wrap=True
        )
        with gr.Row():
            ui["history-prompt"] = gr.Dropdown(
                label="Revise a submission", choices=[], elem_id="history-prompt", allow_custom_value=False
            )
            ui["history-open"] = gr.Button("Open", elem_id="history-open")
        ui["history-item"] = gr.Textbox(
            label="Prompt and responses", interactive=False, lines=6, max_lines=40, elem_id="history-item"
        )
        ui["history-ranking"] = gr.Textbox(label="Ranking", elem_id="history-ranking", max_length=200)
        ui["history-all-bad"] = gr.Checkbox(label="All responses are bad", elem_id="history-all-bad")
        ui["history-comment"] = gr.Textbox(label="Comment", elem_id="history-comment", max_length=5000)
        ui["history-token"] = gr.Textbox(visible="hidden", elem_id="history-token")
        ui["revise"] = gr.Button("Save revision", variant="primary", elem_id="revise")
        ui["history-message"] = gr.Textbox(label="Message", interactive=False, elem_id="history-message")
    return ui


def _admin_tab() -> dict:
    ui: dict = {}
    with gr.Tab("Admin", id="admin", visible=False) as ui["admin-tab"]:
        ui["admin-refresh"] = gr.Button("Refresh statistics", elem_id="admin-refresh")
        ui["admin-summary"] = gr.JSON(label="Summary and agreement", elem_id="admin-summary")
        ui["admin-annotators"] = gr.Dataframe(
            label="Per annotator", interactive=False, elem_id="admin-annotators"
        )
        ui["admin-prompts"] = gr.Dataframe(label="Per prompt", interactive=False, elem_id="admin-prompts")
        with gr.Row():
            ui["admin-format"] = gr.Radio(
                list(EXPORT_FORMATS), value="rankings", label="Export format", elem_id="admin-format"
            )
            ui["admin-export"] = gr.Button("Export JSONL", elem_id="admin-export")
        ui["admin-file"] = gr.File(label="Export", interactive=False, elem_id="admin-file")
        ui["admin-message"] = gr.Textbox(label="Message", interactive=False, elem_id="admin-message")
    return ui


# ----------------------------------------------------------------------------- events


def _answer(values: dict, keys: list[str]) -> list:
    """Gradio's outputs for the components ``keys`` from a handler's answer; a component the
    answer does not name is left unchanged."""
    return [_gradio_value(values[key]) if key in values else gr.update() for key in keys]


def _gradio_value(value):
    if isinstance(value, Props):
        return gr.update(**value)
    if isinstance(value, Table):
        return pd.DataFrame(value.rows, columns=value.columns)
    return value


def _item_keys(slots: tuple[str, ...]) -> list[str]:
    """The components that show an item, in the order of the item events' outputs."""
    slot_parts = [key for label in slots for key in slot_keys(label)]
    form = ["ranking", "all-bad", "comment", "progress", "message", "guidelines"]
    return ["prompt-id", "labels", "client-token", "prompt", *slot_parts, *form]


def _components(ui: dict, keys: list[str]) -> list:
    return [ui[key] for key in keys]


def _wire_annotate(demo: gr.Blocks, page: Page, ui: dict) -> None:
    item_keys = _item_keys(page.slots)
    load_keys = [*item_keys, "history", "history-prompt", "admin-tab"]
    rank_keys = [slot_keys(label)[3] for label in page.slots]
    rendered_keys = [slot_keys(label)[2] for label in page.slots]
    history_keys = ["history", "history-prompt"]

    def on_load(request: gr.Request):
        return _answer(handlers.load(page, session_user(request)), load_keys)

    def on_next(request: gr.Request):
        return _answer(handlers.next_item(page, session_user(request)), item_keys)

    def on_ranks(request: gr.Request, pid: str, labels: str, bad: bool, note: str, shown: str, *ranks):
        # (The request comes first: Gradio only injects it into positional parameters.)
        user = session_user(request)
        values = handlers.ranks_changed(page, user, pid, labels, bad, note, shown, *ranks)
        return _answer(values, ["ranking", "message"])

    def on_ranking_text(
        pid: str, labels: str, text: str, bad: bool, note: str, shown: str, request: gr.Request
    ):
        values = handlers.ranking_text_changed(
            page, session_user(request), pid, labels, text, bad, note, shown
        )
        return _answer(values, [*rank_keys, "message"])

    def on_extras(pid: str, text: str, bad: bool, note: str, shown: str, request: gr.Request):
        values = handlers.extras_changed(page, session_user(request), pid, text, bad, note, shown)
        return _answer(values, ["message"])[0]

    def on_submit(pid: str, tok: str, text: str, bad: bool, note: str, request: gr.Request):
        return _answer(handlers.submit(page, session_user(request), pid, tok, text, bad, note), item_keys)

    def on_skip(pid: str, tok: str, note: str, request: gr.Request):
        return _answer(handlers.skip(page, session_user(request), pid, tok, note), item_keys)

    def on_rendered(show: bool, labels: str):
        return _answer(handlers.rendered_views(page, show, labels), rendered_keys)

    def refresh_history(request: gr.Request):
        return _answer(handlers.history(page, session_user(request)), history_keys)

    demo.load(on_load, None, _components(ui, load_keys), js=KEYS_JS, **PRIVATE)
    ui["next"].click(on_next, None, _components(ui, item_keys), **PRIVATE)
    rank_inputs = _components(ui, rank_keys)
    for rank in rank_inputs:
        rank.input(
            on_ranks,
            [ui["prompt-id"], ui["labels"], ui["all-bad"], ui["comment"], ui["message"], *rank_inputs],
            [ui["ranking"], ui["message"]],
            show_progress="hidden",
            trigger_mode="always_last",
            **PRIVATE,
        )
    ui["ranking"].input(
        on_ranking_text,
        [ui["prompt-id"], ui["labels"], ui["ranking"], ui["all-bad"], ui["comment"], ui["message"]],
        [*rank_inputs, ui["message"]],
        show_progress="hidden",
        trigger_mode="always_last",
        **PRIVATE,
    )
    extras_inputs = [ui["prompt-id"], ui["ranking"], ui["all-bad"], ui["comment"], ui["message"]]
    ui["all-bad"].input(on_extras, extras_inputs, ui["message"], show_progress="hidden", **PRIVATE)
    ui["comment"].input(
        on_extras, extras_inputs, ui["message"], show_progress="hidden", trigger_mode="always_last", **PRIVATE
    )
    submit_inputs = [ui["prompt-id"], ui["client-token"], ui["ranking"], ui["all-bad"], ui["comment"]]
    for trigger in (ui["submit"].click, ui["ranking"].submit):
        trigger(on_submit, submit_inputs, _components(ui, item_keys), trigger_mode="once", **PRIVATE).then(
            refresh_history, None, _components(ui, history_keys), **PRIVATE
        )
    ui["skip"].click(
        on_skip,
        [ui["prompt-id"], ui["client-token"], ui["comment"]],
        _components(ui, item_keys),
        trigger_mode="once",
        **PRIVATE,
    )
    for changed in (ui["rendered-toggle"].change, ui["labels"].change):
        changed(on_rendered, [ui["rendered-toggle"], ui["labels"]], _components(ui, rendered_keys), **PRIVATE)


def _wire_history(page: Page, ui: dict) -> None:
    open_keys = [
        "history-item",
        "history-ranking",
        "history-all-bad",
        "history-comment",
        "history-token",
        "history-message",
    ]
    revise_keys = ["history", "history-prompt", "history-message"]

    def on_open(pid: str, request: gr.Request):
        return _answer(handlers.open_submission(page, session_user(request), pid), open_keys)

    def on_revise(pid: str, text: str, bad: bool, note: str, tok: str, request: gr.Request):
        return _answer(handlers.revise(page, session_user(request), pid, text, bad, note, tok), revise_keys)

    ui["history-open"].click(on_open, [ui["history-prompt"]], _components(ui, open_keys), **PRIVATE)
    revise_inputs = [
        ui["history-prompt"],
        ui["history-ranking"],
        ui["history-all-bad"],
        ui["history-comment"],
        ui["history-token"],
    ]
    for trigger in (ui["revise"].click, ui["history-ranking"].submit):
        trigger(on_revise, revise_inputs, _components(ui, revise_keys), trigger_mode="once", **PRIVATE)


def _wire_admin(page: Page, ui: dict) -> None:
    # The handlers check the caller's role on every call, not just the tab's visibility.
    refresh_keys = ["admin-summary", "admin-annotators", "admin-prompts", "admin-message"]
    export_keys = ["admin-file", "admin-message"]

    def on_admin_refresh(request: gr.Request):
        return _answer(handlers.admin_statistics(page, session_user(request)), refresh_keys)

    def on_admin_export(fmt: str, request: gr.Request):
        return _answer(handlers.admin_export(page, session_user(request), fmt), export_keys)

    ui["admin-refresh"].click(on_admin_refresh, None, _components(ui, refresh_keys), **PRIVATE)
    ui["admin-export"].click(on_admin_export, [ui["admin-format"]], _components(ui, export_keys), **PRIVATE)


_MOVED_TO_SERVER = ("BodySizeLimit", "MAX_BODY_BYTES", "make_auth", "launch", "serve", "serve_candidates")


def __getattr__(name: str):
    # Serving moved to annotation_app.server, which imports this module (for build_app); the old
    # import path keeps working through this lazy forward instead of a circular import.
    if name in _MOVED_TO_SERVER:
        from annotation_app import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
