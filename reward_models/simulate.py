"""Simulated annotators: rank candidates from a gold scorer plus a noise model.

Each simulated annotator has its own seed. For one prompt with gold scores ``s_1 … s_K``:

1. **Order** — Plackett–Luce sampling at temperature ``T``: add independent Gumbel noise to
   ``s_i / T`` and sort (the Gumbel-max trick draws a whole ranking whose every pair follows
   Bradley–Terry, ``P(i ≻ j) = σ((s_i - s_j) / T)``). ``T = 0`` ranks by gold score exactly.
2. **Ties** — walking down that order, a candidate joins the tier above when its gold score is
   within ``tie_threshold`` of the previous candidate's (so near-equal responses are tied the way
   a person would tie them, and a tier is never split by a clearly better response).

3. **Kind** (optional, per annotator, for benchmarks of annotator reliability): ``good`` as above;
   ``careless`` puts the candidates in random places of that ranking's tiers (a uniformly random
   ranking that ties at the same rate); ``adversarial`` reverses the tiers.

Output follows the rankings contract (docs/architecture.md) with two extra fields for evaluation:
``gold`` (the gold score per label) and ``gold_scorer`` (its spec), so reward-model evaluation can
measure agreement with the gold scorer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from rlhf.config import ConfigError, add_config_arguments, config_from_args, option
from rlhf.contracts import load_candidates, prompt_text
from rlhf.datafiles import write_jsonl
from rlhf.rankings import Ranking
from rlhf.scorers import get_scorer
from rlhf.tracking import RunFields, start_stage


@dataclass
class SimulateConfig(RunFields):
    candidates: str = option(
        "", help="candidates file (JSONL or dataset dir), e.g. the output of `rlhf generate`"
    )
    scorer: str = option(
        "vader", help="gold scorer spec: vader, length:target=N, keywords:good=a|b, module:function"
    )
    n_annotators: int = option(3, help="size of the simulated annotator pool (each has its own seed)")
    per_prompt: int = option(1, help="distinct annotators ranking each prompt (≤ n_annotators)")
    temperature: float = option(0.2, help="Bradley–Terry noise temperature on the gold scale (0 = noiseless)")
    tie_threshold: float = option(
        0.05, help="adjacent candidates whose gold scores differ by at most this are tied"
    )
    out: str = option("", help="output rankings JSONL (default: <run_dir>/rankings.jsonl)")
    seed: int = option(0, help="random seed")

    def validate(self) -> None:
        if not self.candidates:
            raise ConfigError("simulate: --candidates is required (a candidates JSONL file)")
        if self.n_annotators < 1:
            raise ConfigError(f"n_annotators must be ≥ 1, got {self.n_annotators}")
        if not 1 <= self.per_prompt <= self.n_annotators:
            raise ConfigError(
                f"per_prompt must be between 1 and n_annotators ({self.n_annotators}), got {self.per_prompt}"
            )
        if self.temperature < 0 or self.tie_threshold < 0:
            raise ConfigError("temperature and tie_threshold must be ≥ 0")


def sample_tiers(
    scores: Sequence[float], temperature: float, tie_threshold: float, rng: random.Random
) -> list[list[int]]:
    """One noisy ranking of candidates ``0..K-1`` as tiers (lists of indices), best first."""
    if temperature > 0:
        keys = [s / temperature - math.log(-math.log(rng.random() or 1e-300)) for s in scores]
    else:
        keys = list(scores)
    order = sorted(range(len(scores)), key=lambda i: (-keys[i], i))
    tiers: list[list[int]] = [[order[0]]]
    for prev, cur in zip(order, order[1:]):
        if abs(scores[cur] - scores[prev]) <= tie_threshold:
            tiers[-1].append(cur)
        else:
            tiers.append([cur])
    return tiers


ANNOTATOR_KINDS = ("good", "careless", "adversarial")


def annotate_as(kind: str, tiers: list[list[int]], rng: random.Random) -> list[list[int]]:
    """What an annotator of ``kind`` reports where a good one reports ``tiers`` (module docstring)."""
    if kind == "careless":
        shuffled = rng.sample([i for tier in tiers for i in tier], sum(len(tier) for tier in tiers))
        return [[shuffled.pop() for _ in tier] for tier in tiers]
    if kind == "adversarial":
        return tiers[::-1]
    return tiers


def pair_counts(records: Sequence[dict]) -> tuple[int, int]:
    """(candidate pairs, tied pairs) over every ranking record (each pair of each ranking once)."""
    n_pairs = sum(len(r["candidates"]) * (len(r["candidates"]) - 1) // 2 for r in records)
    n_ties = sum(sum(len(t) * (len(t) - 1) // 2 for t in r["tiers"]) for r in records)
    return n_pairs, n_ties


def gold_pair_agreement(records: Sequence[dict], tie_threshold: float) -> float:
    """Fraction of clearly different gold pairs (|Δ| > threshold) that the rankings order correctly."""
    agree = total = 0
    for rec in records:
        gold = rec["gold"]
        tier_of = {lab: t for t, tier in enumerate(rec["tiers"]) for lab in tier}
        labels = list(gold)
        for i, a in enumerate(labels):
            for b in labels[i + 1 :]:
                d = gold[a] - gold[b]
                if abs(d) <= tie_threshold:
                    continue
                total += 1
                agree += (tier_of[a] < tier_of[b]) if d > 0 else (tier_of[b] < tier_of[a])
    return agree / total if total else float("nan")


def simulate_rankings(
    candidates: Sequence[dict],
    scorer,
    n_annotators: int = 3,
    temperature: float = 0.2,
    tie_threshold: float = 0.05,
    seed: int = 0,
    per_prompt: int = 1,
    scorer_name: str | None = None,
    kinds: Sequence[str] | None = None,
) -> list[dict]:
    """Rank every candidates record with ``per_prompt`` simulated annotators (rankings contract).
    ``kinds``: each annotator's kind (:data:`ANNOTATOR_KINDS`; None: all good)."""
    if kinds is not None and (len(kinds) != n_annotators or set(kinds) - set(ANNOTATOR_KINDS)):
        raise ValueError(f"kinds must name one of {ANNOTATOR_KINDS} per annotator, got {list(kinds)!r}")

    # Score all responses in one call: scorers may batch (a reward model as gold, VADER is cheap).
    flat_prompts, flat_texts = [], []
    for rec in candidates:
        p = prompt_text(rec["prompt"])
        for c in rec["candidates"]:
            flat_prompts.append(p)
            flat_texts.append(c["text"])
    flat_scores = list(scorer(flat_prompts, flat_texts)) if flat_texts else []
    name = scorer_name or getattr(scorer, "name", str(scorer))
    rngs = [random.Random(f"{seed}:{a}") for a in range(n_annotators)]
    pick = random.Random(f"{seed}:assign")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out, pos = [], 0
    for rec in candidates:
        labels = [c["label"] for c in rec["candidates"]]
        scores = flat_scores[pos : pos + len(labels)]
        pos += len(labels)
        for a in sorted(pick.sample(range(n_annotators), per_prompt)):
            tiers = sample_tiers(scores, temperature, tie_threshold, rngs[a])
            if kinds is not None:
                tiers = annotate_as(kinds[a], tiers, rngs[a])
            ranking = Ranking.from_tiers([[labels[i] for i in tier] for tier in tiers], labels)
            out.append(
                {
                    "prompt_id": rec["prompt_id"],
                    "prompt": rec["prompt"],
                    "candidates": rec["candidates"],
                    "ranking": str(ranking),
                    "tiers": [list(t) for t in ranking.tiers],
                    "annotator": f"sim-{a}",
                    "flags": ["all_tied"] if ranking.all_tied else [],
                    "created_at": now,
                    "gold": {lab: float(s) for lab, s in zip(labels, scores)},
                    "gold_scorer": name,
                }
            )
    return out


