"""Benchmark: ``logits_to_keep`` as an int (transformers' usual call) against an index tensor (the lab's).

Every forward that needs only the last positions' logits (the sampler's prefill, the reference's
and the policy's response log-probs) asks transformers for them with ``logits_to_keep``. Given an
int, transformers slices the hidden states into a strided view. When the output layer's weight does
not require grad (a frozen or merged policy: every policy the lab samples from or scores with),
PyTorch's matmul does not fold a strided 3-D input into one matrix product: it broadcasts the output
layer to every row and copies the whole vocabulary matrix per row. Autocast hides this (its cast of
the input is a contiguous copy), which is why PPO under bf16 never showed it. ``rlhf.sampling.last_positions`` passes index
positions instead: the slice is a contiguous copy and the projection one matrix product. This
script runs both on the same batch, in the three precisions the lab uses (fp32; the weights cast to
bf16, as ``generate``, ``eval`` and ``arena`` sample; bf16 autocast over fp32 weights, as PPO runs),
alternating the two sides and keeping the best of each, and prints the times, their ratio and the
largest difference between the two sides' logits.

    .venv/bin/python -m experiments.benchmarks.bench_logits_to_keep                  # SmolLM2, 32 prompts
    .venv/bin/python -m experiments.benchmarks.bench_logits_to_keep --prompts 64 --repeats 3
    .venv/bin/python -m experiments.benchmarks.bench_logits_to_keep --model tiny --prompts 4
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

from rlhf.data import load_prompts  # noqa: E402
from rlhf.models import autocast_bf16, bf16_hardware, load_policy  # noqa: E402
from rlhf.ppo.rollout import encode_queries, left_pad  # noqa: E402
from rlhf.sampling import last_positions  # noqa: E402


def batch_of(tok, n_prompts: int, response_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts from lab:prompts followed by ``response_tokens`` tokens of each prompt's own
    text repeated (what the tokens are does not matter to the time): ``(input_ids, attention_mask)``."""
    prompts = [p["prompt"] for p in load_prompts("lab:prompts", split="train")[:n_prompts]]
    query, mask = left_pad(encode_queries(tok, prompts, 256), tok.pad_token_id)
    if response_tokens == 0:
        return query, mask
    response = query[:, -1:].repeat(1, response_tokens)
    return torch.cat([query, response], 1), torch.cat([mask, torch.ones_like(response)], 1)


def timed_logits(model, ids, mask, keep, precision: str) -> tuple[float, torch.Tensor]:
    """Seconds for one forward keeping ``keep`` logits, and the logits (float32)."""
    with torch.inference_mode(), autocast_bf16("cpu", precision == "autocast"):
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        return time.perf_counter() - t0, logits.float()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias, model dir or Hub id")
    ap.add_argument("--prompts", type=int, default=32, help="rows of the batch (lab:prompts' train prompts)")
    ap.add_argument("--response_tokens", type=int, default=48, help="response length of the log-probs call")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best kept)")
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.repeats < 1 or args.response_tokens < 1:
        ap.error("--prompts, --repeats and --response_tokens must all be at least 1")
    # Frozen, as every policy the lab samples from or scores with: a merged LoRA policy's weights
    # do not require grad. A weight that does makes PyTorch fold the input whatever its strides.
    fp32_model, tok = load_policy(args.model)
    fp32_model.requires_grad_(False)
    models = {"fp32": fp32_model}
    if bf16_hardware("cpu"):  # emulated bf16 is many times slower than fp32 and not what the lab runs
        models["bf16 weights"] = load_policy(args.model)[0].requires_grad_(False).to(torch.bfloat16)
        models["autocast"] = fp32_model
    calls = {
        "prefill, last position": (batch_of(tok, args.prompts, 0), 1),
        f"log-probs, last {args.response_tokens + 1}": (
            batch_of(tok, args.prompts, args.response_tokens),
            args.response_tokens + 1,
        ),
    }
    print(f"model {args.model}, {args.prompts} rows, torch threads {torch.get_num_threads()}")
    print("| call | precision | int (s) | index (s) | speed-up | max logit difference |")
    print("|---|---|---|---|---|---|")
    for call, ((ids, mask), n) in calls.items():
        for precision, model in models.items():
            best = {"int": float("inf"), "index": float("inf")}
            logits = {}
            for _ in range(args.repeats):
                for side, keep in (("int", n), ("index", last_positions(n))):
                    seconds, logits[side] = timed_logits(model, ids, mask, keep, precision)
                    best[side] = min(best[side], seconds)
            diff = (logits["int"] - logits["index"]).abs().max().item()
            print(
                f"| {call} | {precision} | {best['int']:.3f} | {best['index']:.3f} | "
                f"{best['int'] / best['index']:.2f}x | {diff:.2g} |"
            )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
