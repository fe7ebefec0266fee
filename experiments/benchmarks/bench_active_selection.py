"""Benchmark: does ranking the prompts the reward model is least sure of first (active selection)
buy more gold accuracy per annotation than ranking them in random order?

A pool of prompts with K candidates each (``--candidates``, e.g. the quickstart's) is ranked by
simulated annotators that follow a gold scorer with noise and ties (``reward_models/simulate.py``;
``--per_prompt`` annotators per prompt, 1 as in the quickstart). A quarter of the prompts is held
out; the rest is the unranked pool. Annotation proceeds in batches of ``--batch`` prompts up to
``--rounds`` batches:

- ``random``: the next batch is drawn at random from what is left;
- ``active``: a reward model is trained on what is ranked so far (the shipped preset,
  ``rm_smollm2.yaml``), scores what is left, and the next batch is the ``--batch`` prompts it is
  least certain about (``rlhf.active``, ``--measure margin``: the smallest gap between two
  responses' scores), the order ``rlhf annotate prioritize`` serves them in.

Both arms start from the same random first batch, and a prompt has the same simulated rankings in
both arms (paired design: the arms differ only in which prompts they rank). After each batch a
reward model trains on the arm's rankings and is scored on the held-out prompts against the gold
(``eval/gold_pair_accuracy``). The table gives, per number of ranked prompts, each arm's mean over
seeds with a 95 % t-interval and the paired difference active − random; ``active_selection.png``
plots the two learning curves. The gold reaches training only through the simulated rankings.

    .venv/bin/python -m experiments.benchmarks.bench_active_selection \\
        --candidates runs/quickstart/generate/candidates.jsonl --scorer vader --seeds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

from rlhf.offline import set_offline_defaults  # imports nothing heavy

# Set before the imports below: the Hugging Face libraries read them when first imported.
set_offline_defaults()
os.environ.setdefault("WANDB_MODE", "disabled")

from experiments.benchmarks.bench_annotator_reliability import _fmt, t_interval  # noqa: E402
from experiments.benchmarks.bench_rm_learning import run_choice  # noqa: E402
from experiments.benchmarks.bench_rm_vs_trl import (  # noqa: E402
    add_data_args,
    make_candidates,
    simulate_pool,
    split,
    write_jsonl,
)
from rlhf.active import MEASURES, least_certain_first, uncertainty  # noqa: E402
from rlhf.rewards import load_reward_fn  # noqa: E402
from rlhf.scorers import get_scorer  # noqa: E402

ARMS = ("random", "active")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap, per_prompt=1)
    ap.add_argument("--seeds", type=int, default=3, help="seeds: --seed, --seed + 1, ...")
    ap.add_argument("--batch", type=int, default=50, help="prompts ranked per round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds (the first is random in both arms)")
    ap.add_argument("--measure", choices=MEASURES[:1], default="margin", help="uncertainty measure")
    ap.add_argument(
        "--config",
        default=str(Path(__file__).parent.parent / "configs" / "rm_smollm2.yaml"),
        help="reward-model preset YAML every training starts from",
    )
    ap.add_argument("--out", default="runs/bench_active_selection")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error(f"--seeds must be ≥ 2 for an interval over seeds, got {args.seeds}")
    if args.rounds < 2:
        ap.error(f"--rounds must be ≥ 2 (the first round is random in both arms), got {args.rounds}")
    out = Path(args.out)
    t_start = time.time()
    cands = make_candidates(args)
    write_jsonl(out / "candidates.jsonl", cands)
    scorer = get_scorer(args.scorer)
    runs: list[dict] = []
    for seed in range(args.seed, args.seed + args.seeds):
        runs += run_seed(args, seed, cands, scorer, out / f"seed-{seed}")
        (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print()
    print(table(runs, args))
    plot(runs, args, out / "active_selection.png")
    print(f"\nplot {out / 'active_selection.png'}; wall time {time.time() - t_start:.0f} s")
    return 0


def run_seed(args, seed: int, cands: list[dict], scorer, out: Path) -> list[dict]:
    """Both arms for one seed: one result per arm and round (the first round's model is shared)."""
    rankings = simulate_pool(args, cands, scorer, seed)
    pool_records, held_records = split(rankings, 0.25, seed)
    held = write_jsonl(out / "held.jsonl", held_records)
    by_prompt: dict[str, list[dict]] = {}
    for rec in pool_records:
        by_prompt.setdefault(rec["prompt_id"], []).append(rec)
    random_order = sorted(by_prompt)
    random.Random(f"{seed}:order").shuffle(random_order)
    budget = min(args.batch * args.rounds, len(random_order))
    seed_args = copy.copy(args)
    seed_args.seed = seed
    candidates_of = {c["prompt_id"]: c for c in cands}

    def train(arm: str, chosen: list[str]) -> dict:
        n = len(chosen)
        path = write_jsonl(out / arm / f"ranked-{n}.jsonl", [r for pid in chosen for r in by_prompt[pid]])
        row = run_choice(seed_args, f"{arm}-{n}", {}, path, held, out / arm)
        result = {
            "seed": seed,
            "arm": arm,
            "prompts": n,
            "rankings": sum(len(by_prompt[p]) for p in chosen),
            **row,
        }
        print(json.dumps(result), flush=True)
        return result

    first = random_order[: args.batch]
    shared = train("shared", first)
    results = [{**shared, "arm": arm} for arm in ARMS]
    chosen = {"random": list(first), "active": list(first)}
    model_dir = shared["model_dir"]
    for n in range(2 * args.batch, budget + 1, args.batch):
        chosen["random"] = random_order[:n]
        results.append(train("random", chosen["random"]))
        left = [candidates_of[pid] for pid in random_order if pid not in set(chosen["active"])]
        scores = uncertainty(left, load_reward_fn(model_dir), args.measure)
        chosen["active"] += least_certain_first(scores)[: args.batch]
        active = train("active", chosen["active"])
        model_dir = active["model_dir"]
        results.append(active)
    return results


def _curves(runs: list[dict]) -> dict[int, dict[str, dict[int, float]]]:
    """``{prompts: {arm: {seed: gold accuracy}}}``."""
    curves: dict[int, dict[str, dict[int, float]]] = {}
    for r in runs:
        curves.setdefault(r["prompts"], {}).setdefault(r["arm"], {})[r["seed"]] = r["gold_pair_accuracy"]
    return curves


def table(runs: list[dict], args) -> str:
    """Per budget: each arm's held-out gold pair accuracy over seeds and the paired difference."""
    lines = [
        f"| ranked prompts (gold `{args.scorer}`, {args.per_prompt or args.annotators} ranking(s) each) | seeds "
        "| random [95 % t] | active [95 % t] | active − random [95 % t] |",
        "|---|---|---|---|---|",
    ]
    for n, arms in sorted(_curves(runs).items()):
        seeds = sorted(set(arms.get("random", {})) & set(arms.get("active", {})))
        if not seeds:
            continue
        rnd = [arms["random"][s] for s in seeds]
        act = [arms["active"][s] for s in seeds]
        diff = [a - b for a, b in zip(act, rnd)]
        lines.append(
            f"| {n} | {len(seeds)} | {_fmt(t_interval(rnd))} | {_fmt(t_interval(act))} "
            f"| {_fmt(t_interval(diff), signed=True)} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], args, path: Path) -> None:
    """Held-out gold accuracy against ranked prompts, both arms, with 95 % t-intervals over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, colour in zip(ARMS, ("tab:grey", "tab:blue")):
        xs, mean, low, high = [], [], [], []
        for n, arms in sorted(curves.items()):
            values = list(arms.get(arm, {}).values())
            if len(values) >= 2:
                m, lo, hi = t_interval(values)
                xs.append(n), mean.append(m), low.append(lo), high.append(hi)
        ax.plot(xs, mean, "o-", color=colour, label=arm)
        ax.fill_between(xs, low, high, color=colour, alpha=0.2)
    ax.set_xlabel("ranked prompts")
    ax.set_ylabel(f"held-out gold pair accuracy ({args.scorer})")
    ax.set_title(f"Active selection ({args.measure}) vs random order, 95 % t over seeds", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
