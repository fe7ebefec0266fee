"""The tracker in offline mode, read back with `wandb leet inspect --json`; the no-op mode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhf.config import option
from rlhf.tracking import Tracker, TrackingConfig, resolve_mode, start_stage


@dataclass
class StageCfg:
    experiment: str = option("exp-a", help="")
    runs_dir: str = option("runs", help="")
    seed: int = option(3, help="")
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(mode="offline", tags=["t1"]))


def _wandb_bin() -> str:
    exe = Path(sys.executable).with_name("wandb")
    return str(exe) if exe.exists() else (shutil.which("wandb") or "wandb")


def _records(run_path: Path) -> list[dict]:
    out = subprocess.run(
        [_wandb_bin(), "leet", "inspect", "--json", str(run_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_offline_run_is_named_grouped_and_readable(in_tmp):
    tracker = start_stage(StageCfg(), "generate")
    for step in range(3):
        tracker.log({"perf/tokens_per_s": 10.0 * step, "objective/kl": 0.5}, step=step)
    tracker.log_table("samples", ["step", "response"], [[0, "<b>hi</b>"]], step=3)
    tracker.summary({"final/score": 1.25})
    data = in_tmp / "cands.jsonl"
    data.write_text("{}\n")
    tracker.use_artifact(data, "cands", "dataset")
    tracker.log_artifact(data, "exp-a-rankings", "dataset", metadata={"n": 1})
    run_path = tracker.wandb_dir
    tracker.finish()

    run_dir = in_tmp / "runs" / "exp-a" / "generate"
    assert (run_dir / "config.yaml").read_text().startswith("experiment: exp-a")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2] and lines[2]["perf/tokens_per_s"] == 20.0
    assert json.loads((run_dir / "summary.json").read_text())["final/score"] == 1.25

    records = _records(run_path)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (
        run["run_group"] == "exp-a"
        and run["job_type"] == "generate"
        and run["display_name"] == "exp-a-generate"
    )
    assert run["config"]["update"]["seed"] == 3
    history = [r["history"] for r in records if r["type"] == "history"]
    assert [h["item"]["perf/tokens_per_s"] for h in history if "perf/tokens_per_s" in h["item"]] == [
        0,
        10,
        20,
    ]
    table = next(h["item"] for h in history if "samples._type" in h["item"])
    assert (
        table["samples._type"] == "incremental-table-file"
        and table["samples.nrows"] == 1
        and table["_step"] == 3
    )
    names = [r["artifact"]["name"] for r in records if r["type"] == "artifact"]
    assert "exp-a-rankings" in names


def test_noop_tracker_writes_only_metrics(tmp_path):
    tr = Tracker.noop(tmp_path / "r")
    tr.log({"a": float("nan"), "b": 1}, step=0)
    tr.log_table("t", ["x"], [[1]])
    tr.log_artifact(tmp_path, "x", "model")
    tr.finish()
    assert not (tmp_path / "r" / "wandb").exists()
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text())["a"] is None
    assert Tracker.noop().enabled is False


@pytest.mark.parametrize(
    "env, mode, expected",
    [
        ("offline", "auto", "offline"),
        ("", "disabled", "disabled"),
        ("online", "offline", "offline"),
        ("disabled", "auto", "disabled"),
    ],
)
def test_resolve_mode(monkeypatch, env, mode, expected):
    monkeypatch.setenv("WANDB_MODE", env)
    assert resolve_mode(mode) == expected


def test_auto_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
