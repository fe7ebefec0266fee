"""The annotation page (Gradio 6.31): layout and wiring only.

Everything that decides something lives elsewhere: what each control does in
:mod:`annotation_app.handlers` (plain functions, tested without a server; the Arena tab's, blind
pairwise votes and the admins' leaderboard, in :mod:`annotation_app.arena_tab`), storage, leases,
validation and idempotency in :mod:`annotation_app.store`, login in :mod:`annotation_app.auth`,
the rank board in :mod:`annotation_app.board` (its browser side included) and
:mod:`annotation_app.control`, how untrusted text is shown in :mod:`annotation_app.text`, the
dashboard's figures in :mod:`annotation_app.dashboard`, export in :mod:`annotation_app.io`. Each event here is a thin adapter: the user from the login session,
one handler call, its answer (a dict keyed by component) turned into Gradio updates.

Security (login, throttling, sessions, exports, malformed calls) is :mod:`annotation_app.server`'s
job and is listed in docs/annotation-security.md; what this page adds: responses are shown as
literal text (text boxes, a chat transcript that renders no Markdown), the optional rendered view
escapes HTML and turns images into links, the board draws only labels, a model's suggested ranking
reaches only an annotator who opted in (as literal text), and admin handlers check the caller's
role on every call, not just the tab's visibility.

The named API endpoints for scripts are declared in :mod:`annotation_app.api`; serving (login,
request limits, launch) is :mod:`annotation_app.server`.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from annotation_app import arena_tab, dashboard, handlers
from annotation_app.api import wire_api
from annotation_app.auth import session_user
from annotation_app.board import BOARD_CSS, BOARD_HTML, BOARD_JS, board_value
from annotation_app.handlers import Page, Props, Table, slot_keys
from annotation_app.store import Store
from rlhf.arena import LABELS as ARENA_LABELS
from rlhf.export import EXPORT_FORMATS

# Keyboard shortcuts on top of the board's own keys (see annotation_app/board.py) and Enter in the
# ranking field: Alt+K focuses the board, Alt+R the ranking field, Ctrl+Enter submits, Alt+S skips.
KEYS_JS = """
() => {
  document.addEventListener('keydown', (e) => {
    // Only a button on screen: Alt+S on the Arena tab must not skip the hidden ranking item.
    const click = (id) => { const b = document.getElementById(id); if (b && b.offsetParent !== null) b.click(); };
    const focus = (sel) => { const t = document.querySelector(sel); if (t) { t.focus(); e.preventDefault(); } };
    if (e.altKey && (e.key === 'r' || e.key === 'R')) focus('#ranking textarea, #ranking input');
    else if (e.altKey && (e.key === 'k' || e.key === 'K')) focus('#board .chip[tabindex="0"]');
    else if (e.ctrlKey && e.key === 'Enter') { click('submit'); e.preventDefault(); }
    else if (e.altKey && (e.key === 's' || e.key === 'S')) { click('skip'); e.preventDefault(); }
  });
}
"""

HELP = (
    "Rank the responses best first. Drag each response's letter into a rank on the board (two "
    "letters in one rank are a tie), or use the keyboard: Tab to the board (or Alt+K), press a "
    "response's letter or ←/→ to pick it, a digit to rank it, `=` to tie it with the one placed "
    "last, `0` to unrank it and Enter to submit. You can also type a ranking such as `C > B = D > A` "
    "in the ranking field (Alt+R; `=` is a tie) and press Enter. Ctrl+Enter submits, Alt+S skips. "
    "Your work is saved as a draft as you go."
)

# The annotate tab's layout: the action bar stays on screen; responses sit side by side, up to
# four to a row, each scrolling on its own so long answers can be compared without paging.
PAGE_CSS = """
/* Gradio's container hides its overflow, which makes it the scroll box a sticky child sticks in
   (and it never scrolls); clip still clips but is no scroll box, so the bar sticks to the window. */
.gradio-container { overflow: clip !important; }
#topbar { position: sticky; top: 0; z-index: 20; background: var(--background-fill-primary);
  padding: 4px 0; align-items: center; }
