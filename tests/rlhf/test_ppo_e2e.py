"""End to end through the real command line: ``rlhf sft`` then ``rlhf ppo`` on the tiny model with a
user ``module:function`` reward from YAML; ``rlhf eval``; and PPO under ``accelerate launch`` with 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.cli import main
from tests.rlhf import ppo_helpers

ROOT = Path(__file__).resolve().parents[2]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    demos = ppo_helpers.write_demonstrations(tmp / "demos.jsonl")
    rc = main(
        [
            "sft",
            "--model",
            "tiny",
            "--demonstrations",
            str(demos),
            "--runs_dir",
            str(tmp / "runs"),
            "--experiment",
            "e2e",
            "--epochs",
            "1",
            "--batch_size",
            "4",
            "--learning_rate",
            "0.001",
            "--tracking.mode",
            "offline",
        ]
    )
    assert rc == 0
    run = tmp / "runs" / "e2e" / "sft"
    meta = json.loads((run / "policy" / "rlhf_policy.json").read_text())
    assert meta["stage"] == "sft" and meta["base"]
    lines = _metrics(run / "metrics.jsonl")
    assert any("train/loss" in m for m in lines) and any("eval/loss" in m for m in lines)
    assert list((run / "wandb").glob("offline-run-*"))  # a W&B run (job_type sft) was recorded
    return run / "policy"


def test_sft_then_ppo_through_cli_reward_rises(sft_policy, tmp_path):
    prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
    cfg = {
        "policy": str(sft_policy),
        "reward": "tests.rlhf.ppo_helpers:ascii_fraction",  # a user module:function from YAML
        "prompts": str(prompts),
        "num_eval_prompts": 4,
        "eval_every": 3,
        "sample_every": 2,
        "total_episodes": 192,
        "batch_size": 32,
        "minibatch_size": 16,
        "micro_batch_size": 8,
        "ppo_epochs": 4,
        "response_length": 8,
        "learning_rate": 0.003,
        "kl_coef": 0.01,
        "missing_eos_penalty": 0.0,
        "value_model": "shared",
        "runs_dir": str(tmp_path / "runs"),
        "experiment": "e2e",
        "tracking": {"mode": "disabled"},
    }
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["ppo", "--config", str(tmp_path / "ppo.yaml")]) == 0
    run = tmp_path / "runs" / "e2e" / "ppo"
    lines = _metrics(run / "metrics.jsonl")
    scores = [m["objective/scores"] for m in lines if "objective/scores" in m]
    assert len(scores) == 6
    first, last = sum(scores[:2]) / 2, sum(scores[-2:]) / 2
    print(f"tiny PPO reward curve: {[round(s, 3) for s in scores]}")
    assert last > first + 0.05, scores
    evals = [m for m in lines if "eval/score" in m]
    assert len(evals) == 3 and all("eval/kl" in m and "eval/win_rate" in m for m in evals)
    assert (run / "learning_curves.png").stat().st_size > 1000
    assert (run / "table_samples.jsonl").read_text().count("\n") >= 8  # history kept: updates 1, 2, 4, 6
    assert json.loads((run / "policy" / "rlhf_policy.json").read_text())["stage"] == "ppo"

    # rlhf eval: the PPO policy against the SFT policy on held-out prompts
    rc = main(
        [
            "eval",
            "--policy",
            str(run / "policy"),
            "--reference",
            str(sft_policy),
            "--reward",
            "tests.rlhf.ppo_helpers:ascii_fraction",
            "--gold",
            "tests.rlhf.ppo_helpers:lowercase_fraction",
            "--prompts",
            str(prompts),
            "--split",
            "null",
            "--num_prompts",
            "8",
            "--max_new_tokens",
            "8",
            "--runs_dir",
            str(tmp_path / "runs"),
            "--experiment",
            "e2e",
            "--tracking.mode",
            "disabled",
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "runs" / "e2e" / "eval" / "summary.json").read_text())
    for key in (
        "eval/score",
        "eval/gold_score",
        "eval/kl",
        "eval/length",
        "eval/eos_rate",
        "eval/win_rate",
        "eval/reference_score",
    ):
        assert key in summary
    assert summary["eval/score"] > summary["eval/reference_score"]


def test_ppo_lora_from_sft_policy(sft_policy, tmp_path):
    prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
    rc = main(
        [
            "ppo",
            "--policy",
            str(sft_policy),
            "--reward",
            "keywords:good=nice|calm",
            "--prompts",
            str(prompts),
            "--lora",
            "true",
            "--value_model",
            "shared",
            "--total_episodes",
            "16",
            "--batch_size",
            "8",
            "--minibatch_size",
            "8",
            "--micro_batch_size",
            "4",
            "--ppo_epochs",
            "1",
            "--response_length",
            "6",
            "--learning_rate",
            "0.001",
            "--num_eval_prompts",
            "4",
            "--runs_dir",
            str(tmp_path / "runs"),
            "--tracking.mode",
            "disabled",
        ]
    )
    assert rc == 0
    from rlhf.models import load_policy

    model, _ = load_policy(
        str(tmp_path / "runs" / "default" / "ppo" / "policy")
    )  # merged: loads as a plain model
    assert not hasattr(model, "peft_config")


def test_accelerate_two_processes(sft_policy, tmp_path):
    prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    acc = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(acc),
        "launch",
        "--config_file",
        str(ROOT / "experiments" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port",
        "29533",
        "-m",
        "rlhf.cli",
        "ppo",
        "--policy",
        str(sft_policy),
        "--reward",
        "tests.rlhf.ppo_helpers:ascii_fraction",
        "--prompts",
        str(prompts),
        "--total_episodes",
        "16",
        "--batch_size",
        "8",
        "--minibatch_size",
        "4",
        "--micro_batch_size",
        "2",
        "--ppo_epochs",
        "1",
        "--response_length",
        "6",
        "--num_eval_prompts",
        "2",  # the main process alone evaluates, between updates and at the end
        "--eval_every",
        "1",
        "--runs_dir",
        str(tmp_path / "runs"),
        "--tracking.mode",
        "disabled",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(2 processes)" in out.stdout
    lines = _metrics(tmp_path / "runs" / "default" / "ppo" / "metrics.jsonl")
    steps = [m for m in lines if "objective/scores" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert any(key.startswith("eval/") for m in lines for key in m)
    assert steps[0]["val/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= steps[0]["objective/raw_scores"] <= 1.0
    assert (tmp_path / "runs" / "default" / "ppo" / "policy" / "model.safetensors").exists()
