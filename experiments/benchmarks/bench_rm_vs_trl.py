"""Benchmark: our ranking reward-model trainer vs TRL 1.16's ``RewardTrainer`` on exported pairs.

Same simulated rankings (K = 4 with ties, noisy simulated annotators following a gold scorer),
same backbone with the same trainable parameters (top N decoder layers + head; the lower layers
frozen in both), same AdamW learning rate and batch size, same wall clock per trainer: ours trains
``--budget_s`` seconds after caching the frozen layers, and TRL then trains for as long as ours took
end to end (cache included).
TRL sees the rankings flattened into strict (chosen, rejected) pairs — ties dropped, as every
pairs-only trainer does — formatted with the same chat template as ours, with ``bf16=False``
(TRL's bf16 on a CPU is a no-op or, without bf16 hardware, 12× slower).

The default data is the learning check's (bench_rm_learning): the first 160 shipped train
prompts × 4 candidates sampled from the model, ranked by 3 simulated annotators who follow a gold
scorer preferring 10-word answers (``length:target=10``) with Bradley–Terry noise; a quarter of the
prompts are held out. Here annotators tie answers within one word of each other
(``--tie_threshold 0.15``: about 19 % of pairs tied; 0.05, the learning check's, ties 7 %). ``--source sentiment --scorer vader`` gives the older
sentiment set (48 prompts), on which a 135M reward model stays near chance (see the README).

Printed per trainer, on the held-out rankings:

- strict-pair accuracy against the annotators and against the gold scorer;
- tie log-likelihood: mean log P(tie) on tied pairs, and the 3-way log-likelihood of every pair's
  outcome (win / tie / loss). A tie-aware loss uses the θ / ν it learned; a model trained without
  ties is given the Rao–Kupper θ that fits the *held-out* pairs best — an optimistic bound, so a
  tie-aware model that still scores higher is better for sure;
- training rankings/s (TRL: pairs/s ÷ strict pairs per ranking), end to end for ours (the one-off
  frozen-layer cache included), and ours / TRL's throughput.

    .venv/bin/python -m experiments.benchmarks.bench_rm_vs_trl --budget_s 60          # ~15 min on 2 cores
    .venv/bin/python -m experiments.benchmarks.bench_rm_vs_trl --candidates runs/overoptimization/generate/candidates.jsonl

Candidates are sampled from the model itself (``--candidates FILE`` reuses a candidates JSONL).
"""

from __future__ import annotations

import argparse
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

import torch  # noqa: E402

from reward_models.evaluate import RMEvalConfig, run_rm_eval  # noqa: E402
from reward_models.model import build_reward_model  # noqa: E402
from reward_models.simulate import pair_counts, simulate_rankings  # noqa: E402
from reward_models.train import RMTrainConfig, run_rm_train  # noqa: E402
from rlhf.data import load_prompts, rankings_to_pairs  # noqa: E402
from rlhf.datafiles import read_jsonl  # noqa: E402
from rlhf.generation import generate_candidates  # noqa: E402
from rlhf.models import format_conversation, load_policy  # noqa: E402
from rlhf.reward_model import save_reward_model  # noqa: E402
from rlhf.scorers import get_scorer  # noqa: E402
from rlhf.tracking import TrackingConfig  # noqa: E402

# Prompts that make VADER-scored responses differ: the gold scorer sees real sentiment spread.
PROMPTS = [
    "Describe your ideal weekend.",
    "What do you think about Mondays?",
    "Write one sentence about rain.",
    "How was the food at the new restaurant?",
    "Tell me about a time you were disappointed.",
    "Review a movie you watched recently.",
    "What is your opinion of traffic jams?",
    "Describe a sunny day at the beach.",
    "How do you feel about homework?",
    "Write a short note to a friend.",
    "Describe a broken phone.",
    "What makes a good teacher?",
    "Tell me about your favourite animal.",
    "Describe a rainy Monday morning.",
    "What do you think of cold coffee?",
    "Write a toast for a wedding.",
    "How do you feel about losing a game?",
    "Describe a birthday party.",
    "What is annoying about queues?",
    "Tell me something that makes you happy.",
    "Describe a stressful exam.",
    "What do you love about music?",
    "Describe a long flight delay.",
    "Write a thank-you message.",
    "How was your holiday?",
    "What do you think of noisy neighbours?",
    "Describe a delicious cake.",
    "Tell me about a bad haircut.",
    "Describe a walk in the park.",
    "What do you think about spiders?",
    "Describe your first day at work.",
    "Write a complaint about a late train.",
    "What is great about friendship?",
    "Describe a burnt dinner.",
    "How do you feel about snow?",
    "Describe a beautiful sunset.",
    "What do you think of long meetings?",
    "Tell me about a kind stranger.",
    "Describe a flat tyre on the motorway.",
    "Write a cheerful greeting.",
    "What do you think of the city?",
    "Describe a lost wallet.",
    "Tell me about your best friend.",
    "Describe a hospital waiting room.",
    "What do you love about books?",
    "Describe a summer festival.",
    "How do you feel about public speaking?",
    "Describe a quiet evening at home.",
]


