"""Benchmark: when finished rows leave the sampler's batch (``rlhf.sampling.SHRINK_AT``).

Rows that sample EOS stop sampling at once. Dropping them from the batch copies every layer's whole
KV cache, so the lab's sampler waits until a share ``SHRINK_AT`` of the batch has finished and lets
the finished rows ride along until then (a pad token in, the outputs unread). This script runs
``rlhf generate``'s path (``generate_candidates``, the weights in bf16 where the CPU has it) on the
same prompts with a shrink at every finish (``--baseline``, the sampler before) and with the lab's
share, alternating the sides, and prints the best time of each, the ratio and whether the answers
are the same.

    .venv/bin/python -m experiments.benchmarks.bench_batch_shrink --policy runs/quickstart/sft/policy
    .venv/bin/python -m experiments.benchmarks.bench_batch_shrink --policy tiny --prompts 4 --tokens 8
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from rlhf.offline import set_offline_defaults  # imports nothing heavy

# Set before the imports below: the Hugging Face libraries read them when first imported.
set_offline_defaults()

from rlhf import sampling  # noqa: E402
from rlhf.data import load_prompts  # noqa: E402
from rlhf.generation import generate_candidates  # noqa: E402
from rlhf.models import load_sampling_policy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2-135m-instruct", help="alias, policy dir or Hub id")
    ap.add_argument("--prompts", type=int, default=128, help="lab:prompts' train prompts answered")
    ap.add_argument("--k", type=int, default=4, help="answers a prompt (the quickstart's)")
    ap.add_argument("--tokens", type=int, default=48, help="max_new_tokens (the quickstart's)")
    ap.add_argument("--batch_size", type=int, default=128, help="sequences a sampler call (the quickstart's)")
    ap.add_argument(
        "--baseline", type=float, default=0.0, help="the share the baseline shrinks at (0: every finish)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best kept)")
    args = ap.parse_args(argv)
    if min(args.prompts, args.k, args.tokens, args.batch_size, args.repeats) < 1:
        ap.error("--prompts, --k, --tokens, --batch_size and --repeats must all be at least 1")
    model, tok, bf16 = load_sampling_policy(args.policy, "auto")
    prompts = load_prompts("lab:prompts", split="train")[: args.prompts]

    def answers() -> list[list[str]]:
        records = generate_candidates(
            model, tok, prompts, args.k, args.tokens, batch_size=args.batch_size, progress=False
        )
        return [[c["text"] for c in r["candidates"]] for r in records]

    ours = sampling.SHRINK_AT
    answers()  # warm-up: the first call builds the kernels
    sides = {f"shrink at {args.baseline:g} (baseline)": args.baseline, f"shrink at {ours:g} (lab)": ours}
    best, texts = dict.fromkeys(sides, float("inf")), {}
    try:
        for _ in range(args.repeats):
            for side, share in sides.items():
                sampling.SHRINK_AT = share
                t0 = time.perf_counter()
                texts[side] = answers()
                best[side] = min(best[side], time.perf_counter() - t0)
    finally:
        sampling.SHRINK_AT = ours
    base, lab = best.values()
    same = len(set(map(str, texts.values()))) == 1
    print(
        f"policy {args.policy}, {'bf16 weights' if bf16 else 'fp32'}, {args.prompts} prompts × {args.k} answers"
    )
    for side, seconds in best.items():
        print(f"  {side}: {seconds:.2f} s")
    print(f"  speed-up {base / lab:.2f}x; the same answers: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
