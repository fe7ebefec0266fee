"""``rlhf compare`` (local, offline) and ``rlhf report`` (a W&B report, online).

``rlhf compare GROUP_OR_RUN_DIRS... --metrics a,b --out DIR`` reads local run dirs — any folder
holding ``metrics.jsonl`` (+ ``config.yaml``, ``summary.json``, ``stage.json``) — found under the
given paths. A bare name that is not a folder is taken as an experiment (W&B group): ``runs/<name>/``.

It plots ONE stage kind: ``--stage`` (a kind such as ``ppo``, or a stage's own name such as
``rloo``), else PPO when there are PPO runs, else the kind with the most runs; it says which.
Runs are grouped by the values a sweep set (``sweep_run.json``, written by ``rlhf experiment
run``), or else by the config fields that differ between the runs; the seed is never a grouping
field, so each group's numbers are mean ± std over seeds. Each series is labelled by those
differing fields only (``kl_coef=0.01, seed=1``; paths by the part that differs). Output (``--out``):

- ``curves.png`` — one panel per metric, every run's learning curve overlaid (colour = group, line
  style = seed), the legend below the panels; a metric logged once per run is drawn as bars;
- ``final.csv`` and a table — each group's final value of every metric, mean ± std over runs;
- ``index.html`` — one self-contained page (the PNG embedded as base64, the table, the run list).

``--x`` picks the horizontal axis: ``step`` (default), any logged metric (e.g. ``episodes``), or
``sqrt:<metric>`` (e.g. ``sqrt:eval/kl``: the √KL axis of Gao et al.'s over-optimisation plots).
A ``{field}`` in ``--title`` is replaced by the runs' value of that config field: ``{gold}`` names
the gold scorer they were configured with, ``{experiment}`` the experiment (preset) they belong to.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rlhf.errors import UserError
from rlhf.rewards import parse_ensemble

IGNORED_FIELDS = ("runs_dir", "experiment", "tracking", "out", "output_dir", "seed", "resume")
# Which stage kind to plot when --stage is not given: PPO's learning curves are what most
# comparisons are about; otherwise the kind with the most runs, ties broken by this order
# (outcomes of a stage before its training curves: rm_eval before rm_train).
STAGE_PREFERENCE = ("ppo", "baseline", "eval", "rm_eval", "rm_train", "sft", "simulate", "generate", "export")
LABEL_MAX_CHARS = 40  # a legend entry or table row a reader takes in at a glance
LEGEND_FONT_PT = 8
# What a metric measures and its unit, for axis labels; meanings from docs/ppo.md ("Metrics",
# "Evaluation") and docs/reward-models.md ("How a reward model is judged"). ``{gold}`` is the runs'
# gold scorer: a gold score is on that scorer's own scale.
METRIC_AXES: dict[str, tuple[str, str]] = {
    "objective/scores": ("proxy reward of the rollouts", "RM units"),
    "objective/raw_scores": ("raw proxy reward of the rollouts", "RM units"),
    "objective/kl": ("KL(π‖π_ref) per rollout", "nats"),
    "objective/rlhf_reward": ("reward − β·KL per rollout", "RM units"),
    "objective/non_score_reward": ("−β·KL per rollout", "RM units"),
    "objective/entropy": ("policy entropy per rollout", "nats"),
    "response/length_mean": ("rollout length", "tokens"),
    "eval/score": ("held-out proxy reward", "RM units"),
    "eval/gold_score": ("held-out gold score", "{gold}"),
    "eval/kl": ("held-out KL(π‖π_ref)", "nats"),
    "eval/length": ("held-out response length", "tokens"),
    "eval/eos_rate": ("share of responses that stopped", "fraction"),
    "eval/win_rate": ("win rate vs the reference", "fraction"),
    "eval/gold_win_rate": ("gold win rate vs the reference", "fraction"),
    "eval/pair_accuracy": ("pair accuracy vs annotators", "fraction"),
    "eval/gold_pair_accuracy": ("pair accuracy vs the gold", "fraction"),
    "eval/tie_accuracy": ("win/tie/loss accuracy", "fraction"),
    "eval/kendall_tau": ("Kendall τ-b vs annotators", "−1 … 1"),
    "eval/ece": ("expected calibration error", "probability"),
}
# What ``step`` counts in each stage kind's metrics.jsonl.
STEP_AXES = {
    "ppo": "PPO update",
    "baseline": "trainer step (TRL)",
    "rm_train": "optimiser step",
    "sft": "optimiser step",
}


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


def read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by an interrupted run
    return rows


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


def axis_label(metric: str, gold: str | None) -> str:
    """``held-out gold score (length:target=6)``: what a metric measures, and its unit."""
    what, unit = METRIC_AXES.get(metric, (metric, ""))
    unit = unit.replace("{gold}", gold or "gold scorer's scale")
    return f"{what} ({unit})" if unit else what


def x_axis_label(x: str, kind: str, gold: str | None) -> str:
    """The x axis: what ``step`` counts in this stage kind, or a metric (√ of it for ``sqrt:``)."""
    if x == "step":
        return STEP_AXES.get(kind, "step")
    if x.startswith("sqrt:"):
        what, unit = METRIC_AXES.get(x[5:], (x[5:], ""))
        return f"√{what} (√{unit})" if unit else f"√{what}"
    return axis_label(x, gold)


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


# ----------------------------------------------------------------------------- writing


def compare_runs(
    paths: list[str],
    metrics: list[str] | None = None,
    out: str = "compare",
    stage: str | None = None,
    x: str = "step",
    title: str = "",
    runs_dir: str = "runs",
    strict: bool = True,
) -> dict:
    """Write ``curves.png``, ``final.csv`` and ``index.html`` comparing the runs under ``paths``."""
    runs = [load_run(d) for d in find_run_dirs(paths, stage, runs_dir)]
    if stage is None:
        stage, runs = keep_default_stage(runs)
    available = all_metrics(runs)
    metrics = list(metrics or [])
    if not metrics:
        metrics = available[:6]
    missing = [m for m in metrics if m not in available]
    if missing and not strict:  # e.g. an experiment's own compare block, on a preset that skips evaluation
        print(f"compare: not logged by these runs, left out: {', '.join(missing)}")
        metrics = [m for m in metrics if m in available]
    elif missing:
        raise CompareError(
            f"metric {missing[0]!r} was not logged by these runs; logged: {', '.join(available[:40])}"
        )
    if not metrics:
        raise CompareError("these runs logged no numeric metrics")
    fields, groups = group_runs(runs)
    title = fill_title(title or ", ".join(paths), runs)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "curves.png"
    draw_figure(groups, metrics, x, title, stage).savefig(png, dpi=110)
    table = final_table(groups, metrics)
    csv = write_csv(table, metrics, out_dir / "final.csv")
    page = write_page(out_dir / "index.html", png, table, metrics, runs, title, stage, fields, x)
    return {
        "png": str(png),
        "html": str(page),
        "csv": str(csv),
        "runs": len(runs),
        "stage": stage,
        "groups": {row["group"]: {m: row[m][:2] if row[m] else None for m in metrics} for row in table},
        "group_by": fields,
    }


def group_runs(runs: list[dict]) -> tuple[list[str], dict[str, list[dict]]]:
    """Label the runs (``label_runs``) and gather them by group label; returns the grouping fields too."""
    fields = label_runs(runs)
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["label"], []).append(r)
    return fields, groups


def draw_figure(groups: dict[str, list[dict]], metrics: list[str], x: str, title: str, stage: str) -> Figure:
    """One panel per metric, every run's curve overlaid (colour = group, line style = seed), the legend
    below the panels inside the figure; a metric logged once per run is drawn as bars instead."""
    runs = [r for members in groups.values() for r in members]
    gold = gold_spec(runs)
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    width = 5.2 * ncol
    legend_cols = legend_columns([r["series"] for r in runs], width)
    legend_rows = math.ceil(len({r["series"] for r in runs}) / legend_cols)
    # constrained layout keeps titles, axis labels and the "outside" legend inside the figure
    fig = Figure(figsize=(width, 3.8 * nrow + 0.9 + 0.25 * legend_rows), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    handles: dict[str, Any] = {}  # series label → its line, for the one figure legend
    drew_bars = False
    for i, metric in enumerate(metrics):
        ax = axes[i // ncol][i % ncol]
        ax.set_title(metric, fontsize=10)
        ax.set_ylabel(axis_label(metric, gold), fontsize=9)
        if max(len(curve(r, metric, x)[0]) for r in runs) <= 1:
            # logged once per run (an evaluation stage): a curve would be a dot, so draw group means ± std
            _bars(ax, groups, metric, colours)
            drew_bars = True
            continue
        ax.set_xlabel(x_axis_label(x, runs[0]["kind"], gold), fontsize=9)
        if x == "step":  # updates and optimiser steps are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for gi, members in enumerate(groups.values()):
            for j, r in enumerate(members):
                xs, ys = curve(r, metric, x)
                if not xs:
                    continue
                # colour = group, line style = run within the group (seed), so overlapping runs stay visible
                (line,) = ax.plot(
                    xs,
                    ys,
                    ls=("-", "--", ":", "-.")[j % 4],
                    marker="o" if len(xs) < 30 else None,
                    color=colours[gi % len(colours)],
                    alpha=0.85,
                    ms=3,
                    lw=1.4,
                )
                handles.setdefault(r["series"], line)
    for j in range(len(metrics), nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    seeded = any(len(members) > 1 for members in groups.values())
    caption = f"stage {stage}: {_count(len(runs), 'run')}"
    if len(groups) > 1:
        caption += f" in {len(groups)} groups"
    if drew_bars and seeded:
        caption += "; bars: mean ± std over the runs (seeds) of a group"
    fig.suptitle(f"{title}\n{caption}", fontsize=11)
    if len(handles) > 1:  # a single curve needs no key
        legend_title = "colour = group, line style = seed" if seeded else None
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncol=min(legend_cols, len(handles)),
            fontsize=LEGEND_FONT_PT,
            title=legend_title,
            title_fontsize=LEGEND_FONT_PT,
        )
    return fig


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def legend_columns(labels: list[str], width_in: float) -> int:
    """As many legend columns as fit across the figure. An entry is its text (about 0.6 em a
    character, 72 pt an inch) plus the line sample and the padding around it (about 0.7 in)."""
    entry_in = max(len(t) for t in labels) * 0.6 * LEGEND_FONT_PT / 72 + 0.7
    return max(1, min(len(set(labels)), int(0.95 * width_in / entry_in)))


def _bars(ax, groups: dict[str, list[dict]], metric: str, colours: list[str]) -> None:
    """One bar per group: the mean of the runs' final values, with their std as the error bar; a
    group of one run whose metric comes with its 95 % interval (``<metric>_ci_low`` / ``_ci_high``,
    as evaluations log them) shows that interval instead."""
    labels, means, below, above = [], [], [], []
    for label, members in groups.items():
        vals = [v for v in (final_value(r, metric) for r in members) if v is not None]
        if not vals:
            continue
        m, sd = mean_std(vals)
        low, high = final_value(members[0], f"{metric}_ci_low"), final_value(members[0], f"{metric}_ci_high")
        if len(vals) == 1 and low is not None and high is not None:
            sd_low, sd_high = m - low, high - m
        else:
            sd_low = sd_high = sd
        labels.append(label)
        means.append(m)
        below.append(sd_low)
        above.append(sd_high)
    pos = list(range(len(labels)))
    spread = [below, above] if any(below) or any(above) else None  # no error bar to draw
    ax.bar(pos, means, yerr=spread, capsize=4, color=[colours[i % len(colours)] for i in pos], alpha=0.85)
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_title(f"{metric} (final)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")


def final_table(groups: dict[str, list[dict]], metrics: list[str]) -> list[dict]:
    """Per group: its label, its number of runs and, per metric, (mean, std, n) of the runs' final values."""
    table = []
    for label, members in groups.items():
        row: dict[str, Any] = {"group": label, "runs": len(members)}
        for m in metrics:
            vals = [v for v in (final_value(r, m) for r in members) if v is not None]
            row[m] = mean_std(vals) + (len(vals),) if vals else None
        table.append(row)
    return table


