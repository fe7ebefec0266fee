"""Helpers for the PPO/SFT tests: small data files and rule rewards importable as ``module:function``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

PROMPTS = [
    "Say something nice.",
    "Write a word.",
    "Describe the sea.",
    "Name a fruit.",
    "Tell me a story.",
    "What is rain?",
    "Give advice.",
    "Describe a cat.",
    "Name a colour.",
    "Say hello.",
    "Count to three.",
    "Describe a tree.",
    "What is a star?",
    "Write a poem.",
    "Name a city.",
    "Describe snow.",
    "What is wind?",
    "Say goodbye.",
    "Describe bread.",
    "Name a bird.",
]


def write_prompts(path: Path, n: int = 20) -> Path:
    path.write_text(
        "".join(
            json.dumps({"prompt_id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)]}) + "\n" for i in range(n)
        )
    )
    return path


def write_demonstrations(path: Path, n: int = 12) -> Path:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "completion": "a nice calm answer."}))
    path.write_text("\n".join(lines) + "\n")
    return path


def lowercase_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Rule reward: the fraction of the response's characters that are ASCII lowercase letters."""
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


_calls = {"n": 0}


def interrupting_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Like :func:`lowercase_fraction`, but sends this process a SIGINT (Ctrl-C) on the call number
    given by ``RLHF_TEST_SIGINT_AT`` — the way a user's Ctrl-C lands in the middle of an update."""
    _calls["n"] += 1
    at = int(os.environ.get("RLHF_TEST_SIGINT_AT", "0"))
    if at and _calls["n"] == at:
        os.kill(os.getpid(), signal.SIGINT)
    return lowercase_fraction(prompts, responses)


def reset_calls() -> None:
    _calls["n"] = 0


def ascii_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Rule reward: the fraction of the response's characters that are printable ASCII (the tiny
    byte-level model starts near 0.35: an easy, dense signal for a test that the reward rises)."""
    return [sum(" " <= c <= "~" for c in r) / max(len(r), 1) for r in responses]


def nan_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A broken user reward: NaN for every response."""
    return [float("nan")] * len(responses)
