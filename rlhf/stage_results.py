"""A stage's finished result in its run dir, and moving it aside before another run overwrites it.

``rlhf experiment run`` records each finished stage in ``<run_dir>/stage.json`` (and in
``<runs_dir>/<experiment>/.cache/<key>.json``, keyed by a hash of what the result is made of). A
later run of the same stage, with another config, must not overwrite that result: the experiment
reuses it when its config comes back, and the comparison reports read it. Both the experiment
runner and every stage command (through :func:`rlhf.tracking.start_stage`) move it aside first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def keep_earlier_result(run_dir: Path, key: str | None, cache_dir: Path) -> Path | None:
    """Move the finished result of another config out of ``run_dir`` before the stage reruns there with
    config ``key`` (None: a stage command, whose config has no key): to ``<run_dir>@<its key[:8]>/``
    beside it, its ``stage.json`` and cache entry rewritten to point there. Going back to that config
    reuses it, and both runs stay on disk to compare. Returns where it went, or None when ``run_dir``
    holds no finished result of another config (an interrupted run stays, so that the rerun may
    resume it)."""
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
