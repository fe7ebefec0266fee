"""Which head on frozen features learns the preference: one layer's mean, or several layers' means?

The shipped reward model reads the mean of the 8th layer's states over the response and trains a
linear head with Adam (``configs/rm_smollm2.yaml``). Over the quickstart's candidates the features
stay fixed, so a linear head is a convex problem that can be solved exactly. This benchmark asks
what a different *feature set* and an exactly solved, regularised head would gain, before the lab's
commands are changed to offer it:

- features: the mean over the response tokens (EOS included when the response ended, formatted
  exactly as the reward model formats it) of the states after a layer (0 = the token embeddings),
  raw (no final norm); a *variant* (``--variants``) concatenates blocks of features, joined by
  ``+``: ``0,2,4`` (those layers' means), ``max:8`` / ``std:8`` / ``last:8`` (the response's
  per-feature maximum, standard deviation, or the last token's state after layer 8), ``words``
  (a bag of words: each vocabulary token's share of the response, over the tokens in at least
  three answers) and ``length`` (the response's token count, unpenalised and kept in the reward);
- head: Bradley–Terry on every strict pair of the simulated annotators' rankings, features
  standardised on the training candidates, an L2 penalty ``λ/k · ‖w‖²`` (``k`` penalised blocks
  concatenated, a layer or the bag of words each, so λ means the same per block), solved by L-BFGS:
  no initialisation, data order or validation slice to be lucky with;
- splits: ``--splits`` draws of the simulated annotators and of the held-out quarter of the prompts
  (the seed moves both); accuracy against the gold on every held-out pair it separates by more
  than the tie threshold (the annotators' own ties), then the
  mean over splits with a 95 % Student-t interval, and each row paired with the first;
- length: how much more the reward correlates with the response's token count than the gold does,
  over the held-out answers (Pearson; the ``rlhf rm eval`` measure, in tokens).

``--preset CONFIG`` also trains the lab's own reward model (``rlhf rm train``) on every split and
scores it on the same pairs: the first row, the one every variant is paired with.
``--preset_overrides`` adds rows of the same preset with fields changed (``loss=rao_kupper``), each
trained on the same rankings: how a change to the preset does over splits, not on one draw.

    .venv/bin/python -m experiments.benchmarks.bench_rm_heads --candidates runs/quickstart/generate/candidates.jsonl --scorer vader --preset experiments/configs/rm_smollm2.yaml
    .venv/bin/python -m experiments.benchmarks.bench_rm_heads --candidates FILE --variants "8;0,2,4,6,8" --l2 1,10
    .venv/bin/python -m experiments.benchmarks.bench_rm_heads --candidates FILE --variants "8;0,2,4,6,8" --l2 10 --train_fractions 0.25,0.5,0.75,1
    .venv/bin/python -m experiments.benchmarks.bench_rm_heads --candidates FILE --variants "0,2,4,6,8;0,2,4,6,8+max:0,2,4,6,8;0,2,4,6,8+words;0,2,4,6,8+length" --l2 10

``--rbf GAMMA:LAMBDA,...`` adds nonlinear heads on the first variant's features: Bradley–Terry with a
Gaussian kernel, ``exp(−‖z − z'‖² / (γ · median))`` (the median squared distance between training
candidates), fitted over the training candidates by the representer theorem with the penalty
``λ · aᵀKa``. ``--length_discount`` (with ``--per_prompt 2``: two annotators rank every prompt) adds,
for every linear head, the same head with its length lean discounted without the gold: the two
annotators' agreement is the labels' reliability, Spearman's correction for attenuation turns the
head's out-of-fold agreement with the labels into an estimate ρ of its agreement with what the
annotators follow, and a straight line in the token count is subtracted until the head's length
correlation over the training answers is ``ρ`` times what it was, the best predictor's relation
``corr(r, L) = corr(g, L) / corr(r, g)`` run backwards (docs/reward-models.md).

    .venv/bin/python -m experiments.benchmarks.bench_rm_heads --candidates FILE --variants "0,2,4,6,8" --l2 1,10 --rbf 2:1e-4,4:1e-4 --per_prompt 2 --length_discount

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
import math
import os
import random
import sys
from dataclasses import dataclass
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
from reward_models.length_discount import (  # noqa: E402
    attenuation_corrected_agreement,
    discount_for_correlation,
)
from reward_models.length_lean import (  # noqa: E402
    gold_length_corr,
    joint_moments_by_prompt,
    length_corr_beyond,
    reward_length_corr,
)
from reward_models.train import RMTrainConfig, run_rm_train  # noqa: E402
from rlhf.cli import progress_bar  # noqa: E402
from rlhf.config import build_config, parse_overrides  # noqa: E402
from rlhf.datafiles import read_jsonl  # noqa: E402
from rlhf.models import load_policy  # noqa: E402
from rlhf.rankings import ALL_LABELS  # noqa: E402
from rlhf.reward_model import encode_conversations, pad_right  # noqa: E402
from rlhf.rewards import load_reward_fn  # noqa: E402
from rlhf.scorers import get_scorer  # noqa: E402

HELD_FRACTION = 0.25  # as bench_rm_learning.py
POOLS = ("mean", "max", "std", "last")  # what a layer's block reads of the response's states
WORDS_MIN_ANSWERS = 3  # the bag of words counts the vocabulary tokens used in at least this many answers


@dataclass(frozen=True)
class Block:
    """One block of a variant's features: a pool of a layer's states, ``words`` or ``length``."""

    kind: str
    layer: int = -1

    @property
    def penalised(self) -> bool:
        return self.kind != "length"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap, per_prompt=1)  # one ranking per prompt, as in the quickstart
    ap.add_argument(
        "--variants",
        default="8;0,2,4,6,8;0,4,8,12,16;0,2,4,6,8,10,12,14,16,20",
        help="semicolon-separated feature sets, each blocks joined by +: a comma-separated list of layers "
        "whose response means are concatenated (0: the embeddings), max:/std:/last: and layers for "
        "another pool, words (bag of words) or length (token count, unpenalised); the first set is "
        "the one the others are paired with",
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
        "--preset_overrides",
        default="",
        help="with --preset: semicolon-separated sets of field=value overrides (space-separated within a "
        "set), each trained on every split as one more row, e.g. 'loss=rao_kupper;loss=plackett_luce'",
    )
    ap.add_argument(
        "--more_answers",
        default="",
        help="a second candidates JSONL of the same prompts: every head is also fitted with both files' "
        "answers ranked together, judged on the same held-out pairs of the first file's answers",
    )
    ap.add_argument(
        "--rbf",
        default="",
        help="comma-separated GAMMA:LAMBDA pairs: Gaussian-kernel heads on the first variant's features, "
        "bandwidth γ × the median squared distance, penalty λ·aᵀKa (e.g. 2:1e-4,4:1e-4)",
    )
    ap.add_argument(
        "--length_discount",
        action="store_true",
        help="also every linear head with its length lean discounted by the attenuation-corrected "
        "agreement with the annotators (needs --per_prompt 2 or more)",
    )
    ap.add_argument("--out", default="runs/bench_rm_heads")
    args = ap.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants.split(";") if v.strip()]
        strengths = [float(x) for x in args.l2.split(",")]
        fractions = [float(x) for x in args.train_fractions.split(",")]
    except ValueError as e:
        ap.error(
            f"--variants {args.variants!r} / --l2 {args.l2!r} / --train_fractions {args.train_fractions!r}: "
            f"{e}"
        )
    if (
        not variants
        or any(b.kind in POOLS and b.layer < 0 for v in variants for b in v)
        or any(s < 0 for s in strengths)
    ):
        ap.error("--variants needs at least one feature set, its layers ≥ 0, and --l2 strengths ≥ 0")
    try:
        kernels = [tuple(float(v) for v in pair.split(":")) for pair in args.rbf.split(",") if pair.strip()]
    except ValueError:
        kernels = [()]
    if any(len(k) != 2 or min(k) <= 0 for k in kernels):
        ap.error(f"--rbf {args.rbf!r}: comma-separated GAMMA:LAMBDA pairs, both > 0, e.g. 2:1e-4")
    if args.length_discount and (args.per_prompt or args.annotators) < 2:
        ap.error("--length_discount needs two annotators a prompt: --per_prompt 2 (and --annotators ≥ 2)")
    if args.preset_overrides.strip() and not args.preset:
        ap.error("--preset_overrides needs --preset, the YAML they change")
    # the lab's reward models trained on every split: the preset, then one per set of overrides
    presets = [("preset", [])] if args.preset else []
    presets += [(f"preset, {o.strip()}", o.split()) for o in args.preset_overrides.split(";") if o.strip()]
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
    feats = block_features(args.model, all_cands, {b for v in variants for b in v}, args.max_length)
    all_rows = pair_index(all_cands)
    rows = {key: all_rows[key] for key in pair_index(cands)}
    scorer = get_scorer(args.scorer)

    results: dict[str, list[float]] = {}
    leans: dict[str, list[tuple[float, float]]] = {}  # (length corr − gold's, beyond the accuracy)
    for s in range(args.splits):
        seed = args.seed + s
        all_train, held_recs = split(simulate_pool(args, cands, scorer, seed), HELD_FRACTION, seed)
        held_pairs = gold_pairs(held_recs, rows, args.tie_threshold)
        held_rows, held_gold = held_answers(held_recs, rows)
        held_lengths = feats[Block("length")][held_rows, 0]
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
                for p, (name, overrides) in enumerate(presets):
                    scores = preset_scores(
                        args,
                        all_cands,
                        train_recs,
                        held_recs,
                        out / (f"split{s}_{fraction:g}_preset{p}" + ("_more" if source else "")),
                        seed,
                        overrides,
                    )
                    results.setdefault(name + tag, []).append(accuracy(scores, held_pairs))
                    leans.setdefault(name + tag, []).append(
                        length_leans(scores[held_rows], held_gold, held_lengths)
                    )
                heads = fit_heads(
                    args, feats, variants, strengths, kernels, train_recs, pool_rows, train_pairs, seed
                )
                for name, scores in heads:
                    name += tag
                    results.setdefault(name, []).append(accuracy(scores, held_pairs))
                    leans.setdefault(name, []).append(
                        length_leans(scores[held_rows], held_gold, held_lengths)
                    )
        print(
            f"split {s}: {len({r['prompt_id'] for r in all_train})} training prompts, "
            f"{len(held_pairs)} held-out gold pairs; "
            + ", ".join(f"{k} {acc[-1]:.3f}" for k, acc in results.items()),
            flush=True,
        )
    print()
    print(table(results, leans, args))
    (out / "results.json").write_text(
        json.dumps(
            {
                "scorer": args.scorer,
                "accuracy": results,
                "length_corr_excess": {k: [e for e, _ in v] for k, v in leans.items()},
                "length_corr_beyond": {k: [b for _, b in v] for k, v in leans.items()},
            },
            indent=2,
        )
    )
    return 0


def parse_variant(text: str) -> list[Block]:
    """``"0,2,4+max:8+length"`` → its blocks (module docstring); ValueError names what is wrong."""
    blocks = []
    for part in text.strip().split("+"):
        part = part.strip()
        if part in ("words", "length"):
            blocks.append(Block(part))
            continue
        pool, _, layers = part.rpartition(":")
        pool = pool or "mean"
        if pool not in POOLS:
            raise ValueError(f"{part!r}: a block is layers, {'/'.join(POOLS[1:])}:layers, words or length")
        blocks += [Block(pool, int(x)) for x in layers.split(",")]
    if len(set(blocks)) != len(blocks) or sum(b.kind == "length" for b in blocks) > 1:
        raise ValueError(f"{text!r} names a block twice")
    return blocks


def fit_heads(args, feats, variants, strengths, kernels, train_recs, rows, train_pairs, seed):
    """Every head the options ask for, fitted on one split's training rankings: (row name, every
    candidate's score). Each variant at each λ; with ``--length_discount`` each of those discounted;
    with ``--rbf`` the kernel heads on the first variant's features."""
    train_rows = sorted({i for pair in train_pairs for i in pair})
    lengths = feats[Block("length")][:, 0].double()
    heads = []
    for v in variants:
        x, free = variant_matrix(feats, v)
        penalised = sum(b.penalised for b in v)
        for lam in strengths:
            l2 = lam / max(penalised, 1)
            scores = standardise(x, train_rows) @ fit_ridge_bt(x, train_rows, train_pairs, l2, free)
            heads.append((_name(v, lam), scores))
            if args.length_discount:
                rho = rho_from_records(
                    out_of_fold_scores(x, train_recs, rows, l2, free, seed), train_recs, rows
                )
                discounted = length_discounted(scores.double(), lengths, train_rows, rho)
                heads.append((_name(v, lam) + ", length discounted", discounted))
    if kernels:
        z = standardise(variant_matrix(feats, variants[0])[0].double(), train_rows)
        for gamma, lam in kernels:
            scores = fit_rbf_bt(z, train_rows, train_pairs, gamma, lam)
            heads.append((f"RBF kernel on {_features_name(variants[0])}, γ {gamma:g}, λ {lam:g}", scores))
    return heads


