"""Learning check: which reward model recovers the preference simulated annotators follow?

Simulated annotators rank candidates by a gold scorer plus Bradley–Terry noise and ties; the reward
model never sees the scorer, only their rankings. Each *choice* below trains one reward model on the
same rankings (the shipped preset ``rm_smollm2.yaml`` with a few fields changed) and is scored on the
same held-out prompts (a quarter of them), printed as a table:

- accuracy against the gold scorer on every held-out pair it separates, with a 95 % bootstrap
  interval over prompts (``eval/gold_pair_accuracy``);
- the annotators' own accuracy on those pairs (the ceiling), chance (0.5);
- accuracy against the annotators and Kendall τ-b, the reward's correlation with length (the gold's
  own beside it), and the training time (the frozen-layer cache included).

    .venv/bin/python -m experiments.benchmarks.bench_rm_learning --scorer vader          # the quickstart's gold
    .venv/bin/python -m experiments.benchmarks.bench_rm_learning --choices default,last-top2 --scorer "length:target=10"
    .venv/bin/python -m experiments.benchmarks.bench_rm_learning --candidates FILE --probe

Without ``--candidates`` the candidates are sampled from ``--model`` first (``--source lab``: the
shipped train prompts; ``--source sentiment``: the 48 prompts of bench_rm_vs_trl.py). ``--probe``
adds ridge probes of the frozen backbone's features fitted to the noise-free gold scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from rlhf.offline import set_offline_defaults  # imports nothing heavy

# Set before the imports below: the Hugging Face libraries read them when first imported.
set_offline_defaults()
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from experiments.benchmarks.bench_rm_vs_trl import add_data_args, simulated_data  # noqa: E402
from reward_models.evaluate import RMEvalConfig, run_rm_eval  # noqa: E402
from reward_models.simulate import gold_pair_agreement  # noqa: E402
from reward_models.train import RMTrainConfig, run_rm_train  # noqa: E402
from rlhf.config import build_config  # noqa: E402
from rlhf.data import prompt_text  # noqa: E402
from rlhf.models import load_policy  # noqa: E402
from rlhf.reward_model import encode_conversations, pad_right  # noqa: E402
from rlhf.scorers import get_scorer  # noqa: E402
from rlhf.tracking import TrackingConfig  # noqa: E402

# the quickstart's preset (configs/rm_smollm2_layers.yaml) as changes to rm_smollm2.yaml
LAYERS_EXACT = {
    "read_layers": [0, 2, 4, 6, 8],
    "solver": "lbfgs",
    "l2_search": [1, 3, 10, 30, 100],
    "val_fraction": 0.0,
}

# name → (what it is, the fields changed from the shipped preset)
CHOICES: dict[str, tuple[str, dict]] = {
    "last-top2": (
        "last token, all 30 layers, top 2 train (the preset before this table)",
        {"pooling": "last", "layers": 0, "top_layers": 2, "lr": 1e-4, "epochs": 3.0},
    ),
    "mean-top2": (
        "mean over the response, all 30 layers, top 2 train",
        {"layers": 0, "top_layers": 2, "lr": 1e-4, "epochs": 6.0},
    ),
    "mean-16-head": ("mean, first 16 layers, head only", {"layers": 16}),
    "default": ("mean, first 8 layers, head only (rm_smollm2.yaml)", {}),
    "layers-exact": (
        "means of layers 0, 2, 4, 6, 8, head solved exactly, λ by cross-validation (rm_smollm2_layers.yaml)",
        LAYERS_EXACT,
    ),
    "layers-exact-length": (
        "the same with length_control (the token count fitted beside the head, then dropped)",
        {**LAYERS_EXACT, "length_control": True},
    ),
    "mean-8-top1": ("mean, first 8 layers, the 8th trains too", {"top_layers": 1, "lr": 1e-4, "epochs": 6.0}),
    "mean-3-head": ("mean, first 3 layers, head only", {"layers": 3}),
    "lora-30": (
        "mean, all 30 layers, LoRA r 16 on every attention projection",
        {"layers": 0, "trainable": "lora", "lora_r": 16, "lora_alpha": 32, "lr": 3e-4, "epochs": 3.0},
    ),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap, per_prompt=1)  # one ranking per prompt, as in the quickstart
    ap.add_argument(
        "--choices",
        default=",".join(CHOICES),
        help=f"comma-separated reward-model choices to compare (default all): {', '.join(CHOICES)}",
    )
    ap.add_argument(
        "--probe",
        action="store_true",
        help="also fit ridge probes on the frozen backbone's features to the noise-free gold scores: "
        "how much of the gold signal the representation carries at all (last token vs mean-pooled)",
    )
    ap.add_argument(
        "--config",
        default=str(Path(__file__).parent.parent / "configs" / "rm_smollm2.yaml"),
        help="reward-model preset YAML that every choice starts from",
    )
    ap.add_argument("--out", default="runs/bench_rm_learning")
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="fields changed for every choice, e.g. batch_size=16 (YAML values)",
    )
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.choices.split(",") if c.strip()]
    unknown = [c for c in names if c not in CHOICES]
    if unknown:
        ap.error(f"unknown choice {unknown[0]!r}; choices: {', '.join(CHOICES)}")
    common = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"override {item!r} is not KEY=VALUE")
        common[key] = yaml.safe_load(value)
    out = Path(args.out)
    cands, rankings, train_records, held_records, train, held = simulated_data(args, out)
    print(
        f"{len(train_records)} training rankings, {len(held_records)} held out; annotators agree with "
        f"the gold scorer on {gold_pair_agreement(rankings, args.tie_threshold):.3f} of its pairs",
        flush=True,
    )
    rows = []
    for name in names:
        what, fields = CHOICES[name]
        row = run_choice(args, name, {**fields, **common}, train, held, out)
        rows.append({"choice": name, "what": what, **row})
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(table(rows, args.scorer))
    result = {
        "scorer": args.scorer,
        "rankings_train": len(train_records),
        "rankings_held": len(held_records),
        "rows": rows,
    }
    if args.probe:
        held_ids = {r["prompt_id"] for r in held_records}
        result["probe"] = probe_ceiling(
            args.model, cands, get_scorer(args.scorer), held_ids, args.tie_threshold
        )
        print("ridge probes fitted to the noise-free gold scores (frozen features, held-out pair accuracy):")
        for name, acc in result["probe"].items():
            print(f"  {name:<24}  {acc:.3f}")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return 0


def run_choice(args, name: str, fields: dict, train: Path, held: Path, out: Path) -> dict:
    """Train one reward model on ``train``, evaluate it on ``held``: the figures of one table row."""
    settings = {
        "rankings": str(train),
        "eval_rankings": str(held),
        "model": args.model,
        "seed": args.seed,
        "runs_dir": str(out / name),
        "experiment": "learning",
        "tracking": {"mode": "disabled"},
        **fields,
    }
    t0 = time.time()
    s = run_rm_train(build_config(RMTrainConfig, args.config or None, settings))
    seconds = time.time() - t0
    ev = run_rm_eval(
        RMEvalConfig(
            reward_model=s["model_dir"],
            rankings=str(held),
            runs_dir=str(out / name),
            experiment="learning",
            tracking=TrackingConfig(mode="disabled"),
        )
    )
    keys = (
        "eval/gold_pair_accuracy",
        "eval/gold_pair_accuracy_ci_low",
        "eval/gold_pair_accuracy_ci_high",
        "eval/annotator_gold_accuracy",
        "eval/pair_accuracy",
        "eval/kendall_tau",
        "eval/length_corr",
        "eval/gold_length_corr",
        "eval/gold_pairs",
    )
    return {
        "seconds": round(seconds, 1),
        "model_dir": str(s["model_dir"]),
        **{k.split("/", 1)[1]: ev.get(k) for k in keys},
    }


def table(rows: list[dict], scorer: str) -> str:
    """The rows as a Markdown table (what the experiments README keeps)."""
    head = (
        f"| choice (gold `{scorer}`) | vs gold [95 % CI] | annotators vs gold | vs annotators | τ-b "
        "| length corr (gold's) | time |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        f = _formatter(r)
        lines.append(
            f"| {r['what']} | **{f('gold_pair_accuracy')}** [{f('gold_pair_accuracy_ci_low')}, "
            f"{f('gold_pair_accuracy_ci_high')}] | {f('annotator_gold_accuracy')} | {f('pair_accuracy')} | "
            f"{f('kendall_tau')} | {f('length_corr')} ({f('gold_length_corr')}) | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def _formatter(row: dict):
    def f(key: str) -> str:
        v = row.get(key)
        return f"{v:.3f}" if isinstance(v, (int, float)) else "–"

    return f


def probe_ceiling(model_name: str, cands: list[dict], scorer, held_ids: set, tie_threshold: float) -> dict:
    """Held-out gold pair accuracy of ridge regressions from frozen final-layer features to gold.

    The features are what a reward model with frozen layers reads (the last real token, formatted
    exactly as the reward model formats it) and, for comparison, the mean over all positions. The
    targets are the gold scores themselves, without annotator noise: an upper bound on what a
    linear head on these features can learn from any amount of such rankings.
    """
    model, tok = load_policy(model_name)
    backbone = model.get_decoder().eval()
    flat = [(r["prompt_id"], r["prompt"], c["text"]) for r in cands for c in r["candidates"]]
    gold = torch.tensor(
        scorer([prompt_text(p) for _, p, _ in flat], [t for _, _, t in flat]), dtype=torch.float64
    )
    enc = encode_conversations(tok, [p for _, p, _ in flat], [t for _, _, t in flat], 192)
    last, mean = [], []
    with torch.no_grad():
        for s in range(0, len(flat), 16):
            ids, mask = pad_right(enc.ids[s : s + 16], tok.pad_token_id)
            h = backbone(input_ids=ids, attention_mask=mask).last_hidden_state.double()
            n = mask.sum(-1)
            last.append(h[torch.arange(len(n)), n - 1])
            mean.append((h * mask[..., None]).sum(1) / n[:, None])
    is_held = torch.tensor([pid in held_ids for pid, _, _ in flat])
    out = {}
    for name, feats in (("last token", torch.cat(last)), ("mean-pooled", torch.cat(mean))):
        xtr, ytr = feats[~is_held], gold[~is_held]
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        xs = (xtr - mu) / sd
        for lam in (100.0, 1000.0):
            w = torch.linalg.solve(
                xs.T @ xs + lam * torch.eye(xs.shape[1], dtype=xs.dtype), xs.T @ (ytr - ytr.mean())
            )
            pred = ((feats - mu) / sd) @ w
            right = total = 0
            start = 0
            for r in cands:  # pairs inside each held-out prompt that the gold scorer separates
                k = len(r["candidates"])
                if r["prompt_id"] in held_ids:
                    for a in range(k):
                        for b in range(a + 1, k):
                            dg = float(gold[start + a] - gold[start + b])
                            if abs(dg) > tie_threshold:
                                total += 1
                                right += float((pred[start + a] - pred[start + b]) * dg > 0)
                start += k
            out[f"{name}, ridge λ={lam:g}"] = right / max(total, 1)
    return out


if __name__ == "__main__":
    sys.exit(main())
