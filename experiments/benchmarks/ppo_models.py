"""PPO's own models and a training micro-step, as the benchmarks of PPO's speed-ups build them
(bench_frozen_bf16, bench_training_attention, bench_allocator)."""

from __future__ import annotations

import argparse

import torch

from rlhf.data import load_prompts
from rlhf.models import FrozenLinearsInBF16
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.math import logprobs_from_logits
from rlhf.ppo.rollout import encode_queries, left_pad
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


def add_micro_step_arguments(ap: argparse.ArgumentParser) -> None:
    """``--policy``, ``--micro_batch`` and ``--tokens``: the micro-step a benchmark times."""
    ap.add_argument("--policy", default="smollm2-135m-instruct", help="alias, policy dir or Hub id")
    ap.add_argument(
        "--micro_batch", type=int, default=8, help="rows of the micro-step (PPO's micro_batch_size)"
    )
    ap.add_argument("--tokens", type=int, default=48, help="response tokens (PPO's response_length)")


def micro_step_inputs(cfg: PPOConfig, tokenizer, rows: int, tokens: int):
    """``(query, query_mask, response, response_mask)``: the first ``rows`` training prompts, left
    padded, and ``tokens`` response tokens drawn with a fixed seed, every row of full length."""
    prompts = [p["prompt"] for p in load_prompts("lab:prompts", split="train")[:rows]]
    query, query_mask = left_pad(
        encode_queries(tokenizer, prompts, cfg.max_prompt_tokens), tokenizer.pad_token_id
    )
    gen = torch.Generator().manual_seed(1)
    response = torch.randint(100, min(20_000, len(tokenizer)), (len(prompts), tokens), generator=gen)
    return query, query_mask, response, torch.ones_like(response)


def training_micro_step(pv, query, query_mask, response, response_mask):
    """One training micro-step of ``pv`` (forward, a loss of the response's log-probs and the values,
    backward): ``(log-probs [N, T], every gradient flattened into one vector)``, the gradients then
    cleared, so the step can run again on the same inputs."""
    logits, values = pv(query, query_mask, response, response_mask)
    logprobs = logprobs_from_logits(logits, response, 1.0)
    (logprobs.mean() + values.float().mean()).backward()
    grads = torch.cat([p.grad.flatten() for p in pv.parameters() if p.grad is not None])
    pv.zero_grad(set_to_none=True)
    return logprobs.detach(), grads
