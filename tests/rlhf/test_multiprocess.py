"""Every stage under `accelerate launch` with the shipped 2-process config (rlhf/distributed.py).

The training stages (sft, ppo, rm train) train in both processes; sft and ppo have their own
2-process tests in test_sft.py and test_ppo_e2e.py. Every other stage (dpo and kto too) runs in
process 0 alone:
the same output as a direct run, one writer, one W&B run. A user error prints one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf.cli import main
from rlhf.data import read_jsonl
from tests.rlhf import ppo_helpers

ROOT = Path(__file__).resolve().parents[2]
TWO_PROCESSES = ROOT / "experiments" / "accelerate" / "cpu_2proc.yaml"


def launch(args: list[str], cwd: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(TWO_PROCESSES),
        "--main_process_port",
        str(port),
        "-m",
        "rlhf.cli",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)


def offline_runs(stage_dir: Path) -> list[Path]:
    return list((stage_dir / "wandb").glob("offline-run-*"))


def assert_ran_once(out: subprocess.CompletedProcess, stage: str) -> None:
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count(f"rlhf {stage}: runs in one process; the launch's other 1 process(es) exit") == 1


def test_each_stage_under_two_processes(tmp_path):
    runs = tmp_path / "runs"
    common = ["--runs_dir", str(runs), "--tracking.mode", "offline"]

    # generate: process 0 alone, the very candidates of a direct run
    gen_args = ["generate", "--model", "tiny", "--limit", "16", "--k", "4", "--max_new_tokens", "8"]
    out = launch([*gen_args, *common], tmp_path, 29541)
    assert_ran_once(out, "generate")
    assert out.stdout.count("generate: 16 prompts × 4 candidates") == 1
    assert len(offline_runs(runs / "default" / "generate")) == 1
    candidates = runs / "default" / "generate" / "candidates.jsonl"
    direct = tmp_path / "direct.jsonl"
    assert (
        main(
            [
                *gen_args,
                "--out",
                str(direct),
                "--runs_dir",
                str(tmp_path / "direct"),
                "--tracking.mode",
                "disabled",
            ]
        )
        == 0
    )
    assert read_jsonl(candidates) == read_jsonl(direct)

    # simulate and export: one writer each
    out = launch(
        ["simulate", "--candidates", str(candidates), "--scorer", "length:target=6", *common], tmp_path, 29542
    )
    assert_ran_once(out, "simulate")
    rankings = runs / "default" / "simulate" / "rankings.jsonl"
    assert len(read_jsonl(rankings)) == 16
    pairs = tmp_path / "pairs.jsonl"
    out = launch(["export", "--rankings", str(rankings), "--out", str(pairs), *common], tmp_path, 29543)
    assert_ran_once(out, "export")
    assert pairs.is_file()

    # rm train: both processes train on their shard of prompts; the main one writes and reports
    rm_args = ["rm", "train", "--config", str(ROOT / "experiments" / "configs" / "rm_tiny.yaml")]
    out = launch([*rm_args, "--rankings", str(rankings), "--epochs", "1", *common], tmp_path, 29544)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("rm train:") == 1 and ", 2 processes]" in out.stdout
    assert len(offline_runs(runs / "default" / "rm_train")) == 1
    reward_model = runs / "default" / "rm_train" / "model"
    assert (reward_model / "rlhf_reward.json").is_file()

    # rm eval, eval, baseline: process 0 alone
    held_out = runs / "default" / "rm_train" / "eval_rankings.jsonl"
    rm_eval = ["rm", "eval", "--reward_model", str(reward_model), "--rankings", str(held_out)]
    out = launch([*rm_eval, "--gold", "length:target=6", *common], tmp_path, 29545)
    assert_ran_once(out, "rm")
    metrics = json.loads((runs / "default" / "rm_eval" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["eval/pair_accuracy"] <= 1
    assert len(offline_runs(runs / "default" / "rm_eval")) == 1

    eval_args = ["eval", "--policy", "tiny", "--reward", str(reward_model), "--num_prompts", "4"]
    out = launch([*eval_args, "--max_new_tokens", "6", *common], tmp_path, 29546)
    assert_ran_once(out, "eval")
    assert len(offline_runs(runs / "default" / "eval")) == 1

    for stage, port in (("dpo", 29549), ("kto", 29550)):  # the direct methods: process 0 alone
        direct = [stage, "--policy", "tiny", "--rankings", str(rankings), "--max_steps", "1"]
        out = launch([*direct, *common], tmp_path, port)
        assert_ran_once(out, stage)
        assert out.stdout.count(" 1 steps in ") == 1 and len(offline_runs(runs / "default" / stage)) == 1

    prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
    baseline = ["baseline", "--algorithm", "rloo", "--policy", "tiny", "--prompts", str(prompts)]
    baseline += [
        "--reward",
        "tests.rlhf.ppo_helpers:ascii_fraction",
        "--total_episodes",
        "8",
        "--batch_size",
        "8",
    ]
    baseline += ["--num_generations", "4", "--response_length", "6", "--num_eval_prompts", "0"]
    out = launch([*baseline, *common], tmp_path, 29547)
    assert_ran_once(out, "baseline")
    assert len(offline_runs(runs / "default" / "baseline_rloo")) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["ppo", "--policy", "tiny", "--batch_size", "16", "--minibatch_size", "8", "--micro_batch_size", "8"],
        ["generate", "--model", "tiny", "--k", "40"],
    ],
    ids=["training stage", "one-process stage"],
)
def test_a_user_error_under_two_processes_is_one_line(tmp_path, args):
    out = launch([*args, "--runs_dir", str(tmp_path / "runs")], tmp_path, 29548)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("rlhf: error[")]
    assert len(errors) == 1, out.stderr[-3000:]
    # torchrun's failure report names the same line as the cause, not "To enable traceback see"
    assert f"traceback : {errors[0]}" in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_custom_loops_refuse_sharded_launches_before_loading(kind):
    from accelerate.utils import DistributedType

    from rlhf.config import ConfigError
    from rlhf.distributed import require_data_parallel

    with pytest.raises(
        ConfigError, match=rf"ppo trains data-parallel \(DDP\) only, not under {kind}.*multi_gpu_ddp"
    ):
        require_data_parallel(SimpleNamespace(distributed_type=DistributedType[kind]), "ppo")
    for data_parallel in ("NO", "MULTI_CPU", "MULTI_GPU"):
        require_data_parallel(SimpleNamespace(distributed_type=DistributedType[data_parallel]), "ppo")


def test_the_exact_head_is_the_same_in_two_processes(tmp_path):
    """solver lbfgs: each process holds half the prompts, the sums are reduced at every step, so the
    head (λ chosen by cross-validation too) is the one a single process solves."""
    from safetensors.torch import load_file

    from tests.reward_models.rm_data import make_records, write_records

    data = write_records(tmp_path / "r.jsonl", make_records(40, seed=1, flip=0.2))
    args = [
        "rm",
        "train",
        "--rankings",
        str(data),
        "--model",
        "tiny",
        "--top_layers",
        "0",
        "--solver",
        "lbfgs",
    ]
    args += ["--read_layers", "[0,2]", "--l2_search", "[0.3,3]", "--cv_folds", "3", "--mixed_precision", "no"]
    args += ["--tracking.mode", "disabled"]
    out = launch([*args, "--runs_dir", str(tmp_path / "two")], tmp_path, 29549)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ", 2 processes]" in out.stdout
    assert main([*args, "--runs_dir", str(tmp_path / "one")]) == 0
    heads = [
        load_file(str(tmp_path / n / "default" / "rm_train" / "model" / "rlhf_head.safetensors"))
        for n in ("two", "one")
    ]
    assert torch.allclose(heads[0]["weight"], heads[1]["weight"], atol=1e-4)
    assert torch.allclose(heads[0]["bias"], heads[1]["bias"], atol=1e-4)