#topbar textarea, #topbar input { font-size: 0.9rem; }
.response-column { min-width: 280px; }
.response-column textarea { font-size: 0.92rem; line-height: 1.35; }
#prompt textarea { font-weight: 500; }
#conversation button[aria-label="Clear"] { display: none; }  /* the transcript is read-only */
"""

PRIVATE = {"api_visibility": "private"}  # page events: not part of the scripts' API


def build_app(store: Store, *, project: str | None = None, max_k: int | None = None) -> gr.Blocks:
    """The Blocks app over ``store`` (optionally restricted to one project).

    The page has one response slot per label up to ``max_k`` (default: the largest K stored,
    at least 4); see :meth:`annotation_app.handlers.Page.for_store`.
    """
    page = Page.for_store(store, project, max_k)
    with gr.Blocks(title="RLHF Lab — annotation", analytics_enabled=False) as demo:
        with gr.Tabs():
            ui = {**_annotate_tab(page.slots), **_arena_tab(), **_history_tab(), **_admin_tab()}
        _wire_annotate(demo, page, ui)
        _wire_arena(demo, page, ui)
        _wire_history(page, ui)
        _wire_admin(page, ui)
        wire_api(page)
    return demo


# ----------------------------------------------------------------------------- layout
# Each tab returns its components keyed as the handlers name them (the elem_id, "slot-X" for the
# column of response X, "admin-tab"); creation order is the page order.


def _progress_and_message(progress_id: str, message_id: str, scales: tuple[int, int]):
    """The read-only progress and message lines a tab's top bar starts with."""
    progress = gr.Textbox(
        show_label=False, interactive=False, elem_id=progress_id, scale=scales[0], container=False
    )
    message = gr.Textbox(
        show_label=False,
        interactive=False,
        elem_id=message_id,
        scale=scales[1],
        container=False,
        placeholder="Messages appear here",
    )
    return progress, message


def _annotate_tab(slots: tuple[str, ...]) -> dict:
    ui: dict = {}
    with gr.Tab("Annotate", id="annotate"):
        with gr.Row(elem_id="topbar", equal_height=True):
            ui["progress"], ui["message"] = _progress_and_message("progress", "message", scales=(3, 4))
            ui["skip"] = gr.Button("Skip", elem_id="skip", scale=0, min_width=80)
            ui["submit"] = gr.Button("Submit", variant="primary", elem_id="submit", scale=0, min_width=110)
        with gr.Accordion("Guidelines", open=True, elem_id="guidelines-box") as ui["guidelines-box"]:
            # Guidelines come from the admin's project config (trusted), so Markdown is fine.
            ui["guidelines"] = gr.Markdown(elem_id="guidelines")
            gr.Markdown(HELP)
            # Off by default: a suggestion seen first can pull the ranking toward it (anchoring);
            # the dashboard reports agreement with and without it apart.
            ui["show-proposals"] = gr.Checkbox(
                label="Show the model's suggested ranking (if any)", elem_id="show-proposals"
            )
        ui["prompt-id"] = gr.Textbox(
            label="Prompt id", interactive=False, elem_id="prompt-id", visible="hidden"
        )
        ui["labels"] = gr.Textbox(visible="hidden", elem_id="labels")
        ui["client-token"] = gr.Textbox(visible="hidden", elem_id="client-token")
        ui["prompt"] = gr.Textbox(label="Prompt", interactive=False, elem_id="prompt", lines=1, max_lines=6)
        ui["conversation"] = _transcript("conversation")
        # A text box: the suggestion is shown as literal text, like the responses.
        ui["proposal"] = gr.Textbox(
            show_label=False, interactive=False, elem_id="proposal", container=False, visible=False
        )
        ui["board"] = gr.HTML(
            board_value([], ""),
            html_template=BOARD_HTML,
            css_template=BOARD_CSS,
            js_on_load=BOARD_JS,
            elem_id="board",
        )
        with gr.Row(equal_height=False):
            for label in slots:
                column_key, text_key, rendered_key = slot_keys(label)
                with gr.Column(visible=False, min_width=280, elem_classes="response-column") as ui[
                    column_key
                ]:
                    ui[text_key] = gr.Textbox(
                        label=f"Response {label}",
                        interactive=False,
                        elem_id=text_key,
                        lines=12,
                        max_lines=12,
                        autoscroll=False,
                    )
                    ui[rendered_key] = gr.Markdown(visible=False, elem_id=rendered_key, max_height=320)
        with gr.Row():
            ui["ranking"] = gr.Textbox(
                label="Ranking, best first (e.g. C > B = D > A) — Enter submits",
                elem_id="ranking",
                max_length=200,
                scale=3,
            )
            with gr.Column(scale=2):
                ui["all-bad"] = gr.Checkbox(label="All responses are bad", elem_id="all-bad")
                ui["rendered-toggle"] = gr.Checkbox(
                    label="Also show a rendered view (Markdown; HTML shown as text, images as links)",
                    elem_id="rendered-toggle",
                )
        with gr.Accordion("Correct the best response (optional)", open=False, elem_id="edit-box"):
            gr.Markdown(
                "Fix what is wrong in the response you ranked first: your version is stored with the "
                "ranking and becomes a demonstration for supervised fine-tuning."
            )
            ui["start-edit"] = gr.Button("Copy the best response here", elem_id="start-edit", size="sm")
            ui["edit"] = gr.Textbox(
                label="Your corrected response", elem_id="edit", lines=4, max_lines=16, max_length=20000
            )
        ui["comment"] = gr.Textbox(label="Comment (optional)", elem_id="comment", lines=1, max_length=5000)
        ui["next"] = gr.Button("Next / refresh", elem_id="next", size="sm")
    return ui


