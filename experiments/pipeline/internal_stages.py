"""The runner's own stages: annotation by people (``annotate``) and the closed loop's round
bookkeeping (``prompts``, ``select``, ``collect``), each logged to W&B like a library stage."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotation_app.database import is_url
from annotation_app.io import export_rankings, import_candidates
from annotation_app.store import Store
from experiments.pipeline.plan import Node
from experiments.pipeline.run_context import RunContext, runs_dir_for, stage_tracking
from rlhf.config import from_dict
from rlhf.contracts import load_candidates, load_prompts, load_rankings, prompt_text
from rlhf.datafiles import write_jsonl
from rlhf.errors import ConfigError, UserError
from rlhf.tracking import TrackingConfig, start_stage

# The fields of the human annotation stage (it has no config class: run_annotate reads them).
ANNOTATE_FIELDS = ("candidates", "db", "project", "quorum", "wait", "poll_s", "timeout_s", "guidelines")


class AnnotationPending(UserError):
    """The human annotation stage has not reached its quorum yet (the message says how to resume)."""

    def __init__(self, message: str):
        super().__init__(message, code="annotation_pending")


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
    cfg = InternalStageConfig(
        experiment=ctx.exp.name,
        runs_dir=str(runs_dir_for(ctx, node)),
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
    run_dir.mkdir(parents=True, exist_ok=True)
    if node.kind == "annotate":
        return run_annotate(ctx, node, fields, run_dir)
    if node.kind == "collect":
        return run_collect(fields, run_dir)
    if node.kind == "prompts":
        return run_prompts(node, fields, run_dir)
    if node.kind == "select":
        return run_select(fields, run_dir)
    raise ConfigError(f"unknown internal stage {node.kind!r}")


def run_collect(fields: dict, run_dir: Path) -> dict:
    """Merge every round's rankings so far into one file: what the round's reward model trains on."""
    rows = [r for src in fields["rankings"] for r in load_rankings(src)]
    out = run_dir / "rankings.jsonl"
    write_jsonl(out, rows)
    print(f"collect: {len(rows)} rankings from {len(fields['rankings'])} rounds → {out}")
    return {"run_dir": str(run_dir), "rankings": str(out), "n_rankings": len(rows)}


def run_prompts(node: Node, fields: dict, run_dir: Path) -> dict:
    """The round's prompts: the first ``n`` of the source that no earlier round's rankings name."""
    used = {r["prompt_id"] for src in fields["exclude"] for r in load_rankings(src)}
    pool = [p for p in load_prompts(fields["source"], split=fields["split"]) if p["prompt_id"] not in used]
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
    from rlhf.rewards import load_reward_fn  # imports torch: only when a round selects by uncertainty

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

    db = fields.get("db") or str(Path(ctx.exp.runs_dir) / ctx.exp.name / "annotate" / "lab.db")
    project = str(fields.get("project") or (f"{ctx.exp.name}-r{node.round}"))
    if not is_url(db):  # a PostgreSQL URL names a server, not a folder to make
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
        # gold items are not subject to the quorum (every annotator may answer each): not waited for
        mine = [p for p in stats["prompts"] if p["project_id"] == project and p.get("gold") is None]
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
