"""How long the store takes to choose an annotator's next item, with and without the gold index.

Every call of :meth:`annotation_app.store.Store.next_item` also looks for a gold item (the prompt
with a known answer next in serve order), whether or not the project has any. Schema v8 added a
partial index over the gold items (``prompts_gold``, annotation_app/schema.py). This builds one
SQLite store of ``--prompts`` prompts (every ``--gold_every``-th a gold item, the project's
gold rate ``--gold_rate``), copies it, drops the index from the copy (the baseline: the store as
it was before v8), and on both runs the same work: ``--users`` annotators each fetch an item and
submit it, then fetch their next. Prints the time per call of each and the ratio::

    .venv/bin/python -m experiments.benchmarks.bench_store_choice --prompts 20000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from annotation_app.store import Store


def build(path: Path, prompts: int, gold_every: int, gold_rate: float, users: int) -> None:
    store = Store(path)
    store.upsert_project("default", quorum=3, gold_rate=gold_rate, lease_seconds=600)
    store.add_items(
        [
            {
                "prompt_id": f"p{i}",
                "prompt": f"prompt {i}",
                "candidates": [{"label": label, "text": f"answer {label} to {i}"} for label in "ABCD"],
                **({"gold": "A > B"} if gold_every and i % gold_every == 0 else {}),
            }
            for i in range(prompts)
        ]
    )
    for u in range(users):
        store.add_user(f"u{u}", f"password-u{u}")
    store.close()


def per_call_ms(path: Path, users: int, rounds: int) -> list[float]:
    """Milliseconds per ``next_item`` call, once per round: each user fetches an item, submits it
    (not timed) and fetches the next."""
    store = Store(path)
    times = []
    for r in range(rounds):
        calls, spent = 0, 0.0
        for u in range(users):
            user = f"u{u}"
            t0 = time.perf_counter()
            item = store.next_item(user)
            spent += time.perf_counter() - t0
            calls += 1
            if item is not None:
                store.submit(user, item.prompt_id, "A > B > C > D", client_token=f"{user}-{r}")
                t0 = time.perf_counter()
                store.next_item(user)
                spent += time.perf_counter() - t0
                calls += 1
        times.append(1000 * spent / calls)
    store.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20000, help="prompts in the store")
    ap.add_argument("--gold_every", type=int, default=100, help="every N-th prompt is a gold item (0 = none)")
    ap.add_argument("--gold_rate", type=float, default=0.1, help="the project's gold rate")
    ap.add_argument("--users", type=int, default=20, help="annotators; each fetches and submits once a round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the same work on each store")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_store_choice_"))
    indexed, baseline = work / "indexed.db", work / "baseline.db"
    build(indexed, args.prompts, args.gold_every, args.gold_rate, args.users)
    shutil.copy(indexed, baseline)
    store = Store(baseline)
    with store.write() as conn:
        conn.execute("DROP INDEX prompts_gold")
    store.close()

    ours = per_call_ms(indexed, args.users, args.rounds)
    before = per_call_ms(baseline, args.users, args.rounds)
    ms_ours, ms_before = statistics.median(ours), statistics.median(before)
    gold = f"every {args.gold_every}th a gold item" if args.gold_every else "no gold items"
    print(
        f"{args.prompts} prompts ({gold}), gold rate {args.gold_rate}, {args.users} annotators, {args.rounds} rounds"
    )
    print(f"  next_item with the gold index (v8):    {ms_ours:.2f} ms per call (median of rounds)")
    print(f"  next_item without it (the store at v7): {ms_before:.2f} ms per call")
    print(f"  ratio: {ms_before / ms_ours:.1f}x faster")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
