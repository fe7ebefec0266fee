"""``rlhf ppo``: PPO against a reward model, a gold scorer or any reward function (see :mod:`rlhf.ppo.loop`)."""

from __future__ import annotations

from rlhf.config import add_config_arguments, config_from_args
from rlhf.ppo.config import PPOConfig


def add_parser(subparsers):
    p = subparsers.add_parser(
        "ppo",
        help="PPO against a reward model, gold scorer or any reward function",
        description=(
            "PPO on a policy (usually the SFT policy) against a reward function: a reward-model dir, a gold "
            "scorer (vader, length:target=N, keywords:...), a user function (module:function or "
            "python:file.py:fn) or a weighted list of them. One update = rollout, score, KL-penalised rewards, "
            "GAE advantages, PPO epochs of minibatch updates, log. Ctrl-C finishes the current update and saves "
            "a checkpoint; resume=auto continues exactly. Runs under `accelerate launch` unchanged."
        ),
    )
    add_config_arguments(p, PPOConfig)

    def _run(args) -> int:
        cfg = config_from_args(args, PPOConfig)
        # The loop loads transformers, peft, accelerate and matplotlib: only once PPO runs, so that
        # `rlhf ppo --help` and a bad option answer at once (the lazy stage table's reason, rlhf/cli.py).
        from rlhf.ppo.loop import run_ppo

        summary = run_ppo(cfg)
        return 130 if summary.get("interrupted") else 0

    p.set_defaults(func=_run, across_processes=True)  # trains in every process of a launch
    return p