def write_csv(table: list[dict], metrics: list[str], path: Path) -> Path:
    lines = ["group,runs," + ",".join(f"{m} mean,{m} std" for m in metrics)]
    for row in table:
        cells = [f'"{row["group"]}"', str(row["runs"])]
        for m in metrics:
            cells += [f"{row[m][0]:.6g}", f"{row[m][1]:.6g}"] if row[m] else ["", ""]
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_page(
    path: Path,
    png: Path,
    table: list[dict],
    metrics: list[str],
    runs: list[dict],
    title: str,
    stage: str,
    fields: list[str],
    x: str,
) -> Path:
    """One self-contained HTML page: the PNG embedded, the final-values table, the run list."""
    b64 = base64.b64encode(png.read_bytes()).decode()
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = ""
    for row in table:
        cells = "".join(
            f"<td>{row[m][0]:.4g} ± {row[m][1]:.2g}</td>" if row[m] else "<td>–</td>" for m in metrics
        )
        body += f"<tr><td>{html.escape(row['group'])}</td><td>{row['runs']}</td>{cells}</tr>\n"
    run_list = "".join(
        f"<li><code>{html.escape(str(r['dir']))}</code> — {html.escape(r['series'])}</li>" for r in runs
    )
    n_groups = len(table)
    by = f" by {html.escape(', '.join(fields))}" if fields else ""
    xlabel = html.escape(x_axis_label(x, runs[0]["kind"], gold_spec(runs)))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(runs)} runs of stage {html.escape(stage)} in {n_groups} groups{by};
