"""Set-up of one reward model's training (:mod:`reward_models.train`): from the config to the
:class:`Trainee` that the training loop steps.

:func:`read_data` reads, checks and splits the rankings, and weighs or drops each training
ranking by its annotator's fitted reliability when asked (:func:`weigh_annotators`), all before any
model loads, so bad input fails fast; :func:`set_up` then builds, in this order: the model (its initial tie parameter from
the training rankings' tie rate), the tokenized prompt groups and the input report, this process's
shard of prompts and the cache of its frozen lower layers, the optimiser and learning-rate
schedule, prepared by the accelerator. The seed is set before the model is built
(:func:`reward_models.train._train_one`), so the seeded results depend on this order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from reward_models.groups import DataReport, Group, build_groups, encode_groups, read_records, split_groups
from reward_models.losses import initial_tie_raw, initial_tie_value, tie_rate
from reward_models.model import LoraSettings, build_reward_model
from reward_models.scoring import FrozenStates, build_cache
from reward_models.train_config import RMTrainConfig
from rlhf.checkpoint import Checkpoints
from rlhf.config import ConfigError
from rlhf.errors import UserError
from rlhf.models import FrozenLinearsInBF16, adam_kwargs, autocast_bf16
from rlhf.reliability import ReliabilityFit, annotator_of, fit_reliability
from rlhf.tracking import Tracker

CHECKPOINT_PREFIX = "step_"  # checkpoints/step_000040/ (rlhf.checkpoint)
KEEP_CHECKPOINTS = 2


# ----------------------------------------------------------------------------- 1-2. data


@dataclass
class RMData:
    """The checked rankings of one run, split by prompt."""

    report: DataReport
    records: list[dict]  # the training file's records (their hash goes into rlhf_reward.json)
    train: list[Group]
    held: list[Group]  # scored once, at the end
    val: list[Group]  # decides when to stop and which step to keep
    annotators: AnnotatorWeighting | None = None  # what annotator reliability did (None: not asked)


@dataclass
class AnnotatorWeighting:
    """The annotators' fitted reliability and what it did to the training rankings."""

    fit: ReliabilityFit
    weighted: bool  # each ranking's loss weighs its annotator's weight
    min_reliability: float
    dropped_annotators: list[str]  # expected accuracy below min_reliability
    dropped_rankings: int

    def metrics(self) -> dict[str, float]:
        weights = list(self.fit.weights().values())
        return {
            "annotators/count": len(weights),
            "annotators/mean_weight": sum(weights) / len(weights) if weights else float("nan"),
            "annotators/zero_weight": sum(1 for w in weights if w == 0),
            "annotators/dropped": len(self.dropped_annotators),
            "annotators/dropped_rankings": self.dropped_rankings,
            "annotators/prior_tie": self.fit.prior_tie,
            "annotators/shared_pairs": self.fit.shared_items,
            "annotators/em_iterations": self.fit.iterations,
        }

    def lines(self) -> list[str]:
        fit = self.fit
        use = "each ranking's loss weighs its annotator's weight" if self.weighted else "not used as weights"
        out = [
            f"annotators: reliability of {len(fit.annotators)} fitted on {fit.items} training pairs "
            f"({fit.shared_items} labelled by 2 or more, EM {fit.iterations} rounds"
            + ("" if fit.converged else ", not converged")
            + f"); {use}"
        ]
        if not fit.shared_items:
            out.append(
                "  no pair was labelled by two annotators: reliability cannot be told from the labels, "
                "every annotator agrees with themselves"
            )
        for name, weight, accuracy, *_ in fit.rows()[:5]:
            out.append(f"  {name}: weight {weight:.2f}, expected accuracy {accuracy:.2f}")
        if len(fit.annotators) > 5:
            out.append(f"  ... {len(fit.annotators) - 5} more in annotators.json")
        if self.dropped_rankings:
            out.append(
                f"  {self.dropped_rankings} rankings of {len(self.dropped_annotators)} annotators with expected "
                f"accuracy below min_reliability={self.min_reliability:g}: skipped"
            )
        return out

    def as_dict(self) -> dict:
        return {
            "weighted": self.weighted,
            "min_reliability": self.min_reliability,
            "dropped_annotators": self.dropped_annotators,
            "dropped_rankings": self.dropped_rankings,
            **self.fit.as_dict(),
        }


