"""Which head on frozen features learns the preference: one layer's mean, or several layers' means?

The shipped reward model reads the mean of the 8th layer's states over the response and trains a
linear head with Adam (``configs/rm_smollm2.yaml``). Over the quickstart's candidates the features
stay fixed, so a linear head is a convex problem that can be solved exactly. This benchmark asks
what a different *feature set* and an exactly solved, regularised head would gain, before the lab's
commands are changed to offer it:

- features: the mean over the response tokens (EOS included when the response ended, formatted
  exactly as the reward model formats it) of the states after a layer (0 = the token embeddings),
  raw (no final norm); a *variant* (``--variants``) concatenates those of some layers;
- head: Bradley–Terry on every strict pair of the simulated annotators' rankings, features
  standardised on the training candidates, an L2 penalty ``λ/k · ‖w‖²`` (``k`` layers concatenated,
  so λ means the same per layer), solved by L-BFGS: no initialisation, data order or validation
  slice to be lucky with;
- splits: ``--splits`` draws of the simulated annotators and of the held-out quarter of the prompts
  (the seed moves both); accuracy against the gold on every held-out pair it separates by more
  than the tie threshold (the annotators' own ties), then the
  mean over splits with a 95 % Student-t interval, and each row paired with the first.

``--preset CONFIG`` also trains the lab's own reward model (``rlhf rm train``) on every split and
scores it on the same pairs: the first row, the one every variant is paired with.

    .venv/bin/python -m experiments.benchmarks.bench_rm_heads --candidates runs/quickstart/generate/candidates.jsonl --scorer vader --preset experiments/configs/rm_smollm2.yaml
    .venv/bin/python -m experiments.benchmarks.bench_rm_heads --candidates FILE --variants "8;0,2,4,6,8" --l2 1,10
    .venv/bin/python -m experiments.benchmarks.bench_rm_heads --candidates FILE --variants "8;0,2,4,6,8" --l2 10 --train_fractions 0.25,0.5,0.75,1

``--train_fractions`` fits every head on nested shares of each split's training prompts against the
same held-out pairs: how accuracy grows with the number of prompts ranked. ``--more_answers FILE``
(more answers to the same prompts, e.g. ``rlhf generate --seed 1``) also fits every head with both
files' answers ranked together, on the same held-out pairs of the first file's answers: whether K
answers a prompt buy what as many more prompts buy.

    .venv/bin/python -m experiments.benchmarks.bench_rm_heads --candidates FILE --more_answers FILE_SEED1 --variants "0,2,4,6,8" --l2 10 --train_fractions 0.5,1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
from pathlib import Path

from rlhf.offline import set_offline_defaults  # imports nothing heavy

# Set before the imports below: the Hugging Face libraries read them when first imported.
set_offline_defaults()
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from experiments.benchmarks.bench_annotator_reliability import _fmt, t_interval  # noqa: E402
from experiments.benchmarks.bench_rm_vs_trl import (  # noqa: E402
    add_data_args,
    make_candidates,
    simulate_pool,
    split,
    write_jsonl,
)
from reward_models.train import RMTrainConfig, run_rm_train  # noqa: E402
from rlhf.cli import progress_bar  # noqa: E402
from rlhf.config import build_config  # noqa: E402
from rlhf.datafiles import read_jsonl  # noqa: E402
from rlhf.models import load_policy  # noqa: E402
from rlhf.rankings import ALL_LABELS  # noqa: E402
from rlhf.reward_model import encode_conversations, pad_right  # noqa: E402
from rlhf.rewards import load_reward_fn  # noqa: E402
from rlhf.scorers import get_scorer  # noqa: E402

HELD_FRACTION = 0.25  # as bench_rm_learning.py


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap, per_prompt=1)  # one ranking per prompt, as in the quickstart
    ap.add_argument(
        "--variants",
        default="8;0,2,4,6,8;0,4,8,12,16;0,2,4,6,8,10,12,14,16,20",
        help="semicolon-separated feature sets, each a comma-separated list of layers whose response "
        "means are concatenated (0: the embeddings); the first is the one the others are paired with",
    )
    ap.add_argument("--l2", default="1,10", help="comma-separated L2 strengths λ (penalty λ/k·‖w‖²)")
    ap.add_argument(
        "--splits", type=int, default=5, help="annotator draws × held-out splits (seed, seed+1, ...)"
    )
    ap.add_argument(
        "--train_fractions",
        default="1",
        help="comma-separated shares of each split's training prompts to fit on (nested, the same "
        "held-out pairs): a learning curve over the amount of data, e.g. 0.25,0.5,0.75,1",
    )
    ap.add_argument("--max_length", type=int, default=192, help="tokens per conversation, as the preset")
    ap.add_argument(
        "--preset",
        default="",
        help="also train the lab's reward model from this preset YAML on every split (the baseline row)",
    )
    ap.add_argument(
        "--more_answers",
        default="",
        help="a second candidates JSONL of the same prompts: every head is also fitted with both files' "
        "answers ranked together, judged on the same held-out pairs of the first file's answers",
    )
    ap.add_argument("--out", default="runs/bench_rm_heads")
    args = ap.parse_args(argv)
    try:
        variants = [[int(x) for x in v.split(",")] for v in args.variants.split(";") if v.strip()]
        strengths = [float(x) for x in args.l2.split(",")]
        fractions = [float(x) for x in args.train_fractions.split(",")]
    except ValueError:
        ap.error(
            f"--variants {args.variants!r} / --l2 {args.l2!r} / --train_fractions {args.train_fractions!r}: "
            "expected lists of numbers"
        )
    if not variants or any(layer < 0 for v in variants for layer in v) or any(s < 0 for s in strengths):
        ap.error("--variants needs at least one list of layers ≥ 0 and --l2 strengths ≥ 0")
    if not all(0 < f <= 1 for f in fractions):
        ap.error(f"--train_fractions {args.train_fractions!r}: each share must be in (0, 1]")
    out = Path(args.out)
    cands = make_candidates(args)
    # With --more_answers the features cover both files' answers; the first file's keep their rows'
    # labels, so its pairs index the same features either way.
    both = (
        with_more_answers(cands, read_jsonl(args.more_answers), args.more_answers)
        if args.more_answers
        else None
    )
    all_cands = both or cands
    write_jsonl(out / "candidates.jsonl", all_cands)
    layers = sorted({layer for v in variants for layer in v})
    feats = layer_means(args.model, all_cands, layers, args.max_length)
    all_rows = pair_index(all_cands)
    rows = {key: all_rows[key] for key in pair_index(cands)}
    scorer = get_scorer(args.scorer)

    results: dict[str, list[float]] = {}
    for s in range(args.splits):
        seed = args.seed + s
        all_train, held_recs = split(simulate_pool(args, cands, scorer, seed), HELD_FRACTION, seed)
        held_pairs = gold_pairs(held_recs, rows, args.tie_threshold)
        sources = [("", all_train, rows)]
        if both:
            # split() draws the held-out prompts from the sorted prompt ids and the seed alone, so
            # both files hold out the same prompts.
            both_train, _ = split(simulate_pool(args, both, scorer, seed), HELD_FRACTION, seed)
            sources.append((f", {len(both[0]['candidates'])} answers a prompt", both_train, all_rows))
        for source, pool, pool_rows in sources:
            for fraction in fractions:
                train_recs = first_prompts(pool, fraction, seed)
                tag = source + ("" if fractions == [1.0] else f", {fraction:g} of the training prompts")
                train_pairs = strict_pairs(train_recs, pool_rows)
                train_rows = sorted({i for pair in train_pairs for i in pair})
                if args.preset:
                    scores = preset_scores(
                        args,
                        all_cands,
                        train_recs,
                        held_recs,
                        out / (f"split{s}_{fraction:g}" + ("_more" if source else "")),
                        seed,
                    )
                    results.setdefault("preset" + tag, []).append(accuracy(scores, held_pairs))
                for v in variants:
                    x = torch.cat([feats[layer] for layer in v], dim=1)
                    for lam in strengths:
                        w = fit_ridge_bt(x, train_rows, train_pairs, lam / len(v))
                        results.setdefault(_name(v, lam) + tag, []).append(
                            accuracy(standardise(x, train_rows) @ w, held_pairs)
                        )
        print(
            f"split {s}: {len({r['prompt_id'] for r in all_train})} training prompts, "
            f"{len(held_pairs)} held-out gold pairs; "
            + ", ".join(f"{k} {acc[-1]:.3f}" for k, acc in results.items()),
            flush=True,
        )
    print()
    print(table(results, args))
    (out / "results.json").write_text(json.dumps({"scorer": args.scorer, "accuracy": results}, indent=2))
    return 0


def _name(layers: list[int], lam: float) -> str:
    return f"layers {','.join(map(str, layers))}, λ {lam:g}"


@contextlib.contextmanager
def _first_layers(decoder: nn.Module, n: int):
    """The decoder runs only its first ``n`` layers and no final norm (raw states at every depth)."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers, decoder.norm = nn.ModuleList(list(layers)[:n]), nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