final values are mean ± std over the runs of a group (seeds). x axis: {xlabel}.</p>
<img alt="learning curves" src="data:image/png;base64,{b64}">
<h2>Final metrics</h2>
<table><tr><th>group</th><th>runs</th>{head}</tr>
{body}</table>
<h2>Runs</h2><ul>{run_list}</ul>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path


def _print_table(res: dict, metrics: list[str]) -> None:
    print(f"{res['runs']} runs of stage {res['stage']}, grouped by {', '.join(res['group_by']) or 'run'}:")
    for group, vals in res["groups"].items():
        cells = "  ".join(f"{m}={v[0]:.4g}±{v[1]:.2g}" for m, v in vals.items() if v)
        print(f"  {group}: {cells}")
    print(f"wrote {res['png']}, {res['csv']}, {res['html']}")


def _cmd_compare(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in (args.metrics or "").split(",") if m.strip()]
    res = compare_runs(args.paths, metrics, args.out, args.stage, args.x, args.title, args.runs_dir)
    _print_table(res, list(next(iter(res["groups"].values()), {}).keys()))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="compare local runs: overlaid learning curves, final metrics table, HTML",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="GROUP_OR_RUN_DIR",
        help="run folders, folders holding runs (e.g. runs/kl_sweep), or experiment names",
    )
    p.add_argument(
        "--metrics",
        default="",
        help="comma-separated metrics to plot and tabulate (default: the first 6 logged)",
    )
    p.add_argument(
        "--out",
        default="compare",
        help="output folder for curves.png, final.csv, index.html [default: compare]",
    )
    p.add_argument(
        "--stage",
        default=None,
        help="the stage kind to plot (ppo, rm_eval ...) or a stage's own name (rloo) "
        "[default: ppo if there are PPO runs, else the kind with the most runs]",
    )
    p.add_argument(
        "--x", default="step", help="x axis: step, a logged metric, or sqrt:<metric> (e.g. sqrt:eval/kl)"
    )
    p.add_argument(
        "--title",
        default="",
        help="title of the plot and page; {gold}, {experiment} or any {config_field} is replaced by the runs' value",
    )
    p.add_argument("--runs_dir", default="runs", help="where experiment names are looked up [default: runs]")
    p.set_defaults(func=_cmd_compare)
    return p


