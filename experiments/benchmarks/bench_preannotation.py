"""Could a model pre-rank? Its proposed rankings against the annotators', as the dashboard reports it.

The prompts of a rankings file are imported into a new annotation store, each ``--reward``
(a reward-model dir or a scorer) proposes a ranking of every prompt through
``rlhf annotate propose``, and the proposals are compared with the file's rankings exactly as the
admin dashboard does: Cohen's κ on the win/tie/loss call of every response pair, and Kendall τ-b,
with 95 % bootstrap intervals over prompts. Use rankings the proposer was not trained on, e.g. the
held-out rankings a reward-model run writes::

    .venv/bin/python -m experiments.benchmarks.bench_preannotation \\
        --rankings runs/quickstart/rm_train/eval_rankings.jsonl \\
        --reward runs/quickstart/rm_train/model --reward vader --tie_threshold 0.05
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from annotation_app.dashboard import proposal_headline
from annotation_app.io import import_candidates
from annotation_app.store import Store
from rlhf.cli import main as rlhf_main
from rlhf.contracts import load_rankings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rankings", required=True, help="rankings file (the rankings contract) to compare with")
    ap.add_argument("--reward", action="append", required=True, help="a proposer; repeat to compare several")
    ap.add_argument("--tie_threshold", type=float, default=0.0, help="as rlhf annotate propose's")
    args = ap.parse_args(argv)
    rankings = load_rankings(args.rankings)
    db = str(Path(tempfile.mkdtemp(prefix="bench_preannotation_")) / "lab.db")
    items = list(
        {r["prompt_id"]: {k: r[k] for k in ("prompt_id", "prompt", "candidates")} for r in rankings}.values()
    )
    import_candidates(Store(db), items)
    print(
        f"{len(rankings)} rankings of {len(items)} prompts by {len({r['annotator'] for r in rankings})} annotators"
    )
    for reward in args.reward:
        cmd = [
            "annotate",
            "propose",
            "--db",
            db,
            "--reward",
            reward,
            "--tie_threshold",
            str(args.tie_threshold),
        ]
        if rlhf_main(cmd) != 0:
            return 2
        for figure, value, interval in proposal_headline(Store(db).proposals(), rankings):
            print(f"  {figure}: {value} {interval}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