@torch.no_grad()
def layer_means(
    model_name: str, cands: list[dict], layers: list[int], max_length: int
) -> dict[int, torch.Tensor]:
    """``{layer: [N, H]}``: each candidate's mean state over its response tokens after ``layer``."""
    model, tok = load_policy(model_name)
    decoder = model.get_decoder().eval()
    if max(layers) > len(decoder.layers):
        raise SystemExit(f"--variants: layer {max(layers)} but the model has {len(decoder.layers)} layers")
    flat = [(r["prompt"], c) for r in cands for c in r["candidates"]]
    enc = encode_conversations(
        tok,
        [p for p, _ in flat],
        [c["text"] for _, c in flat],
        max_length,
        finished=[c.get("gen", {}).get("finished", True) for _, c in flat],
    )
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    step = 16
    with _first_layers(decoder, max(layers)), progress_bar(len(flat), "features", "answer") as bar:
        for s in range(0, len(flat), step):
            ids, mask = pad_right(enc.ids[s : s + step], tok.pad_token_id)
            starts = torch.tensor(enc.starts[s : s + step])
            response = mask.bool() & (torch.arange(ids.shape[1])[None] >= starts[:, None])
            hidden = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            w = response.to(torch.float32)[..., None]
            for layer in layers:
                out[layer].append((hidden[layer].float() * w).sum(1) / w.sum(1).clamp(min=1.0))
            bar.update(len(ids))
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def with_more_answers(cands: list[dict], more: list[dict], source: str) -> list[dict]:
    """Each prompt's candidates followed by ``more``'s answers to it, labelled on from the first
    file's last label (A–D then E–H); the two files must hold the same prompts."""
    extra = {r["prompt_id"]: r["candidates"] for r in more}
    if set(extra) != {r["prompt_id"] for r in cands}:
        raise SystemExit(f"--more_answers {source}: its prompts are not the same as --candidates'")
    merged = []
    for r in cands:
        answers = list(r["candidates"]) + extra[r["prompt_id"]]
        if len(answers) > len(ALL_LABELS):
            raise SystemExit(
                f"--more_answers {source}: {len(answers)} answers a prompt, at most {len(ALL_LABELS)}"
            )
        labelled = [{**c, "label": label} for c, label in zip(answers, ALL_LABELS)]
        merged.append({**r, "candidates": labelled})
    return merged