# ----------------------------------------------------------------------------- W&B report


def build_report(
    group: str, *, project: str, entity: str | None, metrics: list[str], group_by: list[str], title: str = ""
):
    """A W&B report (wandb-workspaces) over the runs of one group, runs grouped by the swept fields."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise UserError(
            "rlhf report needs the wandb-workspaces package: pip install wandb-workspaces",
            code="missing_package",
        ) from None
    # the swept values sit under config.sweep (rlhf experiment run sends them with every stage run)
    runset = wr.Runset(
        entity=entity or "",
        project=project,
        name=group,
        filters=f"Group = '{group}'",
        groupby=[f"config.sweep.{f}" for f in group_by] or None,
    )
    panels = [wr.LinePlot(title=m, x="Step", y=[m]) for m in metrics]
    report = wr.Report(
        entity=entity or "",
        project=project,
        title=title or f"RLHF Lab: {group}",
        description=f"runs of group {group}, grouped by {', '.join(group_by) or 'run'}",
        blocks=[wr.H1(title or group), wr.PanelGrid(runsets=[runset], panels=panels)],
    )
    return report


def _cmd_report(args: argparse.Namespace) -> int:
    from rlhf.tracking import resolve_mode

    if resolve_mode(args.mode) != "online":
        raise UserError(
            "W&B is offline here (no credentials, or WANDB_MODE=offline): a W&B report needs W&B "
            "online. Upload runs with `wandb sync runs/<experiment>/*/wandb/offline-run-*` after "
            "`wandb login`, or compare locally with `rlhf compare runs/<experiment>`",
            code="offline",
        )
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
    if not group_by:
        sweep = Path(args.runs_dir) / args.group / "sweep.json"
        if sweep.is_file():
            group_by = [p for p in json.loads(sweep.read_text()).get("parameters", []) if not is_seed(p)]
    report = build_report(
        args.group,
        project=args.project,
        entity=args.entity,
        metrics=metrics,
        group_by=group_by,
        title=args.title,
    )
    report.save()
    print(f"report: {report.url}")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="create a W&B report for an experiment group (W&B online)",
        description="Create a W&B report (via wandb-workspaces) comparing the runs of GROUP, "
        "with line panels of the chosen metrics and runs grouped by the swept fields. "
        "Needs W&B online; offline, use `rlhf compare`.",
    )
    p.add_argument("group", help="experiment name (the W&B group)")
    p.add_argument(
        "--metrics",
        default="objective/scores,objective/kl,eval/score,eval/gold_score",
        help="comma-separated metrics, one panel each",
    )
    p.add_argument(
        "--group_by", default="", help="comma-separated swept fields (default: from runs/<group>/sweep.json)"
    )
    p.add_argument("--project", default="rlhf-lab", help="W&B project [default: rlhf-lab]")
    p.add_argument("--entity", default=None, help="W&B entity (default: yours)")
    p.add_argument(
        "--mode", default="auto", choices=("auto", "online", "offline"), help="W&B mode [default: auto]"
    )
    p.add_argument("--title", default="", help="report title")
    p.add_argument("--runs_dir", default="runs", help="where runs/<group>/sweep.json is looked up")
    p.set_defaults(func=_cmd_report)
    return p
