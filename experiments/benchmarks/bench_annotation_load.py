"""Load benchmark of the annotation app: N simulated annotators over gradio_client on loopback.

The server runs as its own process (``rlhf annotate serve``; ``--servers 2`` runs two on one
database, each annotator talking to one of them in turn), the annotators as threads of this
one, each logging in with its own account and then, for a fixed time, fetching an item
(``/next``), ranking it with the VADER gold scorer and submitting (``/submit``) as fast as it
can. Some double-submit with the same client token; some abandon a lease and come back after it
expired. At the end the database is checked against what the clients were told:

* every acknowledged submit is stored exactly once, with the acknowledged ranking;
* nothing is stored that was not acknowledged, no prompt has more rankings than its quorum,
  nobody ranked a prompt twice; the store's ``integrity_check`` is ok.

The database is a new SQLite file in the work folder, or ``--db postgresql://...``: an existing,
empty PostgreSQL database (the bench creates the tables, and copies it for the baseline when the
role may create databases).

Prints p50/p95/p99 submit latency end to end, the server handler's own time, throughput, and the
same work on the bare store as a baseline. A closed loop at full speed measures queueing (latency
≈ annotators / throughput, Little's law) and the handler's time under contention (goal: p95 <
60 ms at 50 annotators); ``--think S`` makes each annotator read for ~S seconds first, which
measures latency at a human pace (goal: p95 < 150 ms end to end at 200 annotators). Loopback only::

    .venv/bin/python -m experiments.benchmarks.bench_annotation_load --annotators 50 --duration 20
    .venv/bin/python -m experiments.benchmarks.bench_annotation_load --annotators 200 --duration 40 --think 5   # leases: 6 × think
    .venv/bin/python -m experiments.benchmarks.bench_annotation_load --db postgresql://lab@localhost/bench --servers 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from annotation_app.database import is_postgres_url, without_password
from annotation_app.io import import_candidates
from annotation_app.simulated_client import run_annotators
from annotation_app.store import Store, StoreError
from rlhf.data import write_jsonl
from rlhf.scorers import get_scorer

REPO = Path(__file__).resolve().parents[2]
POSITIVE = "wonderful great kind helpful lovely excellent happy brilliant good nice".split()
NEGATIVE = "terrible awful rude useless sad horrible bad poor nasty boring".split()
NEUTRAL = "the answer is about a thing that some people may find in the text today".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_candidates(n_prompts: int, k: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n_prompts):
        cands = []
        for j in range(k):
            words = (
                rng.sample(NEUTRAL, 6)
                + rng.sample(POSITIVE, rng.randint(0, 3))
                + rng.sample(NEGATIVE, rng.randint(0, 3))
            )
            rng.shuffle(words)
            cands.append(
                {"label": "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[j], "text": " ".join(words), "model": "synthetic"}
            )
        recs.append({"prompt_id": f"load-{i:05d}", "prompt": f"Describe item {i}.", "candidates": cands})
    return recs


def bench_db(db: str | None, work: Path, name: str) -> str:
    """The database of a run: ``db`` (a PostgreSQL URL) or a new SQLite file ``work/name``."""
    if db is None:
        path = work / name
        if path.exists():
            raise SystemExit(f"{path} exists; use a fresh --workdir")
        return str(path)
    if not is_postgres_url(db):
        raise SystemExit(
            f"--db must be a postgresql:// URL (without it: a SQLite file in --workdir), got {db!r}"
        )
    return db


def prepare_db(
    db: str | Path, *, n_prompts: int, k: int, n_users: int, quorum: int, lease_seconds: int, work: Path
) -> list[tuple[str, str]]:
    src = work / "candidates.jsonl"
    write_jsonl(src, make_candidates(n_prompts, k))
    store = Store(db)
    if store.counts()["prompts"]:
        raise SystemExit(f"{store.db.name} already holds prompts; give an empty database")
    import_candidates(store, str(src), quorum=quorum, lease_seconds=lease_seconds)
    users = [(f"sim{i:03d}", f"password-{i:03d}") for i in range(n_users)]
    for u, p in users:
        store.add_user(u, p)
    store.close()
    return users


def launch_server(db: str | Path, port: int, log_path: Path) -> subprocess.Popen:
    """``rlhf annotate serve`` on ``port`` as its own process (see :func:`wait_until_up`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "rlhf"), "annotate", "serve", "--db", str(db), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def wait_until_up(
    proc: subprocess.Popen, port: int, log_path: Path, timeout_s: float = 120
) -> subprocess.Popen:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout_s:.0f} s; see {log_path}")


