"""Checking a plan (and every point of a sweep) before any stage runs: each stage's config built as
it will be for the run, and the inputs its section names checked, one problem a line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from huggingface_hub import constants

from experiments.pipeline.experiment_file import (
    LIBRARY_STAGES,
    REF,
    parse_experiment,
    resolve_refs,
    sweep_run_id,
)
from experiments.pipeline.internal_stages import ANNOTATE_FIELDS
from experiments.pipeline.plan import Node, build_plan, node_fields
from experiments.pipeline.run_context import RunContext, library_config, point_context
from rlhf.config import did_you_mean, problems_of
from rlhf.datafiles import LAB_SOURCES
from rlhf.errors import ConfigError, UserError
from rlhf.scorers import get_scorer


def check_plan(ctx: RunContext, plan: list[Node]) -> list[str]:
    """Every problem any stage of ``plan`` would stop on that can be known before the first one runs,
    one line each (``stages.<stage>.<field>: <problem>``), so a typo in the last stage does not
    surface only after an hour of generation and reward-model training.

    Each library stage's config is built exactly as it will be for the run (``library_config``: the
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
    fields = node_fields(node)
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
        cfg = library_config(ctx, node, resolve_refs(fields, _stand_in_outputs(fields, stand_in_root)))
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
    :func:`resolve_refs` reads)."""
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
    from rlhf.reward_model import META_FILE  # imports torch: only when a plan is checked

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
    from rlhf.rewards import check_reward_spec, spec_parts  # imports torch: only when a plan is checked

    check_reward_spec(reward)  # also rejects a list item without `spec`, and checks an ensemble's members
    for part in spec_parts(reward):
        if not Path(str(part)).expanduser().is_dir():
            _check_scorer(str(part))


def _check_reward_model_dir(path: str) -> None:
    """A reward-model dir, or an ensemble dir whose members all are (``rlhf rm eval`` takes both)."""
    from rlhf.reward_model import is_ensemble_dir, read_ensemble, read_meta  # imports torch: only here

    for member in read_ensemble(path)["members"] if is_ensemble_dir(path) else [path]:
        read_meta(member)


DATA_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")  # the files rlhf.data reads


def _check_data_source(source: str) -> None:
    """A data source as :mod:`rlhf.data` reads it: ``lab:<name>``, an existing file or dataset
    folder, or (only with the Hub online) a Hub dataset id."""
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


def check_sweep(raw: dict, file: str, preset: str | None, overrides: dict, points: list[dict]) -> list[str]:
    """The problems of every sweep point (each its own experiment), found before the first one runs.
    A problem every point has is listed once; the others name the sweep runs that have them."""
    found: dict[str, list[str]] = {}  # problem → the sweep runs that have it
    for values in points:
        try:
            exp = parse_experiment(raw, file, preset, {**overrides, **values})
            ctx = point_context(exp, file, values, force_from=None, dry_run=True, base_tags=[])
            problems = check_plan(ctx, build_plan(exp))
        except UserError as err:
            problems = problems_of(err)
        for problem in problems:
            found.setdefault(problem, []).append(sweep_run_id(values))
    return [
        problem if len(runs) == len(points) else f"sweep run {', '.join(runs)}: {problem}"
        for problem, runs in found.items()
    ]