def _transcript(elem_id: str) -> gr.Chatbot:
    """Shown for a multi-turn prompt: the turns as literal text, no Markdown or HTML rendered."""
    return gr.Chatbot(
        label="Conversation so far",
        elem_id=elem_id,
        visible=False,
        height=220,
        render_markdown=False,
        sanitize_html=True,
        buttons=[],
    )


def _arena_tab() -> dict:
    ui: dict = {}
    with gr.Tab("Arena", id="arena") as ui["arena-tab"]:
        with gr.Row(equal_height=True):
            ui["arena-progress"], ui["arena-message"] = _progress_and_message(
                "arena-progress", "arena-message", scales=(2, 5)
            )
            ui["arena-next"] = gr.Button(
                "Next / refresh", elem_id="arena-next", scale=0, min_width=120, size="sm"
            )
        # Guidelines come from the admin's project config (trusted), so Markdown is fine.
        ui["arena-guidelines"] = gr.Markdown(elem_id="arena-guidelines")
        ui["arena-prompt-id"] = gr.Textbox(visible="hidden", elem_id="arena-prompt-id")
        ui["arena-token"] = gr.Textbox(visible="hidden", elem_id="arena-token")
        ui["arena-prompt"] = gr.Textbox(
            label="Prompt", interactive=False, elem_id="arena-prompt", lines=1, max_lines=6
        )
        ui["arena-conversation"] = _transcript("arena-conversation")
        with gr.Row(equal_height=True):
            for label in ARENA_LABELS:  # side by side, each scrolling on its own
                ui[f"arena-response-{label}"] = gr.Textbox(
                    label=label,
                    interactive=False,
                    elem_id=f"arena-response-{label}",
                    elem_classes="response-column",
                    lines=12,
                    max_lines=12,
                    autoscroll=False,
                )
        with gr.Row(elem_id="arena-votes"):
            for key, choice in arena_tab.CHOICES.items():
                ui[key] = gr.Button(choice.button_text(), elem_id=key, variant="primary", interactive=False)
            ui["arena-skip"] = gr.Button(
                arena_tab.SKIP.button_text(), elem_id="arena-skip", scale=0, min_width=110, interactive=False
            )
        # Admins only (the handlers check the role on every call; this is only what shows).
        with gr.Column(visible=False, elem_id="arena-admin") as ui["arena-admin"]:
            gr.Markdown(
                "### Arena leaderboard\nThe app's votes (voter `human`): Bradley–Terry–Davidson ratings "
                "and length-controlled win rates with 95 % bootstrap intervals over prompts (docs/arena.md)."
            )
            with gr.Row(equal_height=True):
                ui["arena-baseline"] = gr.Dropdown(
                    choices=[arena_tab.LOWEST_RATED],
                    value="",
                    label="Win rates against",
                    elem_id="arena-baseline",
                    scale=2,
                )
                ui["arena-refresh"] = gr.Button("Refresh leaderboard", elem_id="arena-refresh", scale=1)
                ui["arena-export"] = gr.Button("Export votes (JSONL)", elem_id="arena-export", scale=1)
            ui["arena-admin-message"] = gr.Textbox(
                show_label=False, interactive=False, elem_id="arena-admin-message", container=False
            )
            ui["arena-leaderboard"] = gr.Dataframe(interactive=False, elem_id="arena-leaderboard", wrap=True)
            ui["arena-figure"] = gr.Plot(show_label=False, elem_id="arena-figure", format="png")
            ui["arena-download"] = gr.Markdown(elem_id="arena-download")
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
        with gr.Row(equal_height=True):
            ui["admin-refresh"] = gr.Button("Refresh", elem_id="admin-refresh", scale=0, min_width=100)
            ui["admin-message"] = gr.Textbox(
                show_label=False, interactive=False, elem_id="admin-message", container=False
            )
        ui["admin-headline"] = gr.Dataframe(
            label="Headline (intervals: 95 % bootstrap over prompts)",
            interactive=False,
            elem_id="admin-headline",
        )
        with gr.Row():
            ui["admin-progress"] = gr.LinePlot(
                x="time",
                y="rankings",
                title="Rankings submitted over time",
                elem_id="admin-progress",
                height=240,
            )
            ui["admin-seconds"] = gr.BarPlot(
                x="seconds",
                y="rankings",
                title="Time per item",
                elem_id="admin-seconds",
                height=240,
                sort=dashboard.SECONDS_BIN_NAMES,  # the bins in time order, not alphabetical
            )
        with gr.Row():
            ui["admin-throughput"] = gr.BarPlot(
                x="annotator",
                y="submitted",
                title="Rankings per annotator",
                elem_id="admin-throughput",
                height=240,
            )
            ui["admin-agreement"] = gr.BarPlot(
                x="annotator",
                y="agreement",
                title="Agreement with the other annotators (win/tie/loss per pair)",
                elem_id="admin-agreement",
                height=240,
                y_lim=[0, 1],
            )
        ui["admin-annotators"] = gr.Dataframe(
            label="Per annotator", interactive=False, elem_id="admin-annotators"
        )
        with gr.Accordion("Per prompt", open=False):
            ui["admin-prompts"] = gr.Dataframe(interactive=False, elem_id="admin-prompts")
        with gr.Accordion(
            "Model pre-ranking per prompt (rlhf annotate propose; shown only to annotators who opt in)",
            open=False,
        ):
            ui["admin-proposals"] = gr.Dataframe(interactive=False, elem_id="admin-proposals")
        with gr.Row(equal_height=True):
            ui["admin-format"] = gr.Radio(
                list(EXPORT_FORMATS), value="rankings", label="Export format", elem_id="admin-format", scale=3
            )
            ui["admin-export"] = gr.Button("Export JSONL", elem_id="admin-export", scale=0, min_width=140)
        ui["admin-download"] = gr.Markdown(elem_id="admin-download")
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
    form = ["ranking", "all-bad", "comment", "edit", "progress", "message", "guidelines", "guidelines-box"]
    return [
        "prompt-id",
        "labels",
        "client-token",
        "prompt",
        "conversation",
        "proposal",
        "board",
        *slot_parts,
        *form,
    ]


