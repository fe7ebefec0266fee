"""Example gold scorers in Python: preferences other than VADER for the simulated annotators.

Any function ``(prompts, responses) -> list[float]`` is a gold (and a reward) through a scorer spec:

    rlhf experiment run experiments/quickstart.yaml gold=python:experiments/golds.py:stays_on_topic

The lab checks that it returns one finite float per response (rlhf/scorers.py). The simulated
annotators rank by the gold plus Bradley–Terry noise; nothing else ever sees it during training.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def stays_on_topic(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the prompt's content words (longer than 3 letters) that the response uses, in [0, 1]:
    a preference that depends on the prompt, unlike sentiment or length."""
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        asked = {w for w in _words(prompt) if len(w) > 3}
        used = set(_words(response))
        out.append(len(asked & used) / len(asked) if asked else 0.0)
    return out


def speaks_to_the_reader(prompts: list[str], responses: list[str]) -> list[float]:
    """Second-person words (you, your, ...) per ten words: answers addressed to the reader."""
    second = {"you", "your", "you're", "yours", "yourself"}
    out = []
    for response in responses:
        words = _words(response)
        out.append(10 * sum(w in second for w in words) / max(len(words), 1))
    return out
