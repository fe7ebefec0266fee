"""``rlhf compare`` (local, offline) and ``rlhf report`` (a W&B report, online).

``rlhf compare GROUP_OR_RUN_DIRS... --metrics a,b --out DIR`` reads local run dirs — any folder
holding ``metrics.jsonl`` (+ ``config.yaml``, ``summary.json``) — found under the given paths. A bare
name that is not a folder is taken as an experiment (W&B group): ``runs/<name>/``. Runs are grouped
by the values a sweep set (``sweep_run.json``, written by ``rlhf experiment run``), or else by the
config fields that differ between the runs; the seed is never a grouping field, so each group's
numbers are mean ± std over seeds. Output (``--out``):

- ``curves.png`` — one panel per metric, every run's learning curve overlaid (colour = group);
- ``final.csv`` and a table — each group's final value of every metric, mean ± std over runs;
- ``index.html`` — one self-contained page (the PNG embedded as base64, the table, the run list).

``--x`` picks the horizontal axis: ``step`` (default), any logged metric (e.g. ``episodes``), or
``sqrt:<metric>`` (e.g. ``sqrt:eval/kl``: the √KL axis of Gao et al.'s over-optimisation plots).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from rlhf.errors import UserError

IGNORED_FIELDS = ("runs_dir", "experiment", "tracking", "out", "output_dir", "seed", "resume")


class CompareError(UserError):
    def __init__(self, message: str):
        super().__init__(message, code="compare")


# ----------------------------------------------------------------------------- reading runs


def find_run_dirs(paths: list[str], stage: str | None = None, runs_dir: str = "runs") -> list[Path]:
    """Every run dir (a folder with ``metrics.jsonl``) under ``paths``; a bare name means ``runs/<name>``."""
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
            if stage and c.name != stage:
                continue
            if c not in found:
                found.append(c)
    if not found:
        where = ", ".join(paths)
        raise CompareError(
            f"no run folders (with metrics.jsonl){' of stage ' + stage if stage else ''} under {where}"
        )
    return found


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
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return {
        "dir": run_dir,
        "config": config,
        "summary": summary,
        "metrics": read_metrics(run_dir),
        "sweep": sweep_values(run_dir),
    }


def is_seed(key: str) -> bool:
    """``seed``, ``ppo.seed`` ...: the fields runs are averaged over, never grouped by."""
    return key.split(".")[-1] == "seed"


def grouping_fields(runs: list[dict]) -> list[str]:
    """Fields that name a run's group: the swept ones (seed excluded), else the config fields that differ."""
    swept = [k for r in runs for k in (r["sweep"] or {}) if not is_seed(k)]
    if any(r["sweep"] is not None for r in runs):
        return list(dict.fromkeys(swept))
    keys = sorted({k for r in runs for k in r["config"]})
    differ = []
    for k in keys:
        if k.split(".")[0] in IGNORED_FIELDS or k.startswith("tracking."):
            continue
        vals = {json.dumps(r["config"].get(k), sort_keys=True, default=str) for r in runs}
        if len(vals) > 1 and not any(
            isinstance(r["config"].get(k), str) and "/" in r["config"][k] for r in runs
        ):
            differ.append(k)
    return differ


def label_by_folder(runs: list[dict]) -> None:
    """Name each run by the first folder that tells it apart from the others (``eval_rloo``, ``eval``)."""
    if len(runs) < 2:
        return
    root = Path(os.path.commonpath([str(r["dir"].resolve()) for r in runs]))
    for r in runs:
        rel = r["dir"].resolve().relative_to(root)
        r["label"] = rel.parts[0] if rel.parts else r["dir"].name


