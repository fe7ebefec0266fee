"""PPO's own models as the benchmarks of its speed-ups build them (bench_frozen_bf16, bench_training_attention)."""

from __future__ import annotations

import torch

from rlhf.models import FrozenLinearsInBF16
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.setup import build_models


def ppo_models_with_an_adapter(policy: str, scale: float = 1e-3):
    """``(cfg, policy_model, pv, tokenizer, frozen)``: PPO's policy and value model
    (``rlhf.ppo.setup.build_models``: LoRA over ``policy``, a value head on its backbone) with the
    adapter's B drawn at ``scale``, as after some updates (a new adapter is zero, so merging it or
    training through it would cost nothing to the numbers), and the frozen linear weights a bf16 run
    keeps in bf16 (:class:`rlhf.models.FrozenLinearsInBF16`, not yet cast)."""
    cfg = PPOConfig(policy=policy, lora=True, value_model="shared", reward="length")
    torch.manual_seed(0)
    policy_model, reference, pv, tokenizer = build_models(cfg)
    with torch.no_grad():
        for name, p in policy_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    return cfg, policy_model, pv, tokenizer, FrozenLinearsInBF16(pv, reference)
