"""The runs a comparison reads (``rlhf compare``, ``rlhf report``): finding and loading run dirs,
choosing the stage kind to plot, the fields that group and label the runs, and each run's curves and
final values."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from rlhf.errors import UserError
from rlhf.rewards import parse_ensemble
from rlhf.tracking import read_metrics

IGNORED_FIELDS = ("runs_dir", "experiment", "tracking", "out", "output_dir", "seed", "resume")
# Which stage kind to plot when --stage is not given: PPO's learning curves are what most
# comparisons are about; otherwise the kind with the most runs, ties broken by this order
# (outcomes of a stage before its training curves: rm_eval before rm_train).
STAGE_PREFERENCE = ("ppo", "baseline", "eval", "rm_eval", "rm_train", "sft", "simulate", "generate", "export")
LABEL_MAX_CHARS = 40  # a legend entry or table row a reader takes in at a glance

PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.]+)\}")


class CompareError(UserError):
    def __init__(self, message: str):
        super().__init__(message, code="compare")


# ----------------------------------------------------------------------------- reading runs


def find_run_dirs(paths: list[str], stage: str | None = None, runs_dir: str = "runs") -> list[Path]:
    """Every run dir (a folder with ``metrics.jsonl``) under ``paths``; a bare name means ``runs/<name>``.
    ``stage`` keeps the run dirs of that stage kind, stage name or folder name."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists() and (Path(runs_dir) / raw).exists():
            p = Path(runs_dir) / raw
        if not p.exists():
            raise CompareError(f"{raw!r} is neither a run folder nor an experiment under {runs_dir}/")
        cands = [p] if (p / "metrics.jsonl").is_file() else sorted(m.parent for m in p.rglob("metrics.jsonl"))
        for c in cands:
            if "wandb" in c.parts or ".cache" in c.parts:
                continue
            if stage and stage not in stage_names(c):
                continue
            if c not in found:
                found.append(c)
    if not found:
        where = ", ".join(paths)
        raise CompareError(
            f"no run folders (with metrics.jsonl){' of stage ' + stage if stage else ''} under {where}"
        )
    return found


def stage_record(run_dir: Path) -> dict:
    """``stage.json``, which ``rlhf experiment run`` writes into each stage's run dir (empty if absent)."""
    f = run_dir / "stage.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def stage_names(run_dir: Path) -> set[str]:
    """The names ``--stage`` matches: the stage kind (``baseline``), the stage's own name (``rloo``)
    and the folder name (``baseline_rloo``)."""
    record = stage_record(run_dir)
    return {run_dir.name, *(str(record[k]) for k in ("kind", "stage") if record.get(k))}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def sweep_values(run_dir: Path) -> dict | None:
    """The swept values of the sweep point a run dir belongs to (``sweep_run.json`` in a parent)."""
    for parent in [run_dir, *run_dir.parents]:
        f = parent / "sweep_run.json"
        if f.is_file():
            return json.loads(f.read_text()).get("values") or {}
    return None