def start_server(db: str | Path, port: int, log_path: Path) -> subprocess.Popen:
    return wait_until_up(launch_server(db, port, log_path), port, log_path)


def start_servers(db: str | Path, ports: list[int], work: Path) -> list[subprocess.Popen]:
    """One server per port on the same database, started together (each takes seconds to import
    Gradio); their logs are ``work/server-<i>.log``."""
    procs = [launch_server(db, port, server_log(work, i)) for i, port in enumerate(ports)]
    return [wait_until_up(p, port, server_log(work, i)) for i, (p, port) in enumerate(zip(procs, ports))]


def server_log(work: Path, i: int) -> Path:
    return work / f"server-{i}.log"


def server_of(i: int, n_servers: int) -> int:
    """The server annotator ``i`` talks to: round robin, so every server gets the same load."""
    return i % n_servers


def copy_database(db: str, work: Path) -> tuple[str, Callable[[], None]] | None:
    """A copy of the prepared database for the baseline, and the function that removes it; None
    when it cannot be copied (a PostgreSQL role without the right to create databases)."""
    if not is_postgres_url(db):
        copy = work / "baseline.db"
        shutil.copy(db, copy)
        return str(copy), lambda: None
    import psycopg  # the PostgreSQL driver (the app extra), only for a PostgreSQL run

    name = f"bench_baseline_{uuid.uuid4().hex[:8]}"
    source = urlsplit(db).path.lstrip("/")
    # CREATE DATABASE ... TEMPLATE copies the whole database, as shutil.copy does a SQLite file
    # (https://www.postgresql.org/docs/current/manage-ag-templatedbs.html); it runs from the
    # maintenance database, since the template must have no other connection.
    maintenance = urlsplit(db)._replace(path="/postgres").geturl()
    try:
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
    except psycopg.Error as err:
        print(f"no baseline: cannot copy the database ({str(err).splitlines()[0]})", flush=True)
        return None

    def drop() -> None:
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

    return urlsplit(db)._replace(path=f"/{name}").geturl(), drop


def store_baseline(db: str, users, duration_s: float, work: Path) -> dict:
    """The same work straight on the store (one thread per annotator, no HTTP) on a copy of the
    prepared database: the baseline the app's end-to-end latency is compared with."""
    copied = copy_database(db, work)
    if copied is None:
        return {"store_submits_per_s": None, "store_submit_p50_ms": None, "store_submit_p95_ms": None}
    copy, drop = copied
    store = Store(copy)
    lat: list[float] = []
    lock = threading.Lock()
    stop_at = time.time() + duration_s

    def work(user: str) -> None:
        while time.time() < stop_at:
            item = store.next_item(user)
            if item is None:
                return
            t0 = time.perf_counter()
            try:
                store.submit(
                    user, item.prompt_id, " > ".join(item.labels), client_token=f"{user}-{item.prompt_id}"
                )
            except StoreError:  # a lease copied from the load run that has run out: take the next item
                continue
            with lock:
                lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=work, args=(u,)) for u, _ in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    drop()
    return {
        "store_submits_per_s": len(lat) / duration_s,
        "store_submit_p50_ms": 1000 * percentile(lat, 0.5),
        "store_submit_p95_ms": 1000 * percentile(lat, 0.95),
    }


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def check_exactly_once(db: str | Path, logs, quorum: int) -> dict:
    """Compare what the clients were acknowledged with what the database holds."""
    store = Store(db)
    rows = store.conn.execute(
        "SELECT username, prompt_id, ranking FROM rankings WHERE status = 'submitted'"
    ).fetchall()
    stored = {(u, p): r for u, p, r in rows}
    acked = [(log.user, pid, ranking) for log in logs for pid, ranking in log.acked]
    acked_keys = [(u, p) for u, p, _ in acked]
    missing = [a for a in acked if stored.get((a[0], a[1])) != a[2]]
    over_quorum = store.conn.execute(
        "SELECT COUNT(*) FROM (SELECT prompt_id FROM rankings WHERE status = 'submitted' "
        "GROUP BY prompt_id HAVING COUNT(*) > ?) AS over",
        (quorum,),
    ).fetchone()[0]
    integrity = store.integrity_check()
    store.close()
    return {
        "acknowledged": len(acked),
        "stored": len(rows),
        "acked_missing_or_different": len(missing),
        "acked_twice": len(acked_keys) - len(set(acked_keys)),
        "stored_not_acked": len(set(stored) - set(acked_keys)),
        "prompts_over_quorum": over_quorum,
        "integrity_check": integrity,
    }


