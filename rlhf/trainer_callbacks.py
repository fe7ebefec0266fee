"""What the lab adds to a transformers/TRL ``Trainer`` (``rlhf sft``, ``rlhf kto``, ``rlhf baseline``):
its logs go to the lab's tracker, and the lab's progress bar replaces Trainer's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from rlhf.cli import progress_bar


def tracker_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """Trainer's log keys as the lab names them: ``eval_loss`` → ``eval/loss``, ``train_runtime`` →
    ``train/runtime``, anything else → ``train/<key>`` (TRL's ``rewards/chosen`` →
    ``train/rewards/chosen``). Values that are not numbers are left out."""
    out = {}
    for key, value in logs.items():
        if not isinstance(value, (int, float)):
            continue
        if key.startswith("eval_"):
            out[f"eval/{key[5:]}"] = value
        elif key.startswith("train_"):
            out[f"train/{key[6:]}"] = value
        else:
            out[f"train/{key}"] = value
    return out


class TrackerCallback(TrainerCallback):
    """Forwards Trainer's logs to the lab's tracker (:func:`tracker_metrics`), at Trainer's step.

    ``aliases`` also logs a Trainer key under a second name (a baseline's ``reward`` as PPO's
    ``objective/scores``); ``extra(args, state)`` adds fields to every logged line."""

    def __init__(
        self,
        tracker,
        aliases: dict[str, str] | None = None,
        extra: Callable[[Any, Any], dict[str, float]] | None = None,
    ):
        self.tracker, self.aliases, self.extra = tracker, aliases or {}, extra

    def on_log(self, args, state, control, logs=None, **kwargs):
        out = tracker_metrics(logs or {})
        out.update({alias: logs[key] for key, alias in self.aliases.items() if key in (logs or {})})
        if not out:
            return
        if self.extra is not None:
            out.update(self.extra(args, state))
        self.tracker.log(out, step=state.global_step)


class ProgressCallback(TrainerCallback):
    """The lab's progress bar over the optimiser steps, with the last logged losses as numbers.

    It replaces Trainer's own bar and the dicts Trainer prints at every log (every number
    formatted as a string: ``{'loss': '2.888', ...}``); the full logs go to the tracker. Pass
    ``disable_tqdm=True`` to Trainer and remove its ``PrinterCallback``.
    """

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None
        self.latest: dict[str, str] = {}  # the last training and held-out losses, both in view

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress_bar(
            state.max_steps, self.desc, "step", enabled=state.is_world_process_zero, initial=state.global_step
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        losses = {k: f"{v:.4f}" for k, v in (logs or {}).items() if k in ("loss", "eval_loss")}
        if self.bar is not None and losses:
            self.latest.update(losses)
            self.bar.set_postfix(self.latest)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()
        self.bar = None


class TimeBudgetCallback(TrainerCallback):
    """Stops training once ``seconds`` have passed since it began (after the step under way), so
    methods can be compared at an equal wall-clock budget. ``stopped`` says whether it did."""

    def __init__(self, seconds: float):
        self.seconds, self.started, self.stopped = seconds, 0.0, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() - self.started >= self.seconds:
            control.should_training_stop = self.stopped = True
