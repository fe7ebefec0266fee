"""Running an experiment: every stage of its plan in order, reused from the cache where nothing it is
made of changed, one sweep point after another, and the summary each run leaves."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.evidence import learning_evidence
from experiments.pipeline.cache import cached_result, stage_key, store_result, tokenise
from experiments.pipeline.experiment_file import (
    LIBRARY_STAGES,
    Experiment,
    load_raw,
    parse_experiment,
    resolve_refs,
    sweep_points,
    sweep_run_id,
)
from experiments.pipeline.internal_stages import run_internal
from experiments.pipeline.plan import Node, build_plan, node_fields, sweep_dependencies
from experiments.pipeline.run_context import (
    RunContext,
    agent_run_env,
    library_config,
    point_context,
    runs_dir_for,
    stage_dir_name,
)
from experiments.pipeline.validation import check_plan, check_sweep
from rlhf.config import ConfigProblems, did_you_mean, parse_overrides, to_dict
from rlhf.errors import ConfigError, UserError
from rlhf.stage_results import keep_earlier_result


def run_plan(ctx: RunContext, plan: list[Node]) -> dict[str, dict]:
    """Run (or reuse) every stage of the plan in order; returns results by instance name."""
    runs_root = Path(ctx.exp.runs_dir)
    cache_dir = runs_root / ctx.exp.name / ".cache"
    results: dict[str, dict] = {}
    keys: dict[str, str] = {}
    forced: set[str] = set()
    _check_before_running(ctx, plan)
    status: dict[str, dict] = {}
    for node in plan:
        fields = node_fields(node)
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
        key, run_dir, real_cfg = _key_and_run_dir(ctx, node, fields, results, keys, runs_root)
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
        t0 = time.time()
        result = _run_stage(ctx, node, real_cfg, fields, results, run_dir, key, cache_dir)
        seconds = time.time() - t0
        store_result(key, node, result, seconds, cache_dir)
        results[node.name] = result
        status[node.name] = {"status": "ran", "key": key, "seconds": round(seconds, 2)}
    ctx.status = status
    return results


def _check_before_running(ctx: RunContext, plan: list[Node]) -> None:
    """Stop on a ``--from`` that names no stage, a stage this installation lacks, or any problem
    :func:`check_plan` finds, before the first stage runs (not hours later)."""
    if ctx.force_from:
        names = [n.name for n in plan]
        if ctx.force_from not in names:
            raise ConfigError(
                f"--from {ctx.force_from!r}: no such stage{did_you_mean(ctx.force_from, names)}; "
                f"stages: {', '.join(names)}"
            )
    for kind in dict.fromkeys(n.kind for n in plan if n.kind in LIBRARY_STAGES):
        module = LIBRARY_STAGES[kind][0]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"the {kind} stage is not available in this installation (no module {module}); "
                f"remove it from the experiment or install it",
                code="stage_unavailable",
            )
    problems = check_plan(ctx, plan)
    if problems:
        raise ConfigProblems(problems, where=ctx.file or ctx.exp.name)


def _key_and_run_dir(
    ctx: RunContext, node: Node, fields: dict, results: dict[str, dict], keys: dict[str, str], runs_root: Path
) -> tuple[str, Path, Any]:
    """A stage's cache key, its run dir and (for a library stage) its config with the real input paths.
    ``keys`` holds the keys of the stages before it: a wired input enters the key as its producer's key."""
    hashed = resolve_refs(fields, results, for_hash=keys)
    if node.kind not in LIBRARY_STAGES:
        key = stage_key(node.kind, {"_fields": hashed, "seed": ctx.exp.seed}, runs_root)
        return key, runs_dir_for(ctx, node) / ctx.exp.name / node.kind, None
    # The key covers the fully resolved config (defaults included), built from the real paths with the
    # hash tokens put back in place of the wired ones (so it does not depend on where inputs were written).
    real_fields = resolve_refs(fields, results)
    real_cfg = library_config(ctx, node, real_fields)
    hashed_cfg = to_dict(real_cfg)
    tokenise(hashed_cfg, real_fields, hashed)
    # (the preset file's values are in the config itself; where it lives and W&B settings are not)
    extra = {k: v for k, v in hashed.items() if k not in ("config", "tracking", "stage")}
    key = stage_key(node.kind, {**hashed_cfg, "_fields": extra}, runs_root)
    return key, Path(real_cfg.runs_dir) / ctx.exp.name / stage_dir_name(node.kind, real_cfg), real_cfg


def _run_stage(
    ctx: RunContext,
    node: Node,
    real_cfg: Any,
    fields: dict,
    results: dict[str, dict],
    run_dir: Path,
    key: str,
    cache_dir: Path,
) -> dict:
    """Run one stage in ``run_dir`` (a library stage from ``real_cfg``, an internal one from its
    resolved fields); returns its result."""
    print(
        f"\n== {node.name} ({node.kind}{', round ' + str(node.round) if node.round > 1 else ''}) ==",
        flush=True,
    )
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
            result = run_internal(ctx, node, resolve_refs(fields, results), run_dir)
    result = dict(result or {})
    result.setdefault("run_dir", str(run_dir))
    return result


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
    ctx = point_context(exp, file, values, force_from, dry_run, base_tags)
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
    from experiments.compare import compare_runs  # imports matplotlib and torch: only with a compare: block

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
