"""SFT: demonstration formats, held-out split, and `rlhf sft` (full and LoRA) on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rlhf.models
import rlhf.sft
from rlhf.cli import main
from rlhf.sft import SFTConfig, sft_trainer_class, split_heldout, to_trl_record
from tests.frozen_bf16 import CastByAutocast, recording
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


def test_the_cpu_bf16_trainer_computes_its_loss_under_autocast(monkeypatch):
    """TRL's bf16 flag does nothing on a CPU, so the lab's trainer autocasts the loss (the forward
    inside it) itself, and only when asked."""
    import torch
    import trl

    seen = []
    monkeypatch.setattr(
        trl.SFTTrainer, "compute_loss", lambda self, *a, **k: seen.append(torch.is_autocast_enabled("cpu"))
    )
    for cpu_bf16 in (False, True):
        cls = sft_trainer_class(cpu_bf16)
        cls.compute_loss(object.__new__(cls), None, {})
    assert seen == [False, True]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_sft_mixed_precision_through_the_cli(tmp_path, capsys, monkeypatch, precision):
    """``mixed_precision`` is resolved on the machine: bf16 trains (and says so in its summary) where
    the CPU has it; where it does not, bf16 is one line and no run. ``no`` is fp32 everywhere."""

    demos = ppo_helpers.write_demonstrations(tmp_path / "demos.jsonl", n=8)
    argv = ["sft", "--model", "tiny", "--demonstrations", str(demos), "--batch_size", "4"]
    argv += [
        "--mixed_precision",
        precision,
        "--runs_dir",
        str(tmp_path / "runs"),
        "--tracking.mode",
        "disabled",
    ]
    if precision == "bf16" and rlhf.models.bf16_hardware("cpu"):
        assert main(argv) == 0
        summary = json.loads((tmp_path / "runs" / "default" / "sft" / "summary.json").read_text())
        assert summary["sft/bf16"] == 1 and summary["train/loss_final"] == summary["train/loss_final"]
    capsys.readouterr()  # the first run's progress bar
    monkeypatch.setattr(rlhf.models, "bf16_hardware", lambda device: False)
    rc = main([*argv, "--experiment", "nobf16"])
    if precision == "bf16":
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "bf16 needs bf16 hardware" in err
        assert not (tmp_path / "runs" / "nobf16").exists()
    else:
        assert rc == 0
        assert (
            json.loads((tmp_path / "runs" / "nobf16" / "sft" / "summary.json").read_text())["sft/bf16"] == 0
        )


def test_lora_sft_under_cpu_autocast_keeps_its_frozen_base_in_bf16_and_learns_the_same(tmp_path, monkeypatch):
    """Under the lab's CPU autocast a LoRA SFT keeps the frozen base's linear weights in bf16 while
    it trains (autocast would cast them at every op): the adapter it writes is the one an fp32 base
    under autocast gives, bit for bit, and the base is fp32 again afterwards."""
    if not rlhf.models.bf16_hardware("cpu"):
        pytest.skip("this CPU has no bf16 (AVX512-BF16/AMX)")
    demos = ppo_helpers.write_demonstrations(tmp_path / "demos.jsonl", n=8)
    argv = ["sft", "--model", "tiny", "--demonstrations", str(demos), "--batch_size", "4", "--lora", "true"]
    argv += ["--mixed_precision", "bf16", "--runs_dir", str(tmp_path / "runs"), "--tracking.mode", "disabled"]
    dtypes = []

    monkeypatch.setattr(rlhf.sft, "FrozenLinearsInBF16", recording(dtypes))
    assert main([*argv, "--experiment", "kept"]) == 0
    assert dtypes == [{torch.bfloat16}]

    monkeypatch.setattr(rlhf.sft, "FrozenLinearsInBF16", CastByAutocast)
    assert main([*argv, "--experiment", "cast"]) == 0
    kept, cast = (
        load_file(tmp_path / "runs" / e / "sft" / "policy" / "adapter_model.safetensors")
        for e in ("kept", "cast")
    )
    assert kept.keys() == cast.keys() and all(torch.equal(kept[k], cast[k]) for k in kept)
    assert all(t.dtype == torch.float32 for t in kept.values())
    summaries = [
        json.loads((tmp_path / "runs" / e / "sft" / "summary.json").read_text()) for e in ("kept", "cast")
    ]
    assert summaries[0]["train/loss_final"] == summaries[1]["train/loss_final"]


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
