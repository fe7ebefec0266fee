"""PPO against an ensemble of reward models: the members' disagreement is logged per update and
shown beside each sample."""

from __future__ import annotations

import json

from reward_models.model import build_reward_model, save_reward_model
from rlhf.cli import main
from tests.rlhf import ppo_helpers


def test_ppo_logs_the_ensembles_disagreement(tmp_path):
    members = []
    for seed in (1, 2):
        model, tok = build_reward_model("tiny", "top", top_layers=1, seed=seed)
        save_reward_model(model, tok, tmp_path / f"rm{seed}", {"loss": "grouped_bt", "max_length": 64})
        members.append(str(tmp_path / f"rm{seed}"))
    prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
    args = ["ppo", "--policy", "tiny", "--reward", "ensemble:mean_minus_std:" + ",".join(members)]
    args += [
        "--prompts",
        str(prompts),
        "--total_episodes",
        "16",
        "--batch_size",
        "8",
        "--minibatch_size",
        "8",
    ]
    args += [
        "--micro_batch_size",
        "8",
        "--ppo_epochs",
        "1",
        "--response_length",
        "6",
        "--num_eval_prompts",
        "0",
    ]
    args += ["--sample_every", "1", "--num_samples", "2", "--runs_dir", str(tmp_path / "runs")]
    assert main([*args, "--tracking.mode", "offline"]) == 0
    run_dir = tmp_path / "runs" / "default" / "ppo"
    updates = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [m for m in updates if "objective/scores" in m]
    assert len(updates) == 2 and all(m["objective/rm_disagreement"] > 0 for m in updates)
    samples = [json.loads(line) for line in (run_dir / "table_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["rm_disagreement"] >= 0 for s in samples)
