"""Reward functions shared by PPO, baselines and evaluation: text in, one float per response out.

:func:`load_reward_fn` builds a :class:`RewardFunction` from a spec:

- a **reward-model dir** (has ``rlhf_reward.json``, written by ``rlhf rm train``): the model scores
  ``format_conversation(prompt, response)`` with *its own* tokenizer and chat template, and the
  stored normalisation is applied, ``(r - offset) / scale``, so reference-policy samples score
  mean 0, std 1. Because it receives text, a reward model whose tokenizer differs from the
  policy's works unchanged;
- any :func:`rlhf.scorers.get_scorer` spec: ``vader``, ``length:target=40``, ``keywords:...``,
  ``package.module:function``, ``python:file.py:fn`` (a gold scorer);
- a list of ``{"spec": ..., "weight": w}``: the weighted sum of those reward functions;
- ``ensemble:COMBINE:DIR,DIR,...``: several reward-model dirs as one reward (:class:`EnsembleRewardFunction`),
  COMBINE being ``mean``, ``min`` (the worst case) or ``mean_minus_std`` (``mean_minus_std=0.5``
  for another k than 1): the objectives Coste et al. (2024, arXiv 2310.02743) found to resist
  over-optimisation; the members' spread is kept as the disagreement PPO logs;
- an **ensemble dir** (``rlhf rm train --ensemble N``): its members, combined by the rule it was
  trained with (``ensemble_reward``); in ``ensemble:COMBINE:...`` it stands for its members.

:func:`spec_parts`, :func:`reward_model_dirs` and :func:`check_reward_spec` read a spec without
loading anything: every stage checks its reward with them before any model loads.

Scoring runs under ``torch.no_grad`` in batches sorted by length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.cli import progress_bar
from rlhf.contracts import candidates_finished, prompt_text
from rlhf.errors import ConfigError, UserError
from rlhf.fsio import recover_dir
from rlhf.reward_model import (
    ENSEMBLE_FILE,
    META_FILE,
    is_ensemble_dir,
    load_reward_model,
    read_ensemble,
    score_texts,
)
from rlhf.scorers import get_scorer

ENSEMBLE_PREFIX = "ensemble:"
ENSEMBLE_COMBINES = ("mean", "min", "mean_minus_std")


class RewardFunction:
    """``fn(prompts, responses, finished=None) -> FloatTensor [N]``; ``name`` says what it is.

    ``prompts`` as in the data contracts (text or chat messages), ``responses`` the text without
    the stop token, ``finished[i]`` whether response ``i`` ended with the stop token (None: all
    did). Only a reward model reads ``finished`` (it appends EOS to finished responses, as in its
    training data); scorers judge the text.
    """

    name: str = "reward"

    def __call__(
        self, prompts: Sequence[Any], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class RewardModelFunction(RewardFunction):
    """A trained reward model with its normalisation applied."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16):

        self.path = str(path)
        self.model, self.tokenizer, self.meta = load_reward_model(path, device)
        norm = self.meta.get("normalization") or {}
        self.offset = float(norm.get("offset", 0.0))
        self.scale = float(norm.get("scale", 1.0)) or 1.0
        self.max_length = int(self.meta.get("max_length", 512))
        self.device, self.batch_size = device, batch_size
        self.name = f"rm:{Path(path).name}"
        self.truncated = 0  # sequences cut to max_length so far (prompt side)

    def raw(
        self, prompts: Sequence[Any], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """Unnormalised scores ``[N]``."""

        scores, enc = score_texts(
            self.model,
            self.tokenizer,
            prompts,
            responses,
            self.max_length,
            self.batch_size,
            self.device,
            finished=finished,
        )
        self.truncated += enc.truncated
        return scores

    def __call__(
        self, prompts: Sequence[Any], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        _check_lengths(prompts, responses)
        return (self.raw(prompts, responses, finished) - self.offset) / self.scale


class ScorerFunction(RewardFunction):
    """A gold scorer (``rlhf.scorers``) as a reward function."""

    def __init__(self, spec: str):

        self.scorer = get_scorer(spec)
        self.name = getattr(self.scorer, "name", spec)

    def __call__(
        self, prompts: Sequence[Any], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:

        _check_lengths(prompts, responses)
        with torch.no_grad():
            values = self.scorer([prompt_text(p) for p in prompts], list(responses))
        out = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
        if out.shape[0] != len(responses):
            raise UserError(
                f"scorer {self.name} returned {out.shape[0]} scores for {len(responses)} responses",
                code="bad_reward",
            )
        return out


class WeightedRewardFunction(RewardFunction):
    """``Σ w_i · f_i(prompts, responses)``."""

    def __init__(self, parts: list[tuple[float, RewardFunction]]):
        self.parts = parts
        self.name = " + ".join(f"{w:g}*{f.name}" for w, f in parts)

    def __call__(
        self, prompts: Sequence[Any], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        total = torch.zeros(len(responses), dtype=torch.float32)
        for w, f in self.parts:
            total += w * f(prompts, responses, finished)
        return total


class EnsembleRewardFunction(RewardFunction):
    """Reward models scoring together: per response the members' mean, their minimum (the worst
    case), or mean − k · std (an uncertainty penalty). Every member is normalised on its own
    reference samples, so their scores share a scale. ``last_disagreement`` holds the members'
    standard deviation per response of the last call: where they disagree, the policy has found
    something the rankings did not teach them (a reward-hacking signal)."""

    def __init__(self, members: list[RewardFunction], combine: str, k: float = 1.0):
        self.members, self.combine, self.k = members, combine, k
        shown = f"mean_minus_std={k:g}" if combine == "mean_minus_std" else combine
        self.name = f"ensemble({shown}) of {len(members)}"
        self.last_disagreement: torch.Tensor | None = None

    def __call__(
        self, prompts: Sequence[Any], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        scores = torch.stack([m(prompts, responses, finished).float() for m in self.members])  # [M, N]
        spread = scores.std(0)
        self.last_disagreement = spread
        if self.combine == "min":
            return scores.min(0).values
        if self.combine == "mean_minus_std":
            return scores.mean(0) - self.k * spread
        return scores.mean(0)


ENSEMBLE_USAGE = "ensemble:COMBINE:DIR,DIR,... with COMBINE one of mean, min, mean_minus_std[=k]"


def score_candidates(
    reward: RewardFunction, records: Sequence[Any], progress: str | None = None, chunk: int = 512
) -> list[list[float]]:
    """Every response of candidates records (``prompt``, ``candidates`` with ``text`` and optionally
    ``gen.finished``), scored and returned as one list of scores per record.

    They are scored ``chunk`` records per call (a reward model batches the responses across
    prompts), so a store of many thousand prompts can show how far it is: ``progress`` names that
    bar. The scores do not depend on ``chunk`` (up to rounding): each response is scored on its own.
    """
    out: list[list[float]] = []
    with progress_bar(len(records), progress or "", "prompt", enabled=progress is not None) as bar:
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]
            prompts = [rec["prompt"] for rec in part for _ in rec["candidates"]]
            texts = [c["text"] for rec in part for c in rec["candidates"]]
            finished = [ended for rec in part for ended in candidates_finished(rec["candidates"])]
            flat = [float(s) for s in reward(prompts, texts, finished)] if texts else []
            at = 0
            for rec in part:
                out.append(flat[at : at + len(rec["candidates"])])
                at += len(rec["candidates"])
            bar.update(len(part))
    return out


def parse_ensemble_rule(rule: str, where: str) -> tuple[str, float]:
    """``mean`` / ``min`` / ``mean_minus_std[=k]`` → ``(combine, k)``; ``where`` names the field in errors."""
    combine, _, k_text = rule.partition("=")
    if combine not in ENSEMBLE_COMBINES:
        raise ConfigError(
            f"{where}: {rule!r} is not a combine rule; expected mean, min or mean_minus_std[=k]"
        )
    try:
        k = float(k_text) if k_text else 1.0
    except ValueError:
        raise ConfigError(f"{where}: k in mean_minus_std=k must be a number, got {k_text!r}") from None
    if k_text and combine != "mean_minus_std":
        raise ConfigError(f"{where}: only mean_minus_std takes =k")
    return combine, k


def ensemble_manifest(path: str) -> dict | None:
    """The manifest of an ensemble dir (``rlhf rm train --ensemble N``), members as paths; else None."""
    if not names_a_path(path) or not is_ensemble_dir(Path(path).expanduser()):
        return None
    return read_ensemble(Path(path).expanduser())


def parse_ensemble(spec: str) -> tuple[str, float, list[str]] | None:
    """``(combine, k, member dirs)`` of an ensemble reward; None for any other spec.

    Two spellings: ``ensemble:COMBINE:DIR,DIR,...``, where an ensemble dir among the DIRs stands for
    its members, and an ensemble dir alone, which combines by the rule it was trained with."""
    if not spec.startswith(ENSEMBLE_PREFIX):
        manifest = ensemble_manifest(spec)
        if manifest is None:
            return None
        rule = str(manifest.get("combine", "mean"))
        return (*parse_ensemble_rule(rule, f"{spec}/{ENSEMBLE_FILE}: combine"), manifest["members"])
    rule, sep, members = spec[len(ENSEMBLE_PREFIX) :].partition(":")
    if not sep or rule.partition("=")[0] not in ENSEMBLE_COMBINES:
        raise ConfigError(f"reward {spec!r}: expected {ENSEMBLE_USAGE}")
    combine, k = parse_ensemble_rule(rule, f"reward {spec!r}")
    dirs = [m.strip() for m in members.split(",") if m.strip()]
    dirs = [d for entry in dirs for d in (ensemble_manifest(entry) or {"members": [entry]})["members"]]
    if len(dirs) < 2:
        raise ConfigError(
            f"reward {spec!r}: an ensemble needs at least two reward-model dirs ({ENSEMBLE_USAGE})"
        )
    return combine, k, dirs


def spec_parts(reward: str | list[dict]) -> list[str]:
    """The single specs a reward names: itself, the items of a weighted list, an ensemble's members."""
    specs = [reward] if isinstance(reward, str) else []
    if not isinstance(reward, str):
        for i, item in enumerate(reward):
            if not isinstance(item, dict) or "spec" not in item:
                raise ConfigError(
                    f"reward[{i}]: expected a mapping with `spec` (and optional `weight`), got {item!r}"
                )
            specs.append(str(item["spec"]))
    out = []
    for spec in specs:
        ensemble = parse_ensemble(spec)
        out += ensemble[2] if ensemble else [spec]
    return out


def names_a_path(spec: str) -> bool:
    """``spec`` names a directory (a reward model or an ensemble of them), not a scorer: vader,
    ``length:...``, ``keywords:...``, ``python:file.py:fn`` (whose file may hold a ``/``),
    ``module:function`` or a weighted sum of those."""
    if spec.startswith(("python:", "module:")) or spec == "vader":
        return False
    if ":" in spec and not spec.startswith((".", "/", "~")):
        return False  # length:..., keywords:..., package.module:function
    if any(c in spec for c in "*+") and not Path(spec).exists():
        return False  # a weighted sum spec
    return "/" in spec or spec.startswith((".", "~")) or Path(spec).exists()


def reward_model_dir_problem(spec: str) -> str | None:
    """Why the path ``spec`` is not a reward-model dir, or None when it is one: the one rule every
    reader of a reward spec applies."""
    path = recover_dir(Path(spec).expanduser())  # a save killed mid-swap left only its backup
    if not path.is_dir():
        return (
            f"reward-model directory {spec!r} does not exist; give a reward-model dir "
            f"(with {META_FILE}) or a scorer spec such as vader or module:function"
        )
    if not (path / META_FILE).is_file():
        return f"{spec!r} has no {META_FILE}; it is not a reward-model dir (train one with `rlhf rm train`)"
    return None


def reward_model_dirs(reward: str | list[dict]) -> list[str]:
    """The reward-model dirs a reward spec names (an ensemble's members included)."""
    return [s for s in spec_parts(reward) if names_a_path(s) and reward_model_dir_problem(s) is None]


def check_reward_spec(reward: str | list[dict]) -> None:
    """A reward that names a directory must be a reward-model dir that exists, and an ensemble's
    members must all be (checked before loading models)."""
    for spec in [reward] if isinstance(reward, str) else []:
        ensemble = parse_ensemble(spec)
        for member in ensemble[2] if ensemble else []:
            if not names_a_path(member):
                raise ConfigError(f"reward: ensemble member {member!r} is not a reward-model dir")
    for spec in spec_parts(reward):
        problem = reward_model_dir_problem(spec) if names_a_path(spec) else None
        if problem:
            raise ConfigError(f"reward: {problem}")


def _check_lengths(prompts: Sequence[Any], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise UserError(
            f"reward function: {len(prompts)} prompts but {len(responses)} responses", code="bad_reward"
        )


def load_reward_fn(spec: Any, device: str = "cpu", batch_size: int = 16) -> RewardFunction:
    """A :class:`RewardFunction` from a reward-model dir, a scorer spec, or a weighted list (module docstring)."""
    if isinstance(spec, dict) and "spec" in spec:
        spec = [spec]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise UserError("reward spec: the weighted list is empty", code="bad_reward")
        parts = []
        for i, item in enumerate(spec):
            if not isinstance(item, dict) or "spec" not in item:
                raise UserError(
                    f"reward spec item {i + 1}: expected {{spec: ..., weight: w}}, got {item!r}",
                    code="bad_reward",
                )
            unknown = set(item) - {"spec", "weight"}
            if unknown:
                raise UserError(
                    f"reward spec item {i + 1}: unknown key {sorted(unknown)[0]!r} (valid: spec, weight)",
                    code="bad_reward",
                )
            try:
                weight = float(item.get("weight", 1.0))
            except (TypeError, ValueError):
                raise UserError(
                    f"reward spec item {i + 1}: weight must be a number, got {item['weight']!r}",
                    code="bad_reward",
                ) from None
            parts.append((weight, load_reward_fn(item["spec"], device, batch_size)))
        return parts[0][1] if len(parts) == 1 and parts[0][0] == 1.0 else WeightedRewardFunction(parts)
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise UserError(
            f"reward spec must be a reward-model dir, a scorer spec or a weighted list, got {spec!r}",
            code="bad_reward",
        )
    ensemble = parse_ensemble(str(spec))
    if ensemble is not None:
        combine, k, dirs = ensemble
        check_reward_spec(str(spec))
        return EnsembleRewardFunction([load_reward_fn(d, device, batch_size) for d in dirs], combine, k)
    if not names_a_path(str(spec)):
        return ScorerFunction(str(spec))
    problem = reward_model_dir_problem(str(spec))
    if problem:
        code = "bad_reward" if Path(str(spec)).expanduser().is_dir() else "not_found"
        raise UserError(problem, code=code)
    return RewardModelFunction(Path(str(spec)).expanduser(), device, batch_size)
