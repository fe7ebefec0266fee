"""SFT: demonstration formats, held-out split, and `rlhf sft` (full and LoRA) on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.sft import SFTConfig, split_heldout, to_trl_record
from tests.rlhf import ppo_helpers


def test_to_trl_record_formats():
    assert to_trl_record({"prompt": "Hi", "completion": "Hello."}) == {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello."}],
    }
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert to_trl_record({"messages": msgs}) == {"messages": msgs}
    chat_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rec = to_trl_record({"prompt": chat_prompt, "completion": [{"role": "assistant", "content": "Yo"}]})
    assert rec["prompt"] == chat_prompt and rec["completion"][0]["content"] == "Yo"


def test_split_heldout_is_deterministic_and_disjoint():
    recs = [{"i": i} for i in range(20)]
    train, held = split_heldout(recs, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18
    assert {r["i"] for r in train}.isdisjoint({r["i"] for r in held})
    assert split_heldout(recs, 0.1, seed=3) == (train, held)
    assert split_heldout(recs, 0.0, seed=3) == (recs, [])


def test_bad_config_rejected():
    from rlhf.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="eval_fraction"):
        build_config(SFTConfig, None, {"eval_fraction": 1.5})


def test_sft_cli_lora_tiny(tmp_path):
    demos = ppo_helpers.write_demonstrations(tmp_path / "demos.jsonl", n=8)
    rc = main(
        [
            "sft",
            "--model",
            "tiny",
            "--demonstrations",
            str(demos),
            "--lora",
            "true",
            "--lora_r",
            "4",
            "--learning_rate",
            "0.01",
            "--epochs",
            "2",
            "--batch_size",
            "4",
            "--runs_dir",
            str(tmp_path / "runs"),
            "--tracking.mode",
            "disabled",
        ]
    )
    assert rc == 0
    run = tmp_path / "runs" / "default" / "sft"
    policy = run / "policy"
    assert (policy / "adapter_config.json").exists()  # LoRA: only the adapter is saved
    meta = json.loads((policy / "rlhf_policy.json").read_text())
    assert meta["stage"] == "sft" and meta["lora"] is True
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in lines if "train/loss" in m]
    assert losses and all(v == v for v in losses)
    summary = json.loads((run / "summary.json").read_text())
    assert "eval/loss" in summary and summary["train/examples"] == 7  # 1 of 8 held out

    from rlhf.models import load_policy

    model, tok = load_policy(str(policy))  # the adapter dir loads on its base
    assert hasattr(model, "peft_config")


def test_sft_missing_data_is_a_clear_error(tmp_path, capsys):
    rc = main(
        [
            "sft",
            "--model",
            "tiny",
            "--demonstrations",
            str(tmp_path / "nope.jsonl"),
            "--runs_dir",
            str(tmp_path / "runs"),
            "--tracking.mode",
            "disabled",
        ]
    )
    assert rc == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_sft_under_two_processes_makes_one_run_and_one_writer(tmp_path):
    """`accelerate launch` with the shipped 2-process config: both processes train, the main one
    alone tracks (one offline W&B run), writes the policy and prints."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(root / "experiments" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port",
        "29534",
        "-m",
        "rlhf.cli",
        "sft",
        "--model",
        "tiny",
        "--lora",
        "false",
        "--max_examples",
        "16",
        "--batch_size",
        "4",
        "--runs_dir",
        str(tmp_path / "runs"),
        "--tracking.mode",
        "offline",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "default" / "sft"
    assert out.stdout.count("sft: wrote policy") == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert (run_dir / "policy" / "model.safetensors").exists()
