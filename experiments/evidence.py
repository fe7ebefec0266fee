"""Did the rankings make the policy better? The figures of a pipeline run, each with its interval,
its reference (chance, the annotators' ceiling) and a verdict.

:func:`learning_evidence` reads the stage results of an experiment (``rm_eval``, ``ppo``, ``eval``,
``arena``, as in ``experiment_summary.json``) and returns the claims the lab can make, each as

    {"claim": ..., "value": v, "ci": [low, high], "reference": r, "verdict": "yes" | "no" | "unclear"}

A verdict is ``yes`` when the whole 95 % interval lies on the better side of the reference, ``no``
when it lies on the other side, and ``unclear`` when the interval contains it: an interval that
straddles chance is not evidence either way. :func:`evidence_lines` renders them for people.
"""

from __future__ import annotations

import math
from typing import Any

from rlhf.rewards import names_a_path


def _verdict(low: float | None, high: float | None, reference: float) -> str:
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "unclear"
    if low > reference:
        return "yes"
    if high < reference:
        return "no"
    return "unclear"


def _claim(stage: dict, key: str, claim: str, reference: float, note: str = "") -> dict[str, Any] | None:
    value = stage.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    low, high = stage.get(key + "_ci_low"), stage.get(key + "_ci_high")
    return {
        "claim": claim,
        "key": key,
        "value": float(value),
        "ci": [low, high],
        "reference": reference,
        "note": note,
        "verdict": _verdict(low, high, reference),
    }


def learning_evidence(stages: dict[str, dict]) -> list[dict[str, Any]]:
    """The claims supported (or not) by a run's ``rm_eval``, ``ppo`` and ``eval`` results."""
    rm, ppo, ev = stages.get("rm_eval", {}), stages.get("ppo", {}), stages.get("eval", {})
    ceiling = rm.get("eval/annotator_gold_accuracy")
    claims = [
        _claim(
            rm,
            "eval/gold_pair_accuracy",
            "the reward model learned the preference the annotators follow (held-out gold pair accuracy)",
            0.5,
            f"chance 0.5; the annotators themselves {ceiling:.3f}" if ceiling is not None else "chance 0.5",
        ),
        _claim(
            rm, "eval/pair_accuracy", "the reward model agrees with held-out annotators (pair accuracy)", 0.5
        ),
        _claim(rm, "eval/kendall_tau", "the reward model ranks like held-out annotators (Kendall τ-b)", 0.0),
        _claim(
            ppo,
            "ppo/score_gain",
            "PPO raised its training reward (rollouts of the last quarter of updates minus the first)",
            0.0,
        ),
        _claim(ev, "eval/score_diff", "PPO beat SFT on the reward model (held-out score difference)", 0.0),
        _claim(
            ev, "eval/gold_win_rate", "PPO beat SFT on the gold scorer (held-out win rate)", 0.5, "chance 0.5"
        ),
        _claim(ev, "eval/gold_score_diff", "PPO raised the gold score over SFT (held-out difference)", 0.0),
    ]
    claims += arena_claims(stages.get("arena", {}))
    return [c for c in claims if c is not None]


# the note of an arena claim that stands on the raw win rate (arena_rate)
RAW_NOTE = (
    "chance 0.5; not length-controlled: the answers' lengths barely overlap, so length cannot be held equal"
)


def arena_claims(arena: dict) -> list[dict[str, Any] | None]:
    """One claim per arena voter and policy measured against the baseline: its length-controlled
    win rate (``arena/<voter>/<model>/lc_win_rate``, :mod:`experiments.arena`). Where that rate
    is an extrapolation (the two sides' lengths barely overlap: ``.../lc_extrapolated``) the votes
    cannot say what they would have been at equal length, and the claim is the raw win rate's,
    saying so."""
    baseline = arena.get("arena/baseline", "the baseline")
    claims = []
    for key, voter, model in arena_win_rates(arena):
        rate_key, raw = arena_rate(arena, key)
        judged = f"{model} beat {baseline} in the blind arena, judged by {voter_words(voter)}"
        kind, note = ("raw win rate", RAW_NOTE) if raw else ("length-controlled win rate", "chance 0.5")
        claims.append(_claim(arena, rate_key, f"{judged} ({kind})", 0.5, note))
    return claims


def arena_rate(arena: dict, lc_key: str) -> tuple[str, bool]:
    """The win rate a voter's arena claim stands on: ``(key, raw)``. The length-controlled rate
    under ``lc_key``, unless it lies beyond the votes (``.../lc_extrapolated``); then the raw one."""
    stem = lc_key.removesuffix("lc_win_rate")
    if arena.get(stem + "lc_extrapolated"):
        return stem + "win_rate", True
    return lc_key, False


def arena_win_rates(arena: dict) -> list[tuple[str, str, str]]:
    """``(key, voter, model)`` of every length-controlled win rate an arena stage reported
    (``arena/<voter>/<model>/lc_win_rate``; a voter may contain slashes, a model name does not)."""
    out = []
    for key in arena:
        if key.startswith("arena/") and key.endswith("/lc_win_rate"):
            voter, model = key[len("arena/") : -len("/lc_win_rate")].rsplit("/", 1)
            out.append((key, voter, model))
    return out


def voter_words(voter: str, short: bool = False) -> str:
    """An arena voter as people say it: ``simulated:vader`` → simulated annotators following vader;
    a reward-model dir → the reward model (its path); a scorer → its spec. ``short``: for a table
    column (simulated people, reward model, a Python scorer's function name)."""
    if voter.startswith("simulated:"):
        return "simulated people" if short else f"simulated annotators following {voter.split(':', 1)[1]}"
    if names_a_path(voter):
        return "reward model" if short else f"the reward model ({voter})"
    if short and voter.startswith("python:"):
        return voter.rsplit(":", 1)[-1]
    return voter


def evidence_lines(claims: list[dict[str, Any]]) -> list[str]:
    """One line per claim: ``claim: yes, 0.71 [0.64, 0.78] (reference 0.5; note)``."""
    out = []
    for c in claims:
        low, high = c["ci"]
        ci = f" [{low:.3f}, {high:.3f}]" if low is not None and not math.isnan(low) else " (no interval)"
        ref = f"reference {c['reference']:g}" + (f"; {c['note']}" if c["note"] else "")
        out.append(f"{c['claim']}: {c['verdict']}, {c['value']:.3f}{ci} ({ref})")
    return out
