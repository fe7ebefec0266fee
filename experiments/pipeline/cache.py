"""The stage cache: a stage's key (a hash of what its result is made of) and its stored result, in
``stage.json`` in its run dir and in ``runs/<name>/.cache/``; an earlier result of another config is
moved aside rather than overwritten (:func:`rlhf.stage_results.keep_earlier_result`)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from experiments.pipeline.plan import Node

# Result keys that name files or folders a later run needs; a cached stage whose outputs are gone reruns.
OUTPUT_KEYS = ("candidates", "rankings", "out", "model_dir", "eval_rankings", "policy_dir", "prompts")


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


def tokenise(cfg_dict: dict, real_fields: dict, hashed_fields: dict) -> None:
    """In the resolved config, put the hash tokens back where wired paths were substituted."""
    for k, real in real_fields.items():
        if k in cfg_dict and real != hashed_fields.get(k):
            cfg_dict[k] = hashed_fields.get(k)


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