def first_prompts(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """The records of the first ``fraction`` of the prompts in an order drawn from ``seed``: nested,
    so a smaller share's prompts are all in a larger one's and a learning curve adds data only."""
    ids = sorted({r["prompt_id"] for r in records})
    random.Random(seed).shuffle(ids)
    keep = set(ids[: max(1, round(len(ids) * fraction))])
    return [r for r in records if r["prompt_id"] in keep]


def pair_index(cands: list[dict]) -> dict[tuple[str, str], int]:
    """(prompt id, candidate label) → the candidate's row in the features."""
    rows, i = {}, 0
    for r in cands:
        for c in r["candidates"]:
            rows[(r["prompt_id"], c["label"])] = i
            i += 1
    return rows


def strict_pairs(records: list[dict], rows: dict) -> list[tuple[int, int]]:
    """(better, worse) rows of every strict pair the rankings state (ties give no pair)."""
    pairs = []
    for r in records:
        tiers = r["tiers"]
        for t, tier in enumerate(tiers):
            for lower in tiers[t + 1 :]:
                pairs += [(rows[(r["prompt_id"], a)], rows[(r["prompt_id"], b)]) for a in tier for b in lower]
    return pairs


def gold_pairs(records: list[dict], rows: dict, tie_threshold: float) -> list[tuple[int, int]]:
    """(better, worse) rows of every held-out pair the gold scorer separates by more than the
    annotators' tie threshold, once per prompt (as bench_rm_learning.py's probe; ``rlhf rm eval``
    counts every pair the gold separates at all, so its figures cover a few more pairs)."""
    pairs, seen = [], set()
    for r in records:
        if r["prompt_id"] in seen:
            continue
        seen.add(r["prompt_id"])
        gold = r["gold"]
        for a in gold:
            for b in gold:
                if gold[a] - gold[b] > tie_threshold:
                    pairs.append((rows[(r["prompt_id"], a)], rows[(r["prompt_id"], b)]))
    return pairs


def standardise(x: torch.Tensor, train_rows: list[int]) -> torch.Tensor:
    """Every feature centred and scaled by its mean and deviation over the training candidates."""
    ref = x[train_rows]
    return (x - ref.mean(0)) / ref.std(0).clamp(min=1e-6)


def fit_ridge_bt(
    x: torch.Tensor, train_rows: list[int], pairs: list[tuple[int, int]], l2: float
) -> torch.Tensor:
    """The weights ``w`` minimising mean softplus(−(z_better − z_worse)·w) + l2·‖w‖² over ``pairs``,
    ``z`` the standardised features (convex: L-BFGS finds the one minimum from zero)."""
    z = standardise(x.double(), train_rows)
    idx = torch.tensor(pairs)
    diff = z[idx[:, 0]] - z[idx[:, 1]]
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = nn.functional.softplus(-(diff @ w)).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    return w.detach().to(x.dtype)


def accuracy(scores: torch.Tensor, pairs: list[tuple[int, int]]) -> float:
    """Share of ``(better, worse)`` pairs the scores order the same way (a tie counts as wrong)."""
    idx = torch.tensor(pairs)
    return float((scores[idx[:, 0]] > scores[idx[:, 1]]).double().mean())


def preset_scores(
    args, cands: list[dict], train_recs: list[dict], held_recs: list[dict], out: Path, seed: int
) -> torch.Tensor:
    """The lab's reward model from ``args.preset`` trained on ``train_recs`` (its own validation
    slice taken from them, ``held_recs`` its held-out rankings), scoring every candidate."""
    settings = {
        "rankings": str(write_jsonl(out / "train.jsonl", train_recs)),
        "eval_rankings": str(write_jsonl(out / "held.jsonl", held_recs)),
        "model": args.model,
        "seed": seed,
        "runs_dir": str(out),
        "experiment": "heads",
        "tracking": {"mode": "disabled"},
    }
    model_dir = run_rm_train(build_config(RMTrainConfig, args.preset, settings))["model_dir"]
    reward = load_reward_fn(str(model_dir))
    scores = []
    for r in cands:
        texts = [c["text"] for c in r["candidates"]]
        finished = [c.get("gen", {}).get("finished", True) for c in r["candidates"]]
        scores += list(reward([r["prompt"]] * len(texts), texts, finished))
    return torch.tensor(scores, dtype=torch.float32)


def table(results: dict[str, list[float]], args) -> str:
    """Mean accuracy over splits with its t interval, and the paired difference with the first row."""
    first = next(iter(results))
    lines = [
        f"| head (gold `{args.scorer}`, {args.splits} splits) | vs gold [95 % t] | − {first} [95 % t] |",
        "|---|---|---|",
    ]
    for name, acc in results.items():
        diff = [a - b for a, b in zip(acc, results[first])]
        paired = _fmt(t_interval(diff), signed=True) if name != first else "–"
        lines.append(f"| {name} | {_fmt(t_interval(acc))} | {paired} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