def _components(ui: dict, keys: list[str]) -> list:
    return [ui[key] for key in keys]


def _wire_annotate(demo: gr.Blocks, page: Page, ui: dict) -> None:
    item_keys = _item_keys(page.slots)
    load_keys = [*item_keys, "history", "history-prompt", "show-proposals", "admin-tab"]
    rendered_keys = [slot_keys(label)[2] for label in page.slots]
    history_keys = ["history", "history-prompt"]

    def on_load(request: gr.Request):
        return _answer(handlers.load(page, session_user(request)), load_keys)

    def on_next(request: gr.Request):
        return _answer(handlers.next_item(page, session_user(request)), item_keys)

    def on_board(pid: str, board: str, bad: bool, note: str, edit: str, shown: str, request: gr.Request):
        values = handlers.board_changed(page, session_user(request), pid, board, bad, note, edit, shown)
        return _answer(values, ["message"])[0]

    def on_ranking_text(
        pid: str, labels: str, text: str, bad: bool, note: str, edit: str, shown: str, request: gr.Request
    ):
        values = handlers.ranking_text_changed(
            page, session_user(request), pid, labels, text, bad, note, edit, shown
        )
        return _answer(values, ["board", "message"])

    def on_extras(pid: str, text: str, bad: bool, note: str, edit: str, shown: str, request: gr.Request):
        values = handlers.extras_changed(page, session_user(request), pid, text, bad, note, edit, shown)
        return _answer(values, ["message"])[0]

    def on_start_edit(pid: str, labels: str, text: str, request: gr.Request):
        return _answer(
            handlers.start_edit(page, session_user(request), pid, labels, text), ["edit", "message"]
        )

    def on_submit(pid: str, tok: str, text: str, bad: bool, note: str, edit: str, request: gr.Request):
        values = handlers.submit(page, session_user(request), pid, tok, text, bad, note, edit)
        return _answer(values, item_keys)

    def on_skip(pid: str, tok: str, note: str, request: gr.Request):
        return _answer(handlers.skip(page, session_user(request), pid, tok, note), item_keys)

    def on_show_proposals(on: bool, pid: str, request: gr.Request):
        values = handlers.show_proposals_changed(page, session_user(request), on, pid)
        return _answer(values, ["proposal", "message"])

    def on_rendered(show: bool, labels: str):
        return _answer(handlers.rendered_views(page, show, labels), rendered_keys)

    def refresh_history(request: gr.Request):
        return _answer(handlers.history(page, session_user(request)), history_keys)

    typing = {"show_progress": "hidden", "trigger_mode": "always_last", **PRIVATE}
    demo.load(on_load, None, _components(ui, load_keys), js=KEYS_JS, **PRIVATE)
    ui["next"].click(on_next, None, _components(ui, item_keys), **PRIVATE)
    ui["board"].input(
        on_board,
        _components(ui, ["prompt-id", "board", "all-bad", "comment", "edit", "message"]),
        ui["message"],
        **typing,
    )
    ui["ranking"].input(
        on_ranking_text,
        _components(ui, ["prompt-id", "labels", "ranking", "all-bad", "comment", "edit", "message"]),
        _components(ui, ["board", "message"]),
        **typing,
    )
    extras_inputs = _components(ui, ["prompt-id", "ranking", "all-bad", "comment", "edit", "message"])
    for extra in ("all-bad", "comment", "edit"):
        ui[extra].input(on_extras, extras_inputs, ui["message"], **typing)
    ui["start-edit"].click(
        on_start_edit,
        _components(ui, ["prompt-id", "labels", "ranking"]),
        _components(ui, ["edit", "message"]),
        **PRIVATE,
    ).then(on_extras, extras_inputs, ui["message"], **typing)
    submit_inputs = _components(ui, ["prompt-id", "client-token", "ranking", "all-bad", "comment", "edit"])
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
    # .input, not .change: only the annotator's own click saves the choice, not the page load.
    ui["show-proposals"].input(
        on_show_proposals,
        [ui["show-proposals"], ui["prompt-id"]],
        _components(ui, ["proposal", "message"]),
        **PRIVATE,
    )
    for changed in (ui["rendered-toggle"].change, ui["labels"].change):
        changed(on_rendered, [ui["rendered-toggle"], ui["labels"]], _components(ui, rendered_keys), **PRIVATE)