def run_spread(urls: list[str], users, scorer, **kwargs) -> list:
    """``run_annotators`` with annotator ``i`` on server ``server_of(i)``: one group per server,
    all at once; the logs come back in the order of ``users``."""
    groups = [[i for i in range(len(users)) if server_of(i, len(urls)) == s] for s in range(len(urls))]
    results: list = [None] * len(urls)

    def run(s: int) -> None:
        results[s] = run_annotators(urls[s], [users[i] for i in groups[s]], scorer, **kwargs)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logs: list = [None] * len(users)
    for s, group in enumerate(groups):
        for i, log in zip(group, results[s]):
            logs[i] = log
    return logs


def acked_per_server(logs, n_servers: int) -> list[int]:
    return [
        sum(len(log.acked) for i, log in enumerate(logs) if server_of(i, n_servers) == s)
        for s in range(n_servers)
    ]


def summarize(logs, duration_s: float) -> dict:
    submit = [x for log in logs for x in log.submit_latency_s]
    nxt = [x for log in logs for x in log.next_latency_s]
    server = [x for log in logs for x in log.submit_server_ms]
    refused: dict[str, int] = {}
    for log in logs:
        for code, n in log.refused.items():
            refused[code] = refused.get(code, 0) + n
    errors = [e for log in logs for e in log.errors]
    transport = [e for log in logs for e in log.transport_errors]
    return {
        "submit_calls": len(submit),
        "submit_p50_ms": 1000 * percentile(submit, 0.50),
        "submit_p95_ms": 1000 * percentile(submit, 0.95),
        "submit_p99_ms": 1000 * percentile(submit, 0.99),
        "submit_mean_ms": 1000 * statistics.fmean(submit) if submit else float("nan"),
        "submit_server_p50_ms": percentile(server, 0.50),
        "submit_server_p95_ms": percentile(server, 0.95),
        "next_calls": len(nxt),
        "next_p50_ms": 1000 * percentile(nxt, 0.50),
        "next_p95_ms": 1000 * percentile(nxt, 0.95),
        "acked_per_s": sum(len(log.acked) for log in logs) / duration_s,
        "duplicate_acks": sum(log.duplicates_acked for log in logs),
        "abandoned_leases": sum(log.abandoned for log in logs),
        "refused": refused,
        "errors": len(errors),
        "transport_errors": len(transport),
        "first_errors": (errors + transport)[:5],
    }


