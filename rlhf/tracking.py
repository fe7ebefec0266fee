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
``job_type`` = stage, ``name`` = ``tracking.name`` or ``<experiment>-<stage>``, ``tags``, and the full
resolved config (plus ``config.sweep``: the swept values the run depends on). Each run also records
the git commit, system metrics and its console output unless ``tracking.git`` / ``system_metrics`` /
``console`` turn them off.

Lineage: every output is logged as an artifact, and every input a stage reads (the config fields in
:data:`INPUT_FIELDS` that name local files, plus what a stage passes to ``use_artifact``) is recorded
as an input of its run, under the name its producing run logged it with (each run dir keeps an
``artifacts.json`` for that), so after ``wandb sync`` the lineage graph connects
candidates → rankings → reward model → policies across runs. Files up to ``tracking.upload_max_mb``
go into the artifact itself; larger ones are recorded by reference (path and checksum).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rlhf.config import option, save_config, to_dict
from rlhf.fsio import atomic_file
from rlhf.stage_results import keep_earlier_result

METRICS_FILE = "metrics.jsonl"  # one JSON line per `log` call, in every tracking mode


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
    name: str | None = option(
        None,
        help="W&B run name; default <experiment>-<stage> (rlhf experiment run adds the round and the "
        "swept values the stage depends on, e.g. kl_sweep-ppo-kl_coef=0.01-seed=1)",
    )
    sweep: dict = option(
        default_factory=dict,
        help="the swept values this run depends on, sent as config.sweep (what `rlhf report` groups "
        "by); rlhf experiment run sets it",
    )
    git: bool = option(True, help="record the git commit and remote of the working directory")
    system_metrics: bool = option(True, help="sample CPU, GPU, memory and disk use into the run")
    console: bool = option(True, help="capture the console output into the run's logs")
    upload_max_mb: float = option(
        50.0,
        help="an artifact (dataset or model) up to this size in MB is uploaded with the run, so "
        "teammates can download it; a larger one is recorded by reference (path + checksum)",
    )


# The config fields that name a stage's inputs (a field name means the same in every stage, see
# `rlhf <stage> --help`) and the kind of artifact each is. start_stage records every one that names a
# local file or folder as an input of the stage's run.
INPUT_FIELDS = {
    "prompts": "dataset",
    "demonstrations": "dataset",
    "candidates": "dataset",
    "rankings": "dataset",
    "eval_rankings": "dataset",
    "model": "model",
    "policy": "model",
    "reference": "model",
    "norm_policy": "model",
    "reward": "model",
    "reward_model": "model",
}
# In a run dir: what each output was logged as ({path relative to the run dir: {name, type}}), so the
# runs that read it record the very same artifact as their input.
ARTIFACTS_FILE = "artifacts.json"


@dataclass
class RunFields:
    """Where a stage's run goes, shared by every stage config (listed after a stage's own fields in
    ``--help``): the experiment is the W&B group and the folder ``<runs_dir>/<experiment>/``."""

    experiment: str = option("default", help="experiment name: the W&B group and runs/<experiment>/")
    runs_dir: str = option("runs", help="root folder of run directories")
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


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


def capture_settings(cfg: TrackingConfig) -> dict[str, Any]:
    """The ``wandb.Settings`` that switch off what a run records besides what the code logs. A flag
    that is on leaves the setting to W&B: on by default, and the environment may still turn it off
    (``WANDB_CONSOLE=off``, ``WANDB_DISABLE_GIT=true``)."""
    off: dict[str, Any] = {}
    if not cfg.git:
        off["disable_git"] = True
    if not cfg.system_metrics:
        off["x_disable_stats"] = True
    if not cfg.console:
        off["console"] = "off"
    return off


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


def _nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"ppo.kl_coef": 0.1}`` → ``{"ppo": {"kl_coef": 0.1}}``: W&B shows nested config keys joined
    by dots, so the run's ``config.sweep.ppo.kl_coef`` is the swept key's own name."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def local_inputs(value: Any) -> list[Path]:
    """The local files and folders a config value names: a path, a ``lab:<name>`` shipped data set,
    or either inside a list or mapping (``reward: [{spec: DIR, weight: 1}]``). Hub ids, scorer specs
    and model aliases name no local file and are left out."""
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in local_inputs(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in local_inputs(v)]
    if not isinstance(value, str) or not value:
        return []
    if value.startswith("lab:"):  # the shipped data files, where rlhf.data reads `lab:` sources
        path = Path(str(resources.files("rlhf.lab_data").joinpath(f"{value[4:]}.jsonl")))
    else:
        path = Path(value).expanduser()
    return [path] if path.exists() else []


