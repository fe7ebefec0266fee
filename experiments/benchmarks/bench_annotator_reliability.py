"""Benchmark: does weighting each ranking by its annotator's reliability help when the pool has bad
annotators, and does it cost anything when it has none?

Simulated pools of ``--annotators`` (10) annotators, ``--per_prompt`` (3) of them ranking each prompt,
rank the same candidates by a gold scorer plus Bradley–Terry noise and ties
(``reward_models/simulate.py``). Some annotators are *careless* (the candidates put in random places
of the ranking's tiers: a uniformly random ranking that ties at the same rate) or *adversarial* (the
ranking reversed):

- ``all-good``; ``careless-30`` (30 % careless); ``adversarial-20`` (20 % adversarial);
  ``careless-20+adversarial-20``.

Which annotators are bad changes with the seed. For every pool and seed, two reward models train on
the same rankings with the shipped preset (``rm_smollm2.yaml``, as ``bench_rm_learning.py`` does,
through its ``run_choice``): ``unweighted`` (``annotator_weights: none``) and ``weighted``
(``annotator_weights: reliability``: each ranking's loss weighs its annotator's Dawid–Skene weight,
fitted on the training rankings only). Both are scored on the same held-out quarter of the prompts
against the gold scorer (``eval/gold_pair_accuracy``; the per-run 95 % bootstrap interval over
prompts is in ``results.json``). The table gives, per pool, each arm's mean over seeds with a 95 %
t-interval over seeds, and the paired difference weighted − unweighted with its t-interval; the
mean fitted weight of each kind of annotator; the pool's own accuracy against the gold.

    .venv/bin/python -m experiments.benchmarks.bench_annotator_reliability \\
        --candidates runs/quickstart/generate/candidates.jsonl --scorer vader --seeds 5

Without ``--candidates`` the candidates are sampled from ``--model`` first (bench_rm_vs_trl.py's
``make_candidates``), once for every pool and seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from rlhf.offline import set_offline_defaults  # imports nothing heavy

# Set before the imports below: the Hugging Face libraries read them when first imported.
set_offline_defaults()
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
from scipy.stats import t as student_t  # noqa: E402

from experiments.benchmarks.bench_rm_learning import run_choice  # noqa: E402
from experiments.benchmarks.bench_rm_vs_trl import (  # noqa: E402
    add_data_args,
    make_candidates,
    simulate_pool,
    split,
    write_jsonl,
)
from reward_models.simulate import gold_pair_agreement  # noqa: E402
from rlhf.scorers import get_scorer  # noqa: E402

# name → (share of careless annotators, share of adversarial ones)
POOLS: dict[str, tuple[float, float]] = {
    "all-good": (0.0, 0.0),
    "careless-30": (0.3, 0.0),
    "adversarial-20": (0.0, 0.2),
    "careless-20+adversarial-20": (0.2, 0.2),
}
ARMS: dict[str, dict] = {
    "unweighted": {"annotator_weights": "none"},
    "weighted": {"annotator_weights": "reliability"},
}
KINDS = ("good", "careless", "adversarial")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap, per_prompt=3)
    ap.set_defaults(annotators=10)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per pool: --seed, --seed + 1, ...")
    ap.add_argument(
        "--pools", default=",".join(POOLS), help=f"comma-separated pools (default all): {', '.join(POOLS)}"
    )
    ap.add_argument(
        "--config",
        default=str(Path(__file__).parent.parent / "configs" / "rm_smollm2.yaml"),
        help="reward-model preset YAML both arms start from",
    )
    ap.add_argument("--out", default="runs/bench_annotator_reliability")
    args = ap.parse_args(argv)
    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    unknown = [p for p in pools if p not in POOLS]
    if unknown:
        ap.error(f"unknown pool {unknown[0]!r}; pools: {', '.join(POOLS)}")
    if args.seeds < 2:
        ap.error(f"--seeds must be ≥ 2 for an interval over seeds, got {args.seeds}")
    out = Path(args.out)
    t_start = time.time()
    cands = make_candidates(args)  # once: every pool and seed ranks the same candidates
    write_jsonl(out / "candidates.jsonl", cands)
    scorer = get_scorer(args.scorer)
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):  # seeds outermost: stopping early keeps whole seeds
        for pool in pools:
            runs += run_pool(args, pool, seed, cands, scorer, out)
            (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print()
    print(table(runs, pools, args))
    print(f"\nwall time {time.time() - t_start:.0f} s for {len(runs)} reward models")
    return 0


def pool_kinds(pool: str, n_annotators: int, seed: int) -> list[str]:
    """Each annotator's kind: the pool's shares of careless and adversarial ones, who they are
    drawn by the seed."""
    careless, adversarial = (round(share * n_annotators) for share in POOLS[pool])
    kinds = ["careless"] * careless + ["adversarial"] * adversarial
    kinds += ["good"] * (n_annotators - len(kinds))
    random.Random(f"{seed}:kinds").shuffle(kinds)
    return kinds


def run_pool(args, pool: str, seed: int, cands: list[dict], scorer, out: Path) -> list[dict]:
    """Simulate ``pool`` with ``seed``, split it, train and score both arms: one result per arm."""
    kinds = pool_kinds(pool, args.annotators, seed)
    rankings = simulate_pool(args, cands, scorer, seed, kinds)
    train_records, held_records = split(rankings, 0.25, seed)
    where = out / pool / f"seed-{seed}"
    train = write_jsonl(where / "train.jsonl", train_records)
    held = write_jsonl(where / "held.jsonl", held_records)
    seed_args = copy.copy(args)
    seed_args.seed = seed
    results = []
    for arm, fields in ARMS.items():
        row = run_choice(seed_args, arm, fields, train, held, where)
        result = {
            "pool": pool,
            "seed": seed,
            "arm": arm,
            "pool_gold_agreement": gold_pair_agreement(train_records, args.tie_threshold),
            **row,
        }
        if fields["annotator_weights"] == "reliability":
            result["weight_by_kind"] = weight_by_kind(where / arm / "learning" / "rm_train", kinds)
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def weight_by_kind(run_dir: Path, kinds: list[str]) -> dict[str, float]:
    """The mean fitted weight of each kind of annotator (``annotators.json`` of the weighted run)."""
    fitted = json.loads((run_dir / "annotators.json").read_text())["annotators"]
    weights = {a["annotator"]: a["weight"] for a in fitted}
    out = {}
    for kind in KINDS:
        mine = [weights[f"sim-{i}"] for i, k in enumerate(kinds) if k == kind and f"sim-{i}" in weights]
        if mine:
            out[kind] = sum(mine) / len(mine)
    return out


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval over seeds."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(student_t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def table(runs: list[dict], pools: list[str], args) -> str:
    """Per pool: each arm's held-out gold pair accuracy over seeds and the paired difference (Markdown)."""
    lines = [
        f"| pool (gold `{args.scorer}`, {args.annotators} annotators, {args.per_prompt} per prompt) | seeds "
        "| pool vs gold | unweighted [95 % t] | weighted [95 % t] | weighted − unweighted [95 % t] "
        "| mean weight: good / careless / adversarial |",
        "|---|---|---|---|---|---|---|",
    ]
    for pool in pools:
        by_seed: dict[int, dict[str, dict]] = {}
        for r in runs:
            if r["pool"] == pool:
                by_seed.setdefault(r["seed"], {})[r["arm"]] = r
        seeds = sorted(s for s, arms in by_seed.items() if len(arms) == len(ARMS))
        if not seeds:
            continue
        acc = {arm: [by_seed[s][arm]["gold_pair_accuracy"] for s in seeds] for arm in ARMS}
        diff = [w - u for w, u in zip(acc["weighted"], acc["unweighted"])]
        agreement = sum(by_seed[s]["unweighted"]["pool_gold_agreement"] for s in seeds) / len(seeds)
        kinds = {}
        for kind in KINDS:
            seen = [by_seed[s]["weighted"]["weight_by_kind"].get(kind) for s in seeds]
            seen = [w for w in seen if w is not None]
            kinds[kind] = f"{sum(seen) / len(seen):.2f}" if seen else "–"
        lines.append(
            f"| {pool} | {len(seeds)} | {agreement:.3f} | {_fmt(t_interval(acc['unweighted']))} "
            f"| {_fmt(t_interval(acc['weighted']))} | {_fmt(t_interval(diff), signed=True)} "
            f"| {kinds['good']} / {kinds['careless']} / {kinds['adversarial']} |"
        )
    return "\n".join(lines)


def _fmt(interval: tuple[float, float, float], signed: bool = False) -> str:
    mean, low, high = interval
    spec = "+.3f" if signed else ".3f"
    return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


if __name__ == "__main__":
    sys.exit(main())
