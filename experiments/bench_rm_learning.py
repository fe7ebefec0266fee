"""Learning check: does a reward model trained on noisy simulated rankings recover the gold scorer?

Simulated annotators rank candidates by a gold scorer plus Bradley–Terry noise and ties; the reward
model never sees the scorer, only their rankings. The default gold prefers 10-word answers
(``length:target=10``) and the candidates are the first 160 shipped train prompts × 4 samples of
48 tokens; a quarter of the prompts are held out. On them this prints

- the reward model's pair accuracy against the annotators (``eval/pair_accuracy``),
- its accuracy against the gold scorer on pairs the gold scorer separates (``eval/gold_pair_accuracy``),
- the annotators' own agreement with the gold scorer on the same pairs (``eval/annotator_gold_accuracy``):
  what a model learning from those annotators should come close to,
- chance (0.5);
- with ``--probe``: ridge regressions from the frozen backbone's features straight to the
  noise-free gold scores, i.e. how much of the gold signal the representation carries at all.

    .venv/bin/python experiments/bench_rm_learning.py                  # ~8 min on 2 cores
    .venv/bin/python experiments/bench_rm_learning.py --scorer vader --probe   # sentiment: hard at 135M
    .venv/bin/python experiments/bench_rm_learning.py --candidates FILE top_layers=4

Without ``--candidates`` the candidates are sampled from ``--model`` first (``--source lab``: the
shipped train prompts; ``--source sentiment``: the 48 prompts of bench_rm_vs_trl.py). Training is
the shipped preset (``rm_smollm2.yaml``: top 2 layers, the rest frozen and cached) at lr 3e-4 for
up to 8 epochs with early stopping; extra ``KEY=VALUE`` arguments override its fields.
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

from experiments.bench_rm_vs_trl import add_data_args, simulated_data  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument(
        "--probe",
        action="store_true",
        help="also fit ridge probes on the frozen backbone's features to the noise-free gold scores: "
        "how much of the gold signal the representation carries at all (last token vs mean-pooled)",
    )
    ap.add_argument("--loss", default="grouped_bt")
    ap.add_argument(
        "--config",
        default=str(Path(__file__).parent / "configs" / "rm_smollm2.yaml"),
        help="reward-model preset YAML (model, loss, epochs, budget overridden by the options here)",
    )
    ap.add_argument("--epochs", type=float, default=8.0, help="at most; early stopping on held-out loss")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (the preset's is 1e-4)")
    ap.add_argument("--budget_s", type=float, default=0.0, help="training time limit (0 = epochs decide)")
    ap.add_argument("--out", default="runs/bench_rm_learning")
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="more reward-model config fields, e.g. top_layers=4 batch_size=16 (YAML values)",
    )
    args = ap.parse_args(argv)

    from reward_models.evaluate import RMEvalConfig, run_rm_eval
    from reward_models.simulate import gold_pair_agreement
    from reward_models.train import RMTrainConfig, run_rm_train
    from rlhf.config import build_config
    from rlhf.scorers import get_scorer
    from rlhf.tracking import TrackingConfig

    out = Path(args.out)
    cands, rankings, train_records, held_records, train, held = simulated_data(args, out)
    off = TrackingConfig(mode="disabled")
    # the shipped preset (default experiments/configs/rm_smollm2.yaml) with this run's data and budget
    overrides = {
        "rankings": str(train),
        "eval_rankings": str(held),
        "model": args.model,
        "loss": args.loss,
        "epochs": args.epochs,
        "lr": args.lr,
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
    print(
        f"  annotators vs gold        {result['annotators_accuracy_vs_gold_same_pairs']:.3f}  (their own agreement)"
    )
    print("  chance                    0.500")
    print(f"  reward model vs annotators {result['rm_pair_accuracy_vs_annotators']:.3f}")
    gap = result["annotators_accuracy_vs_gold_same_pairs"] - result["rm_pair_accuracy_vs_gold"]
    print(f"  gap to the annotators     {gap:+.3f}")
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


def probe_ceiling(model_name: str, cands: list[dict], scorer, held_ids: set, tie_threshold: float) -> dict:
    """Held-out gold pair accuracy of ridge regressions from frozen final-layer features to gold.

    The features are what a reward model with frozen layers reads (the last real token, formatted
    exactly as the reward model formats it) and, for comparison, the mean over all positions. The
    targets are the gold scores themselves, without annotator noise: an upper bound on what a
    linear head on these features can learn from any amount of such rankings.
    """
    import torch

    from reward_models.model import encode_conversations, pad_right
    from rlhf.data import prompt_text
    from rlhf.models import load_policy

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
