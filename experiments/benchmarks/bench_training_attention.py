"""Benchmark: PPO's training micro-step through transformers' eager attention against SDPA.

On a CPU, PyTorch's SDPA runs a flash-attention kernel whose backward is slow in bf16; PPO's
``auto`` therefore times one micro-step through each and trains through eager attention where it is
clearly faster (:func:`rlhf.models.attention_if_faster`). This script builds PPO's own
policy-and-value model (``rlhf.ppo.setup.build_models``: LoRA over the SFT start, a value head on
its backbone), keeps the frozen weights in bf16 as a bf16 run does, and times, on the same inputs
and alternating the sides, a training micro-step (forward and backward) and a forward alone, under
bf16 autocast and in fp32. It prints the best time of each side, the ratio, and how far eager's
log-probs and gradients are from SDPA's: the two round differently, so they are close, not equal.

    .venv/bin/python -m experiments.benchmarks.bench_training_attention                 # SmolLM2
    .venv/bin/python -m experiments.benchmarks.bench_training_attention --policy runs/quickstart/sft/policy
    .venv/bin/python -m experiments.benchmarks.bench_training_attention --policy tiny --tokens 6
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from rlhf.offline import set_offline_defaults  # imports nothing heavy

# Set before the imports below: the Hugging Face libraries read them when first imported.
set_offline_defaults()

import torch  # noqa: E402

from experiments.benchmarks.ppo_models import (  # noqa: E402
    add_micro_step_arguments,
    micro_step_inputs,
    ppo_models_with_an_adapter,
)
from rlhf.models import autocast_bf16, bf16_hardware  # noqa: E402
from rlhf.ppo.math import logprobs_from_logits  # noqa: E402

ATTENTIONS = ("sdpa", "eager")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_micro_step_arguments(ap)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side (best kept)")
    args = ap.parse_args(argv)
    if min(args.micro_batch, args.tokens, args.repeats) < 1:
        ap.error("--micro_batch, --tokens and --repeats must all be at least 1")
    cfg, policy, pv, tok, frozen = ppo_models_with_an_adapter(args.policy)
    query, qmask, response, rmask = micro_step_inputs(cfg, tok, args.micro_batch, args.tokens)

    def micro_step():
        logits, values = pv(query, qmask, response, rmask)
        logprobs = logprobs_from_logits(logits, response, 1.0)
        (logprobs.mean() + values.float().mean()).backward()
        grads = torch.cat([p.grad.flatten() for p in pv.parameters() if p.grad is not None])
        pv.zero_grad(set_to_none=True)
        return logprobs.detach(), grads

    def forward():
        with torch.no_grad():
            logits, _ = pv(query, qmask, response, rmask)
            return logprobs_from_logits(logits, response, 1.0), None

    precisions = [("bf16 autocast", True)] if bf16_hardware("cpu") else []
    precisions.append(("fp32", False))
    print(
        f"policy {args.policy}, torch threads {torch.get_num_threads()}, {query.shape[0]} rows × {args.tokens} tokens"
    )
    print("| call | precision | SDPA (s) | eager (s) | eager vs SDPA | max log-prob diff | max grad diff |")
    print("|---|---|---|---|---|---|---|")
    for precision, bf16 in precisions:
        stored = frozen if bf16 else contextlib.nullcontext()
        with autocast_bf16("cpu", bf16), stored:
            for call, fn in (("training micro-step", micro_step), ("forward", forward)):
                best, out = dict.fromkeys(ATTENTIONS, float("inf")), {}
                for attention in ATTENTIONS:  # warm-up: the first call builds the kernels for these shapes
                    policy.set_attn_implementation(attention)
                    fn()
                for _ in range(args.repeats):
                    for attention in ATTENTIONS:
                        policy.set_attn_implementation(attention)
                        t0 = time.perf_counter()
                        out[attention] = fn()
                        best[attention] = min(best[attention], time.perf_counter() - t0)
                policy.set_attn_implementation("sdpa")
                (lp_s, g_s), (lp_e, g_e) = out["sdpa"], out["eager"]
                grad_diff = "—" if g_s is None else f"{float((g_s - g_e).abs().max()):.2e}"
                print(
                    f"| {call} | {precision} | {best['sdpa']:.3f} | {best['eager']:.3f} | "
                    f"{best['sdpa'] / best['eager']:.2f}x | {float((lp_s - lp_e).abs().max()):.2e} | {grad_diff} |"
                )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
