"""Learning check: does a reward model trained on noisy simulated rankings recover the gold scorer?

Simulated annotators rank candidates by a gold scorer (VADER by default) plus Bradley–Terry noise
and ties; the reward model never sees the scorer, only their rankings. On held-out prompts this
prints

- the reward model's pair accuracy against the annotators (``eval/pair_accuracy``),
- its accuracy against the gold scorer on pairs the gold scorer separates (``eval/gold_pair_accuracy``),
- the annotators' own agreement with the gold scorer on the same pairs (``eval/annotator_gold_accuracy``):
  the ceiling a model learning from those annotators should approach,
- chance (0.5).

    .venv/bin/python experiments/bench_rm_learning.py --candidates runs/bench_rm_vs_trl/candidates.jsonl

Without ``--candidates`` the candidates are sampled from ``--model`` first (see bench_rm_vs_trl.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.bench_rm_vs_trl import make_candidates, split, write_jsonl  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--candidates", default="")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--scorer", default="vader", help="the gold scorer the annotators follow")
    ap.add_argument("--annotators", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.2, help="annotator noise")
    ap.add_argument("--tie_threshold", type=float, default=0.05)
    ap.add_argument("--loss", default="grouped_bt")
    ap.add_argument(
        "--config",
        default=str(Path(__file__).parent / "configs" / "rm_smollm2.yaml"),
        help="reward-model preset YAML (model, loss, epochs, budget overridden by the options here)",
    )
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--budget_s", type=float, default=0.0, help="training time limit (0 = epochs decide)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_rm_learning")
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="more reward-model config fields, e.g. top_layers=4 lr=3e-4 (YAML values)",
    )
    args = ap.parse_args(argv)

    from reward_models.evaluate import RMEvalConfig, run_rm_eval
    from reward_models.simulate import gold_pair_agreement, simulate_rankings
    from reward_models.train import RMTrainConfig, run_rm_train
    from rlhf.config import build_config
    from rlhf.scorers import get_scorer
    from rlhf.tracking import TrackingConfig

    out = Path(args.out)
    cands = make_candidates(args)
    rankings = simulate_rankings(
        cands,
        get_scorer(args.scorer),
        n_annotators=args.annotators,
        temperature=args.temperature,
        tie_threshold=args.tie_threshold,
        seed=args.seed,
        per_prompt=args.annotators,
        scorer_name=args.scorer,
    )
    train_records, held_records = split(rankings, 0.25, args.seed)
    train, held = (
        write_jsonl(out / "train.jsonl", train_records),
        write_jsonl(out / "held.jsonl", held_records),
    )
    off = TrackingConfig(mode="disabled")
    # the shipped preset (default experiments/configs/rm_smollm2.yaml) with this run's data and budget
    overrides = {
        "rankings": str(train),
        "eval_rankings": str(held),
        "model": args.model,
        "loss": args.loss,
        "epochs": args.epochs,
        "max_time_s": args.budget_s,
        "seed": args.seed,
        "runs_dir": str(out),
        "experiment": "learning",
        "tracking": {"mode": "disabled"},
    }
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"override {item!r} is not KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    s = run_rm_train(build_config(RMTrainConfig, args.config or None, overrides))
    ev = run_rm_eval(
        RMEvalConfig(
            reward_model=s["model_dir"],
            rankings=str(held),
            runs_dir=str(out),
            experiment="learning",
            tracking=off,
        )
    )
    result = {
        "rankings_train": len(train_records),
        "rankings_held": len(held_records),
        "annotator_gold_agreement_all": gold_pair_agreement(rankings, args.tie_threshold),
        "rm_pair_accuracy_vs_annotators": ev["eval/pair_accuracy"],
        "rm_pair_accuracy_vs_gold": ev.get("eval/gold_pair_accuracy"),
        "annotators_accuracy_vs_gold_same_pairs": ev.get("eval/annotator_gold_accuracy"),
        "rm_gold_spearman": ev.get("eval/gold_spearman"),
    }
    print("\nheld-out pairs the gold scorer separates:")
    print(f"  reward model vs gold      {result['rm_pair_accuracy_vs_gold']:.3f}")
    print(f"  annotators vs gold        {result['annotators_accuracy_vs_gold_same_pairs']:.3f}  (ceiling)")
    print("  chance                    0.500")
    print(f"  reward model vs annotators {result['rm_pair_accuracy_vs_annotators']:.3f}")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
