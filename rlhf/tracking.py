"""One tracker over Weights & Biases, with a no-op mode.

Library code receives a :class:`Tracker` and calls ``log`` / ``log_table`` / ``log_artifact``;
it never imports ``wandb`` itself, and it never branches on whether W&B is on (the no-op tracker
accepts the same calls). Only this module talks to W&B.

Modes (``TrackingConfig.mode``):

- ``auto`` (default): online when the user has configured W&B (``WANDB_API_KEY`` set, or a
  ``wandb login`` entry in ``~/.netrc``) and ``WANDB_MODE`` does not say otherwise; offline
  otherwise. Offline runs are written under ``<run_dir>/wandb/`` and can be uploaded later with
  ``wandb sync``.
- ``offline`` / ``online``: forced.
- ``disabled``: no W&B at all.

In every mode the tracker also appends one JSON line per ``log`` call to ``<run_dir>/metrics.jsonl``
(``{"step": ..., "_time": ..., <metric>: value}``), so comparisons and tests can read metrics
without W&B, and writes ``summary.json`` on ``finish``.

Runs are named and grouped so dashboards compare: ``project`` (one per lab), ``group`` = experiment,
``job_type`` = stage, ``name`` = ``<experiment>-<stage>`` by default, ``tags``, and the full
resolved config.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import option, save_config, to_dict


@dataclass
class TrackingConfig:
    project: str = option("rlhf-lab", help="W&B project (one per lab)")
    mode: str = option(
        "auto",
        help="auto = online only if W&B is configured; offline; online; disabled (no W&B)",
        choices=("auto", "offline", "online", "disabled"),
    )
    tags: list[str] = option(default_factory=list, help="W&B tags for the run")
    entity: str | None = option(None, help="W&B entity (team or user); default: yours")


def wandb_configured() -> bool:
    """True when the user has W&B credentials (API key in the environment or in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc()
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def resolve_mode(mode: str) -> str:
    """The W&B mode to use: ``online``, ``offline`` or ``disabled``."""
    env = os.environ.get("WANDB_MODE", "").lower()
    if mode == "auto":
        if env in ("offline", "online", "disabled", "dryrun"):
            return "offline" if env == "dryrun" else env
        return "online" if wandb_configured() else "offline"
    return mode


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class Tracker:
    """Logs scalars, tables, images and artifacts to W&B (or nowhere) and to ``metrics.jsonl``."""

    def __init__(self, run_dir: str | Path | None = None, run: Any = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._run = run
        self._summary: dict[str, Any] = {}
        self._inputs: list[dict] = []
        self._metrics_file = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    # ------------------------------------------------------------------ construction
    @classmethod
    def noop(cls, run_dir: str | Path | None = None) -> Tracker:
        """A tracker that sends nothing to W&B (still writes metrics.jsonl when given a run dir)."""
        return cls(run_dir=run_dir, run=None)

    @classmethod
    def start(
        cls,
        cfg: TrackingConfig,
        *,
        run_dir: str | Path,
        job_type: str,
        group: str | None = None,
        name: str | None = None,
        config: dict | None = None,
    ) -> Tracker:
        mode = resolve_mode(cfg.mode)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if mode == "disabled":
            return cls(run_dir=run_dir, run=None)
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DISABLE_GIT", "true")
        import wandb

        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            job_type=job_type,
            name=name,
            tags=list(cfg.tags) or None,
            config=config or {},
            dir=str(run_dir.resolve()),  # absolute: the wandb service may run in another cwd
            mode=mode,
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False),
        )
        return cls(run_dir=run_dir, run=run)

    @property
    def enabled(self) -> bool:
        return self._run is not None

    @property
    def wandb_dir(self) -> Path | None:
        """The run's own W&B folder (``.../wandb/offline-run-*``), for ``wandb sync`` or ``leet``."""
        if self._run is None:
            return None
        return Path(self._run.dir).parent

    # ------------------------------------------------------------------ logging
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        if self._metrics_file is not None:
            line = {"step": step, "_time": round(time.time(), 3), **clean}
            self._metrics_file.write(json.dumps(line) + "\n")
            self._metrics_file.flush()
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        """Log a table. Each call logs a fresh table under ``key``, so W&B keeps every version."""
        if self.run_dir is not None:
            with open(self.run_dir / f"table_{key.replace('/', '_')}.jsonl", "a", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(
                        json.dumps({"step": step, **{c: _jsonable(v) for c, v in zip(columns, row)}}) + "\n"
                    )
        if self._run is not None:
            import wandb

            table = wandb.Table(columns=list(columns), data=[[_jsonable(v) for v in row] for row in rows])
            self._run.log({key: table}, step=step)

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Image(str(path))}, step=step)

    def log_artifact(
        self,
        path: str | Path,
        name: str,
        type: str,
        metadata: dict | None = None,
        aliases: list[str] | None = None,
    ) -> None:
        """Record a file or directory as an output artifact of this run (lineage)."""
        if self._run is None:
            return
        art = self._artifact(path, name, type, metadata)
        self._run.log_artifact(art, aliases=aliases)

    def use_artifact(self, path: str | Path, name: str, type: str) -> None:
        """Record a file or directory as an input of this run (lineage: dataset → model → policy)."""
        self._inputs.append({"name": name, "type": type, "path": str(Path(path).resolve())})
        if self._run is None:
            return
        # W&B refuses use_artifact in offline mode; there the inputs are kept in the run's summary
        # (``lineage/inputs``) and in summary.json, and the graph is complete for online runs.
        self._run.summary["lineage/inputs"] = list(self._inputs)
        if self._run.offline:
            return
        art = self._artifact(path, name, type, None)
        self._run.use_artifact(art)

    def _artifact(self, path: str | Path, name: str, type: str, metadata: dict | None):
        import wandb

        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:120]
        art = wandb.Artifact(safe, type=type, metadata=_jsonable(metadata or {}))
        p = Path(path).resolve()
        # A reference records path and checksum without copying hundreds of MB of weights into
        # the offline run; the digest still links producer and consumer runs in the lineage graph.
        art.add_reference(p.as_uri(), name=p.name, checksum=True, max_objects=100_000)
        return art

    def summary(self, values: dict[str, Any]) -> None:
        self._summary.update({k: _jsonable(v) for k, v in values.items()})
        if self._run is not None:
            for k, v in values.items():
                self._run.summary[k] = v

    def finish(self) -> None:
        if self._inputs:
            self._summary["lineage/inputs"] = self._inputs
        if self.run_dir is not None and self._summary:
            (self.run_dir / "summary.json").write_text(json.dumps(self._summary, indent=2))
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def stage_run_dir(cfg: Any, stage: str) -> Path:
    """``<runs_dir>/<experiment>/<stage>/`` for a stage config."""
    return Path(cfg.runs_dir) / cfg.experiment / stage


def start_stage(cfg: Any, stage: str, job_type: str | None = None) -> Tracker:
    """Create the stage's run dir, save its resolved ``config.yaml``, start its tracked run.

    ``cfg`` must have ``experiment`` (the W&B group), ``runs_dir`` and ``tracking`` fields.
    """
    run_dir = stage_run_dir(cfg, stage)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A rerun of the same stage starts a fresh metrics file (earlier runs stay in W&B).
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    for old in run_dir.glob("table_*.jsonl"):
        old.unlink()
    save_config(cfg, run_dir / "config.yaml")
    return Tracker.start(
        cfg.tracking,
        run_dir=run_dir,
        job_type=job_type or stage,
        group=cfg.experiment,
        name=f"{cfg.experiment}-{stage}",
        config=to_dict(cfg),
    )