def make_candidates(args) -> list[dict]:
    """``args.candidates`` read back, or K candidates sampled from ``args.model`` for the first
    ``args.prompts`` prompts of ``args.source``: ``lab`` (the shipped train prompts) or
    ``sentiment`` (the sentiment-eliciting prompts above)."""
    if args.candidates:
        return read_jsonl(args.candidates)
    if args.source == "lab":
        prompts = load_prompts("lab:prompts", split="train")[: args.prompts]
    else:
        prompts = [{"prompt_id": f"b{i}", "prompt": p} for i, p in enumerate(PROMPTS[: args.prompts])]
    model, tok = load_policy(args.model)
    t0 = time.time()
    cands = generate_candidates(
        model,
        tok,
        prompts,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        batch_size=32,
        seed=args.seed,
        model_name=args.model,
    )
    print(f"generated {len(cands)} × {args.k} candidates in {time.time() - t0:.0f}s", flush=True)
    return cands


def add_data_args(ap: argparse.ArgumentParser, tie_threshold: float = 0.05, per_prompt: int = 0) -> None:
    """The simulated-rankings options both reward-model benchmarks share (same defaults but the
    tie threshold and how many annotators rank each prompt)."""
    ap.add_argument("--model", default="smollm2-135m-instruct", help="backbone (and candidate sampler)")
    ap.add_argument("--candidates", default="", help="reuse a candidates JSONL instead of sampling")
    ap.add_argument(
        "--source",
        choices=("lab", "sentiment"),
        default="lab",
        help="prompts to sample candidates for: the lab's shipped train prompts, or the 48 "
        "sentiment-eliciting prompts of this file",
    )
    ap.add_argument("--prompts", type=int, default=160, help="how many prompts (sentiment: at most 48)")
    ap.add_argument("--k", type=int, default=4, help="candidates per prompt")
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument(
        "--scorer",
        default="length:target=10",
        help="the gold scorer the simulated annotators follow (any rlhf.scorers spec: vader, "
        "length:target=N, ...); the reward model never sees it",
    )
    ap.add_argument("--annotators", type=int, default=3, help="simulated annotators in the pool")
    ap.add_argument(
        "--per_prompt",
        type=int,
        default=per_prompt,
        help="distinct annotators ranking each prompt (0: all of them; the quickstart has 1)",
    )
    ap.add_argument("--temperature", type=float, default=0.2, help="annotator noise (BT temperature)")
    ap.add_argument(
        "--tie_threshold",
        type=float,
        default=tie_threshold,
        help="gold gap within which annotators tie (length:target=10 moves 0.1 a word: 0.05 ties equal "
        "lengths, about 7%% of pairs; 0.15 ties lengths one word apart, about 19%%)",
    )
    ap.add_argument("--seed", type=int, default=0)


def simulated_data(args, out: Path):
    """Candidates, their simulated rankings, and a by-prompt split (a quarter held out), written
    under ``out``: returns ``(cands, rankings, train_records, held_records, train_path, held_path)``."""
    cands = make_candidates(args)
    write_jsonl(out / "candidates.jsonl", cands)
    rankings = simulate_pool(args, cands, get_scorer(args.scorer), args.seed)
    train_records, held_records = split(rankings, 0.25, args.seed)
    train = write_jsonl(out / "train.jsonl", train_records)
    held = write_jsonl(out / "held.jsonl", held_records)
    return cands, rankings, train_records, held_records, train, held


def simulate_pool(args, cands: list[dict], scorer, seed: int, kinds: list[str] | None = None) -> list[dict]:
    """The candidates ranked by the simulated pool the data options describe (``add_data_args``),
    with ``seed``; ``kinds``: each annotator's kind (all good by default)."""
    return simulate_rankings(
        cands,
        scorer,
        n_annotators=args.annotators,
        temperature=args.temperature,
        tie_threshold=args.tie_threshold,
        seed=seed,
        per_prompt=args.per_prompt or args.annotators,
        scorer_name=args.scorer,
        kinds=kinds,
    )