def read_data(cfg: RMTrainConfig, split_seed: int) -> RMData:
    """Read and check the rankings, split off the held-out and validation prompts, then weigh or
    drop the training rankings by annotator reliability when the config asks."""
    report = DataReport()
    records = read_records(cfg.rankings, skip_bad_rows=cfg.skip_bad_rows, report=report)
    groups = build_groups(records, report, cfg.loss)
    if cfg.eval_rankings:
        held_report = DataReport()
        held_records = read_records(cfg.eval_rankings, skip_bad_rows=cfg.skip_bad_rows, report=held_report)
        held = build_groups(held_records, held_report, cfg.loss)
        train_groups = groups
        report.bad_rows += held_report.bad_rows
        report.examples += [f"(eval file) {e}" for e in held_report.examples]
    else:
        train_groups, held = split_groups(groups, cfg.eval_fraction, split_seed)
    val: list[Group] = []
    if cfg.val_fraction > 0 and len(train_groups) > 2:
        train_groups, val = split_groups(train_groups, cfg.val_fraction, split_seed + 1)
    annotators = None
    if cfg.annotator_weights == "reliability" or cfg.min_reliability > 0:
        annotators = weigh_annotators(cfg, train_groups + val)
        train_groups, val = [g for g in train_groups if g.rankings], [g for g in val if g.rankings]
        report.used_rankings -= annotators.dropped_rankings
    if not train_groups:
        raise UserError(
            f"{cfg.rankings}: no usable rankings ({report.records} records; "
            + "; ".join(report.lines()[1:3]).strip()
            + ")",
            code="no_data",
        )
    if cfg.length_discount == "attenuation" and not any(len(g.rankings) >= 2 for g in train_groups):
        raise UserError(
            f"{cfg.rankings}: length_discount=attenuation needs prompts ranked twice (two annotators, e.g. "
            f"rlhf simulate --per_prompt 2) and none of the {len(train_groups)} training prompts is",
            code="no_data",
        )
    return RMData(report, records, train_groups, held, val, annotators)


def weigh_annotators(cfg: RMTrainConfig, groups: list[Group]) -> AnnotatorWeighting:
    """Fit every annotator's reliability to the rankings of ``groups`` (the training and validation
    prompts: never the held-out ones), then, in place, leave out the rankings of annotators whose
    expected accuracy is below ``cfg.min_reliability`` and, with ``annotator_weights: reliability``,
    give every ranking its annotator's weight (rlhf/reliability.py says why max(0, a - r))."""
    fit = fit_reliability(record for g in groups for record in g.records)
    unreliable = sorted(
        name for name, a in fit.annotators.items() if a.expected_accuracy < cfg.min_reliability
    )
    if unreliable and len(unreliable) == len(fit.annotators):
        best = max(fit.annotators.values(), key=lambda a: a.expected_accuracy)
        raise UserError(
            f"min_reliability={cfg.min_reliability:g} leaves no training rankings: the most reliable "
            f"annotator, {best.annotator}, has expected accuracy {best.expected_accuracy:.3f}",
            code="no_data",
        )
    weighted = cfg.annotator_weights == "reliability"
    dropped = 0
    for g in groups:
        keep = [i for i, record in enumerate(g.records) if annotator_of(record) not in unreliable]
        dropped += len(g.records) - len(keep)
        g.rankings = [g.rankings[i] for i in keep]
        g.records = [g.records[i] for i in keep]
        if weighted:
            g.weights = [fit.annotators[annotator_of(record)].weight for record in g.records]
    if weighted and not any(w > 0 for g in groups for w in g.weights or []):
        raise UserError(
            "annotator_weights=reliability gives every training ranking weight 0 (no annotator reports the "
            "true order more often than the reversed one); look at the rankings, or train with "
            "annotator_weights=none",
            code="no_data",
        )
    return AnnotatorWeighting(fit, weighted, cfg.min_reliability, unreliable, dropped)