def group_label(run: dict, fields: list[str]) -> str:
    if not fields:
        return run.get("label") or run["dir"].name
    src = run["sweep"] if run["sweep"] is not None else run["config"]
    return ", ".join(f"{f.split('.')[-1]}={_fmt_value(src.get(f, run['config'].get(f)))}" for f in fields)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in find_run_dirs(paths, stage, runs_dir)]
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
    fields = grouping_fields(runs)
    if not fields:  # nothing but paths differ (e.g. eval of three policies): each run folder is its own group
        label_by_folder(runs)
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(group_label(r, fields), []).append(r)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # 1. curves: one panel per metric, runs overlaid, one colour per group
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xlabel = f"√{x[5:]}" if x.startswith("sqrt:") else x
    for i, metric in enumerate(metrics):
        ax = axes[i // ncol][i % ncol]
        if max(len(curve(r, metric, x)[0]) for r in runs) <= 1:
            # logged once per run (an evaluation stage): a curve would be a dot, so draw group means ± std
            _bars(ax, groups, metric, colours)
            continue
        for gi, (label, members) in enumerate(groups.items()):
            c = colours[gi % len(colours)]
            for j, r in enumerate(members):
                xs, ys = curve(r, metric, x)
                if not xs:
                    continue
                # colour = group, line style = run within the group (seed), so overlapping runs stay visible
                ls = ("-", "--", ":", "-.")[j % 4]
                ax.plot(
                    xs,
                    ys,
                    ls=ls,
                    marker="o" if len(xs) < 30 else None,
                    color=c,
                    alpha=0.85,
                    ms=3,
                    lw=1.4,
                    label=label if j == 0 else None,
                )
        ax.set_title(metric)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(len(metrics), nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.suptitle(title or ", ".join(paths), fontsize=10)
    fig.tight_layout()
    png = out_dir / "curves.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    # 2. final values: mean ± std over the runs (seeds) of each group
    table = []
    for label, members in groups.items():
        row = {"group": label, "runs": len(members)}
        for m in metrics:
            vals = [v for v in (final_value(r, m) for r in members) if v is not None]
            row[m] = mean_std(vals) + (len(vals),) if vals else None
        table.append(row)
    csv_lines = ["group,runs," + ",".join(f"{m} mean,{m} std" for m in metrics)]
    for row in table:
        cells = [f'"{row["group"]}"', str(row["runs"])]
        for m in metrics:
            cells += [f"{row[m][0]:.6g}", f"{row[m][1]:.6g}"] if row[m] else ["", ""]
        csv_lines.append(",".join(cells))
    (out_dir / "final.csv").write_text("\n".join(csv_lines) + "\n")

    # 3. one self-contained HTML page
    b64 = base64.b64encode(png.read_bytes()).decode()
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = ""
    for row in table:
        cells = "".join(
            f"<td>{row[m][0]:.4g} ± {row[m][1]:.2g}</td>" if row[m] else "<td>–</td>" for m in metrics
        )
        body += f"<tr><td>{html.escape(row['group'])}</td><td>{row['runs']}</td>{cells}</tr>\n"
    run_list = "".join(
        f"<li><code>{html.escape(str(r['dir']))}</code> — {html.escape(group_label(r, fields))}</li>"
        for r in runs
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title or "comparison")}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title or "comparison")}</h1>
<p>{len(runs)} runs in {len(groups)} groups{" by " + html.escape(", ".join(fields)) if fields else ""};
final values are mean ± std over the runs of a group (seeds). x axis: {html.escape(xlabel)}.</p>
<img alt="learning curves" src="data:image/png;base64,{b64}">
<h2>Final metrics</h2>
<table><tr><th>group</th><th>runs</th>{head}</tr>
{body}</table>
<h2>Runs</h2><ul>{run_list}</ul>
</body></html>
"""
    page_path = out_dir / "index.html"
    page_path.write_text(page, encoding="utf-8")
    return {
        "png": str(png),
        "html": str(page_path),
        "csv": str(out_dir / "final.csv"),
        "runs": len(runs),
        "groups": {row["group"]: {m: row[m][:2] if row[m] else None for m in metrics} for row in table},
        "group_by": fields,
    }


def _bars(ax, groups: dict[str, list[dict]], metric: str, colours: list[str]) -> None:
    """One bar per group: the mean of the runs' final values, with their std as the error bar."""
    labels, means, stds = [], [], []
    for label, members in groups.items():
        vals = [v for v in (final_value(r, metric) for r in members) if v is not None]
        if vals:
            m, sd = mean_std(vals)
            labels.append(label)
            means.append(m)
            stds.append(sd)
    pos = list(range(len(labels)))
    ax.bar(pos, means, yerr=stds, capsize=4, color=[colours[i % len(colours)] for i in pos], alpha=0.85)
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_title(f"{metric} (final, mean ± std)")
    ax.grid(alpha=0.3, axis="y")


def _print_table(res: dict, metrics: list[str]) -> None:
    print(f"{res['runs']} runs, grouped by {', '.join(res['group_by']) or 'run'}:")
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
    p.add_argument("--stage", default=None, help="only run folders of this stage (e.g. ppo)")
    p.add_argument(
        "--x", default="step", help="x axis: step, a logged metric, or sqrt:<metric> (e.g. sqrt:eval/kl)"
    )
    p.add_argument("--title", default="", help="title of the plot and page")
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