def _name(blocks: list[Block], lam: float) -> str:
    """``layers 0,2 + max 8,4 + words, λ 10``: the features' name and the penalty."""
    return f"{_features_name(blocks)}, λ {lam:g}"


def _features_name(blocks: list[Block]) -> str:
    """``layers 0,2 + max 0,2 + words``: each kind once, its layers together, in order."""
    layers: dict[str, list[str]] = {}
    for b in blocks:
        layers.setdefault(b.kind, []).extend([] if b.layer < 0 else [str(b.layer)])
    parts = [
        ("layers" if kind == "mean" else kind) + (" " + ",".join(ls) if ls else "")
        for kind, ls in layers.items()
    ]
    return " + ".join(parts)


def variant_matrix(feats: dict[Block, torch.Tensor], blocks: list[Block]) -> tuple[torch.Tensor, int]:
    """The variant's features side by side, the unpenalised length column last, and how many
    columns the penalty covers (those before it)."""
    ordered = [b for b in blocks if b.penalised] + [b for b in blocks if not b.penalised]
    x = torch.cat([feats[b] for b in ordered], dim=1)
    return x, sum(feats[b].shape[1] for b in ordered if b.penalised)


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
def block_features(
    model_name: str, cands: list[dict], blocks: set[Block], max_length: int
) -> dict[Block, torch.Tensor]:
    """``{block: [N, width]}`` for every candidate (module docstring), and always ``Block("length")``
    (the response's token count, EOS included), which the length figure reads."""
    model, tok = load_policy(model_name)
    decoder = model.get_decoder().eval()
    layers = sorted({b.layer for b in blocks if b.kind in POOLS})
    if layers and max(layers) > len(decoder.layers):
        raise SystemExit(f"--variants: layer {max(layers)} but the model has {len(decoder.layers)} layers")
    flat = [(r["prompt"], c) for r in cands for c in r["candidates"]]
    enc = encode_conversations(
        tok,
        [p for p, _ in flat],
        [c["text"] for _, c in flat],
        max_length,
        finished=[c.get("gen", {}).get("finished", True) for _, c in flat],
    )
    responses = [ids[start:] for ids, start in zip(enc.ids, enc.starts)]
    out = {Block("length"): torch.tensor([[float(len(r))] for r in responses])}
    if Block("words") in blocks:
        out[Block("words")] = bag_of_words(responses, WORDS_MIN_ANSWERS)
    pooled = sorted((b for b in blocks if b.kind in POOLS), key=lambda b: (b.kind, b.layer))
    if not pooled:
        return out
    parts: dict[Block, list[torch.Tensor]] = {b: [] for b in pooled}
    step = 16
    with _first_layers(decoder, max(layers)), progress_bar(len(flat), "features", "answer") as bar:
        for s in range(0, len(flat), step):
            ids, mask = pad_right(enc.ids[s : s + step], tok.pad_token_id)
            starts = torch.tensor(enc.starts[s : s + step])
            response = mask.bool() & (torch.arange(ids.shape[1])[None] >= starts[:, None])
            hidden = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for b in pooled:
                parts[b].append(pool_states(hidden[b.layer].float(), response, b.kind))
            bar.update(len(ids))
    return out | {b: torch.cat(p) for b, p in parts.items()}


