"""Simulated annotators that annotate through the app's named API (``/next``, ``/submit``) with
``gradio_client``, exactly like a scripted human would: same login, leases and validation.

Each annotator ranks the responses by a gold scorer (``rlhf.scorers.get_scorer`` spec or any
callable ``(prompts, responses) -> scores``), tying responses whose scores are within
``tie_threshold``. For load tests some annotators double-submit (same client token, as a double
click or a retry would) and some abandon a lease (take an item and walk away).
"""

from __future__ import annotations

import functools
import json
import random
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from annotation_app.control import ranking_from_scores

Scorer = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@dataclass
class AnnotatorLog:
    user: str
    acked: list[tuple[str, str]] = field(default_factory=list)  # (prompt_id, ranking) acknowledged
    submit_latency_s: list[float] = field(default_factory=list)
    submit_server_ms: list[float] = field(default_factory=list)  # the handler's own time
    next_latency_s: list[float] = field(default_factory=list)
    duplicates_acked: int = 0
    abandoned: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # error code -> count (stale leases etc.)
    errors: list[str] = field(default_factory=list)  # replies that break a guarantee
    transport_errors: list[str] = field(default_factory=list)  # lost replies (server down), retried


class HttpApiClient:
    """The same named endpoints over Gradio's plain HTTP API (``POST /gradio_api/call/<name>``, then
    the event's result stream), with ``gradio_client``'s ``predict(*data, api_name=...)`` shape.

    Same login, queue, leases and validation on the server; it only skips gradio_client's
    client-side polling (a 50 ms sleep loop), so latencies show what the server does.
    """

    def __init__(self, url: str, user: str, password: str, timeout: float = 60.0):
        import httpx  # lazy, like certifi and gradio_client below: they come with the optional app extra

        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        r = self.http.post("/login", data={"username": user, "password": password})
        if r.status_code != 200:
            raise PermissionError(f"login as {user!r} refused ({r.status_code})")

    def predict(self, *data, api_name: str):
        name = api_name.strip("/")
        r = self.http.post(f"/gradio_api/call/{name}", json={"data": list(data)})
        r.raise_for_status()
        event_id = r.json()["event_id"]
        event = None
        with self.http.stream("GET", f"/gradio_api/call/{name}/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "complete":
                    return json.loads(line[5:])[0]
                elif line.startswith("data:") and event == "error":
                    raise RuntimeError(f"{api_name} failed: {line[5:].strip()}")
        raise RuntimeError(f"{api_name}: the result stream ended without a result")


@functools.cache
def shared_tls_context():
    """One verifying TLS context for every client of this process.

    ``gradio_client`` opens a fresh ``httpx`` client for each call's POST and for each result
    stream, and ``httpx`` builds a new TLS context from certifi's bundle every time (~30 ms of CPU
    here, even for a plain ``http://`` URL): about 60 ms per call before the server sees it.
    httpx accepts a ready ``ssl.SSLContext`` where it takes ``verify``, so passing this one keeps
    certificate verification on for ``https://`` servers and skips the rebuild.
    """
    import certifi  # lazy: the optional app extra

    return ssl.create_default_context(cafile=certifi.where())


def connect(
    url: str,
    user: str,
    password: str,
    retries: int = 1,
    wait_s: float = 1.0,
    transport: str = "gradio_client",
):
    """A logged-in client: ``gradio_client.Client`` (default) or :class:`HttpApiClient` (``"http"``)."""
    from gradio_client import Client  # lazy: the optional app extra, and slow to import

    for attempt in range(retries):
        try:
            if transport == "http":
                return HttpApiClient(url, user, password)
            return Client(
                url,
                auth=(user, password),
                verbose=False,
                analytics_enabled=False,
                download_files=False,
                ssl_verify=shared_tls_context(),  # type: ignore[arg-type] - httpx takes a context
            )
        except Exception:  # noqa: BLE001 - server starting up; retried, then raised
            if attempt == retries - 1:
                raise
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def annotate(
    url: str,
    user: str,
    password: str,
    scorer: Scorer,
    *,
    stop_at: float,
    tie_threshold: float = 0.05,
    double_submit: float = 0.0,
    abandon: float = 0.0,
    abandon_wait_s: float = 0.0,
    seed: int = 0,
    log: AnnotatorLog | None = None,
    client=None,
    transport: str = "gradio_client",
    retry_until: float | None = None,
    stop: threading.Event | None = None,
    think_s: float = 0.0,
) -> AnnotatorLog:
    """One annotator: next → score → submit, as fast as possible until ``time.time() >= stop_at``
    (or ``stop`` is set; the item in hand is finished first). ``think_s`` > 0 pauses a random
    0.5–1.5 × think_s before each submit, like a person reading (0: a closed loop at full speed).

    A submit whose reply is lost (connection refused or reset: a crashed server) is sent again
    with the same client token after logging in again, until ``retry_until`` (default
    ``stop_at + 60``); the store answers a repeat with the stored result, so a submit that had
    reached the disk is acknowledged then, not stored twice.
    """
    rng = random.Random(seed)
    log = log or AnnotatorLog(user)
    retry_until = stop_at + 60 if retry_until is None else retry_until

    stopped_at: list[float] = []

    def reconnect():
        while time.time() < retry_until:
            if stop is not None and stop.is_set():  # stopping: give a dead server 60 s more, not forever
                stopped_at.append(stopped_at[0] if stopped_at else time.time())
                if time.time() > stopped_at[0] + 60:
                    return None
            try:
                return connect(url, user, password, transport=transport)
            except Exception:  # noqa: BLE001 - the server is down; try again shortly
                time.sleep(0.5)
        return None

    client = client or reconnect()
    while client is not None and time.time() < stop_at and not (stop is not None and stop.is_set()):
        try:
            t0 = time.perf_counter()
            item = client.predict(api_name="/next")
            log.next_latency_s.append(time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - transport error: log in again
            log.transport_errors.append(f"next: {type(err).__name__}: {str(err)[:200]}")
            client = reconnect()
            continue
        if not item.get("ok"):
            log.refused[item.get("code", "?")] = log.refused.get(item.get("code", "?"), 0) + 1
            continue
        if item["prompt_id"] is None:  # nothing left for this annotator
            return log
        if rng.random() < abandon:  # take the item and walk away; the lease must expire
            log.abandoned += 1
            time.sleep(abandon_wait_s)
            continue
        labels = item["labels"]
        responses = [item["responses"][lab] for lab in labels]
        text = ranking_from_scores(
            labels, list(scorer([item["prompt"]] * len(labels), responses)), tie_threshold
        )
        if think_s > 0:
            time.sleep(think_s * rng.uniform(0.5, 1.5))
        token = uuid.uuid4().hex
        sends_wanted = 2 if rng.random() < double_submit else 1
        sends = 0
        acked = False
        while sends < sends_wanted and client is not None and time.time() < retry_until:
            try:
                t0 = time.perf_counter()
                res = client.predict(item["prompt_id"], text, [], "", token, api_name="/submit")
                log.submit_latency_s.append(time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001 - reply lost: same token again after re-login
                log.transport_errors.append(f"submit: {type(err).__name__}: {str(err)[:200]}")
                client = reconnect()
                continue
            sends += 1
            if "server_ms" in res:
                log.submit_server_ms.append(float(res["server_ms"]))
            if not res.get("ok"):
                code = res.get("code", "?")
                log.refused[code] = log.refused.get(code, 0) + 1
                break
            if not acked:
                log.acked.append((res["prompt_id"], res["ranking"]))
                acked = True
            elif res.get("duplicate"):
                log.duplicates_acked += 1
            else:
                log.errors.append(f"a repeated submit with the same token was stored again: {res}")
    return log


def run_annotators(
    url: str,
    users: Sequence[tuple[str, str]],
    scorer: Scorer,
    *,
    duration_s: float,
    connect_first: bool = True,
    transport: str = "gradio_client",
    **kwargs,
) -> list[AnnotatorLog]:
    """Run one thread per (user, password) for ``duration_s`` seconds; returns their logs.

    With ``connect_first`` every client logs in before the clock starts, so the timed window
    measures annotation, not 50 simultaneous logins.
    """
    logs = [AnnotatorLog(u) for u, _ in users]
    clients: list = [None] * len(users)
    if connect_first:

        def _connect(i: int) -> None:
            try:
                clients[i] = connect(url, users[i][0], users[i][1], retries=5, transport=transport)
            except Exception as err:  # noqa: BLE001
                logs[i].errors.append(f"connect: {err}")

        threads = [threading.Thread(target=_connect, args=(i,)) for i in range(len(users))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    stop_at = time.time() + duration_s
    threads = [
        threading.Thread(
            target=annotate,
            args=(url, u, p, scorer),
            kwargs={
                "stop_at": stop_at,
                "seed": i,
                "log": logs[i],
                "client": clients[i],
                "transport": transport,
                **kwargs,
            },
        )
        for i, (u, p) in enumerate(users)
        if clients[i] is not None or not connect_first
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return logs