def producer_record(path: Path) -> dict | None:
    """``{name, type}`` of the artifact a run logged for ``path`` (from the ``artifacts.json`` of the
    run dir it lies in), or None when no tracked run produced it (a prompts file, a base model)."""
    path = path.resolve()
    for folder in path.parents:
        registry = folder / ARTIFACTS_FILE
        if registry.is_file():
            try:
                entry = json.loads(registry.read_text()).get(path.relative_to(folder).as_posix())
            except (OSError, ValueError):
                continue
            if entry:
                return entry
    return None


class Tracker:
    """Logs scalars, tables, images and artifacts to W&B (or nowhere) and to ``metrics.jsonl``."""

    def __init__(
        self,
        run_dir: str | Path | None = None,
        run: Any = None,
        upload_max_mb: float = TrackingConfig.upload_max_mb,
    ):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._run = run
        self._upload_max_bytes = upload_max_mb * 1024 * 1024
        self._summary: dict[str, Any] = {}
        self._inputs: list[dict] = []
        self._tables: dict[str, Any] = {}  # key → its incremental wandb.Table
        self._metrics_file = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._metrics_file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115

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
            settings=wandb.Settings(silent=True, save_code=False, **capture_settings(cfg)),
        )
        return cls(run_dir=run_dir, run=run, upload_max_mb=cfg.upload_max_mb)

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
        """Add rows to the table ``key``. W&B gets one incremental table per key: each call logs only
        its new rows, and the table panel shows the rows of every call (a table logged anew under the
        same key would show only its latest version)."""
        if self.run_dir is not None:
            with open(self.run_dir / f"table_{key.replace('/', '_')}.jsonl", "a", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(
                        json.dumps({"step": step, **{c: _jsonable(v) for c, v in zip(columns, row)}}) + "\n"
                    )
        if self._run is not None:
            import wandb

            table = self._tables.get(key)
            if table is None or list(table.columns) != list(columns):
                # mixed types allowed: a column may hold None in one call (no gold scorer) and numbers in
                # the next, and a type clash in a sample table must not stop a training run
                table = wandb.Table(columns=list(columns), log_mode="INCREMENTAL", allow_mixed_types=True)
                self._tables[key] = table
            for row in rows:
                table.add_data(*[_jsonable(v) for v in row])
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
        self._remember_output(Path(path), art)

    def use_artifact(self, path: str | Path, name: str, type: str) -> None:
        """Record a file or directory as an input of this run (lineage: dataset → model → policy).

        An output of an earlier tracked run is recorded under the name and type that run logged it
        with (:func:`producer_record`), whatever ``name`` says, so both runs share one artifact
        version (same name, same content digest) and the lineage graph links them. A path recorded
        already (start_stage records the config's inputs) is not recorded twice.
        """
        source = Path(path).resolve()
        if any(known["path"] == str(source) for known in self._inputs):
            return
        produced = producer_record(source) if source.exists() else None
        if produced:
            name, type = produced["name"], produced["type"]
        self._inputs.append({"name": name, "type": type, "path": str(source)})
        if self._run is None:
            return
        self._run.summary["lineage/inputs"] = list(self._inputs)
        if not source.exists():
            return  # a Hub id or scorer spec: nothing local to record
        art = self._artifact(source, name, type, None)
        if self._run.offline:
            # wandb refuses run.use_artifact offline ("Cannot use artifact when in offline mode",
            # wandb/sdk/wandb_run.py). What use_artifact does online with an artifact object is log it
            # as user-created with use_after_commit; offline that record is kept in the run file, and
            # on `wandb sync` wandb-core creates the version or, when the producer's version with the
            # same digest exists, reuses it, then marks it used by this run (core/pkg/artifacts/saver.go
            # in github.com/wandb/wandb): the same input edge as online. `_log_artifact` is private:
            # pyproject.toml pins wandb to 0.31.x, whose run.use_artifact calls it just so.
            self._run._log_artifact(art, is_user_created=True, use_after_commit=True)
        else:
            self._run.use_artifact(art)

    def use_config_inputs(self, cfg: Any) -> None:
        """Record every config field of :data:`INPUT_FIELDS` that names local files as an input."""
        for field_name, art_type in INPUT_FIELDS.items():
            for path in local_inputs(getattr(cfg, field_name, None)):
                self.use_artifact(path, field_name.replace("_", "-"), art_type)

    def _artifact(self, path: str | Path, name: str, type: str, metadata: dict | None):
        """The artifact of a file or folder. Producer and consumers build it the same way, so its
        digest (a hash of each file's name and checksum) is the same in every run that records it."""
        import wandb

        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:120]
        art = wandb.Artifact(safe, type=type, metadata=_jsonable(metadata or {}))
        p = Path(path).resolve()
        if _size_bytes(p) <= self._upload_max_bytes:
            # by value: the files are copied into the artifact (uploaded by `wandb sync`), so a
            # teammate can download them; the copy waits in W&B's staging folder until then
            if p.is_dir():
                art.add_dir(str(p), name=p.name)
            else:
                art.add_file(str(p), name=p.name)
        else:
            # by reference: path and checksum only, no copy of hundreds of MB of weights
            art.add_reference(p.as_uri(), name=p.name, checksum=True, max_objects=100_000)
        return art

    def _remember_output(self, path: Path, art: Any) -> None:
        """Note in the run dir's ``artifacts.json`` what ``path`` was logged as (outputs inside the run
        dir only: the key is relative, so it survives the runner moving an earlier result aside)."""
        if self.run_dir is None:
            return
        run_dir = self.run_dir.resolve()
        try:
            key = path.resolve().relative_to(run_dir).as_posix()
        except ValueError:
            return
        registry = run_dir / ARTIFACTS_FILE
        entries = json.loads(registry.read_text()) if registry.is_file() else {}
        entries[key] = {"name": art.name, "type": art.type}
        registry.write_text(json.dumps(entries, indent=2))

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


