"""Gold scorers: programmatic judges of a response, for simulated annotators and evaluation.

A scorer is any callable ``(prompts: list[str], responses: list[str]) -> list[float]`` (higher is
better). :func:`get_scorer` builds one from a short spec string:

==============================  ===================================================================
``vader``                       VADER compound sentiment of the response (-1 … 1): positivity.
``length:target=40``            minus the distance, in words, from a target length (``unit=chars``
                                counts characters instead).
``keywords:good=a|b,bad=c|d``   +1 per good keyword present, -1 per bad one (case-insensitive,
                                whole words).
``package.module:function``     any importable callable with the scorer signature.
``python:path/to/file.py:fn``   a function from a Python file that is not on the import path.
==============================  ===================================================================

Specs can be summed with weights, ``0.7*vader + 0.3*length:target=30``, which gives a scorer
whose value is the weighted sum. Errors in a spec raise :class:`ScorerError` (one clear line).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhf.config import did_you_mean
from rlhf.errors import UserError, require_extra

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]

KINDS = "vader, length:target=N, keywords:good=a|b,bad=c, module:function, python:FILE.py:function"
# The names a spec starts with (a misspelt one gets a did-you-mean suggestion).
KIND_NAMES = ("vader", "length", "keywords", "python")


class ScorerError(UserError):
    code = "scorer"


class VaderScorer:
    """VADER compound sentiment of the response, in [-1, 1] (the prompt is ignored)."""

    name = "vader"

    def __init__(self):
        vader = require_extra("vaderSentiment.vaderSentiment", "vader", "the vader scorer")
        self._analyzer = vader.SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(r)["compound"]) for r in responses]


class LengthScorer:
    """``-|len(response) - target|`` in words (or characters), scaled by ``1/target``."""

    def __init__(self, target: float = 40, unit: str = "words"):
        if target <= 0:
            raise ScorerError(f"length scorer: target must be > 0, got {target}")
        if unit not in ("words", "chars"):
            raise ScorerError(f"length scorer: unit must be words or chars, got {unit!r}")
        self.target, self.unit = float(target), unit
        self.name = f"length:target={target:g}" + ("" if unit == "words" else ",unit=chars")

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        def n(r: str) -> int:
            return len(r.split()) if self.unit == "words" else len(r)

        return [-abs(n(r) - self.target) / self.target for r in responses]


class KeywordScorer:
    """+1 for each good keyword present, -1 for each bad keyword present (whole words)."""

    def __init__(self, good: Sequence[str] = (), bad: Sequence[str] = ()):
        if not good and not bad:
            raise ScorerError("keywords scorer: give good=word|word and/or bad=word|word")
        self.good = [w.lower() for w in good]
        self.bad = [w.lower() for w in bad]
        self.name = "keywords:" + ",".join(
            p
            for p in (
                "good=" + "|".join(self.good) if self.good else "",
                "bad=" + "|".join(self.bad) if self.bad else "",
            )
            if p
        )
        self._good = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in self.good]
        self._bad = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in self.bad]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [
            float(sum(bool(p.search(r)) for p in self._good) - sum(bool(p.search(r)) for p in self._bad))
            for r in responses
        ]


class WeightedSum:
    """``Σ w_i · scorer_i`` over several scorers."""

    def __init__(self, parts: list[tuple[float, Scorer]]):
        self.parts = parts
        self.name = " + ".join(f"{w:g}*{getattr(s, 'name', s)}" for w, s in parts)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        total = [0.0] * len(responses)
        for w, s in self.parts:
            for i, v in enumerate(s(prompts, responses)):
                total[i] += w * float(v)
        return total


class CallableScorer:
    """Wraps a user function and checks what it returns (one float per response)."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        out = self.fn(list(prompts), list(responses))
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise ScorerError(
                f"scorer {self.name} must return one number per response, got {type(out).__name__}"
            ) from None
        if len(values) != len(responses):
            raise ScorerError(
                f"scorer {self.name} returned {len(values)} scores for {len(responses)} responses"
            )
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ScorerError(f"scorer {self.name} returned a non-finite score ({bad[0]})")
        return values


def _parse_kwargs(body: str, spec: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in part:
            raise ScorerError(f"bad scorer option {part!r} in {spec!r}; options look like key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_callable(spec: str) -> Callable:
    """Import ``package.module:function`` or ``python:path/file.py:function``."""
    if spec.startswith("python:"):
        rest = spec[len("python:") :]
        path, _, fn_name = rest.rpartition(":")
        file = Path(path)
        if not path or not fn_name:
            raise ScorerError(f"bad spec {spec!r}; expected python:path/to/file.py:function")
        if not file.is_file():
            raise ScorerError(f"scorer file not found: {file}")
        mod_spec = importlib.util.spec_from_file_location(f"rlhf_user_{file.stem}", file)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as err:  # the user's file failed to import: say which and why
            raise ScorerError(f"could not import {file}: {type(err).__name__}: {err}") from None
    else:
        mod_name, _, fn_name = spec.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as err:
            raise ScorerError(f"cannot import module {mod_name!r} for scorer {spec!r}: {err}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ScorerError(f"{spec!r}: {fn_name!r} is not a callable in that module")
    return fn


_TERM = re.compile(r"^\s*(?:(?P<w>[-+]?\d*\.?\d+(?:e[-+]?\d+)?)\s*\*\s*)?(?P<spec>\S.*?)\s*$", re.IGNORECASE)


def _split_sum(spec: str) -> list[str]:
    # Split on " + " only (a spec like keywords:good=c++ keeps its plus signs).
    return [t for t in re.split(r"\s\+\s", spec) if t.strip()]


def get_scorer(spec: str) -> Scorer:
    """Build a scorer from ``spec`` (see the module docstring for the forms)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ScorerError(f"empty scorer spec; valid kinds: {KINDS}")
    terms = _split_sum(spec)
    if len(terms) > 1 or _TERM.match(terms[0]).group("w"):
        parts = []
        for term in terms:
            m = _TERM.match(term)
            weight = float(m.group("w")) if m.group("w") else 1.0
            parts.append((weight, get_scorer(m.group("spec"))))
        return WeightedSum(parts)
    spec = spec.strip()
    kind, _, body = spec.partition(":")
    if kind == "vader" and not body:
        return VaderScorer()
    if kind == "length":
        kw = _parse_kwargs(body, spec)
        unknown = set(kw) - {"target", "unit"}
        if unknown:
            raise ScorerError(f"length scorer: unknown option {sorted(unknown)[0]!r}; valid: target, unit")
        try:
            target = float(kw.get("target", 40))
        except ValueError:
            raise ScorerError(f"length scorer: target must be a number, got {kw['target']!r}") from None
        return LengthScorer(target, kw.get("unit", "words"))
    if kind == "keywords":
        kw = _parse_kwargs(body, spec)
        unknown = set(kw) - {"good", "bad"}
        if unknown:
            raise ScorerError(f"keywords scorer: unknown option {sorted(unknown)[0]!r}; valid: good, bad")
        return KeywordScorer(
            [w for w in kw.get("good", "").split("|") if w], [w for w in kw.get("bad", "").split("|") if w]
        )
    if kind == "python" or (
        body and re.fullmatch(r"[A-Za-z_][\w.]*", kind) and re.fullmatch(r"[A-Za-z_]\w*", body)
    ):
        return CallableScorer(load_callable(spec), spec)
    raise ScorerError(f"unknown scorer {spec!r}{did_you_mean(kind, KIND_NAMES)}; valid kinds: {KINDS}")