def load_run(run_dir: Path) -> dict:
    cfg_file = run_dir / "config.yaml"
    config = flatten(yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file.is_file() else {}
    record = stage_record(run_dir)
    if "round" in record:  # the closed loop's round tells its PPO runs apart better than their paths do
        config.setdefault("round", record["round"])
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return {
        "dir": run_dir,
        "kind": record.get("kind") or run_dir.name,  # hand-made run dirs: the folder
        "config": config,
        "summary": summary,
        "metrics": read_metrics(run_dir),
        "sweep": sweep_values(run_dir),
    }


def default_stage_kind(runs: list[dict]) -> str:
    """The stage kind plotted when none is asked for: PPO if any, else the commonest (see STAGE_PREFERENCE)."""
    counts = Counter(r["kind"] for r in runs)

    def rank(kind: str) -> tuple:
        order = STAGE_PREFERENCE.index(kind) if kind in STAGE_PREFERENCE else len(STAGE_PREFERENCE)
        return (kind != "ppo", -counts[kind], order, kind)

    return min(counts, key=rank)


def keep_default_stage(runs: list[dict]) -> tuple[str, list[dict]]:
    """The default stage kind and its runs, saying which was chosen and what else is there."""
    stage = default_stage_kind(runs)
    others = Counter(r["kind"] for r in runs if r["kind"] != stage)
    kept = [r for r in runs if r["kind"] == stage]
    also = ", ".join(f"{kind} ({n})" for kind, n in sorted(others.items()))
    print(
        f"compare: stage {stage} ({len(kept)} runs)"
        + (f"; also here: {also} — choose another with --stage" if also else "")
    )
    return stage, kept


def is_seed(key: str) -> bool:
    """``seed``, ``ppo.seed`` ...: the fields runs are averaged over, never grouped by."""
    return key.split(".")[-1] == "seed"


def is_path(value: Any) -> bool:
    return isinstance(value, str) and "/" in value


def field_value(run: dict, key: str) -> Any:
    """A run's value of a field: the swept value if a sweep set it, else its config's."""
    if run["sweep"] is not None and key in run["sweep"]:
        return run["sweep"][key]
    return run["config"].get(key)


def differing_fields(runs: list[dict], keys: list[str]) -> list[str]:
    """The keys whose value is not the same in every run."""
    return [
        k for k in keys if len({json.dumps(field_value(r, k), sort_keys=True, default=str) for r in runs}) > 1
    ]


def grouping_fields(runs: list[dict]) -> list[str]:
    """Fields that name a run's group: the swept ones (seed excluded), else the config fields that differ.
    Paths (every run of another experiment has its own) count only when nothing else tells the runs
    apart: when one ``eval`` stage scores the policies of three trainers, or when the only other field
    that differs is one that several runs leave unset."""
    if any(r["sweep"] is not None for r in runs):
        swept = [k for r in runs for k in (r["sweep"] or {}) if not is_seed(k)]
        return list(dict.fromkeys(swept))
    keys = sorted({k for r in runs for k in r["config"]})
    keys = [k for k in keys if k.split(".")[0] not in IGNORED_FIELDS and not is_seed(k)]
    differ = differing_fields(runs, keys)
    not_paths = [k for k in differ if not any(is_path(r["config"].get(k)) for r in runs)]
    # runs that set none of those fields would share one label: their paths tell them apart
    unnamed = [r for r in runs if all(r["config"].get(k) is None for k in not_paths)]
    if not not_paths or len(unnamed) > 1:
        return differ
    return not_paths


def seed_fields(runs: list[dict]) -> list[str]:
    """The seed fields that differ between the runs (they tell the runs of one group apart): the swept
    ones in a sweep (its stages' configs repeat them), else the config's."""
    swept = any(r["sweep"] is not None for r in runs)
    keys = {k for r in runs for k in (r["sweep"] or {} if swept else r["config"]) if is_seed(k)}
    return differing_fields(runs, sorted(keys))


def short_values(values: list[Any]) -> list[str]:
    """Values as a label shows them. Paths keep only the part that tells them apart (the folders they
    all share at either end dropped), and of that its last folder unless two would then read alike:
    ``runs/x/ppo/policy``, ``runs/x/rloo/x/baseline_rloo/policy`` → ``ppo``, ``baseline_rloo``.
    An unset value (None) reads ``None``; labels leave such fields out."""
    ensembles = {
        str(v): _ensemble_label(str(v)) for v in values if isinstance(v, str) and _ensemble_label(str(v))
    }
    if not any(is_path(v) for v in values if str(v) not in ensembles):
        return [ensembles.get(str(v)) or _fmt_value(v) for v in values]
    present = [str(v) for v in values if v is not None and str(v) not in ensembles]
    parts = [p.strip("/").split("/") for p in present]
    # one path among other values: its last two folders (`rm_train/model`) say what it is
    shown = _distinct_tails(parts) if len(parts) > 1 else ["/".join(parts[0][-2:])]
    tails = {**dict(zip(present, shown)), **ensembles}
    return [tails[str(v)] if v is not None else "None" for v in values]


def _ensemble_label(value: str) -> str | None:
    """``ensemble:mean_minus_std:DIR,DIR,DIR`` as a label reads it: ``ensemble(mean_minus_std) of 3``."""
    try:
        parsed = parse_ensemble(value)
    except UserError:
        return None
    return f"ensemble({parsed[0]}) of {len(parsed[2])}" if parsed else None


def _distinct_tails(parts: list[list[str]]) -> list[str]:
    """The part of each path (as its folders) that differs from the others: see ``short_values``."""
    shortest = min(len(p) for p in parts)
    head = 0
    while head < shortest - 1 and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while head + tail < shortest - 1 and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    middles = [p[head : len(p) - tail] for p in parts]
    lasts = [m[-1] for m in middles]
    if len(set(lasts)) == len({"/".join(m) for m in middles}):
        return lasts
    return ["/".join(m) for m in middles]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def shorten(text: str, limit: int = LABEL_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def label_runs(runs: list[dict]) -> list[str]:
    """Label every run: ``label`` names its group (the fields that differ between the runs, never one
    that is unset), ``series`` its own curve (the group and, where seeds differ, the seed). Returns the
    grouping fields."""
    fields = grouping_fields(runs)
    seeds = seed_fields(runs)
    group_parts = _label_parts(runs, fields)
    seed_parts = _label_parts(runs, seeds)
    folders = folder_names(runs)
    for r, group, seed, folder in zip(runs, group_parts, seed_parts, folders):
        r["label"] = shorten(", ".join(group) or folder)
        seed_text = ", ".join(seed)
        r["series"] = (
            f"{shorten(r['label'], LABEL_MAX_CHARS - len(seed_text) - 2)}, {seed_text}"
            if seed_text
            else r["label"]
        )
    return fields


def _label_parts(runs: list[dict], fields: list[str]) -> list[list[str]]:
    """Per run, ``name=value`` for each field it sets (a field a run leaves unset is not named)."""
    parts: list[list[str]] = [[] for _ in runs]
    for f in fields:
        values = [field_value(r, f) for r in runs]
        for run_parts, value, text in zip(parts, values, short_values(values)):
            if value is not None:
                run_parts.append(f"{f.split('.')[-1]}={text}")
    return parts


def folder_names(runs: list[dict]) -> list[str]:
    """Each run's first folder that tells it apart from the others (``eval_rloo``, ``eval``)."""
    if len(runs) < 2:
        return [r["dir"].name for r in runs]
    root = Path(os.path.commonpath([str(r["dir"].resolve()) for r in runs]))
    names = []
    for r in runs:
        rel = r["dir"].resolve().relative_to(root)
        names.append(rel.parts[0] if rel.parts else r["dir"].name)
    return names


def config_values(runs: list[dict], key: str) -> str | None:
    """The runs' values of one config field, joined (``length:target=6``), or None if none sets it."""
    values = sorted({_fmt_value(r["config"][key]) for r in runs if r["config"].get(key) not in (None, "")})
    return ", ".join(values) or None


def gold_spec(runs: list[dict]) -> str | None:
    """The gold scorer the runs were configured with (``gold:`` in their config), if they name one."""
    return config_values(runs, "gold")


def fill_title(title: str, runs: list[dict]) -> str:
    """``{gold}``, ``{experiment}`` ... in a title → the runs' values of those config fields, so one
    experiment file titles its full run and its tiny preset truthfully."""
    return PLACEHOLDER.sub(lambda m: config_values(runs, m.group(1)) or "not recorded", title)


def final_value(run: dict, metric: str) -> float | None:
    """The run's final value of a metric: ``summary.json`` if it holds it, else the last logged value."""
    v = run["summary"].get(metric)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    for row in reversed(run["metrics"]):
        v = row.get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value). ``[n]`` → ``(mean, std)``."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))


def curve(run: dict, metric: str, x: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of one metric over a run. ``x`` = ``step`` | a metric | ``sqrt:<metric>``."""
    xs, ys = [], []
    root = x.startswith("sqrt:")
    xkey = x[5:] if root else x
    for i, row in enumerate(run["metrics"]):
        y = row.get(metric)
        if not isinstance(y, (int, float)) or isinstance(y, bool):
            continue
        xv = row.get(xkey) if xkey != "step" else (row.get("step") if row.get("step") is not None else i)
        if not isinstance(xv, (int, float)):
            continue
        if root:
            xv = math.sqrt(max(float(xv), 0.0))
        xs.append(float(xv))
        ys.append(float(y))
    if xkey != "step":  # against a metric (√KL), draw the curve left to right, not in logging order
        pairs = sorted(zip(xs, ys), key=lambda p: p[0])
        xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    return xs, ys


def all_metrics(runs: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for r in runs:
        for row in r["metrics"]:
            for k, v in row.items():
                if k not in ("step", "_time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys[k] = None
    return list(keys)
