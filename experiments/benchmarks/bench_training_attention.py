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
import functools
import sys

from rlhf.offline import set_offline_defaults  # imports nothing heavy

# Set before the imports below: the Hugging Face libraries read them when first imported.
set_offline_defaults()

import torch  # noqa: E402

from experiments.benchmarks.ppo_models import (  # noqa: E402
    add_micro_step_arguments,
    micro_step_inputs,
    ppo_models_with_an_adapter,
    training_micro_step,
)
from rlhf.models import (  # noqa: E402
    autocast_bf16,
    best_step_times,
    bf16_hardware,
    computing_through,
    set_attention,
)
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

    micro_step = functools.partial(training_micro_step, pv, query, qmask, response, rmask)

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
                out: dict[str, tuple] = {}  # each attention's last result, to compare

                def step(fn=fn, out=out):
                    out[policy.config._attn_implementation] = fn()

                sides = {attention: computing_through([policy], attention) for attention in ATTENTIONS}
                best = best_step_times(sides, step, args.repeats)
                set_attention(policy, "sdpa")
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
