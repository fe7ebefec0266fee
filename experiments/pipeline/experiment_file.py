"""The experiment file: its keys and stage kinds, overrides and presets, ``${stage.key}``
references, and the sweep a ``sweep:`` block describes (``experiments/README.md`` has the format)."""

from __future__ import annotations

import copy
import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import did_you_mean, from_dict, read_yaml
from rlhf.errors import ConfigError, UserError
from rlhf.tracking import TrackingConfig

# kind → (module, config class, run function). Imported lazily: a stage's heavy imports only load
# when a pipeline uses it.
LIBRARY_STAGES: dict[str, tuple[str, str, str]] = {
    "generate": ("rlhf.generation", "GenerateConfig", "run_generate"),
    "simulate": ("reward_models.simulate", "SimulateConfig", "run_simulate"),
    "export": ("rlhf.data", "ExportConfig", "run_export"),
    "rm_train": ("reward_models.train", "RMTrainConfig", "run_rm_train"),
    "rm_eval": ("reward_models.evaluate", "RMEvalConfig", "run_rm_eval"),
    "sft": ("rlhf.sft", "SFTConfig", "run_sft"),
    "ppo": ("rlhf.ppo.loop", "PPOConfig", "run_ppo"),
    "baseline": ("rlhf.baselines", "BaselineConfig", "run_baseline"),
    "dpo": ("reward_models.dpo", "DPOStageConfig", "run_dpo"),
    "kto": ("rlhf.kto", "KTOStageConfig", "run_kto"),
    "eval": ("rlhf.evaluate", "EvalConfig", "run_eval"),
    "arena": ("experiments.arena", "ArenaConfig", "run_arena"),
}
# Stages the runner implements itself (internal_stages.py: annotation by people; the round bookkeeping
# of the closed loop).
INTERNAL_STAGES = ("annotate", "prompts", "select", "collect")
USER_STAGES = tuple(LIBRARY_STAGES) + ("annotate",)
# The stage fields a top-level ``gold:`` fills in (where the stage's section does not set them): the
# simulated annotators follow it, PPO and evaluation report it. It never reaches a reward.
GOLD_FIELDS = {"simulate": "scorer", "ppo": "gold", "baseline": "gold", "eval": "gold", "arena": "gold"}
TOP_LEVEL_KEYS = (
    "name",
    "description",
    "seed",
    "gold",
    "runs_dir",
    "tracking",
    "stages",
    "sweep",
    "rounds",
    "round",
    "presets",
    "compare",
)
REF = re.compile(r"\$\{([A-Za-z0-9_@]+)\.([A-Za-z0-9_/]+)\}")


# ----------------------------------------------------------------------------- the experiment file


@dataclass
class Experiment:
    """A parsed experiment file with overrides applied."""

    name: str
    stages: dict[str, dict]  # instance name → section (ordered)
    seed: int = 0
    runs_dir: str = "runs"
    tracking: dict = field(default_factory=dict)
    sweep: dict | None = None
    rounds: int = 1
    round: dict = field(default_factory=dict)
    compare: dict | None = None
    description: str = ""
    path: str = ""


