"""One run of a plan: where its stages write, the W&B run each stage logs to, and each library
stage's config built from its section, its wiring and the experiment's common fields."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.pipeline.experiment_file import LIBRARY_STAGES, Experiment, sweep_run_id
from experiments.pipeline.plan import Node
from rlhf.config import ConfigProblems, build_config, from_dict, to_dict
from rlhf.errors import ConfigError, UserError
from rlhf.tracking import TrackingConfig


@dataclass
class RunContext:
    """One run of a plan (an experiment, or one point of its sweep) and what it records as it goes."""

    exp: Experiment
    prefix: Path  # runs_dir given to the stages of this run (sweep runs nest under runs/<exp>/sweep/<id>)
    tags: list[str]  # W&B tags of every stage run (stage_tracking adds each stage's own)
    sweep_values: dict  # this sweep point's values (in each stage's own config)
    force_from: str | None = None
    dry_run: bool = False
    file: str = ""
    status: dict = field(default_factory=dict)  # per stage: ran / cached / forced, key, seconds
    agent_stage: str | None = None  # under `wandb agent`: the stage that reports to the agent's sweep run
    # per stage: the swept values it depends on (sweep_dependencies), in its run name, tags and config.sweep
    stage_values: dict[str, dict] = field(default_factory=dict)
    shared_stages: set[str] = field(default_factory=set)  # stages one run of which serves several points


AGENT_ENV = ("WANDB_RUN_ID", "WANDB_SWEEP_ID")


class agent_run_env:
    """Under ``wandb agent`` the environment names one W&B run (the sweep point's). Only one stage may
    take it (``sweep.agent_stage``, default the last stage); the others get their own runs in the group,
    so the variables are hidden from them while they run and restored afterwards."""

    def __init__(self, keep: bool):
        self.keep = keep
        self.saved: dict[str, str] = {}

    def __enter__(self):
        if not self.keep:
            self.saved = {k: os.environ.pop(k) for k in AGENT_ENV if k in os.environ}
        return self

    def __exit__(self, *exc):
        os.environ.update(self.saved)
        return False


def stage_tracking(ctx: RunContext, node: Node) -> dict:
    """The tracking config of one stage's W&B run: the experiment's ``tracking:`` section plus the run's
    name, tags and ``sweep`` (config.sweep) from the swept values the stage depends on, and nothing from
    the values it does not: one run of a stage that several sweep points share carries only the values
    they have in common and the tag ``shared``. Names read ``kl_sweep-ppo-kl_coef=0.01-seed=1`` (a
    key of the stage's own section without its ``ppo.``) and ``closed_loop-ppo@2`` (round 2)."""
    values = ctx.stage_values.get(node.name, {})
    tracking = to_dict(from_dict(TrackingConfig, ctx.exp.tracking))
    tags = list(tracking["tags"]) + ctx.tags + [f"{k}={v}" for k, v in values.items()][:10]
    if node.name in ctx.shared_stages:
        tags.append("shared")
    if ctx.exp.rounds > 1:
        tags.append(f"round={node.round}")
    own_prefix = node.name.split("@", 1)[0] + "."
    swept = [f"{k.removeprefix(own_prefix)}={v}" for k, v in values.items()]
    name = "-".join([ctx.exp.name, node.name, *swept])
    return {**tracking, "name": name, "tags": tags, "sweep": dict(values)}


def runs_dir_for(ctx: RunContext, node: Node) -> Path:
    if not node.folder:
        return ctx.prefix
    return ctx.prefix / ctx.exp.name / node.folder


def library_config(ctx: RunContext, node: Node, fields: dict):
    module, cls_name, _ = LIBRARY_STAGES[node.kind]
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise UserError(
            f"stage {node.name!r}: the {node.kind} stage is not available ({module}: {err})",
            code="stage_unavailable",
        ) from None
    cls = getattr(mod, cls_name)
    common = {
        "experiment": ctx.exp.name,
        "runs_dir": str(runs_dir_for(ctx, node)),
        "seed": ctx.exp.seed,
        "tracking": stage_tracking(ctx, node),
    }
    fields = dict(fields)
    fields.pop("stage", None)
    if isinstance(fields.get("tracking"), dict):  # a section's `tracking:` refines its run's, keeps the name
        common["tracking"].update(fields.pop("tracking"))
    try:
        preset_file = _find_preset(fields.pop("config", None), ctx.exp.path)
        return build_config(cls, preset_file, fields, base=common)
    except ConfigProblems as err:  # from the field types: every line starts with its key
        raise ConfigProblems([f"stages.{node.name}.{line}" for line in err.problems]) from None
    except UserError as err:  # from the config's own validate(): free text
        raise ConfigProblems([_stage_line(node.name, cls, str(err))]) from None


def _stage_line(stage: str, cls: type, problem: str) -> str:
    """``stages.<stage>.<field>: …`` when ``problem`` starts with a field of ``cls`` (``kl_coef: …``),
    else ``stages.<stage>: <problem>``."""
    head, sep, rest = problem.partition(": ")
    if sep and re.split(r"[.\[]", head, maxsplit=1)[0] in {f.name for f in dataclasses.fields(cls)}:
        return f"stages.{stage}.{head}: {rest}"
    return f"stages.{stage}: {problem}"


def stage_dir_name(kind: str, cfg: Any) -> str:
    """The folder a library stage writes under runs/<experiment>/ (baselines add their algorithm)."""
    if kind == "baseline":
        return f"baseline_{cfg.algorithm}"
    return kind


def _find_preset(path: str | None, exp_file: str) -> str | None:
    """A stage's ``config:`` preset: as given, else relative to the experiment file's folder."""
    if not path:
        return None
    p = Path(path)
    if p.is_absolute() or p.is_file():
        return str(p)
    for base in (Path(exp_file).parent, Path(exp_file).parent.parent):
        if (base / p).is_file():
            return str(base / p)
    raise ConfigError(f"config preset {path!r} not found (looked in . and next to {exp_file})")


def point_context(exp: Experiment, file: str, values: dict, force_from, dry_run, base_tags) -> RunContext:
    """A sweep point runs in runs/<experiment>/sweep/<values>/ (its stages are tagged with the values
    each depends on: :func:`stage_tracking`)."""
    prefix = Path(exp.runs_dir) / exp.name / "sweep" / sweep_run_id(values)
    return RunContext(exp, prefix, list(base_tags), dict(values), force_from, dry_run, file)
