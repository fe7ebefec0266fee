"""Crash benchmark: kill -9 an annotation server in the middle of the load, restart it, check.

Simulated annotators (as in ``bench_annotation_load``) submit as fast as they can; after
``--kill-after-acks`` more acknowledged submits the server process gets SIGKILL (no shutdown,
no flush) and is started again on the same port ``--down`` seconds later. Annotators whose reply
was lost log in again and resend the same submit with the same client token (the store answers a
repeat with the stored result). This repeats ``--kills`` times. With ``--servers 2`` two app
processes serve one database (``--db postgresql://...``, or the SQLite file), the annotators
spread over them, and the first one is killed while the other keeps writing. Then:

* every submit a client was told is stored is in the database, with that ranking, once;
* the store's ``integrity_check`` is ok; no prompt is over its quorum; nobody ranked a prompt twice.

    .venv/bin/python -m experiments.benchmarks.bench_annotation_crash --annotators 20 --kills 2
    .venv/bin/python -m experiments.benchmarks.bench_annotation_crash --db postgresql://lab@localhost/crash --servers 2
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from annotation_app.database import without_password
from annotation_app.simulated_client import AnnotatorLog, annotate
from experiments.benchmarks.bench_annotation_load import (
    acked_per_server,
    add_pool_arguments,
    check_exactly_once,
    free_port,
    prepare_pool,
    report,
    server_log,
    server_of,
    start_server,
    start_servers,
    summarize,
)
from rlhf.scorers import get_scorer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotators", type=int, default=20, help="simulated annotators (threads)")
    ap.add_argument("--kills", type=int, default=2, help="how many times the server is killed with SIGKILL")
    ap.add_argument(
        "--kill-after-acks",
        type=int,
        default=30,
        help="acknowledged submits (since the last restart) before each kill",
    )
    ap.add_argument(
        "--kill-after", type=float, default=180.0, help="kill after this many seconds at the latest"
    )
    ap.add_argument(
        "--down", type=float, default=1.0, help="seconds the server stays dead before the restart"
    )
    ap.add_argument("--tail", type=float, default=6.0, help="seconds of load after the last restart")
    ap.add_argument("--lease-seconds", type=int, default=120, help="lease length (longer than a restart)")
    add_pool_arguments(
        ap,
        servers_help="app processes on the one database, annotators spread over them; the first is the one killed",
    )
    args = ap.parse_args(argv)
    work, db, users = prepare_pool(args, "crash")
    ports = [free_port() for _ in range(args.servers)]
    servers = start_servers(db, ports, work)
    scorer = get_scorer("vader")
    stop = threading.Event()
    far = time.time() + 3600
    logs = [AnnotatorLog(u) for u, _ in users]
    threads = [
        threading.Thread(
            target=annotate,
            args=(f"http://127.0.0.1:{ports[server_of(i, args.servers)]}/", u, p, scorer),
            kwargs={
                "stop_at": far,
                "stop": stop,
                "seed": i,
                "log": logs[i],
                "transport": args.transport,
                "double_submit": args.double_submit,
                "retry_until": far,
            },
        )
        for i, (u, p) in enumerate(users)
    ]
    t0 = time.time()
    for t in threads:
        t.start()
    kills = []
    try:
        for _ in range(args.kills):
            # Kill in the middle of the load: once this many more submits were acknowledged (so the
            # crash hits a server that is busy writing), or after --kill-after s at the latest.
            start = sum(len(log.acked) for log in logs)
            deadline = time.time() + args.kill_after
            while (
                time.time() < deadline and sum(len(log.acked) for log in logs) - start < args.kill_after_acks
            ):
                time.sleep(0.05)
            acked_before = sum(len(log.acked) for log in logs)
            os.kill(servers[0].pid, signal.SIGKILL)  # no shutdown handlers, no flush: a crash
            servers[0].wait()
            time.sleep(args.down)
            t_restart = time.time()
            servers[0] = start_server(db, ports[0], server_log(work, 0))
            kills.append(
                {
                    "acked_before_kill": acked_before,
                    "restart_s": round(time.time() - t_restart, 2),
                    # by the other servers, while the first was dead or starting again
                    "acked_while_down": sum(len(log.acked) for log in logs) - acked_before,
                }
            )
            print(f"killed server 0 with SIGKILL and restarted it: {kills[-1]}", flush=True)
        time.sleep(args.tail)
    finally:
        stop.set()  # annotators finish the item in hand (resending lost submits), then stop
        for t in threads:
            t.join()
    wall = time.time() - t0
    for server in servers:
        server.terminate()
        server.wait(timeout=30)
    result = {
        "config": {**vars(args), "db": without_password(str(db))},
        "wall_s": wall,
        "load_average_1min": os.getloadavg()[0],  # the machine is shared: read latencies with this
        "kills": kills,
        **summarize(logs, wall),
        "acked_per_server": acked_per_server(logs, args.servers),
        "exactly_once": check_exactly_once(db, logs, args.quorum),
    }
    ok = report(result, args.json)
    eo = result["exactly_once"]
    print(
        "PASS" if ok else "FAIL",
        f"{args.kills} kill -9 of 1 of {args.servers} server(s), {eo['acknowledged']} acknowledged submits "
        f"(per server {result['acked_per_server']}), {eo['acked_missing_or_different']} missing, "
        f"{eo['stored_not_acked']} stored unacknowledged, {eo['prompts_over_quorum']} over quorum, "
        f"integrity {eo['integrity_check']}",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
