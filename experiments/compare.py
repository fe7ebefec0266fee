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
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Reading, grouping and labelling the runs lives in experiments/compare_data.py; the names below stay
# importable from here, kept for user code (the noqa: F401 ones).
from experiments.compare_data import (  # noqa: F401
    IGNORED_FIELDS,
    LABEL_MAX_CHARS,
    PLACEHOLDER,
    STAGE_PREFERENCE,
    CompareError,
    all_metrics,
    config_values,
    curve,
    default_stage_kind,
    differing_fields,
    field_value,
    fill_title,
    final_value,
    find_run_dirs,
    flatten,
    folder_names,
    gold_spec,
    grouping_fields,
    is_path,
    is_seed,
    keep_default_stage,
    label_runs,
    load_run,
    mean_std,
    read_metrics,
    seed_fields,
    short_values,
    shorten,
    stage_names,
    stage_record,
    sweep_values,
)
from rlhf.errors import UserError
from rlhf.tracking import resolve_mode

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


# ----------------------------------------------------------------------------- the figure, table and page


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