# ----------------------------------------------------------------------------- 3-4. set-up


@dataclass
class Run:
    """What every step of one model's training shares: config, processes, tracker, run dir."""

    cfg: RMTrainConfig
    accelerator: Accelerator
    bf16: bool
    tracker: Tracker
    run_dir: Path
    t_start: float
    # frozen-layer states by token ids (scoring.build_cache): shared by an ensemble's members of one
    # depth, so each sequence goes through the frozen layers once; states_below, a shallower
    # member's, are where this model's frozen layers start from
    frozen_states: FrozenStates
    states_below: FrozenStates | None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def eval_path(self) -> Path:
        return self.run_dir / "eval_rankings.jsonl"

    @property
    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.run_dir / "checkpoints", CHECKPOINT_PREFIX, "reward-model")

    def amp(self):
        """Forwards under bf16 autocast where mixed_precision resolved to bf16 (weights stay fp32)."""
        return autocast_bf16(self.accelerator.device, self.bf16)


@dataclass
class Trainee:
    """The reward model under training, its optimiser and schedule, and this process's prompts."""

    model: Any  # as the accelerator prepared it (DDP-wrapped in a multi-process launch)
    inner: Any  # the reward model itself
    tokenizer: Any
    tie_init: float | None
    my_train: list[Group]
    my_val: list[Group]
    my_held: list[Group]
    cache: dict | None  # frozen lower layers' hidden states, by group
    cache_time: float
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int  # the same in every process
    total_steps: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def raw_tie(self) -> torch.Tensor | None:
        return self.inner.tie_param