def run_simulate(cfg: SimulateConfig) -> dict:
    """Load candidates, rank them with simulated annotators, write the rankings contract."""

    cfg.validate()
    candidates = load_candidates(cfg.candidates)
    scorer = get_scorer(cfg.scorer)
    tracker = start_stage(cfg, "simulate")
    try:
        tracker.use_artifact(cfg.candidates, "candidates", "dataset")
        records = simulate_rankings(
            candidates,
            scorer,
            cfg.n_annotators,
            cfg.temperature,
            cfg.tie_threshold,
            cfg.seed,
            cfg.per_prompt,
            scorer_name=cfg.scorer,
        )
        out = cfg.out or str(tracker.run_dir / "rankings.jsonl")
        write_jsonl(out, records)
        n_pairs, n_ties = pair_counts(records)
        stats = {
            "simulate/rankings": len(records),
            "simulate/prompts": len(candidates),
            "simulate/tie_rate": n_ties / n_pairs if n_pairs else 0.0,
            "simulate/all_tied": sum(1 for r in records if "all_tied" in r["flags"]),
            "simulate/gold_agreement": gold_pair_agreement(records, cfg.tie_threshold),
        }
        tracker.log(stats, step=0)
        tracker.summary(stats)
        tracker.log_artifact(
            out, f"{cfg.experiment}-rankings", "dataset", metadata={"scorer": cfg.scorer, **stats}
        )
    finally:
        tracker.finish()
    print(
        f"simulate: {stats['simulate/rankings']} rankings of {stats['simulate/prompts']} prompts by "
        f"{cfg.n_annotators} simulated annotators ({cfg.scorer}); tie rate {stats['simulate/tie_rate']:.2f}, "
        f"agreement with gold {stats['simulate/gold_agreement']:.3f} → {out}"
    )
    return {"run_dir": str(tracker.run_dir), "rankings": out, **stats}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "simulate",
        help="rank candidates with simulated annotators (gold scorer + noise)",
        description=__doc__.split("\n\n")[0] + "\n\nWrites the rankings contract (JSONL).",
    )
    add_config_arguments(p, SimulateConfig)
    p.set_defaults(func=lambda args: run_simulate(config_from_args(args, SimulateConfig)) and 0)
    return p
