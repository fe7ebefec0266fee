"""Synthetic rankings in the rankings contract, for reward-model tests (no other stage needed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

FILLER = ["the", "soup", "was", "today", "and", "my", "cat", "said", "it", "really", "very", "honestly"]
WORDS = {"great": 1.0, "fine": 0.0, "awful": -1.0}


def tiers_from_scores(labels: list[str], scores: list[float]) -> list[list[str]]:
    """Best-first tiers; equal scores share a tier."""
    out: list[list[str]] = []
    last = None
    for lab, s in sorted(zip(labels, scores), key=lambda x: -x[1]):
        if last is not None and s == last:
            out[-1].append(lab)
        else:
            out.append([lab])
        last = s
    return [sorted(t) for t in out]


def make_records(n_prompts: int, k: int = 4, seed: int = 0, flip: float = 0.0) -> list[dict]:
    """Rankings whose gold is the sentiment word each response contains (great > fine > awful).

    ``flip``: probability that an annotator swaps two adjacent tiers (label noise).
    """
    rng = random.Random(seed)
    labels = [chr(65 + i) for i in range(k)]
    out = []
    for p in range(n_prompts):
        cands, gold = [], {}
        for lab in labels:
            word = rng.choice(list(WORDS))
            # the deciding word ends the response: easy for a 2-layer model to learn in seconds
            words = rng.sample(FILLER, rng.randint(2, 5)) + [word]
            cands.append({"label": lab, "text": " ".join(words)})
            gold[lab] = WORDS[word]
        tiers = tiers_from_scores(labels, [gold[lab] for lab in labels])
        if flip and len(tiers) > 1 and rng.random() < flip:
            i = rng.randrange(len(tiers) - 1)
            tiers[i], tiers[i + 1] = tiers[i + 1], tiers[i]
        out.append(
            {
                "prompt_id": f"p{p}",
                "prompt": f"Tell me about soup number {p}.",
                "candidates": cands,
                "ranking": " > ".join(" = ".join(t) for t in tiers),
                "tiers": tiers,
                "annotator": "sim-0",
                "flags": ["all_tied"] if len(tiers) == 1 else [],
                "created_at": "2026-01-01T00:00:00+00:00",
                "gold": gold,
                "gold_scorer": "keywords:good=great,bad=awful",
            }
        )
    return out


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