def pool_states(states: torch.Tensor, response: torch.Tensor, kind: str) -> torch.Tensor:
    """``[B, T, H]`` states read over each row's response tokens (``response [B, T]`` bool) → ``[B, H]``."""
    w = response.to(states.dtype)[..., None]
    n = w.sum(1).clamp(min=1.0)
    mean = (states * w).sum(1) / n
    if kind == "mean":
        return mean
    if kind == "max":
        return states.masked_fill(~response[..., None], float("-inf")).amax(1)
    if kind == "std":
        return (((states - mean[:, None]) ** 2 * w).sum(1) / n).sqrt()
    last = response.shape[1] - 1 - response.flip(1).long().argmax(1)  # each row's last response token
    return states[torch.arange(states.shape[0]), last]


def bag_of_words(responses: list[list[int]], min_answers: int) -> torch.Tensor:
    """``[N, V']``: each token's share of each response, over the V' tokens used in ≥ ``min_answers``
    answers (rarer ones could only be memorised)."""
    used: dict[int, int] = {}
    for ids in responses:
        for t in set(ids):
            used[t] = used.get(t, 0) + 1
    column = {t: i for i, t in enumerate(sorted(t for t, n in used.items() if n >= min_answers))}
    x = torch.zeros(len(responses), len(column))
    for row, ids in enumerate(responses):
        for t in ids:
            if t in column:
                x[row, column[t]] += 1.0 / len(ids)
    return x


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
    x: torch.Tensor,
    train_rows: list[int],
    pairs: list[tuple[int, int]],
    l2: float,
    free_from: int | None = None,
) -> torch.Tensor:
    """The weights ``w`` minimising mean softplus(−(z_better − z_worse)·w) + l2·‖w‖² over ``pairs``,
    ``z`` the standardised features (convex: L-BFGS finds the one minimum from zero). Columns from
    ``free_from`` on are not penalised."""
    z = standardise(x.double(), train_rows)
    idx = torch.tensor(pairs)
    diff = z[idx[:, 0]] - z[idx[:, 1]]
    penalised = torch.ones(z.shape[1], dtype=torch.float64)
    penalised[z.shape[1] if free_from is None else free_from :] = 0
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = nn.functional.softplus(-(diff @ w)).mean() + l2 * (w.pow(2) * penalised).sum()
        loss.backward()
        return loss

    opt.step(objective)
    return w.detach().to(x.dtype)


