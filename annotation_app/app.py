"""The annotation page (Gradio 6.31): wiring only.

Everything that decides something lives elsewhere: storage, leases, validation and
idempotency in :mod:`annotation_app.store`, the rank-selector logic in
:mod:`annotation_app.control`, how untrusted text is shown in :mod:`annotation_app.text`,
statistics in :mod:`annotation_app.agreement`, export in :mod:`annotation_app.io`.

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

Named API endpoints for scripts (``gradio_client`` with ``auth=(user, password)``):
``/next`` → the caller's next item as a dict (``None`` fields when all is done);
``/submit`` (prompt_id, ranking, flags, comment, client_token) → ``{"ok": true, "status", ...,
"server_ms"}``
or ``{"ok": false, "code", "message"}``; ``/skip`` (prompt_id, client_token) likewise.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no phone-home
# Gradio's queue keeps a record of its last 10,000 events for the monitoring dashboard (off
# here) and rebuilds a pandas summary of all of them after every event: 4-20 ms of the server's
# one core per API call, growing with uptime. Summarise never, keep few records.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**12))
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "256")

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from annotation_app import agreement  # noqa: E402
from annotation_app.control import ranks_to_text, text_to_ranks  # noqa: E402
from annotation_app.store import Item, LoginThrottle, Store, StoreError  # noqa: E402
from annotation_app.text import safe_markdown, visible_text  # noqa: E402
from rlhf.data import EXPORT_FORMATS  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.rankings import ALL_LABELS  # noqa: E402

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


API_WORKERS = 4


def _user(request: gr.Request | None) -> str:
    # Identity comes only from the server-side session that Gradio's login created.
    name = getattr(request, "username", None) if request is not None else None
    if not name:
        raise StoreError("you are not logged in; reload the page and log in", code="not_logged_in")
    return name


def _explain(err: Exception) -> str:
    if isinstance(err, UserError):
        return f"Error: {err}"
    return "Error: something went wrong on the server; your draft is kept. Please try again."


def build_app(store: Store, *, project: str | None = None, max_k: int | None = None) -> gr.Blocks:
    """The Blocks app over ``store`` (optionally restricted to one project).

    The page has one response slot per label up to ``max_k`` (default: the largest K stored,
    at least 4). Fewer slots keep the page config small: with all 26 it is ~145 kB, built on
    every page load and every scripted client's login.
    """
    SLOTS = ALL_LABELS[: max(2, min(len(ALL_LABELS), max_k or max(4, store.max_k())))]  # noqa: N806

    def progress_text(user: str) -> str:
        p = store.progress(user)
        return (
            f"{user}: {p['submitted']} submitted, {p['skipped']} skipped — "
            f"{p['prompts_needing_rankings']} of {p['prompts']} prompts still need rankings"
        )

    def item_outputs(user: str, item: Item | None, message: str) -> list:
        """Values for ``item_components`` (in that order) showing ``item``."""
        if item is None:
            slots = []
            for _ in SLOTS:
                slots += [gr.update(visible=False), "", "", gr.update(choices=[], value=None)]
            return [
                "",
                "",
                "",
                "All done: there is nothing left for you to rank right now. "
                "Press Next later to check for new prompts.",
                *slots,
                "",
                False,
                "",
                progress_text(user),
                message,
                "",
            ]
        labels = item.labels
        if len(labels) > len(SLOTS):
            return item_outputs(
                user,
                None,
                f"Error: prompt {item.prompt_id} has {len(labels)} responses but this page was started with "
                f"{len(SLOTS)} slots; ask your admin to restart `rlhf annotate serve` after the import.",
            )
        draft = item.draft or {}
        ranks, _ = text_to_ranks(draft.get("ranking", ""), labels)
        slots = []
        texts = {c["label"]: c["text"] for c in item.candidates}
        choices = [str(i) for i in range(1, len(labels) + 1)]
        for i, label in enumerate(SLOTS):
            if label in texts:
                slots += [
                    gr.update(visible=True),
                    visible_text(texts[label]),
                    safe_markdown(texts[label]),
                    gr.update(choices=choices, value=ranks[i]),
                ]
            else:
                slots += [gr.update(visible=False), "", "", gr.update(choices=[], value=None)]
        return [
            item.prompt_id,
            " ".join(labels),
            secrets.token_hex(16),
            visible_text(item.prompt),
            *slots,
            draft.get("ranking", ""),
            "all_bad" in draft.get("flags", []),
            draft.get("comment", ""),
            progress_text(user),
            message,
            item.guidelines,
        ]

    def history_rows(user: str) -> list[list]:
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

    with gr.Blocks(title="RLHF Lab — annotation", analytics_enabled=False) as demo:
        with gr.Tabs():
            with gr.Tab("Annotate", id="annotate"):
                with gr.Accordion("Guidelines", open=False):
                    # Guidelines come from the admin's project config (trusted), so Markdown is fine.
                    guidelines = gr.Markdown(elem_id="guidelines")
                    gr.Markdown(HELP)
                progress = gr.Textbox(label="Progress", interactive=False, elem_id="progress")
                message = gr.Textbox(label="Message", interactive=False, elem_id="message")
                prompt_id = gr.Textbox(
                    label="Prompt id", interactive=False, elem_id="prompt-id", visible="hidden"
                )
                labels_box = gr.Textbox(visible="hidden", elem_id="labels")
                token = gr.Textbox(visible="hidden", elem_id="client-token")
                prompt = gr.Textbox(
                    label="Prompt", interactive=False, elem_id="prompt", lines=2, max_lines=20
                )
                rendered = gr.Checkbox(
                    label="Also show a rendered view (Markdown; HTML shown as text, images as links)",
                    elem_id="rendered-toggle",
                )
                slot_parts = []
                for label in SLOTS:
                    with gr.Group(visible=False) as group:
                        text = gr.Textbox(
                            label=f"Response {label}",
                            interactive=False,
                            elem_id=f"response-{label}",
                            lines=2,
                            max_lines=30,
                        )
                        md = gr.Markdown(visible=False, elem_id=f"rendered-{label}")
                        rank = gr.Radio(
                            choices=[],
                            label=f"Rank of {label} (1 = best, equal numbers = tie)",
                            elem_id=f"rank-{label}",
                        )
                    slot_parts.append((group, text, md, rank))
                ranking = gr.Textbox(
                    label="Ranking, best first (e.g. C > B = D > A) — Enter submits",
                    elem_id="ranking",
                    max_length=200,
                )
                all_bad = gr.Checkbox(label="All responses are bad", elem_id="all-bad")
                comment = gr.Textbox(label="Comment (optional)", elem_id="comment", lines=1, max_length=5000)
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary", elem_id="submit")
                    skip = gr.Button("Skip", elem_id="skip")
                    next_btn = gr.Button("Next / refresh", elem_id="next")
            with gr.Tab("My history", id="history"):
                history = gr.Dataframe(
                    headers=["prompt_id", "status", "ranking", "flags", "revisions", "updated"],
                    interactive=False,
                    elem_id="history",
                    wrap=True,
                )
                with gr.Row():
                    h_prompt = gr.Dropdown(
                        label="Revise a submission",
                        choices=[],
                        elem_id="history-prompt",
                        allow_custom_value=False,
                    )
                    h_load = gr.Button("Open", elem_id="history-open")
                h_item = gr.Textbox(
                    label="Prompt and responses",
                    interactive=False,
                    lines=6,
                    max_lines=40,
                    elem_id="history-item",
                )
                h_ranking = gr.Textbox(label="Ranking", elem_id="history-ranking", max_length=200)
                h_all_bad = gr.Checkbox(label="All responses are bad", elem_id="history-all-bad")
                h_comment = gr.Textbox(label="Comment", elem_id="history-comment", max_length=5000)
                h_token = gr.Textbox(visible="hidden", elem_id="history-token")
                revise = gr.Button("Save revision", variant="primary", elem_id="revise")
                h_message = gr.Textbox(label="Message", interactive=False, elem_id="history-message")
            with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                a_refresh = gr.Button("Refresh statistics", elem_id="admin-refresh")
                a_summary = gr.JSON(label="Summary and agreement", elem_id="admin-summary")
                a_users = gr.Dataframe(label="Per annotator", interactive=False, elem_id="admin-annotators")
                a_prompts = gr.Dataframe(label="Per prompt", interactive=False, elem_id="admin-prompts")
                with gr.Row():
                    a_format = gr.Radio(
                        list(EXPORT_FORMATS), value="rankings", label="Export format", elem_id="admin-format"
                    )
                    a_export = gr.Button("Export JSONL", elem_id="admin-export")
                a_file = gr.File(label="Export", interactive=False, elem_id="admin-file")
                a_message = gr.Textbox(label="Message", interactive=False, elem_id="admin-message")

        slot_outputs = [c for part in slot_parts for c in part[:4]]
        item_components = [
            prompt_id,
            labels_box,
            token,
            prompt,
            *slot_outputs,
            ranking,
            all_bad,
            comment,
            progress,
            message,
            guidelines,
        ]
        rank_inputs = [part[3] for part in slot_parts]
        md_parts = [part[2] for part in slot_parts]

        # ---------------------------------------------------------------- annotate handlers

        def on_load(request: gr.Request):
            user = _user(request)
            role = store.role(user)
            try:
                item = store.next_item(user, project)
                out = item_outputs(user, item, "Draft restored." if item and item.draft else "")
            except UserError as err:
                out = item_outputs(user, None, _explain(err))
            rows = history_rows(user)
            return [
                *out,
                rows,
                gr.update(choices=[r[0] for r in rows if r[1] == "submitted"]),
                gr.update(visible=role == "admin"),
            ]

        def on_next(request: gr.Request):
            user = _user(request)
            try:
                item = store.next_item(user, project)
                return item_outputs(user, item, "")
            except UserError as err:
                return item_outputs(user, None, _explain(err))

        def on_ranks(request: gr.Request, pid: str, labels: str, bad: bool, note: str, shown: str, *ranks):
            # A rank selector changed: rewrite the ranking text and keep the draft. (The request
            # comes first: Gradio only injects it into positional parameters.)
            text = ranks_to_text(labels.split(), ranks)
            stale, msg = _save_draft(_user(request), pid, text, bad, note, shown)
            return (gr.update(), gr.update()) if stale else (text, msg)

        def _save_draft(user, pid, text, bad, note, shown) -> tuple[bool, object]:
            """(stale, message update). A draft event that arrives after its prompt was submitted
            is stale: it must not touch the page, which already shows the next prompt."""
            if not pid:
                return False, gr.update()
            try:
                saved = store.save_draft(user, pid, text, ["all_bad"] if bad else [], note or "")
            except UserError as err:
                return False, _explain(err)
            # Clear an earlier error, keep any other message (e.g. "Saved your ranking ...").
            return not saved, ("" if (shown or "").startswith("Error") else gr.update())

        def on_ranking_text(
            pid: str, labels: str, text: str, bad: bool, note: str, shown: str, request: gr.Request
        ):
            ranks, error = text_to_ranks(text, labels.split())
            stale, msg = _save_draft(_user(request), pid, text, bad, note, shown)
            if stale:
                return [gr.update()] * (len(SLOTS) + 1)
            if error:  # keep the selectors as they were while the text is half typed
                return [*[gr.update()] * len(SLOTS), f"Error: {error}"]
            updates = [gr.update(value=r) for r in ranks] + [gr.update()] * (len(SLOTS) - len(ranks))
            return [*updates, msg]

        def on_extras(pid: str, text: str, bad: bool, note: str, shown: str, request: gr.Request):
            return _save_draft(_user(request), pid, text, bad, note, shown)[1]

        def on_submit(pid: str, tok: str, text: str, bad: bool, note: str, request: gr.Request):
            user = _user(request)
            if not pid:
                return on_next(request)
            try:
                res = store.submit(user, pid, text, ["all_bad"] if bad else [], note or "", tok or None)
            except UserError as err:
                return [gr.update()] * (len(item_components) - 3) + [
                    progress_text(user),
                    _explain(err),
                    gr.update(),
                ]
            item = store.next_item(user, project)
            return item_outputs(user, item, f"Saved your ranking of {res.prompt_id}: {res.ranking}.")

        def on_skip(pid: str, tok: str, note: str, request: gr.Request):
            user = _user(request)
            if not pid:
                return on_next(request)
            try:
                store.skip(user, pid, note or "", tok or None)
            except UserError as err:
                return [gr.update()] * (len(item_components) - 3) + [
                    progress_text(user),
                    _explain(err),
                    gr.update(),
                ]
            return item_outputs(user, store.next_item(user, project), f"Skipped {pid}.")

        def on_rendered(show: bool, labels: str):
            present = set(labels.split())
            return [gr.update(visible=bool(show) and lab in present) for lab in SLOTS]

        def refresh_history(request: gr.Request):
            rows = history_rows(_user(request))
            return rows, gr.update(choices=[r[0] for r in rows if r[1] == "submitted"])

        hist_outputs = [history, h_prompt]
        private = {"api_visibility": "private"}
        demo.load(on_load, None, [*item_components, history, h_prompt, admin_tab], js=KEYS_JS, **private)
        next_btn.click(on_next, None, item_components, **private)
        for rank in rank_inputs:
            rank.input(
                on_ranks,
                [prompt_id, labels_box, all_bad, comment, message, *rank_inputs],
                [ranking, message],
                show_progress="hidden",
                trigger_mode="always_last",
                **private,
            )
        ranking.input(
            on_ranking_text,
            [prompt_id, labels_box, ranking, all_bad, comment, message],
            [*rank_inputs, message],
            show_progress="hidden",
            trigger_mode="always_last",
            **private,
        )
        all_bad.input(
            on_extras,
            [prompt_id, ranking, all_bad, comment, message],
            message,
            show_progress="hidden",
            **private,
        )
        comment.input(
            on_extras,
            [prompt_id, ranking, all_bad, comment, message],
            message,
            show_progress="hidden",
            trigger_mode="always_last",
            **private,
        )
        submit_inputs = [prompt_id, token, ranking, all_bad, comment]
        for trigger in (submit.click, ranking.submit):
            trigger(on_submit, submit_inputs, item_components, trigger_mode="once", **private).then(
                refresh_history, None, hist_outputs, **private
            )
        skip.click(on_skip, [prompt_id, token, comment], item_components, trigger_mode="once", **private)
        rendered.change(on_rendered, [rendered, labels_box], md_parts, **private)
        labels_box.change(on_rendered, [rendered, labels_box], md_parts, **private)

        # ---------------------------------------------------------------- history handlers

        def on_open(pid: str, request: gr.Request):
            user = _user(request)
            try:
                row = store.own_ranking(user, pid or "")
            except UserError as err:
                return "", "", False, "", "", _explain(err)
            body = "\n\n".join(
                [f"Prompt {pid}:\n{visible_text(row['prompt'])}"]
                + [f"Response {c['label']}:\n{visible_text(c['text'])}" for c in row["candidates"]]
            )
            return body, row["ranking"], "all_bad" in row["flags"], row["comment"], secrets.token_hex(16), ""

        def on_revise(pid: str, text: str, bad: bool, note: str, tok: str, request: gr.Request):
            user = _user(request)
            try:
                res = store.revise(user, pid or "", text, ["all_bad"] if bad else [], note or "", tok or None)
            except UserError as err:
                rows = history_rows(user)
                return rows, gr.update(), _explain(err)
            rows = history_rows(user)
            return rows, gr.update(), f"Revised {res.prompt_id}: {res.ranking} (revision {res.revision})."

        h_load.click(
            on_open, [h_prompt], [h_item, h_ranking, h_all_bad, h_comment, h_token, h_message], **private
        )
        revise.click(
            on_revise,
            [h_prompt, h_ranking, h_all_bad, h_comment, h_token],
            [history, h_prompt, h_message],
            trigger_mode="once",
            **private,
        )
        h_ranking.submit(
            on_revise,
            [h_prompt, h_ranking, h_all_bad, h_comment, h_token],
            [history, h_prompt, h_message],
            trigger_mode="once",
            **private,
        )

        # ---------------------------------------------------------------- admin handlers (role checked per call)

        def on_admin_refresh(request: gr.Request):
            try:
                store.require_admin(_user(request))
            except UserError as err:
                return None, None, None, _explain(err)
            stats = store.stats()
            report = agreement.agreement_report(store.submitted_rankings(project))
            summary = {k: v for k, v in stats.items() if k not in ("annotators", "prompts")}
            summary.update(report)
            summary = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}
            users = [
                [
                    u["username"],
                    u["role"],
                    u["submitted"] or 0,
                    u["skipped"] or 0,
                    u["drafts"] or 0,
                    None if u["mean_seconds"] is None else round(u["mean_seconds"], 1),
                ]
                for u in stats["annotators"]
            ]
            prompts = [
                [p["prompt_id"], p["project_id"], p["quorum"], p["submitted"], p["skipped"], p["leased"]]
                for p in stats["prompts"]
            ]
            import pandas as pd

            return (
                summary,
                pd.DataFrame(
                    users, columns=["annotator", "role", "submitted", "skipped", "drafts", "mean_seconds"]
                ),
                pd.DataFrame(
                    prompts, columns=["prompt_id", "project", "quorum", "submitted", "skipped", "leased"]
                ),
                "",
            )

        def on_admin_export(fmt: str, request: gr.Request):
            from annotation_app.io import export_rankings

            try:
                store.require_admin(_user(request))
                out = Path(tempfile.mkdtemp(prefix="rlhf_export_")) / f"{fmt}.jsonl"
                res = export_rankings(store, str(out), fmt=fmt, project=project)
            except UserError as err:
                return None, _explain(err)
            return str(out), f"Exported {res['records']} {fmt} records."

        a_refresh.click(on_admin_refresh, None, [a_summary, a_users, a_prompts, a_message], **private)
        a_export.click(on_admin_export, [a_format], [a_file, a_message], **private)

        # ---------------------------------------------------------------- named API for scripts

        def api_next(request: gr.Request) -> dict:
            """The caller's next assigned item: prompt_id, prompt, responses {label: text}, labels,
            lease_expires_at (epoch seconds), draft. ``prompt_id`` is None when nothing is left."""
            t0 = time.perf_counter()
            try:
                item = store.next_item(_user(request), project)
            except UserError as err:
                return {"ok": False, "code": err.code, "message": str(err)}
            if item is None:
                return {"ok": True, "prompt_id": None, "message": "nothing left to rank"}
            return {"ok": True, **item.to_dict(), "server_ms": _ms_since(t0)}

        def api_submit(
            prompt_id: str,
            ranking: str,
            flags: list[str],
            comment: str,
            client_token: str,
            request: gr.Request,
        ) -> dict:
            """Submit a complete ranking (e.g. "C > B = D > A") for a prompt leased to the caller.
            flags: [] or ["all_bad"]. Sending the same client_token again returns the stored result."""
            t0 = time.perf_counter()
            try:
                res = store.submit(
                    _user(request), prompt_id, ranking, flags or [], comment or "", client_token or None
                )
            except UserError as err:
                return {"ok": False, "code": err.code, "message": str(err)}
            # server_ms: time in the handler (validation + the SQLite transaction, waits for the
            # write lock included) — separates the store's cost from transport and client overhead.
            return {**res.to_dict(), "server_ms": _ms_since(t0)}

        def api_skip(prompt_id: str, client_token: str, request: gr.Request) -> dict:
            """Skip a prompt leased to the caller (it is not offered to them again)."""
            try:
                res = store.skip(_user(request), prompt_id, "", client_token or None)
            except UserError as err:
                return {"ok": False, "code": err.code, "message": str(err)}
            return res.to_dict()

        # SQLite runs one writer at a time anyway; a few workers keep the queue moving without
        # dozens of threads fighting over the GIL and the write lock (API_WORKERS, shared).
        api = {"concurrency_limit": API_WORKERS, "concurrency_id": "store-api"}
        gr.api(api_next, api_name="next", **api)
        gr.api(api_submit, api_name="submit", **api)
        gr.api(api_skip, api_name="skip", **api)
    return demo


def _ms_since(t0: float) -> float:
    return round(1000 * (time.perf_counter() - t0), 3)


MAX_BODY_BYTES = 1_000_000


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, before any route runs.

    The store checks every text field's length, but a 100 MB JSON body would still be read and
    parsed by the framework first; this stops it at the door (declared or streamed length).
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ValueError(f"request body over {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited_receive, send)


async def _too_large(send, limit: int) -> None:
    body = f'{{"detail": "request body too large (limit {limit} bytes)"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def make_auth(store: Store, throttle: LoginThrottle | None = None):
    """Gradio's ``auth`` callable: checks the store, off the event loop, with a failure throttle.

    Gradio awaits an async auth function inside its login route; a plain function would run
    the KDF (tens of ms) on the event loop and stall every open connection during a login wave.
    """
    import anyio

    throttle = throttle or LoginThrottle()

    async def auth(username: str, password: str) -> bool:
        if not throttle.allowed(username):
            return False
        ok = await anyio.to_thread.run_sync(store.verify_password, username, password)
        throttle.record(username, ok)
        return ok

    return auth


def launch(
    store: Store,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    project: str | None = None,
    block: bool = True,
    quiet: bool = False,
    max_threads: int = 64,
):
    """Build and launch the app on ``host:port`` with login against ``store``; returns (demo, url)."""
    demo = build_app(store, project=project)
    # SQLite serialises writers anyway; a bounded pool keeps latency predictable under load.
    demo.queue(default_concurrency_limit=16, max_size=2048)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        auth=make_auth(store),
        auth_message="RLHF Lab annotation: log in with the account your lab admin created "
        "(`rlhf annotate users add NAME`).",
        prevent_thread_lock=not block,
        quiet=quiet,
        show_error=False,
        max_file_size="1mb",
        ssr_mode=False,
        mcp_server=False,
        max_threads=max_threads,
        enable_monitoring=False,
        app_kwargs={"middleware": [Middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)]},
    )
    return demo, url


def serve(
    db: str,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    *,
    project: str | None = None,
    block: bool = True,
    quiet: bool = False,
):
    """Open the store at ``db`` and serve the app (in-process entry point; ``rlhf annotate serve``)."""
    store = Store(db)
    if not store.users():
        raise StoreError(
            f"{db} has no users yet: add one with `rlhf annotate users add NAME --role admin --db {db}`",
            code="no_users",
        )
    return launch(store, host=host, port=port, project=project, block=block, quiet=quiet)


def serve_candidates(
    candidates: str, db: str, port: int = 7860, host: str = "127.0.0.1", *, block: bool = True
):
    """Import a candidates file into ``db`` and serve it (``rlhf quickstart --annotate``).

    When the database has no users yet, an ``admin`` account is created with a random password,
    printed once on the terminal.
    """
    from annotation_app.io import import_candidates

    store = Store(db)
    res = import_candidates(store, candidates)
    print(f"annotation: {res['added']} new prompts imported into {db} ({res['unchanged']} already there)")
    if not store.users():
        password = secrets.token_urlsafe(12)
        store.add_user("admin", password, "admin")
        print(
            f"annotation: created user 'admin' with password {password} (add annotators with "
            f"`rlhf annotate users add NAME --db {db}`)"
        )
    return launch(store, host=host, port=port, block=block)