def _wire_arena(demo: gr.Blocks, page: Page, ui: dict) -> None:
    view_keys = list(arena_tab.VIEW_KEYS)
    view = _components(ui, view_keys)
    pair = [ui["arena-prompt-id"], ui["arena-token"]]
    leaderboard_keys = list(arena_tab.LEADERBOARD_KEYS)
    export_keys = list(arena_tab.EXPORT_KEYS)

    def on_arena_open(request: gr.Request):
        return _answer(arena_tab.open_arena(page, session_user(request)), [*view_keys, "arena-admin"])

    def on_arena_next(request: gr.Request):
        return _answer(arena_tab.next_pair(page, session_user(request)), view_keys)

    def on_arena_vote(button: str):
        # One handler per vote button, named after it (on_arena_a, ...): the choice is fixed
        # here on the server, never sent by the page.
        def on_vote(pid: str, tok: str, request: gr.Request):
            return _answer(arena_tab.vote(page, session_user(request), pid, tok, button), view_keys)

        on_vote.__name__ = on_vote.__qualname__ = "on_" + button.replace("-", "_")
        return on_vote

    def on_arena_skip(pid: str, tok: str, request: gr.Request):
        return _answer(arena_tab.skip(page, session_user(request), pid, tok), view_keys)

    def on_arena_leaderboard(baseline: str, request: gr.Request):
        return _answer(arena_tab.leaderboard(page, session_user(request), baseline), leaderboard_keys)

    def on_arena_export(request: gr.Request):
        return _answer(arena_tab.export_votes(page, session_user(request)), export_keys)

    # The pair is leased when the tab is opened, not at page load: someone who never opens the
    # Arena tab holds no pair back from the others.
    ui["arena-tab"].select(on_arena_open, None, [*view, ui["arena-admin"]], **PRIVATE)
    ui["arena-next"].click(on_arena_next, None, view, **PRIVATE)
    for key in arena_tab.CHOICES:
        ui[key].click(on_arena_vote(key), pair, view, trigger_mode="once", **PRIVATE)
    ui["arena-skip"].click(on_arena_skip, pair, view, trigger_mode="once", **PRIVATE)
    for trigger in (ui["arena-refresh"].click, ui["arena-baseline"].input):
        trigger(on_arena_leaderboard, [ui["arena-baseline"]], _components(ui, leaderboard_keys), **PRIVATE)
    ui["arena-export"].click(on_arena_export, None, _components(ui, export_keys), **PRIVATE)
    demo.load(None, None, None, js=arena_tab.KEYS_JS, **PRIVATE)


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
    refresh_keys = [*handlers.ADMIN_FIGURES, "admin-message"]
    export_keys = ["admin-download", "admin-message"]

    def on_admin_refresh(request: gr.Request):
        return _answer(handlers.admin_statistics(page, session_user(request)), refresh_keys)

    def on_admin_export(fmt: str, request: gr.Request):
        return _answer(handlers.admin_export(page, session_user(request), fmt), export_keys)

    ui["admin-refresh"].click(on_admin_refresh, None, _components(ui, refresh_keys), **PRIVATE)
    ui["admin-tab"].select(on_admin_refresh, None, _components(ui, refresh_keys), **PRIVATE)
    ui["admin-export"].click(on_admin_export, [ui["admin-format"]], _components(ui, export_keys), **PRIVATE)


_MOVED_TO_SERVER = ("BodySizeLimit", "MAX_BODY_BYTES", "make_auth", "launch", "serve", "serve_candidates")


def __getattr__(name: str):
    # Serving moved to annotation_app.server, which imports this module (for build_app); the old
    # import path keeps working through this lazy forward instead of a circular import.
    if name in _MOVED_TO_SERVER:
        from annotation_app import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
