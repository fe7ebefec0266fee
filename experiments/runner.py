"""``rlhf experiment run FILE``: a whole RLHF pipeline from one YAML file, cached stage by stage.

An experiment file lists stages in loop order, each with the config of that stage (the same fields
as ``rlhf <stage> --help``); see ``experiments/README.md`` for the full format. In short::

    name: kl_sweep                      # the W&B group and runs/<name>/
    seed: 0                             # seed of every stage (a stage section may set its own)
    gold: vader                         # the gold scorer: simulate.scorer, ppo/eval.gold (unless set)
    stages:
      generate: {model: tiny, limit: 16}
      simulate: {scorer: vader}
      rm_train: {config: experiments/configs/rm_tiny.yaml, loss: bt}   # `config:` = a preset file
      sft: {model: tiny}
      ppo: {kl_coef: 0.05, gold: vader}
      eval: {reward: "${rm_train.model_dir}"}                          # explicit wiring
    sweep: {method: grid, parameters: {ppo.kl_coef: [0.01, 0.1], seed: [0, 1]}}
    rounds: 2                           # the closed loop (see below)
    presets: {tiny: {generate.model: tiny}}   # named override sets: --preset tiny

**Wiring.** Outputs flow as in ``rlhf quickstart`` unless a section sets the field itself:
sft.policy_dir → a later generate's model (candidates come from the SFT policy); generate.candidates → simulate/annotate; their rankings → export, rm_train; rm_train.model_dir and
eval_rankings → rm_eval; sft.policy_dir → ppo/baseline policy; rm_train.model_dir → ppo/baseline
reward; ppo.policy_dir → eval policy (sft as reference). Any string may reference an output with
``${stage.key}``.

**Caching.** Each stage's key is a hash of its resolved config (without ``runs_dir``, ``experiment``
and ``tracking``, with every wired input replaced by the hash of the stage that produced it, and
with the size and mtime of local input files). The key and the stage's result are stored in
``stage.json`` in the stage's run dir (and in ``runs/<name>/.cache/``, so runs of a sweep share
identical upstream stages). A stage reruns when its key changed, its outputs are gone, or
``--from`` names it or one of its inputs; everything downstream of a changed stage gets a new key.
A stage that reruns with another config first moves the earlier result aside, to
``runs/<name>/<stage>@<its key[:8]>/`` (its cache entry follows), so both stay on disk and going back
to the earlier override reuses it.

**Annotation by people** (stage ``annotate``): the candidates are imported into the annotation app's
database; when every prompt has reached its quorum the submitted rankings are exported and the
pipeline goes on. Otherwise the run waits (``wait: true``) or stops with the commands to serve the
app and to resume.

**Rounds** (``rounds: N``): after the first pass, each round samples candidates from the latest
policy on prompts not used yet (``round.select: next``, or ``uncertainty``: the prompts whose
candidates an ensemble of reward models disagrees on most), annotates them, retrains the reward
model on all rankings so far and continues PPO from the last policy. Every round's stages log to
W&B with the tag ``round=<r>`` and artifact lineage rankings → reward model → policy.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.evidence import learning_evidence
from rlhf.config import (
    ConfigProblems,
    build_config,
    did_you_mean,
    from_dict,
    parse_overrides,
    problems_of,
    read_yaml,
    to_dict,
)
from rlhf.errors import ConfigError, UserError
from rlhf.scorers import get_scorer
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
}
# Stages implemented here (annotation by people; the round bookkeeping of the closed loop).
INTERNAL_STAGES = ("annotate", "prompts", "select", "collect")
USER_STAGES = tuple(LIBRARY_STAGES) + ("annotate",)
# The stage fields a top-level ``gold:`` fills in (where the stage's section does not set them): the
# simulated annotators follow it, PPO and evaluation report it. It never reaches a reward.
GOLD_FIELDS = {"simulate": "scorer", "ppo": "gold", "baseline": "gold", "eval": "gold"}
# Result keys that name files or folders a later run needs; a cached stage whose outputs are gone reruns.
OUTPUT_KEYS = ("candidates", "rankings", "out", "model_dir", "eval_rankings", "policy_dir", "prompts")
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


class AnnotationPending(UserError):
    """The human annotation stage has not reached its quorum yet (the message says how to resume)."""

    def __init__(self, message: str):
        super().__init__(message, code="annotation_pending")


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


# ----------------------------------------------------------------------------- the plan (unrolled DAG)


@dataclass
class Node:
    name: str  # instance name, unique in the plan ("ppo", "ppo@2", "rm_ens1@2")
    kind: str
    section: dict  # fields of the stage (``${}`` refs allowed)
    wired: dict[str, str]  # field → "${inst.key}" default wiring
    round: int = 1
    folder: str = ""  # sub-folder under the run prefix ("" = the standard runs/<exp>/<kind>/)

    def refs(self) -> set[str]:
        text = json.dumps([self.section, self.wired])
        return {m.group(1) for m in REF.finditer(text)}


RANKINGS_PRODUCERS = ("simulate", "annotate", "collect")
# The fields of the human annotation stage (it has no config class: run_annotate reads them).
ANNOTATE_FIELDS = ("candidates", "db", "project", "quorum", "wait", "poll_s", "timeout_s", "guidelines")


def default_wiring(kind: str, latest: dict[str, str]) -> dict[str, str]:
    """Quickstart's wiring: each input field ← the latest earlier stage that produces it."""

    def ref(stage: str, key: str) -> str | None:
        return f"${{{latest[stage]}.{key}}}" if stage in latest else None

    rankings = next((f"${{{latest[k]}.rankings}}" for k in ("_rankings",) if k in latest), None)
    wires: dict[str, str | None] = {}
    if kind == "generate":
        # InstructGPT's order: comparisons are sampled from the SFT policy that PPO will start from,
        # so the reward model is trained on the distribution it will score
        wires["model"] = ref("sft", "policy_dir")
    elif kind in ("simulate", "annotate"):
        wires["candidates"] = ref("_candidates", "candidates")
    elif kind in ("export", "rm_train"):
        wires["rankings"] = rankings
    elif kind == "rm_eval":
        wires = {"reward_model": ref("rm_train", "model_dir"), "rankings": ref("rm_train", "eval_rankings")}
    elif kind in ("ppo", "baseline"):
        wires = {"policy": ref("sft", "policy_dir"), "reward": ref("rm_train", "model_dir")}
    elif kind in ("dpo", "kto"):
        wires = {"policy": ref("sft", "policy_dir"), "rankings": rankings}
    elif kind == "eval":
        trained = ("ppo", "baseline", "dpo", "kto")
        policy = next((ref(k, "policy_dir") for k in trained if k in latest), None)
        wires = {
            "policy": policy,
            "reference": ref("sft", "policy_dir"),
            "reward": ref("rm_train", "model_dir"),
        }
    return {k: v for k, v in wires.items() if v is not None}