def split(records: list[dict], frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    ids = sorted({r["prompt_id"] for r in records})
    random.Random(seed).shuffle(ids)
    held = set(ids[: max(1, int(len(ids) * frac))])
    return [r for r in records if r["prompt_id"] not in held], [r for r in records if r["prompt_id"] in held]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def evaluate(model_dir: Path, held: Path, out: Path, name: str) -> dict:
    return run_rm_eval(
        RMEvalConfig(
            reward_model=str(model_dir),
            rankings=str(held),
            runs_dir=str(out),
            experiment=f"eval-{name}",
            tracking=TrackingConfig(mode="disabled"),
        )
    )


def eval_fields(ev: dict) -> dict:
    """The held-out figures the table prints, from ``rlhf rm eval``'s metrics."""
    return {
        "pair_acc": ev["eval/pair_accuracy"],
        "gold_acc": ev.get("eval/gold_pair_accuracy", float("nan")),
        "tie_loglik": ev["eval/tie_loglik"],
        "pair_loglik": ev["eval/pair_loglik"],
        "tie_loglik_fitted": ev["eval/tie_loglik_fitted"],
        "pair_loglik_fitted": ev["eval/pair_loglik_fitted"],
        "tie_theta": ev.get("eval/tie_theta", ev.get("eval/tie_nu", float("nan"))),
    }


def run_ours(args, loss: str, train: Path, held: Path, out: Path) -> dict:
    cfg = RMTrainConfig(
        rankings=str(train),
        eval_rankings=str(held),
        model=args.model,
        loss=loss,
        trainable="top",
        top_layers=args.top_layers,
        pooling="last",  # what TRL's sequence-classification head reads: like for like
        max_length=args.max_length,
        batch_size=args.batch_size,
        lr=args.lr,
        epochs=1000.0,
        max_time_s=args.budget_s,
        eval_every=0,
        normalize=False,
        seed=args.seed,
        runs_dir=str(out),
        experiment=f"ours-{loss}",
        tracking=TrackingConfig(mode="disabled"),
    )
    s = run_rm_train(cfg)
    ev = evaluate(Path(s["model_dir"]), held, out, loss)
    seen = s["rm/rankings_seen"]
    return {
        "trainer": f"ours:{loss}",
        "model_dir": s["model_dir"],
        **eval_fields(ev),
        "rankings_per_s": s["rm/rankings_per_s"],
        "rankings_per_s_e2e": seen / (s["rm/train_time_s"] + s["rm/cache_time_s"]),
        "steps": s["rm/steps"],
        "train_s": s["rm/train_time_s"],
        "cache_s": s["rm/cache_time_s"],
    }


def run_trl(args, train_records: list[dict], held: Path, out: Path, budget_s: float) -> dict:
    # TRL (and the datasets library it reads) loads only when its trainer runs: --skip_trl and
    # --reeval never import it
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    model, tok = build_reward_model(args.model, "top", args.top_layers, seed=args.seed)
    rows, strict_per_ranking = [], []
    for r in train_records:  # `rlhf export`'s pairs, strict ones only: a pairs trainer drops the ties
        strict = [p for p in rankings_to_pairs([r]) if not p["tie"]]
        rows += [
            {
                "chosen": format_conversation(tok, r["prompt"], p["chosen"]),
                "rejected": format_conversation(tok, r["prompt"], p["rejected"]),
            }
            for p in strict
        ]
        strict_per_ranking.append(len(strict))
    if not rows:
        raise SystemExit("no strict pairs in the training rankings (everything tied): raise the gold spread")
    random.Random(args.seed).shuffle(rows)
    pairs_per_ranking = sum(strict_per_ranking) / len(strict_per_ranking)

    class Budget(TrainerCallback):
        def __init__(self):
            self.t0, self.steps = None, 0

        def on_step_begin(self, a, state, control, **kw):
            if self.t0 is None:
                self.t0 = time.time()

        def on_step_end(self, a, state, control, **kw):
            self.steps = state.global_step
            if time.time() - self.t0 >= budget_s:
                control.should_training_stop = True

    budget = Budget()
    cfg = RewardConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        num_train_epochs=1000,
        bf16=False,
        fp16=False,
        max_length=args.max_length,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        disable_dropout=True,
        dataloader_num_workers=0,
        seed=args.seed,
        use_cpu=True,
        center_rewards_coefficient=None,
        weight_decay=0.0,
        gradient_checkpointing=False,
    )
    trainer = RewardTrainer(
        model=model.seq_model,
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[budget],
    )
    trainer.train()
    elapsed = time.time() - budget.t0
    pairs = budget.steps * args.batch_size
    model_dir = save_reward_model(
        model,
        tok,
        out / "trl" / "model",
        {
            "loss": "bt",
            "base_model": args.model,
            "max_length": args.max_length,
            "normalization": {"offset": 0.0, "scale": 1.0},
        },
    )
    ev = evaluate(model_dir, held, out, "trl")
    return {
        "trainer": "TRL RewardTrainer (pairs)",
        "model_dir": str(model_dir),
        **eval_fields(ev),
        "rankings_per_s": pairs / elapsed / pairs_per_ranking,
        "rankings_per_s_e2e": pairs / elapsed / pairs_per_ranking,
        "steps": budget.steps,
        "train_s": elapsed,
        "cache_s": 0.0,
        "pairs_per_s": pairs / elapsed,
    }