def report(result: dict, json_path: str | None) -> bool:
    """Print (and optionally save) a benchmark result; True when the exactly-once check passed:
    nothing acknowledged missing, changed or stored twice, nothing stored unacknowledged, no
    prompt over quorum, integrity ok."""
    print(json.dumps(result, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    eo = result["exactly_once"]
    return (
        eo["acked_missing_or_different"] == 0
        and eo["acked_twice"] == 0
        and eo["stored_not_acked"] == 0
        and eo["prompts_over_quorum"] == 0
        and eo["integrity_check"] == "ok"
        and result["errors"] == 0
    )


def add_pool_arguments(ap: argparse.ArgumentParser, *, servers_help: str) -> None:
    """The options both annotation benchmarks (load, crash) share: the prompts, the store, the servers."""
    ap.add_argument("--prompts", type=int, default=2000, help="prompts imported")
    ap.add_argument("--k", type=int, default=4, help="responses per prompt")
    ap.add_argument("--quorum", type=int, default=3, help="rankings needed per prompt")
    ap.add_argument(
        "--double-submit", type=float, default=0.2, help="share of items submitted twice (same token)"
    )
    ap.add_argument(
        "--transport",
        choices=("gradio_client", "http"),
        default="gradio_client",
        help="gradio_client (default) or Gradio's plain HTTP API (same server path, no client polling)",
    )
    ap.add_argument(
        "--db",
        default=None,
        help="an empty PostgreSQL database, postgresql://user@host:port/dbname (default: a new SQLite "
        "file in --workdir)",
    )
    ap.add_argument("--servers", type=int, default=1, help=servers_help)
    ap.add_argument("--workdir", default=None, help="where the database and logs go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")


def prepare_pool(args: argparse.Namespace, name: str) -> tuple[Path, str, list]:
    """``(work folder, database, accounts)``: the folder made, the database filled with prompts
    and one account per annotator, from the options of :func:`add_pool_arguments`."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix=f"bench_annotation_{name}_"))
    work.mkdir(parents=True, exist_ok=True)
    db = bench_db(args.db, work, f"{name}.db")
    users = prepare_db(
        db,
        n_prompts=args.prompts,
        k=args.k,
        n_users=args.annotators,
        quorum=args.quorum,
        lease_seconds=args.lease_seconds,
        work=work,
    )
    return work, db, users


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--annotators", type=int, default=50, help="simulated annotators (threads), each its own account"
    )
    ap.add_argument(
        "--duration", type=float, default=20.0, help="seconds of annotation after everyone logged in"
    )
    ap.add_argument(
        "--lease-seconds",
        type=int,
        default=None,
        help="lease length (default 4 s, short so abandoned leases expire within the run; with "
        "--think, 6 × the think time, so reading annotators do not lose their leases)",
    )
    ap.add_argument(
        "--abandon", type=float, default=0.03, help="share of items abandoned (lease left to expire)"
    )
    ap.add_argument(
        "--think",
        type=float,
        default=0.0,
        help="mean seconds an annotator reads before submitting (0: submit as fast as possible)",
    )
    add_pool_arguments(ap, servers_help="app processes on the one database, annotators spread over them")
    args = ap.parse_args(argv)
    if args.lease_seconds is None:
        args.lease_seconds = max(4, int(6 * args.think))
    work, db, users = prepare_pool(args, "load")
    baseline = store_baseline(db, users, min(args.duration, 5.0), work)
    ports = [free_port() for _ in range(args.servers)]
    servers = start_servers(db, ports, work)
    import psutil  # the optional `bench` extra: only this benchmark measures CPU time

    servers_ps = [psutil.Process(server.pid) for server in servers]
    try:
        cpu0_server = sum(sum(ps.cpu_times()[:2]) for ps in servers_ps)
        cpu0_clients = sum(os.times()[:2])
        t0 = time.time()
        logs = run_spread(
            [f"http://127.0.0.1:{port}/" for port in ports],
            users,
            get_scorer("vader"),
            duration_s=args.duration,
            double_submit=args.double_submit,
            abandon=args.abandon,
            abandon_wait_s=args.lease_seconds + 0.5,
            transport=args.transport,
            think_s=args.think,
        )
        wall = time.time() - t0
        cpu_server = sum(sum(ps.cpu_times()[:2]) for ps in servers_ps) - cpu0_server
        cpu_clients = sum(os.times()[:2]) - cpu0_clients
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "config": {**vars(args), "db": without_password(str(db))},
        "wall_s": wall,
        "load_average_1min": os.getloadavg()[0],  # the machine is shared: read latencies with this
        **summarize(logs, args.duration),
        "acked_per_server": acked_per_server(logs, args.servers),
        # where the 2 cores went: the server processes and this one (the annotators' gradio_clients)
        "cpu_s_server": cpu_server,
        "cpu_s_clients": cpu_clients,
        "baseline": baseline,
        "exactly_once": check_exactly_once(db, logs, args.quorum),
    }
    ok = report(result, args.json) and result["transport_errors"] == 0
    calls = result["submit_calls"] + result["next_calls"]
    bare = baseline["store_submit_p95_ms"]
    print(
        "PASS" if ok else "FAIL",
        f"exactly-once on {'PostgreSQL' if is_postgres_url(db) else 'SQLite'} with {args.servers} server(s); "
        f"p95 submit {result['submit_p95_ms']:.0f} ms end to end (goal at a human pace: < 150 ms), "
        f"{result['submit_server_p95_ms']:.1f} ms in the server's handler (goal < 60 ms), "
        + (f"{bare:.1f} ms on the bare store; " if bare is not None else "")
        + f"load average {os.getloadavg()[0]:.1f}; CPU per API call: server "
        f"{1000 * cpu_server / max(1, calls):.1f} ms, clients {1000 * cpu_clients / max(1, calls):.1f} ms",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