def _track_latest(latest: dict[str, str], node: Node) -> None:
    latest[node.kind] = node.name
    if node.kind in ("generate", "select"):
        latest["_candidates"] = node.name
    if node.kind in RANKINGS_PRODUCERS:
        latest["_rankings"] = node.name


def _add(plan: list[Node], latest: dict[str, str], node: Node) -> Node:
    node.wired = {k: v for k, v in default_wiring(node.kind, latest).items() if k not in node.section}
    plan.append(node)
    _track_latest(latest, node)
    return node


def _round_section(section: dict, r: int, names: set[str]) -> dict:
    """A round-1 section copied for round ``r``: ``${x.key}`` → ``${x@r.key}`` where round r has ``x``."""
    text = json.dumps(section)

    def sub(m: re.Match) -> str:
        target = f"{m.group(1)}@{r}"
        return f"${{{target}.{m.group(2)}}}" if target in names else m.group(0)

    return json.loads(REF.sub(sub, text))


def build_plan(exp: Experiment) -> list[Node]:
    """Unroll the experiment into an ordered list of stage instances (rounds appended after round 1)."""
    plan: list[Node] = []
    latest: dict[str, str] = {}
    for name, section in exp.stages.items():
        folder = "" if name == stage_kind(name, section) else name
        _add(plan, latest, Node(name, stage_kind(name, section), dict(section), {}, 1, folder))
    kinds = {n.kind: n for n in plan}
    per_round = int(exp.round.get("prompts_per_round", 0) or 0)
    select = exp.round.get("select", "next")
    ensemble = int(exp.round.get("ensemble", 2))
    gen1 = kinds.get("generate")
    all_rankings = [f"${{{latest['_rankings']}.rankings}}"] if "_rankings" in latest else []
    for r in range(2, exp.rounds + 1):
        names_r = {f"{n.name}@{r}" for n in plan if n.round == 1} | {
            f"{k}@{r}" for k in ("prompts", "select", "collect")
        }
        folder = f"round{r}"
        gen_sec = dict(gen1.section)
        # 1. prompts not used in earlier rounds (the rankings so far name them)
        prompts = Node(
            f"prompts@{r}",
            "prompts",
            {
                "source": gen_sec.get("prompts", "lab:prompts"),
                "split": gen_sec.get("split", "train"),
                "exclude": list(all_rankings),
                "n": (
                    exp.round.get("pool", 4 * per_round if per_round else 0)
                    if select == "uncertainty"
                    else per_round
                )
                or int(gen_sec.get("limit") or 0),
            },
            {},
            r,
            folder,
        )
        _add(plan, latest, prompts)
        # 2. candidates from the latest policy
        gen = {
            **_round_section(gen_sec, r, names_r),
            "prompts": f"${{prompts@{r}.prompts}}",
            "split": None,
            "limit": None,
            "model": f"${{{latest['ppo']}.policy_dir}}",
        }
        _add(plan, latest, Node(f"{gen1.name}@{r}", "generate", gen, {}, r, folder))
        if select == "uncertainty":
            members = [f"${{{latest['rm_train']}.model_dir}}"]
            rm1 = kinds["rm_train"]
            for i in range(1, ensemble):
                sec = {
                    **_round_section(rm1.section, r, names_r),
                    "rankings": f"${{{latest['_rankings']}.rankings}}",
                    "seed": int(rm1.section.get("seed", exp.seed)) + 1000 * i,
                }
                node = Node(f"rm_ens{i}@{r}", "rm_train", sec, {}, r, f"{folder}_ens{i}")
                plan.append(node)  # not the loop's reward model: do not update `latest`
                members.append(f"${{{node.name}.model_dir}}")
            _add(
                plan,
                latest,
                Node(
                    f"select@{r}",
                    "select",
                    {
                        "candidates": f"${{{gen1.name}@{r}.candidates}}",
                        "reward_models": members,
                        "n": per_round or 0,
                    },
                    {},
                    r,
                    folder,
                ),
            )
        # 3. the rest of round 1's stages after generate, in order, with rankings merged before training
        for n in [n for n in plan if n.round == 1 and n.kind not in ("generate", "sft")]:
            sec = _round_section(n.section, r, names_r)
            if n.kind == "rm_train":
                collect = Node(f"collect@{r}", "collect", {"rankings": list(all_rankings)}, {}, r, folder)
                _add(plan, latest, collect)
            if n.kind in ("ppo", "baseline"):
                sec["policy"] = f"${{{latest[n.kind]}.policy_dir}}"  # always continue from the last policy
            node = _add(
                plan,
                latest,
                Node(f"{n.name}@{r}", n.kind, sec, {}, r, folder if not n.folder else f"{folder}_{n.folder}"),
            )
            if n.kind in ("simulate", "annotate"):
                all_rankings.append(f"${{{node.name}.rankings}}")
        # collect lists every round's rankings so far (including this round's)
        for node in plan:
            if node.name == f"collect@{r}":
                node.section["rankings"] = list(all_rankings)
    names = {n.name for n in plan}
    for node in plan:
        for ref in node.refs():
            if ref not in names:
                raise ConfigError(
                    f"stages.{node.name}: reference ${{{ref}.…}} names no stage{did_you_mean(ref, names)}; "
                    f"stages: {', '.join(names)}"
                )
    return plan


def upstream_of(plan: list[Node], name: str) -> list[Node]:
    """The nodes of ``plan`` that ``name`` needs (itself included), in plan order."""
    by_name = {n.name: n for n in plan}
    needed: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo.extend(by_name[current].refs())
    return [n for n in plan if n.name in needed]


# ----------------------------------------------------------------------------- hashing and caching


def _resolve(value: Any, results: dict[str, dict], for_hash: dict[str, str] | None = None) -> Any:
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
        return [_resolve(v, results, for_hash) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, results, for_hash) for k, v in value.items()}
    return value


