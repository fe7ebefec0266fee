"""The quickstart's PPO stage and `configs/ppo_smollm2.yaml` are one recipe at two sizes.

docs/ppo.md lists them in one column ("quickstart / configs/ppo_smollm2.yaml") and each measured
change to the recipe (the learning rate, its schedule, λ, the KL coefficient, ...) is made to both.
They may differ only in how much they run and what they log, never in how PPO learns: a setting
changed in one file and forgotten in the other fails here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from rlhf.ppo.config import PPOConfig

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"

# what the two may set differently: the run's size and batching, its held-out checks and logging,
# and what the quickstart wires in from its other stages (gold, policy, reward)
SIZE_AND_LOGGING = {
    "experiment",
    "gold",
    "total_episodes",
    "batch_size",
    "minibatch_size",
    "micro_batch_size",
    "num_eval_prompts",
    "sample_every",
    "eval_every",
    "save_every",
}


def test_the_quickstart_and_the_smollm2_preset_train_ppo_alike():
    quickstart = yaml.safe_load((EXPERIMENTS / "quickstart.yaml").read_text())["stages"]["ppo"]
    preset = yaml.safe_load((EXPERIMENTS / "configs" / "ppo_smollm2.yaml").read_text())
    a, b = (dataclasses.asdict(PPOConfig(**fields)) for fields in (quickstart, preset))
    drifted = {name: (a[name], b[name]) for name in a if a[name] != b[name] and name not in SIZE_AND_LOGGING}
    assert not drifted, drifted  # {setting: (quickstart's, preset's)}
    assert (a["anneal_lr"], a["learning_rate"]) == (False, 5e-4)  # the recipe docs/ppo.md measures
