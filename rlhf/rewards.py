"""Reward functions shared by PPO, baselines and evaluation: text in, one float per response out.

:func:`load_reward_fn` builds a :class:`RewardFunction` from a spec:

- a **reward-model dir** (has ``rlhf_reward.json``, written by ``rlhf rm train``): the model scores
  ``format_conversation(prompt, response)`` with *its own* tokenizer and chat template, and the
  stored normalisation is applied, ``(r - offset) / scale``, so reference-policy samples score
  mean 0, std 1. Because it receives text, a reward model whose tokenizer differs from the
  policy's works unchanged;
- any :func:`rlhf.scorers.get_scorer` spec: ``vader``, ``length:target=40``, ``keywords:...``,
  ``package.module:function``, ``python:file.py:fn`` (a gold scorer);
- a list of ``{"spec": ..., "weight": w}``: the weighted sum of those reward functions.

Scoring runs under ``torch.no_grad`` in batches sorted by length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import UserError


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
        from reward_models.model import load_reward_model

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
        from reward_models.model import score_texts

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
        from rlhf.scorers import get_scorer

        self.scorer = get_scorer(spec)
        self.name = getattr(self.scorer, "name", spec)

    def __call__(
        self, prompts: Sequence[Any], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        from reward_models.model import prompt_as_text

        _check_lengths(prompts, responses)
        with torch.no_grad():
            values = self.scorer([prompt_as_text(p) for p in prompts], list(responses))
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
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        if not (path / "rlhf_reward.json").is_file():
            raise UserError(
                f"{spec}: a directory but not a reward model (no rlhf_reward.json); "
                "train one with `rlhf rm train`",
                code="bad_reward",
            )
        return RewardModelFunction(path, device, batch_size)
    if str(spec).startswith((".", "/", "~")) and not str(spec).startswith("python:"):
        raise UserError(f"reward model {spec!r}: no such directory", code="not_found")
    return ScorerFunction(str(spec))