def _file_fingerprint(value: Any, runs_root: Path) -> Any:
    """Size and mtime of local input files outside the runs folder (so editing a prompts file reruns)."""
    out = {}

    def walk(v: Any) -> None:
        if (
            isinstance(v, str)
            and v
            and len(v) < 500
            and ("/" in v or v.endswith((".jsonl", ".json", ".yaml")))
        ):
            p = Path(v)
            try:
                if p.is_file() and runs_root.resolve() not in p.resolve().parents:
                    st = p.stat()
                    out[v] = [st.st_size, int(st.st_mtime)]
            except OSError:
                pass
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    walk(value)
    return out


def stage_key(kind: str, hashed_config: dict, runs_root: Path) -> str:
    """The cache key of a stage: sha256 of its kind, its config (run-location fields dropped) and input files."""
    cfg = {k: v for k, v in hashed_config.items() if k not in ("runs_dir", "experiment", "tracking")}
    blob = json.dumps(
        {"kind": kind, "config": cfg, "files": _file_fingerprint(cfg, runs_root)}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _outputs_exist(result: dict) -> bool:
    for key in OUTPUT_KEYS:
        v = result.get(key)
        if isinstance(v, str) and v and not Path(v).exists():
            return False
    return bool(result.get("run_dir")) and Path(result["run_dir"]).is_dir()


def cached_result(key: str, run_dir: Path, cache_dir: Path) -> dict | None:
    """The stored result of a stage with this key, if its ``stage.json`` still says so and its outputs exist."""
    for cand in (run_dir / "stage.json", cache_dir / f"{key}.json"):
        try:
            info = json.loads(cand.read_text())
        except (OSError, ValueError):
            continue
        if info.get("key") != key:
            continue
        result = info.get("result") or {}
        home = Path(result.get("run_dir", run_dir)) / "stage.json"
        try:  # the run dir the result lives in must still hold this very stage (not a later rerun)
            if json.loads(home.read_text()).get("key") != key:
                continue
        except (OSError, ValueError):
            continue
        if _outputs_exist(result):
            return result
    return None


def store_result(key: str, node: Node, result: dict, seconds: float, cache_dir: Path) -> None:
    info = {
        "key": key,
        "stage": node.name,
        "kind": node.kind,
        "round": node.round,
        "seconds": round(seconds, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "result": json.loads(json.dumps(result, default=str)),
    }
    run_dir = Path(result["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(info, indent=2)
    (run_dir / "stage.json").write_text(text)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / f"{key}.json").write_text(text)


def keep_earlier_result(run_dir: Path, key: str, cache_dir: Path) -> Path | None:
    """Move the finished result of another config out of ``run_dir`` before the stage reruns there with
    config ``key``: to ``<run_dir>@<its key[:8]>/`` beside it, its ``stage.json`` and cache entry
    rewritten to point there. Going back to that config reuses it, and both runs stay on disk to
    compare. Returns where it went, or None when ``run_dir`` holds no finished result of another config
    (an interrupted run stays, so that the rerun may resume it)."""
    try:
        info = json.loads((run_dir / "stage.json").read_text())
    except (OSError, ValueError):
        return None
    earlier_key = info.get("key")
    if not earlier_key or earlier_key == key:
        return None
    target = run_dir.with_name(f"{run_dir.name}@{earlier_key[:8]}")
    suffix = 2
    while target.exists():  # the same config ran here twice (a --from rerun): keep both
        target = run_dir.with_name(f"{run_dir.name}@{earlier_key[:8]}-{suffix}")
        suffix += 1
    moves = {str(run_dir): str(target), str(run_dir.resolve()): str(target.resolve())}
    run_dir.rename(target)
    info["result"] = _moved_paths(info.get("result") or {}, moves)
    text = json.dumps(info, indent=2)
    (target / "stage.json").write_text(text)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / f"{earlier_key}.json").write_text(text)
    return target


def _moved_paths(value: Any, moves: dict[str, str]) -> Any:
    """``value`` with every path under a moved folder (``moves``: old → new) pointing at the new place."""
    if isinstance(value, str):
        for old, new in moves.items():
            if value == old or value.startswith(old + os.sep):
                return new + value[len(old) :]
        return value
    if isinstance(value, list):
        return [_moved_paths(v, moves) for v in value]
    if isinstance(value, dict):
        return {k: _moved_paths(v, moves) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- running


@dataclass
class RunContext:
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


def _runs_dir_for(ctx: RunContext, node: Node) -> Path:
    if not node.folder:
        return ctx.prefix
    return ctx.prefix / ctx.exp.name / node.folder


def _library_config(ctx: RunContext, node: Node, fields: dict):
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
        "runs_dir": str(_runs_dir_for(ctx, node)),
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


def _stage_dir_name(kind: str, cfg: Any) -> str:
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


def _node_fields(node: Node) -> dict:
    return {**node.wired, **node.section}


def run_plan(ctx: RunContext, plan: list[Node]) -> dict[str, dict]:
    """Run (or reuse) every stage of the plan in order; returns results by instance name."""
    runs_root = Path(ctx.exp.runs_dir)
    cache_dir = runs_root / ctx.exp.name / ".cache"
    results: dict[str, dict] = {}
    keys: dict[str, str] = {}
    forced: set[str] = set()
    if ctx.force_from:
        names = [n.name for n in plan]
        if ctx.force_from not in names:
            raise ConfigError(
                f"--from {ctx.force_from!r}: no such stage{did_you_mean(ctx.force_from, names)}; "
                f"stages: {', '.join(names)}"
            )
    for kind in dict.fromkeys(n.kind for n in plan if n.kind in LIBRARY_STAGES):
        module = LIBRARY_STAGES[kind][0]
        if importlib.util.find_spec(module) is None:  # fail before the first stage runs, not hours later
            raise UserError(
                f"the {kind} stage is not available in this installation (no module {module}); "
                f"remove it from the experiment or install it",
                code="stage_unavailable",
            )
    problems = check_plan(ctx, plan)
    if problems:
        raise ConfigProblems(problems, where=ctx.file or ctx.exp.name)
    status: dict[str, dict] = {}
    for node in plan:
        fields = _node_fields(node)
        if ctx.force_from == node.name or node.refs() & forced:
            forced.add(node.name)
        if ctx.dry_run and not all(
            "run_dir" in results.get(r, {}) and results[r].get("_cached") for r in node.refs()
        ):
            # an input would be (re)built first: this stage's key is not known yet, so it runs
            print(f"  {node.name:<14} {'run':<7} (after its inputs)")
            results[node.name] = {}
            status[node.name] = {"status": "run"}
            continue
        hashed = _resolve(fields, results, for_hash=keys)
        if node.kind in LIBRARY_STAGES:
            # The key covers the fully resolved config (defaults included), built with hash tokens in
            # place of wired paths; the real config is built again below with the real paths.
            real_fields = _resolve(fields, results)
            real_cfg = _library_config(ctx, node, real_fields)
            hashed_cfg = to_dict(real_cfg)
            _tokenise(hashed_cfg, real_fields, hashed)
            # (the preset file's values are in the config itself; where it lives and W&B settings are not)
            extra = {k: v for k, v in hashed.items() if k not in ("config", "tracking", "stage")}
            key = stage_key(node.kind, {**hashed_cfg, "_fields": extra}, runs_root)
            run_dir = Path(real_cfg.runs_dir) / ctx.exp.name / _stage_dir_name(node.kind, real_cfg)
        else:
            real_cfg = None
            key = stage_key(node.kind, {"_fields": hashed, "seed": ctx.exp.seed}, runs_root)
            run_dir = _runs_dir_for(ctx, node) / ctx.exp.name / node.kind
        keys[node.name] = key
        hit = None if node.name in forced else cached_result(key, run_dir, cache_dir)
        if ctx.dry_run:
            state = "cached" if hit else ("forced" if node.name in forced else "run")
            print(f"  {node.name:<14} {state:<7} key {key}  → {run_dir}")
            results[node.name] = {**hit, "_cached": True} if hit else {}
            status[node.name] = {"status": state, "key": key}
            continue
        if hit is not None:
            print(f"== {node.name}: cached ({key}) → {hit['run_dir']}", flush=True)
            results[node.name] = hit
            status[node.name] = {"status": "cached", "key": key, "seconds": 0.0}
            continue
        print(
            f"\n== {node.name} ({node.kind}{', round ' + str(node.round) if node.round > 1 else ''}) ==",
            flush=True,
        )
        t0 = time.time()
        # A finished result of another config moves aside first (the annotate folder stays: it holds the
        # annotation database every run of the experiment shares).
        kept = keep_earlier_result(run_dir, key, cache_dir) if node.kind != "annotate" else None
        if kept is not None:
            print(f"   (the earlier result of {node.name} is kept in {kept})", flush=True)
        # The stage is about to overwrite its run dir: until it finishes, that dir holds no valid result
        # (an interrupted rerun must not leave an old stage.json vouching for half-written outputs).
        (run_dir / "stage.json").unlink(missing_ok=True)
        with agent_run_env(ctx.agent_stage is None or node.name == ctx.agent_stage):
            if real_cfg is not None:
                module, _, fn_name = LIBRARY_STAGES[node.kind]
                result = getattr(importlib.import_module(module), fn_name)(real_cfg)
            else:
                result = run_internal(ctx, node, _resolve(fields, results), run_dir)
        seconds = time.time() - t0
        result = dict(result or {})
        result.setdefault("run_dir", str(run_dir))
        store_result(key, node, result, seconds, cache_dir)
        results[node.name] = result
        status[node.name] = {"status": "ran", "key": key, "seconds": round(seconds, 2)}
    ctx.status = status
    return results


# ----------------------------------------------------------------------------- checking the plan before any stage runs


def check_plan(ctx: RunContext, plan: list[Node]) -> list[str]:
    """Every problem any stage of ``plan`` would stop on that can be known before the first one runs,
    one line each (``stages.<stage>.<field>: <problem>``), so a typo in the last stage does not
    surface only after an hour of generation and reward-model training.

    Each library stage's config is built exactly as it will be for the run (``_library_config``: the
    field types, choices and the config's own ``validate()``), with every ``${stage.key}`` replaced
    by a stand-in for that output (:func:`_stand_in`); then the inputs the section names itself are
    checked (:data:`INPUT_CHECKS`). Inputs an earlier stage produces do not exist yet: the stage
    that writes them is checked instead.
    """
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rlhf-plan-") as tmp:
        for node in plan:
            problems += _node_problems(ctx, node, Path(tmp))
    # the config's validate() and an input check may find the same problem: say it once
    return _most_specific(list(dict.fromkeys(problems)))


def _most_specific(problems: list[str]) -> list[str]:
    """One line per problem: where the same message is reported for a stage (``stages.ppo: ...``)
    and for one of its fields (``stages.ppo.reward: ...``), the field's line alone."""

    def where_and_what(line: str) -> tuple[str, str]:
        where, _, what = line.partition(": ")
        return where, what

    by_field = {what for where, what in map(where_and_what, problems) if where.count(".") >= 2}
    return [
        p for p in problems if where_and_what(p)[0].count(".") >= 2 or where_and_what(p)[1] not in by_field
    ]


def _node_problems(ctx: RunContext, node: Node, stand_in_root: Path) -> list[str]:
    fields = _node_fields(node)
    wired = {k for k, v in fields.items() if REF.search(json.dumps(v))}
    if node.kind == "annotate":
        unknown = [k for k in fields if k not in (*ANNOTATE_FIELDS, "stage")]
        problems = [
            f"stages.{node.name}.{key}: unknown key{did_you_mean(key, ANNOTATE_FIELDS)}; "
            f"valid keys: {', '.join(ANNOTATE_FIELDS)}"
            for key in unknown
        ]
        return problems + _input_problems(node, fields, wired)
    if node.kind not in LIBRARY_STAGES:
        return []  # the round bookkeeping stages (prompts, select, collect) take only wired values
    try:
        cfg = _library_config(ctx, node, _resolve(fields, _stand_in_outputs(fields, stand_in_root)))
    except UserError as err:
        # still check the inputs the section names, so every problem of the stage is listed at once
        return problems_of(err) + _input_problems(node, fields, wired)
    return _input_problems(node, vars(cfg), wired)


def _input_problems(node: Node, values: dict, wired: set[str]) -> list[str]:
    problems = []
    for name, check in INPUT_CHECKS.items():
        value = values.get(name)
        if name in wired or not value or not isinstance(value, (str, list)):
            continue  # produced upstream, unset (optional), or a wrong type the config already reported
        try:
            check(value)
        except UserError as err:
            message = str(err)
            if not message.startswith(f"{name}: "):
                message = f"{name}: {message}"
            problems.append(f"stages.{node.name}.{message}")
    return problems


def _stand_in_outputs(fields: dict, root: Path) -> dict[str, dict[str, str]]:
    """``{stage: {key: stand-in}}`` for every ``${stage.key}`` in ``fields`` (the shape of the results
    :func:`_resolve` reads)."""
    outputs: dict[str, dict[str, str]] = {}
    for match in REF.finditer(json.dumps(fields)):
        stage, key = match.groups()
        outputs.setdefault(stage, {})[key] = _stand_in(root, stage, key)
    return outputs


def _stand_in(root: Path, stage: str, key: str) -> str:
    """An existing path shaped like output ``key`` of ``stage`` will be, so a config that reads it
    passes its own checks unchanged: a reward-model dir (with its metadata file) for ``model_dir``,
    an empty dir for the other ``*_dir`` outputs, an empty JSON Lines file for data
    (docs/architecture.md lists what each stage writes)."""
    from reward_models.model import META_FILE

    path = root / f"{stage}.{key}"
    if key.endswith("_dir"):
        path.mkdir(exist_ok=True)
        if key == "model_dir":
            (path / META_FILE).write_text("{}")
        return str(path)
    path = path.with_name(path.name + ".jsonl")
    path.touch()
    return str(path)


def _check_model(name: str) -> None:
    from rlhf.models import check_model_name  # imports torch: only when a plan is checked

    check_model_name(name)


def _check_scorer(spec: str) -> None:
    get_scorer(spec)  # builds it: a module:function spec is imported, a python: file is run


def _check_reward(reward: str | list[dict]) -> None:
    """A reward as :func:`rlhf.rewards.load_reward_fn` reads it: parts that name a directory must be
    reward-model dirs (``check_reward_spec``, the rule PPO and the baselines apply), the others are
    scorer specs."""
    from rlhf.rewards import check_reward_spec, spec_parts

    check_reward_spec(reward)  # also rejects a list item without `spec`, and checks an ensemble's members
    for part in spec_parts(reward):
        if not Path(str(part)).expanduser().is_dir():
            _check_scorer(str(part))


def _check_reward_model_dir(path: str) -> None:
    from reward_models.model import read_meta

    read_meta(path)


DATA_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")  # the files rlhf.data reads


def _check_data_source(source: str) -> None:
    """A data source as :mod:`rlhf.data` reads it: ``lab:<name>``, an existing file or dataset
    folder, or (only with the Hub online) a Hub dataset id."""
    from huggingface_hub import constants

    from rlhf.data import LAB_SOURCES

    if source.startswith("lab:"):
        name = source[len("lab:") :]
        if name not in LAB_SOURCES:
            raise ConfigError(
                f"unknown shipped data {source!r}{did_you_mean(name, LAB_SOURCES, 'lab:')}; "
                f"choose {' or '.join('lab:' + n for n in LAB_SOURCES)}"
            )
        return
    path = Path(source).expanduser()
    if path.exists():
        return
    local = source.startswith((".", "/", "~")) or path.suffix.lower() in DATA_FILE_SUFFIXES
    if not local and not constants.HF_HUB_OFFLINE:
        return  # may be a Hub dataset id; the stage fetches it
    siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    hint = did_you_mean(path.name, siblings, f"{path.parent}/" if str(path.parent) != "." else "")
    offline = "" if local else " (and the Hub is offline, HF_HUB_OFFLINE=1, so it is no Hub dataset)"
    raise ConfigError(f"{source}: no such file or dataset folder{hint}{offline}")


# The input fields of the stages, by name (a field name means the same in every stage, see
# `rlhf <stage> --help`) → the check each gets before any stage runs.
INPUT_CHECKS = {
    "model": _check_model,
    "policy": _check_model,
    "reference": _check_model,
    "norm_policy": _check_model,
    "scorer": _check_scorer,
    "gold": _check_scorer,
    "reward": _check_reward,
    "reward_model": _check_reward_model_dir,
    "prompts": _check_data_source,
    "demonstrations": _check_data_source,
    "candidates": _check_data_source,
    "rankings": _check_data_source,
    "eval_rankings": _check_data_source,
}


def _tokenise(cfg_dict: dict, real_fields: dict, hashed_fields: dict) -> None:
    """In the resolved config, put the hash tokens back where wired paths were substituted."""
    for k, real in real_fields.items():
        if k in cfg_dict and real != hashed_fields.get(k):
            cfg_dict[k] = hashed_fields.get(k)


# ----------------------------------------------------------------------------- internal stages


@dataclass
class InternalStageConfig:
    """What an internal stage (annotate, prompts, select, collect) records as its W&B run config."""

    experiment: str
    runs_dir: str
    seed: int
    round: int
    params: dict
    tracking: Any = None


# Inputs and outputs of the internal stages, for W&B lineage: field or result key → artifact type.
INTERNAL_INPUTS = {
    "candidates": "dataset",
    "rankings": "dataset",
    "exclude": "dataset",
    "reward_models": "model",
}
INTERNAL_OUTPUTS = ("rankings", "candidates", "prompts")


def log_internal_stage(ctx: RunContext, node: Node, fields: dict, result: dict) -> None:
    """Record an internal stage as a W&B run (group = experiment, job_type = its kind) with its inputs and
    outputs as artifacts, so round r's lineage reads rankings → collected rankings → reward model → policy."""
    from rlhf.tracking import start_stage

    cfg = InternalStageConfig(
        experiment=ctx.exp.name,
        runs_dir=str(_runs_dir_for(ctx, node)),
        seed=ctx.exp.seed,
        round=node.round,
        params=json.loads(json.dumps(fields, default=str)),
        tracking=from_dict(TrackingConfig, stage_tracking(ctx, node)),
    )
    tracker = start_stage(cfg, node.kind)
    try:
        for key, art_type in INTERNAL_INPUTS.items():
            values = fields.get(key)
            for path in values if isinstance(values, list) else [values]:
                if isinstance(path, str) and path and Path(path).exists():
                    tracker.use_artifact(path, f"{ctx.exp.name}-{key}", art_type)
        stats = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if stats:
            tracker.log(stats, step=0)
            tracker.summary(stats)
        for key in INTERNAL_OUTPUTS:
            if isinstance(result.get(key), str):
                tracker.log_artifact(
                    result[key],
                    f"{ctx.exp.name}-{key}",
                    "dataset",
                    metadata={"round": node.round, "stage": node.name},
                )
    finally:
        tracker.finish()


def run_internal(ctx: RunContext, node: Node, fields: dict, run_dir: Path) -> dict:
    result = _run_internal(ctx, node, fields, run_dir)
    log_internal_stage(ctx, node, fields, result)
    return result


def _run_internal(ctx: RunContext, node: Node, fields: dict, run_dir: Path) -> dict:
    from rlhf.data import write_jsonl

    run_dir.mkdir(parents=True, exist_ok=True)
    if node.kind == "annotate":
        return run_annotate(ctx, node, fields, run_dir)
    if node.kind == "collect":
        from rlhf.data import load_rankings

        rows = [r for src in fields["rankings"] for r in load_rankings(src)]
        out = run_dir / "rankings.jsonl"
        write_jsonl(out, rows)
        print(f"collect: {len(rows)} rankings from {len(fields['rankings'])} rounds → {out}")
        return {"run_dir": str(run_dir), "rankings": str(out), "n_rankings": len(rows)}
    if node.kind == "prompts":
        from rlhf.data import load_prompts, load_rankings

        used = {r["prompt_id"] for src in fields["exclude"] for r in load_rankings(src)}
        pool = [
            p for p in load_prompts(fields["source"], split=fields["split"]) if p["prompt_id"] not in used
        ]
        n = int(fields.get("n") or 0)
        chosen = pool[:n] if n else pool
        if not chosen:
            raise UserError(
                f"round {node.round}: no unused prompts left in {fields['source']!r} "
                f"({len(used)} used in earlier rounds); add prompts or lower rounds",
                code="no_prompts",
            )
        out = run_dir / "prompts.jsonl"
        write_jsonl(out, chosen)
        print(f"prompts: {len(chosen)} prompts not used in earlier rounds → {out}")
        return {"run_dir": str(run_dir), "prompts": str(out), "n_prompts": len(chosen)}
    if node.kind == "select":
        return run_select(fields, run_dir)
    raise ConfigError(f"unknown internal stage {node.kind!r}")


def ensemble_disagreement(scores: list[list[float]]) -> float:
    """Disagreement of an ensemble on one prompt's candidates: the mean over candidates of the variance
    across members of their (normalised) scores. ``scores[m][c]`` = member m's score of candidate c."""
    n_members = len(scores)
    if n_members < 2:
        return 0.0
    n_cands = len(scores[0])
    total = 0.0
    for c in range(n_cands):
        col = [scores[m][c] for m in range(n_members)]
        mean = sum(col) / n_members
        total += sum((x - mean) ** 2 for x in col) / n_members
    return total / n_cands if n_cands else 0.0


def run_select(fields: dict, run_dir: Path) -> dict:
    """Keep the ``n`` prompts whose candidates the reward-model ensemble disagrees on most."""
    from rlhf.data import load_candidates, prompt_text, write_jsonl
    from rlhf.rewards import load_reward_fn

    records = load_candidates(fields["candidates"])
    prompts = [prompt_text(r["prompt"]) for r in records for _ in r["candidates"]]
    texts = [c["text"] for r in records for c in r["candidates"]]
    member_scores = []
    for spec in fields["reward_models"]:
        fn = load_reward_fn(spec)
        member_scores.append([float(x) for x in fn(prompts, texts)])
    per_prompt, pos = [], 0
    for r in records:
        k = len(r["candidates"])
        per_prompt.append(ensemble_disagreement([s[pos : pos + k] for s in member_scores]))
        pos += k
    n = int(fields.get("n") or 0) or len(records)
    order = sorted(range(len(records)), key=lambda i: -per_prompt[i])[:n]
    chosen = [records[i] for i in sorted(order)]
    out = run_dir / "candidates.jsonl"
    write_jsonl(out, chosen)
    table = [
        {"prompt_id": records[i]["prompt_id"], "disagreement": per_prompt[i], "selected": i in order}
        for i in range(len(records))
    ]
    write_jsonl(run_dir / "disagreement.jsonl", table)
    sel = [per_prompt[i] for i in order]
    rest = [per_prompt[i] for i in range(len(records)) if i not in order]
    stats = {
        "select/pool": len(records),
        "select/selected": len(chosen),
        "select/disagreement_selected": sum(sel) / len(sel) if sel else 0.0,
        "select/disagreement_rest": sum(rest) / len(rest) if rest else 0.0,
    }
    (run_dir / "summary.json").write_text(json.dumps(stats, indent=2))
    print(
        f"select: {len(chosen)} of {len(records)} prompts by ensemble disagreement "
        f"(mean {stats['select/disagreement_selected']:.4f} selected vs {stats['select/disagreement_rest']:.4f} rest)"
    )
    return {"run_dir": str(run_dir), "candidates": str(out), **stats}


def run_annotate(ctx: RunContext, node: Node, fields: dict, run_dir: Path) -> dict:
    """Human annotation: import the candidates into the app DB; go on once every prompt has its quorum.
    Its fields (:data:`ANNOTATE_FIELDS`) were checked with the whole plan (:func:`check_plan`)."""
    from annotation_app.io import export_rankings, import_candidates
    from annotation_app.store import Store

    db = fields.get("db") or str(Path(ctx.exp.runs_dir) / ctx.exp.name / "annotate" / "lab.db")
    project = str(fields.get("project") or (f"{ctx.exp.name}-r{node.round}"))
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    store = Store(db)
    store.migrate()
    res = import_candidates(
        store,
        fields["candidates"],
        project=project,
        quorum=fields.get("quorum"),
        guidelines=fields.get("guidelines"),
    )
    print(f"annotate: {res['added']} new prompts imported into {db} (project {project!r})")
    deadline = time.time() + float(fields.get("timeout_s", 0) or 0)
    while True:
        stats = store.stats()
        mine = [p for p in stats["prompts"] if p["project_id"] == project]
        done = sum(1 for p in mine if p["submitted"] >= p["quorum"])
        if mine and done == len(mine):
            break
        if not fields.get("wait") or (fields.get("timeout_s") and time.time() > deadline):
            resume = "rlhf experiment run " + shlex.quote(ctx.file or "FILE")
            raise AnnotationPending(
                f"annotation incomplete: {done}/{len(mine)} prompts of project {project!r} have their quorum.\n"
                f"  serve the app:  rlhf annotate serve --db {shlex.quote(db)}\n"
                f"  progress:       rlhf annotate stats --db {shlex.quote(db)}\n"
                f"  then resume:    {resume}   (finished stages are reused)"
            )
        print(f"annotate: waiting, {done}/{len(mine)} prompts have their quorum", flush=True)
        time.sleep(float(fields.get("poll_s", 30)))
    out = run_dir / "rankings.jsonl"
    info = export_rankings(store, str(out), fmt="rankings", project=project)
    print(f"annotate: quorum reached; {info['records']} rankings → {out}")
    return {
        "run_dir": str(run_dir),
        "rankings": str(out),
        "db": db,
        "project": project,
        "annotate/rankings": info["records"],
    }


# ----------------------------------------------------------------------------- the command


def run_experiment(
    file: str,
    overrides: list[str] | dict | None = None,
    *,
    preset: str | None = None,
    force_from: str | None = None,
    dry_run: bool = False,
    sweep_run: bool = False,
    only: list[int] | None = None,
) -> dict:
    """Run an experiment file (all sweep points in turn when it has a sweep); returns a summary dict."""
    ov = parse_overrides(list(overrides)) if isinstance(overrides, list) else dict(overrides or {})
    raw = load_raw(file)
    exp = parse_experiment(raw, file, preset, ov)
    base_tags = [f"experiment={exp.name}"]

    def variant(values: dict) -> Experiment:  # the experiment at one sweep point
        return parse_experiment(raw, file, preset, {**ov, **values})

    if exp.sweep is None or sweep_run:
        if sweep_run:  # one point of a `wandb agent` sweep: place it like a local sweep run
            values = {k: v for k, v in ov.items() if k in (exp.sweep or {}).get("parameters", {})}
            points = sweep_points(exp.sweep) if exp.sweep else []
            return _run_point(exp, file, values, force_from, dry_run, base_tags, variant, points)
        plan = build_plan(exp)
        ctx = RunContext(exp, Path(exp.runs_dir), base_tags, {}, force_from, dry_run, file)
        return _finish(ctx, plan, run_plan(ctx, plan), Path(exp.runs_dir) / exp.name)
    points = sweep_points(exp.sweep)
    chosen = [(i, values) for i, values in enumerate(points) if not only or i in only]
    problems = check_sweep(raw, file, preset, ov, [values for _, values in chosen])
    if problems:
        raise ConfigProblems(problems, where=file)
    print(
        f"sweep {exp.name}: {len(points)} runs ({exp.sweep.get('method', 'grid')} over "
        f"{', '.join(exp.sweep['parameters'])}), one after another"
    )
    summaries = []
    for i, values in chosen:
        print(f"\n######## sweep run {i + 1}/{len(points)}: {sweep_run_id(values)}", flush=True)
        summaries.append(
            _run_point(variant(values), file, values, force_from, dry_run, base_tags, variant, points)
        )
    root = Path(exp.runs_dir) / exp.name
    root.mkdir(parents=True, exist_ok=True)
    sweep_summary = {
        "experiment": exp.name,
        "parameters": list(exp.sweep["parameters"]),
        "runs": [{"values": s["sweep_values"], "dir": s["dir"], "stages": s["stages"]} for s in summaries],
    }
    if not dry_run:
        (root / "sweep.json").write_text(json.dumps(sweep_summary, indent=2, default=str))
        _auto_compare(exp, root)
    return sweep_summary


def check_sweep(raw: dict, file: str, preset: str | None, overrides: dict, points: list[dict]) -> list[str]:
    """The problems of every sweep point (each its own experiment), found before the first one runs.
    A problem every point has is listed once; the others name the sweep runs that have them."""
    found: dict[str, list[str]] = {}  # problem → the sweep runs that have it
    for values in points:
        try:
            exp = parse_experiment(raw, file, preset, {**overrides, **values})
            ctx = _point_context(exp, file, values, force_from=None, dry_run=True, base_tags=[])
            problems = check_plan(ctx, build_plan(exp))
        except UserError as err:
            problems = problems_of(err)
        for problem in problems:
            found.setdefault(problem, []).append(sweep_run_id(values))
    return [
        problem if len(runs) == len(points) else f"sweep run {', '.join(runs)}: {problem}"
        for problem, runs in found.items()
    ]


def _point_context(exp: Experiment, file: str, values: dict, force_from, dry_run, base_tags) -> RunContext:
    """A sweep point runs in runs/<experiment>/sweep/<values>/ (its stages are tagged with the values
    each depends on: :func:`stage_tracking`)."""
    prefix = Path(exp.runs_dir) / exp.name / "sweep" / sweep_run_id(values)
    return RunContext(exp, prefix, list(base_tags), dict(values), force_from, dry_run, file)


def sweep_dependencies(
    variant: Callable[[dict], Experiment], values: dict, points: list[dict]
) -> tuple[dict[str, dict], set[str]]:
    """For the sweep point ``values``: the swept values each of its stages depends on, and the stages it
    shares with another point of ``points`` (``variant(values)`` is the experiment at a point).

    A stage depends on a swept key when giving that key another of its swept values changes what the
    stage is made of (:func:`stage_fingerprints`). A stage is shared when another point has the same
    values for every key it depends on: the cache hands that point the same run.
    """
    mine = stage_fingerprints(variant(values))
    depends: dict[str, dict] = {name: {} for name in mine}
    for key, value in values.items():
        other = next((p[key] for p in points if key in p and p[key] != value), None)
        if other is None:
            continue  # one value in the whole sweep: no stage differs by it
        changed = stage_fingerprints(variant({**values, key: other}))
        for name, fingerprint in mine.items():
            if changed.get(name) != fingerprint:
                depends[name][key] = value
    shared = {
        name
        for name, own in depends.items()
        if any(p != values and all(p.get(k) == v for k, v in own.items()) for p in points)
    }
    return depends, shared


def stage_fingerprints(exp: Experiment) -> dict[str, str]:
    """Stage instance → a digest of what its result is made of: its kind, its fields (W&B settings
    aside), its seed and the digests of the stages it reads. It is what :func:`stage_key` covers,
    known before anything runs (defaults and input file sizes aside: every sweep point has the same)."""
    prints: dict[str, str] = {}
    for node in build_plan(exp):
        fields = {k: v for k, v in _node_fields(node).items() if k != "tracking"}
        seed = fields.get("seed", exp.seed) if node.kind in LIBRARY_STAGES else exp.seed
        inputs = {ref: prints.get(ref) for ref in sorted(node.refs())}
        blob = json.dumps(
            {"kind": node.kind, "fields": fields, "seed": seed, "inputs": inputs}, sort_keys=True, default=str
        )
        prints[node.name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return prints


def _run_point(
    exp: Experiment,
    file: str,
    values: dict,
    force_from,
    dry_run,
    base_tags,
    variant: Callable[[dict], Experiment],
    points: list[dict],
) -> dict:
    ctx = _point_context(exp, file, values, force_from, dry_run, base_tags)
    ctx.stage_values, ctx.shared_stages = sweep_dependencies(variant, values, points)
    prefix = ctx.prefix
    plan = build_plan(exp)
    if os.environ.get("WANDB_SWEEP_ID"):  # launched by `wandb agent`
        ctx.agent_stage = (exp.sweep or {}).get("agent_stage") or plan[-1].name
    results = run_plan(ctx, plan)
    if not dry_run:
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "sweep_run.json").write_text(
            json.dumps({"experiment": exp.name, "values": values}, indent=2, default=str)
        )
    out = _finish(ctx, plan, results, prefix)
    out["sweep_values"] = values
    return out


def _finish(ctx: RunContext, plan: list[Node], results: dict, out_dir: Path) -> dict:
    status = ctx.status
    summary = {
        "experiment": ctx.exp.name,
        "dir": str(out_dir),
        "stages": {
            n.name: {
                **status.get(n.name, {}),
                "run_dir": results[n.name].get("run_dir"),
                **{
                    k: v
                    for k, v in results[n.name].items()
                    if isinstance(v, (int, float, str)) and k != "run_dir"
                },
            }
            for n in plan
        },
    }
    if ctx.dry_run:
        return summary
    evidence = learning_evidence(summary["stages"])
    if evidence:
        summary["evidence"] = evidence
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "experiment_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    ran = [n for n, s in summary["stages"].items() if s.get("status") == "ran"]
    cached = [n for n, s in summary["stages"].items() if s.get("status") == "cached"]
    print(
        f"\n{ctx.exp.name}: ran {len(ran)} stage(s) ({', '.join(ran) or 'none'}), reused {len(cached)} from cache; "
        f"summary: {out_dir / 'experiment_summary.json'}"
    )
    if ctx.exp.sweep is None:
        _auto_compare(ctx.exp, out_dir)
    return summary


def _auto_compare(exp: Experiment, root: Path) -> None:
    """Run the experiment's ``compare:`` block (e.g. the overoptimization plot) into runs/<exp>/compare/."""
    if not exp.compare:
        return
    from experiments.compare import compare_runs

    spec = dict(exp.compare)
    metrics = spec.get("metrics") or []
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    try:
        res = compare_runs(
            [str(root)],
            metrics=metrics,
            out=str(root / "compare"),
            stage=spec.get("stage"),
            x=spec.get("x", "step"),
            title=spec.get("title") or exp.name,
            strict=False,
        )
    except UserError as err:  # the pipeline itself succeeded: a comparison that cannot be drawn is a warning
        print(f"compare: skipped ({err})")
        return
    print(f"compare: {res['png']}  {res['html']}")


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or [])
    if args.wandb_sweep:
        raw, parsed_overrides = load_raw(args.file), parse_overrides(overrides)
        exp = parse_experiment(raw, args.file, args.preset, parsed_overrides)
        if not exp.sweep:
            raise ConfigError(f"--wandb-sweep: {args.file} has no `sweep:` block")
        # the agent runs each point later: a typo must stop the sweep before it is created
        problems = check_sweep(raw, args.file, args.preset, parsed_overrides, sweep_points(exp.sweep))
        if problems:
            raise ConfigProblems(problems, where=args.file)
        spec = wandb_sweep_yaml(exp, args.file, args.preset, overrides)
        Path(args.wandb_sweep).parent.mkdir(parents=True, exist_ok=True)
        Path(args.wandb_sweep).write_text(yaml.safe_dump(spec, sort_keys=False))
        print(
            f"wrote {args.wandb_sweep}; start it with:\n  wandb sweep {args.wandb_sweep}\n"
            f"  wandb agent <entity>/<project>/<sweep id printed by the line above>"
        )
        return 0
    only = [int(x) for x in args.only.split(",")] if args.only else None
    if args.dry_run:
        print(f"plan for {args.file} (nothing runs):")
    run_experiment(
        args.file,
        overrides,
        preset=args.preset,
        force_from=args.from_stage,
        dry_run=args.dry_run,
        sweep_run=args.sweep_run,
        only=only,
    )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "experiment",
        help="run a named pipeline, sweep or closed loop from a YAML file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="experiment_command", metavar="{run}", required=True)
    r = sub.add_parser(
        "run",
        help="run an experiment file (cached: only changed stages rerun)",
        description="Run FILE's stages in order, reusing every stage whose config and inputs did "
        "not change. Overrides after FILE: stage.field=value (ppo.kl_coef=0.1) or a top-level "
        "key (seed=3, rounds=2, tracking.mode=disabled).",
    )
    r.add_argument("file", metavar="FILE.yaml", help="experiment file, e.g. experiments/quickstart.yaml")
    r.add_argument("--preset", default=None, help="apply the file's named override set (e.g. tiny)")
    r.add_argument(
        "--from",
        dest="from_stage",
        metavar="STAGE",
        default=None,
        help="rerun this stage and everything after it that uses its outputs, even if cached",
    )
    r.add_argument(
        "--dry_run", action="store_true", help="print which stages would run or be reused; run nothing"
    )
    r.add_argument(
        "--wandb_sweep",
        metavar="OUT.yaml",
        default=None,
        help="write the W&B sweep YAML for the file's sweep block (and print how to start the agent) "
        "instead of running locally",
    )
    r.add_argument(
        "--sweep_run",
        action="store_true",
        help="(used by wandb agent) run one sweep point given as overrides, in its sweep folder",
    )
    r.add_argument(
        "--only", default=None, metavar="I,J", help="run only these sweep points (0-based indices)"
    )
    r.set_defaults(func=_cmd_run, overrides=[])
    return p


if __name__ == "__main__":  # pragma: no cover
    from rlhf.cli import main

    sys.exit(main(["experiment", *sys.argv[1:]]))