def read_logged(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` or ``table_*.jsonl`` file the tracker wrote, in order; a
    line cut short by a killed run is left out. The one reader of these files."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            continue  # the last line of a run killed mid-write
        if isinstance(rec, dict):
            rows.append(rec)
    return rows


def read_metrics(run_dir: Path) -> list[dict]:
    """Every ``log`` call of a run, as :func:`read_logged` reads them from its ``metrics.jsonl``."""
    return read_logged(Path(run_dir) / METRICS_FILE)


def _keep_steps_until(path: Path, step: int) -> None:
    """Keep the lines of a metrics or table file logged at ``step`` or before; drop the rest."""
    if not path.exists():
        return
    kept = [
        json.dumps(rec) + "\n"
        for rec in read_logged(path)
        if isinstance(rec.get("step"), int) and rec["step"] <= step
    ]
    with atomic_file(path) as tmp:  # a crash leaves the old file or the new one
        tmp.write_text("".join(kept), encoding="utf-8")


def claim_run_dir(cfg: Any, stage: str, resuming: bool = False) -> Path:
    """The stage's run dir, emptied of a finished experiment result first (unless ``resuming`` it).

    A stage command run into an experiment's stage dir (``rlhf ppo --config
    runs/quickstart/ppo/config.yaml kl_coef=0.1``) must not overwrite the experiment's result: it
    moves aside (:func:`rlhf.stage_results.keep_earlier_result`), where ``rlhf experiment run``
    still finds and reuses it. The experiment runner has already moved or cleared it."""
    run_dir = stage_run_dir(cfg, stage)
    if not resuming:
        kept = keep_earlier_result(run_dir, None, Path(cfg.runs_dir) / cfg.experiment / ".cache")
        if kept is not None:
            print(f"{stage}: the finished result of experiment {cfg.experiment!r} here is kept in {kept}")
    return run_dir


def start_stage(cfg: Any, stage: str, job_type: str | None = None, resumed_at: int | None = None) -> Tracker:
    """Create the stage's run dir, save its resolved ``config.yaml``, start its tracked run and record
    the inputs its config names (:data:`INPUT_FIELDS`).

    ``cfg`` must have ``experiment`` (the W&B group), ``runs_dir`` and ``tracking`` fields. A run
    resumed from a checkpoint made after step ``resumed_at`` keeps the metrics and table rows of
    the steps up to it, so its files end as an uninterrupted run's would. Any other run first moves a
    finished experiment result out of the run dir (:func:`claim_run_dir`).
    """
    # a stage asked to resume (`resume` in its config) works on what its run dir holds
    run_dir = claim_run_dir(
        cfg, stage, resuming=resumed_at is not None or bool(getattr(cfg, "resume", False))
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    # A rerun of the same stage starts fresh files (earlier runs stay in W&B).
    logged = [run_dir / METRICS_FILE, *run_dir.glob("table_*.jsonl")]
    for path in logged:
        if resumed_at is None:
            path.unlink(missing_ok=True)
        else:
            _keep_steps_until(path, resumed_at)
    (run_dir / ARTIFACTS_FILE).unlink(missing_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    config = to_dict(cfg)
    if cfg.tracking.sweep:
        config["sweep"] = _nested(cfg.tracking.sweep)
    tracker = Tracker.start(
        cfg.tracking,
        run_dir=run_dir,
        job_type=job_type or stage,
        group=cfg.experiment,
        name=cfg.tracking.name or f"{cfg.experiment}-{stage}",
        config=config,
    )
    tracker.use_config_inputs(cfg)
    return tracker