def set_up(run: Run, data: RMData) -> Trainee:
    """The model and tokenized data, this process's shard of prompts and its cache, the optimiser
    and schedule (module docstring)."""
    cfg, accelerator = run.cfg, run.accelerator
    tie_init = initial_tie_value(cfg.loss, cfg.theta, cfg.nu, tie_rate(data.train))
    model, tokenizer = build_reward_model(
        cfg.model,
        cfg.trainable,
        cfg.top_layers,
        LoraSettings(cfg.lora_r, cfg.lora_alpha, 0.0, tuple(cfg.lora_target_modules)),
        tie_param=initial_tie_raw(cfg.loss, tie_init),
        learn_tie_param=cfg.learn_tie_param,
        seed=cfg.seed,
        pooling=cfg.pooling,
        layers=cfg.layers,
        read_layers=cfg.read_layers,
    )
    for groups in (data.train, data.held, data.val):
        encode_groups(groups, tokenizer, cfg.max_length, data.report)
    if run.main:
        _report_data(run, data.report)
        if data.annotators is not None:
            _report_annotators(run, data.annotators)

    # each process owns a fixed shard of prompts (so its cache covers only its own)
    rank, world = accelerator.process_index, run.world
    by_len = sorted(data.train, key=lambda g: (g.n_tokens, g.prompt_id))
    my_train, my_held, my_val = by_len[rank::world], data.held[rank::world], data.val[rank::world]
    cache, cache_time = _cache_frozen_layers(run, model, my_train + my_val + my_held, tokenizer.pad_token_id)

    optimizer = _optimizer(cfg, model)
    steps_per_epoch, total_steps = _steps(run, len(my_train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    prepared, optimizer = accelerator.prepare(model, optimizer)
    return Trainee(
        model=prepared,
        inner=accelerator.unwrap_model(prepared),
        tokenizer=tokenizer,
        tie_init=tie_init,
        my_train=my_train,
        my_val=my_val,
        my_held=my_held,
        cache=cache,
        cache_time=cache_time,
        optimizer=optimizer,
        scheduler=scheduler,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def _cache_frozen_layers(run: Run, model, groups: list[Group], pad_id: int) -> tuple[dict | None, float]:
    """The frozen lower layers' hidden states of every sequence of ``groups``, computed once
    (None where nothing is frozen or ``cache_hidden`` is off), and the seconds it took."""
    if not (model.caches_lower_layers and run.cfg.cache_hidden):
        return None, 0.0
    t0 = time.time()
    store, below = run.frozen_states, run.states_below
    reused = len(store.by_ids)
    # under autocast the frozen layers' weights are kept in bf16 for the pass, as autocast computes
    # with them (the same states; rlhf.models.FrozenLinearsInBF16)
    with run.amp(), FrozenLinearsInBF16(model if run.bf16 else None):
        cache = build_cache(model, groups, pad_id, run.cfg.score_batch_size, run.main, store, below)
    cache_time = time.time() - t0
    if run.main:
        computed = len(store.by_ids) - reused
        notes = []
        if computed and below is not None and below.starts(store.layers):
            notes.append(f"layers 1-{below.layers} taken from an earlier ensemble member's states")
        if reused:
            notes.append(f"reused {reused} sequences an earlier ensemble member cached")
        what = (
            f"the means of layers {', '.join(map(str, model.read_layers))}"
            if model.caches_features
            else f"the {model.frozen_layers} frozen layers"
        )
        print(
            f"rm: cached {what} of {computed} sequences in {cache_time:.1f}s"
            + "".join(f"; {n}" for n in notes),
            flush=True,
        )
    return cache, cache_time


def _steps(run: Run, n_train: int) -> tuple[int, int]:
    """Optimizer steps per epoch and in all, for ``n_train`` training prompts in this process."""
    cfg = run.cfg
    n_batches = math.ceil(n_train / cfg.batch_size)
    if run.world > 1:  # every process must take the same number of steps
        n_batches = int(run.accelerator.gather(torch.tensor([n_batches])).min())
    if n_batches < cfg.grad_accum:
        raise ConfigError(
            f"grad_accum={cfg.grad_accum} but an epoch has only {n_batches} micro-batches of "
            f"{cfg.batch_size} prompts per process; lower grad_accum or batch_size"
        )
    steps_per_epoch = max(1, n_batches // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    return steps_per_epoch, total_steps


def _report_data(run: Run, report: DataReport) -> None:
    """Print the input report, log it at step 0 and write it to ``data_report.json``."""
    for line in report.lines():
        print(line, flush=True)
    run.tracker.log(report.metrics(), step=0)
    run.tracker.summary(report.metrics())
    (run.run_dir / "data_report.json").write_text(
        json.dumps({**vars(report), "lines": report.lines()}, indent=2, default=str)
    )


def _report_annotators(run: Run, annotators: AnnotatorWeighting) -> None:
    """Print the annotators' reliability, log it at step 0 (figures and the ``annotators`` table) and
    write it to ``annotators.json``."""
    for line in annotators.lines():
        print(line, flush=True)
    run.tracker.log(annotators.metrics(), step=0)
    run.tracker.summary(annotators.metrics())
    run.tracker.log_table("annotators", list(ReliabilityFit.COLUMNS), annotators.fit.rows(), step=0)
    (run.run_dir / "annotators.json").write_text(json.dumps(annotators.as_dict(), indent=2))


def _optimizer(cfg: RMTrainConfig, model) -> torch.optim.AdamW:
    """AdamW over the trainable weights; a learned tie parameter gets its own rate and no weight
    decay (that would pull log ν / raw θ to 0)."""
    tie = model.tie_param if model.tie_param is not None and model.tie_param.requires_grad else None
    params = [p for p in model.parameters() if p.requires_grad and p is not tie]
    groups = [{"params": params}]
    if tie is not None:
        groups.append({"params": [tie], "lr": cfg.tie_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        **adam_kwargs([p for g in groups for p in g["params"]]),
    )
