"""Benchmark: PPO under bf16 autocast with its frozen weights kept in bf16, against autocast casting them.

Under bf16 autocast every linear op computes with a bf16 weight. Autocast keeps its cast of a
weight for the rest of the autocast region only when the weight requires grad, so the frozen
base of a LoRA policy (and the frozen reference of a full fine-tune) is cast again at every
forward: at each decoding step of a rollout, and at every training forward.
:class:`rlhf.models.FrozenLinearsInBF16` stores those weights in bf16 for the run instead; the
ops are the same, so are the numbers. This script builds PPO's own policy-and-value model
(``rlhf.ppo.setup.build_models``: LoRA over the SFT start, a value head on its backbone) and times,
on the same inputs and alternating the sides, a rollout (``sample_rollout`` with the adapter
merged, as the loop samples) and a training micro-step (forward and backward), each in fp32, under
autocast as before and under autocast with the frozen weights in bf16. It prints the best time of
each, the ratios, and whether the new side gave the same tokens and the same logits and gradients.

    .venv/bin/python -m experiments.benchmarks.bench_frozen_bf16                    # SmolLM2
    .venv/bin/python -m experiments.benchmarks.bench_frozen_bf16 --policy runs/quickstart/sft/policy
    .venv/bin/python -m experiments.benchmarks.bench_frozen_bf16 --policy tiny --prompts 4 --tokens 6
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

from experiments.benchmarks.ppo_models import ppo_models_with_an_adapter  # noqa: E402
from rlhf.data import load_prompts  # noqa: E402
from rlhf.models import FrozenLinearsInBF16, autocast_bf16, bf16_hardware  # noqa: E402
from rlhf.ppo.rollout import encode_queries, left_pad, sample_rollout  # noqa: E402
from rlhf.ppo.value import merged_lora  # noqa: E402

SIDES = ("fp32", "autocast", "autocast, frozen bf16")


def side_context(side: str, frozen: FrozenLinearsInBF16):
    stack = contextlib.ExitStack()
    stack.enter_context(autocast_bf16("cpu", side != "fp32"))
    if side == "autocast, frozen bf16":
        stack.enter_context(frozen)
    return stack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2-135m-instruct", help="alias, policy dir or Hub id")
    ap.add_argument(
        "--prompts", type=int, default=32, help="rollout rows (PPO's batch_size in the quickstart)"
    )
    ap.add_argument("--micro_batch", type=int, default=8, help="rows of the training micro-step")
    ap.add_argument("--tokens", type=int, default=48, help="response tokens (PPO's response_length)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best kept)")
    args = ap.parse_args(argv)
    if min(args.prompts, args.micro_batch, args.tokens, args.repeats) < 1:
        ap.error("--prompts, --micro_batch, --tokens and --repeats must all be at least 1")
    if not bf16_hardware("cpu"):
        print("this CPU has no bf16 (AVX512-BF16/AMX): PPO's auto stays fp32 here; nothing to compare")
        return 0
    cfg, policy, pv, tok, frozen = ppo_models_with_an_adapter(args.policy)
    prompts = [p["prompt"] for p in load_prompts("lab:prompts", split="train")[: args.prompts]]
    query, qmask = left_pad(encode_queries(tok, prompts, cfg.max_prompt_tokens), tok.pad_token_id)

    def rollout(side: str):
        with side_context(side, frozen), merged_lora(policy, frozen):
            return sample_rollout(
                policy,
                query,
                qmask,
                max_new_tokens=args.tokens,
                temperature=1.0,
                stop_token_id=-1,  # no token has this id: every row runs its full length on each side
                pad_token_id=tok.pad_token_id,
                generator=torch.Generator().manual_seed(1),
                value_head=pv.value_head,
            ).tokens

    q, qm = query[: args.micro_batch], qmask[: args.micro_batch]
    response = q[:, -1:].repeat(1, args.tokens)

    def micro_step(side: str):
        with side_context(side, frozen):
            logits, values = pv(q, qm, response, torch.ones_like(response))
            (logits.float().logsumexp(-1).mean() + values.float().mean()).backward()
        grads = [p.grad.clone() for p in pv.parameters() if p.grad is not None]
        pv.zero_grad(set_to_none=True)
        return logits.detach(), grads

    print(
        f"policy {args.policy}, torch threads {torch.get_num_threads()}, {len(frozen.layers)} frozen linears"
    )
    print("| call | " + " | ".join(f"{s} (s)" for s in SIDES) + " | frozen bf16 vs autocast | same numbers |")
    print("|---|---|---|---|---|---|")
    for call, fn in (
        (f"rollout, {args.prompts} × {args.tokens} tokens", rollout),
        (f"training micro-step, {args.micro_batch} rows", micro_step),
    ):
        best, out = dict.fromkeys(SIDES, float("inf")), {}
        for _ in range(args.repeats):
            for side in SIDES:
                t0 = time.perf_counter()
                out[side] = fn(side)
                best[side] = min(best[side], time.perf_counter() - t0)
        a, b = out["autocast"], out["autocast, frozen bf16"]
        same = (
            torch.equal(a, b)
            if isinstance(a, torch.Tensor)
            else (torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1])))
        )
        print(
            f"| {call} | "
            + " | ".join(f"{best[s]:.3f}" for s in SIDES)
            + f" | {best['autocast'] / best['autocast, frozen bf16']:.2f}x | {'yes' if same else 'NO'} |"
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