def fit_rbf_bt(
    z: torch.Tensor, train_rows: list[int], pairs: list[tuple[int, int]], gamma: float, lam: float
):
    """Every candidate's score under the Bradley–Terry head with a Gaussian kernel over the standardised
    features ``z``: ``f = K a`` over the training candidates, ``a`` minimising mean softplus(−(f_better −
    f_worse)) + λ · aᵀKa (convex; the representer theorem puts the minimum in that span)."""
    train = z[train_rows]
    position = {row: i for i, row in enumerate(train_rows)}
    idx = torch.tensor([(position[a], position[b]) for a, b in pairs])
    d2 = torch.cdist(train, train).pow(2)
    width = gamma * d2.median()
    kernel = torch.exp(-d2 / width)
    a = torch.zeros(len(train_rows), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        f = kernel @ a
        loss = nn.functional.softplus(-(f[idx[:, 0]] - f[idx[:, 1]])).mean() + lam * (a @ f)
        loss.backward()
        return loss

    opt.step(objective)
    return torch.exp(-torch.cdist(z, train).pow(2) / width) @ a.detach()


def out_of_fold_scores(
    x: torch.Tensor, records: list[dict], rows: dict, l2: float, free: int, seed: int, folds: int = 5
) -> torch.Tensor:
    """Each training candidate scored by the linear head fitted without its prompt's fold."""
    prompts = sorted({r["prompt_id"] for r in records})
    rng = random.Random(seed)
    fold = {p: rng.randrange(folds) for p in prompts}
    scores = torch.zeros(len(x), dtype=torch.float64)
    for f in range(folds):
        fit_recs = [r for r in records if fold[r["prompt_id"]] != f]
        pairs = strict_pairs(fit_recs, rows)
        fit_rows = sorted({i for pair in pairs for i in pair})
        w = fit_ridge_bt(x, fit_rows, pairs, l2, free)
        own = sorted(
            {
                rows[(r["prompt_id"], label)]
                for r in records
                if fold[r["prompt_id"]] == f
                for label in r["gold"]
            }
        )
        scores[own] = standardise(x.double(), fit_rows)[own] @ w.double()
    return scores


def rho_from_records(scores: torch.Tensor, records: list[dict], rows: dict) -> float:
    """ρ from every prompt's rankings and its candidates' (out-of-fold) scores, as ``length_discount:
    attenuation`` estimates it (:func:`reward_models.length_discount.attenuation_corrected_agreement`)."""
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    rankings, prompt_scores = [], []
    for pid, recs in by_prompt.items():
        ranked = {label for r in recs for members in r["tiers"] for label in members}
        labels = sorted(ranked, key=lambda label: rows[(pid, label)])
        tiers = [{label: t for t, members in enumerate(r["tiers"]) for label in members} for r in recs]
        rankings.append([[t.get(label, -1) for label in labels] for t in tiers])
        prompt_scores.append(scores[[rows[(pid, label)] for label in labels]])
    return attenuation_corrected_agreement(rankings, prompt_scores)[0]


def length_discounted(scores: torch.Tensor, lengths: torch.Tensor, train_rows: list[int], rho: float):
    """``scores − β · (lengths − their training mean)``, β as ``length_discount: attenuation`` finds it
    (:func:`reward_models.length_discount.discount_for_correlation`) but along the token count itself."""
    centred = lengths - lengths[train_rows].mean()
    beta = discount_for_correlation(scores[train_rows], lengths[train_rows], centred[train_rows], rho)[0]
    return scores - beta * centred


def held_answers(records: list[dict], rows: dict) -> tuple[list[int], torch.Tensor]:
    """The rows of every held-out prompt's answers (each prompt once) and their gold scores."""
    by_prompt = {r["prompt_id"]: r for r in records}
    keys = [(pid, label) for pid, r in by_prompt.items() for label in sorted(r["gold"])]
    gold = torch.tensor([by_prompt[pid]["gold"][label] for pid, label in keys], dtype=torch.float64)
    return [rows[key] for key in keys], gold


def length_leans(scores: torch.Tensor, gold: torch.Tensor, lengths: torch.Tensor) -> tuple[float, float]:
    """Over the held-out answers pooled: the reward's length correlation minus the gold's, and
    minus the one its agreement with the gold explains (``reward_models.length_lean``)."""
    m = joint_moments_by_prompt(
        scores[None], gold[None], lengths[None], torch.ones(1, len(scores), dtype=torch.bool)
    )
    return reward_length_corr(m) - gold_length_corr(m), length_corr_beyond(m)


def accuracy(scores: torch.Tensor, pairs: list[tuple[int, int]]) -> float:
    """Share of ``(better, worse)`` pairs the scores order the same way (a tie counts as wrong)."""
    idx = torch.tensor(pairs)
    return float((scores[idx[:, 0]] > scores[idx[:, 1]]).double().mean())


def preset_scores(
    args,
    cands: list[dict],
    train_recs: list[dict],
    held_recs: list[dict],
    out: Path,
    seed: int,
    overrides: list[str],
) -> torch.Tensor:
    """The lab's reward model from ``args.preset`` with ``overrides`` (``field=value``) trained on
    ``train_recs`` (its own validation slice taken from them, ``held_recs`` its held-out rankings),
    scoring every candidate."""
    settings = {
        **parse_overrides(overrides),
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


def table(results: dict[str, list[float]], leans: dict[str, list[tuple[float, float]]], args) -> str:
    """Mean accuracy over splits with its t interval, the paired difference with the first row, and
    the reward's length correlation above the gold's and above what its accuracy explains."""
    first = next(iter(results))
    lines = [
        f"| head (gold `{args.scorer}`, {args.splits} splits) | vs gold [95 % t] | − {first} [95 % t] "
        "| length corr − gold's [95 % t] | − explained by accuracy [95 % t] |",
        "|---|---|---|---|---|",
    ]
    for name, acc in results.items():
        diff = [a - b for a, b in zip(acc, results[first])]
        paired = _fmt(t_interval(diff), signed=True) if name != first else "–"
        excess, beyond = ([lean[i] for lean in leans[name]] for i in (0, 1))
        # no reference where the reward agrees with the gold less than length alone (length_lean)
        explained = _fmt(t_interval(beyond), signed=True) if not any(map(math.isnan, beyond)) else "–"
        lines.append(
            f"| {name} | {_fmt(t_interval(acc))} | {paired} | {_fmt(t_interval(excess), signed=True)} "
            f"| {explained} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