def table(results: list[dict], base: dict | None) -> str:
    """The comparison as text: accuracy, the two tie log-likelihoods (own θ / ν, and one common
    fitted θ), throughput and the ratio to TRL."""
    lines = [
        f"{'trainer':<28} {'pair acc':>8} {'vs gold':>8} {'tie LL':>7} {'3-way LL':>8} {'tie LL θ*':>9} "
        f"{'3-way θ*':>8} {'rankings/s':>10} {'e2e r/s':>8} {'× TRL':>6}"
    ]
    for r in results:
        ratio = r["rankings_per_s_e2e"] / base["rankings_per_s"] if base else float("nan")
        lines.append(
            f"{r['trainer']:<28} {r['pair_acc']:>8.3f} {r['gold_acc']:>8.3f} {r['tie_loglik']:>7.3f} "
            f"{r['pair_loglik']:>8.3f} {r['tie_loglik_fitted']:>9.3f} {r['pair_loglik_fitted']:>8.3f} "
            f"{r['rankings_per_s']:>10.2f} {r['rankings_per_s_e2e']:>8.2f} {ratio:>6.1f}"
        )
    lines += [
        "pair acc: held-out strict pairs vs the annotators; vs gold: pairs the gold scorer separates;",
        "tie LL: mean log P(tie) on tied pairs; 3-way LL: mean log P(observed win / tie / loss) on every",
        "pair — with the model's own learned θ / ν (no tie model: the Rao–Kupper θ fitted to the",
        "held-out pairs, an optimistic bound); θ*: the same with that fitted Rao–Kupper θ for every",
        "model, i.e. how well the rewards themselves place ties.",
    ]
    return "\n" + "\n".join(lines)


def reeval(out: Path) -> int:
    """Refresh the held-out figures of a finished run from its saved models (throughput kept)."""
    results = json.loads((out / "results.json").read_text())
    for r in results:
        name = r["trainer"].removeprefix("ours:") if r["trainer"].startswith("ours:") else "trl"
        r.update(eval_fields(evaluate(Path(r["model_dir"]), out / "held.jsonl", out, name)))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results, next((r for r in results if r["trainer"].startswith("TRL")), None)))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap, tie_threshold=0.15)  # ties are what this benchmark is about: ~19 % of pairs
    ap.add_argument(
        "--budget_s",
        type=float,
        default=60.0,
        help="our training time per loss, after the one-off frozen-layer cache; TRL then trains for "
        "our median end-to-end time (cache + training), so both get the same wall clock",
    )
    ap.add_argument("--top_layers", type=int, default=2)
    ap.add_argument("--max_length", type=int, default=192)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate, constant, for every trainer")
    ap.add_argument("--losses", default="grouped_bt,bt,rao_kupper,davidson,plackett_luce")
    ap.add_argument("--skip_trl", action="store_true")
    ap.add_argument("--out", default="runs/bench_rm_vs_trl")
    ap.add_argument(
        "--reeval",
        action="store_true",
        help="train nothing: evaluate the models an earlier run saved under --out again on its "
        "held-out rankings (e.g. after rm eval gained a metric) and print the table",
    )
    args = ap.parse_args(argv)
    if args.reeval:
        return reeval(Path(args.out))

    torch.manual_seed(args.seed)
    out = Path(args.out)
    _, rankings, train_records, held_records, train, held = simulated_data(args, out)
    n_pairs, n_ties = pair_counts(rankings)
    print(
        f"{len(rankings)} rankings (K={args.k}, {len(train_records)} train / {len(held_records)} held out), "
        f"tie rate {n_ties / n_pairs:.2f}; our training budget {args.budget_s:g}s per loss; model {args.model}",
        flush=True,
    )

    results = []
    for loss in [x for x in args.losses.split(",") if x]:
        results.append(run_ours(args, loss, train, held, out))
        print(json.dumps(results[-1]), flush=True)
    if not args.skip_trl:
        # the same wall clock: TRL trains as long as ours took end to end (cache + training)
        e2e = sorted(r["cache_s"] + r["train_s"] for r in results) or [args.budget_s]
        trl_budget = e2e[len(e2e) // 2]
        print(f"TRL's budget: {trl_budget:.0f}s, our median end-to-end time", flush=True)
        results.insert(0, run_trl(args, train_records, held, out, trl_budget))
        print(json.dumps(results[0]), flush=True)

    base = next((r for r in results if r["trainer"].startswith("TRL")), None)
    print(table(results, base))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"\nresults: {out / 'results.json'}  (× TRL = our end-to-end rankings/s, cache included, over TRL's)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