def stage_kind(name: str, section: dict | None = None) -> str:
    """The stage type of an instance: its ``stage:`` key, else its name without an ``@round`` suffix."""
    if section and isinstance(section.get("stage"), str):
        return section["stage"]
    return name.split("@", 1)[0]


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Apply dotted overrides to a raw experiment mapping (``ppo.kl_coef`` → ``stages.ppo.kl_coef``).

    The first part of the key names a stage when the file has a stage of that name, else a
    top-level key (``seed``, ``rounds``, ``tracking.mode`` ...).
    """
    out = copy.deepcopy(raw)
    stages = out.setdefault("stages", {})
    for key, value in overrides.items():
        head = key.split(".", 1)[0]
        if head in stages and "." in key:
            if stages[head] is None:
                stages[head] = {}
            _set_dotted(stages[head], key.split(".", 1)[1], value)
        elif head in TOP_LEVEL_KEYS:
            _set_dotted(out, key, value)
        else:
            raise ConfigError(
                f"override {key}={value!r}: {head!r} is neither a stage of this experiment "
                f"({', '.join(stages) or 'none'}) nor a top-level key ({', '.join(TOP_LEVEL_KEYS)})"
                f"{did_you_mean(head, [*stages, *TOP_LEVEL_KEYS])}"
            )
    return out


def load_raw(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"experiment file not found: {path}", code="not_found")
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment file is a mapping with a `stages:` section")
    return raw


def parse_experiment(
    raw: dict, path: str = "", preset: str | None = None, overrides: dict[str, Any] | None = None
) -> Experiment:
    """Validate an experiment mapping: known keys, known stages, sweep and rounds well formed."""
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(
            f"{path or 'experiment'}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], TOP_LEVEL_KEYS)}; "
            f"valid keys: {', '.join(TOP_LEVEL_KEYS)}"
        )
    if preset:
        presets = raw.get("presets") or {}
        if preset not in presets:
            raise ConfigError(
                f"preset {preset!r} is not defined in {path or 'the experiment'}{did_you_mean(preset, presets)}; "
                f"presets: {', '.join(presets) or 'none'}"
            )
        raw = apply_overrides(raw, presets[preset] or {})
    if overrides:
        raw = apply_overrides(raw, overrides)
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(
            f"{path or 'experiment'}: `stages:` must map stage names to their configs "
            f"(stages: {', '.join(USER_STAGES)})"
        )
    clean: dict[str, dict] = {}
    for name, section in stages.items():
        section = section or {}
        if not isinstance(section, dict):
            raise ConfigError(f"stages.{name}: expected a mapping of config fields, got {section!r}")
        if "@" in name:
            raise ConfigError(f"stages.{name}: '@' is reserved for round copies of stages")
        kind = stage_kind(name, section)
        if kind not in USER_STAGES:
            raise ConfigError(
                f"stages.{name}: unknown stage {kind!r}{did_you_mean(kind, USER_STAGES)}; stages: "
                f"{', '.join(USER_STAGES)} (name a stage freely and give `stage: <kind>`)"
            )
        clean[name] = section
    gold = raw.get("gold")
    if gold is not None:
        if not isinstance(gold, str) or not gold.strip():
            raise ConfigError(f"gold: expected a gold scorer spec such as vader, got {gold!r}")
        for section_name, section in clean.items():
            field_name = GOLD_FIELDS.get(stage_kind(section_name, section))
            if field_name and field_name not in section:
                clean[section_name] = {**section, field_name: gold}
    name = str(raw.get("name") or Path(path).stem or "experiment")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(
            f"name: {name!r} may only hold letters, digits, '.', '_' and '-' (it names a folder)"
        )
    rounds = raw.get("rounds", 1)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError(f"rounds: expected a whole number ≥ 1, got {rounds!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    tracking = raw.get("tracking") or {}
    from_dict(TrackingConfig, tracking, prefix="tracking.")  # once here, not once in every stage's config
    exp = Experiment(
        name=name,
        stages=clean,
        seed=seed,
        runs_dir=str(raw.get("runs_dir", "runs")),
        tracking=dict(tracking),
        sweep=raw.get("sweep"),
        rounds=rounds,
        round=dict(raw.get("round") or {}),
        compare=raw.get("compare"),
        description=str(raw.get("description", "")),
        path=str(path),
    )
    if exp.sweep is not None:
        sweep_points(exp.sweep)  # validates
    if exp.rounds > 1:
        for need in ("generate", "rm_train", "ppo"):
            if not any(stage_kind(n, s) == need for n, s in clean.items()):
                raise ConfigError(
                    f"rounds: {exp.rounds} needs a {need} stage (the loop samples, retrains the "
                    "reward model and continues PPO)"
                )
        if not any(stage_kind(n, s) in ("simulate", "annotate") for n, s in clean.items()):
            raise ConfigError("rounds needs a simulate or annotate stage")
        select = exp.round.get("select", "next")
        if select not in ("next", "uncertainty"):
            raise ConfigError(f"round.select: {select!r} is not valid; choose next or uncertainty")
        if select == "uncertainty" and int(exp.round.get("ensemble", 2)) < 2:
            raise ConfigError("round.ensemble: uncertainty selection needs at least 2 reward models")
    return exp


# ----------------------------------------------------------------------------- ``${stage.key}`` references


def resolve_refs(value: Any, results: dict[str, dict], for_hash: dict[str, str] | None = None) -> Any:
    """Replace ``${stage.key}`` in strings by the stage's output (or, with ``for_hash``, by a token made of
    the stage's cache key, so a key does not depend on where a stage wrote its files)."""
    if isinstance(value, str):
        whole = REF.fullmatch(value)

        def lookup(m: re.Match) -> Any:
            stage, key = m.group(1), m.group(2)
            if stage not in results:
                raise ConfigError(f"${{{stage}.{key}}}: stage {stage!r} has not run before this one")
            if for_hash is not None:
                return f"<{stage}:{for_hash[stage]}:{key}>"
            if key not in results[stage]:
                have = ", ".join(k for k, v in results[stage].items() if isinstance(v, str))
                raise ConfigError(
                    f"${{{stage}.{key}}}: stage {stage!r} has no output {key!r}; it has: {have}"
                )
            return results[stage][key]

        if whole:
            return lookup(whole)
        return REF.sub(lambda m: str(lookup(m)), value)
    if isinstance(value, list):
        return [resolve_refs(v, results, for_hash) for v in value]
    if isinstance(value, dict):
        return {k: resolve_refs(v, results, for_hash) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- sweeps


def sweep_points(sweep: dict) -> list[dict[str, Any]]:
    """The list of override dicts a ``sweep:`` block describes (grid: every combination, in file order;
    random: ``count`` draws seeded by ``sweep.seed``). A parameter is a list of values or, for random
    search, ``{min, max, distribution: uniform|log_uniform|int_uniform}``."""
    if (
        not isinstance(sweep, dict)
        or not isinstance(sweep.get("parameters"), dict)
        or not sweep["parameters"]
    ):
        raise ConfigError("sweep: expected {method: grid|random, parameters: {dotted.field: [values]}}")
    method = sweep.get("method", "grid")
    params = sweep["parameters"]
    if method == "grid":
        keys = list(params)
        for k in keys:
            if not isinstance(params[k], list) or not params[k]:
                raise ConfigError(f"sweep.parameters.{k}: a grid sweep needs a non-empty list of values")
        return [dict(zip(keys, combo)) for combo in itertools.product(*(params[k] for k in keys))]
    if method == "random":
        count = sweep.get("count")
        if not isinstance(count, int) or count < 1:
            raise ConfigError(f"sweep.count: a random sweep needs count ≥ 1, got {count!r}")
        rng = random.Random(sweep.get("seed", 0))
        points = []
        for _ in range(count):
            point = {}
            for k, spec in params.items():
                point[k] = _draw(k, spec, rng)
            points.append(point)
        return points
    raise ConfigError(f"sweep.method: {method!r} is not valid; choose grid or random")


def _draw(key: str, spec: Any, rng: random.Random) -> Any:
    if isinstance(spec, list) and spec:
        return rng.choice(spec)
    if isinstance(spec, dict) and "min" in spec and "max" in spec:
        lo, hi, dist = spec["min"], spec["max"], spec.get("distribution", "uniform")
        if dist == "uniform":
            return rng.uniform(lo, hi)
        if dist == "log_uniform":
            if lo <= 0:
                raise ConfigError(f"sweep.parameters.{key}: log_uniform needs min > 0")
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        if dist == "int_uniform":
            return rng.randint(int(lo), int(hi))
        raise ConfigError(
            f"sweep.parameters.{key}.distribution: {dist!r}; choose uniform, log_uniform, int_uniform"
        )
    raise ConfigError(f"sweep.parameters.{key}: expected a list of values or {{min, max, distribution}}")


def sweep_run_id(values: dict[str, Any]) -> str:
    """A folder name for one sweep point, e.g. ``ppo.kl_coef=0.1,seed=0``."""
    parts = [f"{k}={v}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "-", ",".join(parts))[:150]


def wandb_sweep_yaml(exp: Experiment, file: str, preset: str | None, overrides: list[str]) -> dict:
    """The W&B sweep description of ``exp.sweep``: ``wandb agent`` calls ``rlhf experiment run`` once per
    point, passing the swept values as ``key=value`` overrides (the same form as on the command line)."""
    sweep = exp.sweep or {}
    params = {}
    for k, spec in sweep["parameters"].items():
        if isinstance(spec, list):
            params[k] = {"values": spec}
        else:
            params[k] = {kk: vv for kk, vv in spec.items() if kk in ("min", "max", "distribution")}
    command = ["${env}", "rlhf", "experiment", "run", file, "--sweep-run"]
    if preset:
        command += ["--preset", preset]
    command += list(overrides) + ["${args_no_hyphens}"]
    out = {"name": exp.name, "method": sweep.get("method", "grid"), "command": command, "parameters": params}
    if sweep.get("metric"):
        out["metric"] = sweep["metric"]
    # the project the stage runs log to (tracking.project, default rlhf-lab): without it `wandb sweep`
    # creates the sweep in the user's default project and the agent's runs land apart from the stages
    tracking = from_dict(TrackingConfig, exp.tracking)
    out["project"] = tracking.project
    if tracking.entity:
        out["entity"] = tracking.entity
    return out
