"""The prompts of a PPO run: which are trained on, which are held out, and in what order they come.

:func:`load_prompt_sets` is also how ``rlhf baseline`` splits the prompts, so GRPO / RLOO train and
evaluate on exactly PPO's prompts.
"""

from __future__ import annotations

import torch

from rlhf.config import ConfigError
from rlhf.contracts import load_prompts
from rlhf.errors import UserError
from rlhf.ppo.config import PPOConfig


def load_prompt_sets(cfg: PPOConfig) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` prompt records; ``held_out`` has at most ``num_eval_prompts`` records."""
    train = load_prompts(cfg.prompts, split=cfg.prompts_split)
    if not train:
        raise ConfigError(f"prompts {cfg.prompts!r} has no records in split {cfg.prompts_split!r}")
    held: list[dict] = []
    if cfg.num_eval_prompts > 0:
        try:
            held = load_prompts(cfg.prompts, split=cfg.eval_split) if cfg.eval_split else []
        except UserError:
            held = []
        train_ids = {p["prompt_id"] for p in train}
        overlap = bool(held) and all(p["prompt_id"] in train_ids for p in held)
        # No separate held-out split (a plain file puts every record in every split): hold out the
        # last prompts so eval/* measures generalisation, not the training prompts.
        if (not held or overlap) and len(train) > cfg.num_eval_prompts:
            train, held = train[: -cfg.num_eval_prompts], train[-cfg.num_eval_prompts :]
        held = held[: cfg.num_eval_prompts]
    return train, held


def prompt_index(k: int, n: int, seed: int) -> int:
    """Index of the ``k``-th prompt drawn over the run: a fresh seeded permutation per pass.

    The data position is therefore just the number of episodes done (exact resume for free).
    """
    epoch, i = divmod(k, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return int(perm[i])
