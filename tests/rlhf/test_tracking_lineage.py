"""W&B as a reader sees it: inputs recorded as the producer's artifact (offline too), small files
uploaded by value, the tracking flags, incremental sample tables. Offline run files are read back with
`wandb leet inspect --json`, the reader tests/rlhf/test_tracking.py uses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config import option
from rlhf.tracking import ARTIFACTS_FILE, TrackingConfig, capture_settings, start_stage


@dataclass
class ProducerCfg:
    experiment: str = option("exp-l", help="")
    runs_dir: str = option("runs", help="")
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(mode="offline"))


@dataclass
class ConsumerCfg:
    experiment: str = option("exp-l", help="")
    runs_dir: str = option("runs", help="")
    candidates: str = option("", help="")
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(mode="offline", upload_max_mb=0))


def _records(run_path: Path) -> list[dict]:
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(exe) if exe.exists() else shutil.which("wandb"), "leet", "inspect", "--json", str(run_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _artifacts(run_path: Path) -> list[dict]:
    return [r["artifact"] for r in _records(run_path) if r["type"] == "artifact"]


def test_an_input_is_recorded_as_the_artifact_its_producer_logged(in_tmp):
    producer = start_stage(ProducerCfg(), "generate")
    out = producer.run_dir / "candidates.jsonl"
    out.write_text('{"prompt_id": "p1"}\n')
    producer.log_artifact(out, "exp-l-candidates", "dataset")
    producer_run = producer.wandb_dir
    producer.finish()
    assert json.loads((producer.run_dir / ARTIFACTS_FILE).read_text()) == {
        "candidates.jsonl": {"name": "exp-l-candidates", "type": "dataset"}
    }

    # the consumer's config names the file: start_stage records it; a second, explicit call adds nothing
    consumer = start_stage(ConsumerCfg(candidates=str(out)), "simulate")
    consumer.use_artifact(out, "candidates", "dataset")
    consumer_run = consumer.wandb_dir
    consumer.finish()

    (logged,) = _artifacts(producer_run)
    (used,) = _artifacts(consumer_run)
    # one artifact version for both runs: same name, same content digest; `wandb sync` links them
    assert used["name"] == logged["name"] == "exp-l-candidates" and used["digest"] == logged["digest"]
    assert used["use_after_commit"] and used["user_created"] and not logged.get("use_after_commit")
    # small (below tracking.upload_max_mb): the file itself is in the artifact; upload_max_mb=0: a reference
    (entry,) = logged["manifest"]["contents"]
    assert entry["path"] == "candidates.jsonl" and "local_path" in entry and "ref" not in entry
    assert used["manifest"]["contents"][0]["ref"] == out.resolve().as_uri()
    inputs = json.loads((consumer.run_dir / "summary.json").read_text())["lineage/inputs"]
    assert [(i["name"], i["type"]) for i in inputs] == [("exp-l-candidates", "dataset")]


def test_a_folder_input_no_run_produced_keeps_the_given_name(in_tmp):
    model = in_tmp / "base"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\0" * 64)
    tracker = start_stage(ProducerCfg(), "sft")
    tracker.use_artifact(model, "base-tiny", "model")
    tracker.use_artifact("HuggingFaceTB/SmolLM2-135M", "hub", "model")  # a Hub id: listed, nothing sent
    run_path = tracker.wandb_dir
    tracker.finish()
    (used,) = _artifacts(run_path)
    assert used["name"] == "base-tiny" and used["type"] == "model" and used["use_after_commit"]
    assert [e["path"] for e in used["manifest"]["contents"]] == ["base/weights.bin"]


def test_git_system_metrics_and_console_are_on_unless_switched_off(in_tmp):
    assert capture_settings(TrackingConfig()) == {}  # on: W&B's defaults (the environment may still say off)
    cfg = ProducerCfg(tracking=TrackingConfig(mode="offline", git=False, system_metrics=False, console=False))
    assert capture_settings(cfg.tracking) == {"disable_git": True, "x_disable_stats": True, "console": "off"}
    tracker = start_stage(cfg, "generate")
    settings = tracker._run.settings
    assert settings.disable_git and settings.x_disable_stats and settings.console == "off"
    tracker.finish()


def test_sample_tables_keep_every_update(in_tmp):
    tracker = start_stage(ProducerCfg(), "ppo")
    for update in (1, 2, 3):
        tracker.log_table(
            "samples", ["step", "response", "gold"], [[update, f"r{update}", None]], step=update
        )
    run_path = tracker.wandb_dir
    tracker.finish()
    tables = [
        r["history"]["item"]
        for r in _records(run_path)
        if r["type"] == "history" and "samples._type" in r["history"]["item"]
    ]
    # one incremental table: each update adds its rows, the panel shows them all
    assert [t["samples._type"] for t in tables] == ["incremental-table-file"] * 3
    assert [t["samples.increment_num"] for t in tables] == [0, 1, 2]
    assert [t["samples.nrows"] for t in tables] == [1, 2, 3]
