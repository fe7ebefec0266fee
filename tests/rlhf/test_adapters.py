"""IA3 beside LoRA: one field (`adapter`) picks the adapter of SFT, DPO, KTO and PPO; each trains
it, saves, reloads and samples with the lab's sampler, and only IA3's targets change."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.cli import main
from rlhf.data import read_jsonl
from rlhf.models import load_policy
from tests.reward_models.rm_data import make_records, write_records
from tests.rlhf import ppo_helpers

IA3_TARGETS = ("k_proj", "v_proj", "down_proj")  # peft's IA3 modules for Llama-style models


def _changed(policy_dir) -> list[str]:
    trained, _ = load_policy(str(policy_dir), merged=True)
    base, _ = load_policy("tiny")
    before = base.state_dict()
    return [n for n, p in trained.state_dict().items() if not torch.equal(p, before[n])]


def _stage_args(stage: str, tmp_path) -> list[str]:
    if stage == "sft":
        demos = ppo_helpers.write_demonstrations(tmp_path / "demos.jsonl")
        return [
            "sft",
            "--model",
            "tiny",
            "--demonstrations",
            str(demos),
            "--max_examples",
            "8",
            "--batch_size",
            "4",
        ]
    if stage == "ppo":
        prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
        return [
            "ppo",
            "--policy",
            "tiny",
            "--reward",
            "tests.rlhf.ppo_helpers:ascii_fraction",
            "--prompts",
        ] + [
            str(prompts),
            "--total_episodes",
            "8",
            "--batch_size",
            "8",
            "--minibatch_size",
            "8",
            "--micro_batch_size",
            "8",
            "--response_length",
            "6",
            "--num_eval_prompts",
            "0",
        ]
    rankings = write_records(tmp_path / "rankings.jsonl", make_records(8, seed=1))
    return [stage, "--policy", "tiny", "--rankings", str(rankings), "--max_steps", "2"]


@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "ppo"])
def test_ia3_trains_saves_reloads_and_samples(stage, tmp_path):
    runs = tmp_path / "runs"
    args = _stage_args(stage, tmp_path) + [
        "--lora",
        "true",
        "--adapter",
        "ia3",
        "--learning_rate" if stage in ("sft", "ppo") else "--lr",
        "0.01",
    ]
    assert main([*args, "--runs_dir", str(runs), "--tracking.mode", "disabled"]) == 0
    policy = runs / "default" / stage / "policy"
    if stage == "sft":  # SFT writes the adapter itself; the later stages merge theirs
        assert json.loads((policy / "adapter_config.json").read_text())["peft_type"] == "IA3"
    changed = _changed(policy)
    assert changed and all(any(t in n for t in IA3_TARGETS) for n in changed), changed
    out = tmp_path / "candidates.jsonl"
    gen = ["generate", "--model", str(policy), "--limit", "2", "--k", "2", "--max_new_tokens", "4"]
    assert main([*gen, "--out", str(out), "--runs_dir", str(runs), "--tracking.mode", "disabled"]) == 0
    assert [len(r["candidates"]) for r in read_jsonl(out)] == [2, 2]
