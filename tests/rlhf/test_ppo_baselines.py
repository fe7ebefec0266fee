"""TRL's GRPO / RLOO driven by the lab's reward interface, through the real command line (tiny model)."""

from __future__ import annotations

import json

import pytest

from rlhf.cli import main
from rlhf.config import ConfigError, build_config
from tests.rlhf import ppo_helpers


def test_trl_reward_func_wraps_lab_reward():
    from rlhf.baselines import trl_reward_func
    from rlhf.rewards import load_reward_fn

    fn = trl_reward_func(load_reward_fn("tests.rlhf.ppo_helpers:ascii_fraction"))
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    completions = [
        [{"role": "assistant", "content": "abc"}],
        [{"role": "assistant", "content": "\u00e9\u00e9"}],
    ]
    assert fn(prompts=prompts, completions=completions) == pytest.approx([1.0, 0.0])


def test_trl_reward_func_tells_the_reward_which_completions_ended():
    from rlhf.baselines import trl_reward_func

    seen = []

    def reward(prompts, responses, finished=None):
        seen.append(finished)
        return [0.0] * len(responses)

    fn = trl_reward_func(reward, stop_token_ids={2, 7})
    prompts = [[{"role": "user", "content": "hi"}]] * 3
    completions = [[{"role": "assistant", "content": "a"}]] * 3
    fn(prompts=prompts, completions=completions, completion_ids=[[5, 2], [5, 6], [7]])
    fn(prompts=prompts, completions=completions)  # no ids: the reward decides (None)
    assert seen == [[True, False, True], None]


def test_validation():
    from rlhf.baselines import BaselineConfig

    with pytest.raises(ConfigError, match="num_generations"):
        build_config(BaselineConfig, None, {"batch_size": 6, "num_generations": 4})


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_baseline_cli(tmp_path, algorithm):
    prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
    rc = main(
        [
            "baseline",
            "--algorithm",
            algorithm,
            "--policy",
            "tiny",
            "--reward",
            "tests.rlhf.ppo_helpers:ascii_fraction",
            "--prompts",
            str(prompts),
            "--total_episodes",
            "16",
            "--batch_size",
            "8",
            "--num_generations",
            "4",
            "--response_length",
            "6",
            "--num_eval_prompts",
            "4",
            "--runs_dir",
            str(tmp_path / "runs"),
            "--experiment",
            "cmp",
            "--tracking.mode",
            "disabled",
        ]
    )
    assert rc == 0
    run = tmp_path / "runs" / "cmp" / f"baseline_{algorithm}"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "objective/scores" in m] == [1, 2]
    assert any("eval/win_rate" in m for m in lines)
    assert json.loads((run / "policy" / "rlhf_policy.json").read_text())["stage"] == f"baseline_{algorithm}"
