"""Benchmark: the sampler's own decoding attention against transformers' SDPA, on `rlhf generate`'s path.

Each decoding step asks one query per head to attend over the KV cache. For a grouped-query model
(SmolLM2: 9 query heads, 3 key/value heads) transformers sends a batch without padding to PyTorch's
SDPA with ``enable_gqa``, and a padded one to its flash kernel; on a CPU both cost more, in bf16
most of all, than the two matmuls of ``rlhf.sampling._decode_attention``. This script generates the
same candidates both ways, with the code ``rlhf generate`` runs (``generate_candidates``: K answers
a prompt, prompts grouped by length, the weights cast to bf16 where the CPU computes it), and prints
the times and their ratio. The runs alternate (SDPA, ours, SDPA, ours, ...) and the best of each is
kept, so a busy moment on the machine does not favour either side.

    .venv/bin/python -m experiments.benchmarks.bench_decode_attention                 # SmolLM2, 128 prompts × 4
    .venv/bin/python -m experiments.benchmarks.bench_decode_attention --precision no  # fp32, as PPO samples
    .venv/bin/python -m experiments.benchmarks.bench_decode_attention --model tiny --prompts 8

"same answers" counts the answers both ways wrote identically: in fp32 the two attentions agree to
about 1e-6, so most answers are the same; in bf16 their rounding differs, every answer can take
another turn after a few tokens, and the sampled distribution is what stays the same.
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

from rlhf import sampling  # noqa: E402
from rlhf.data import load_prompts  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.generation import generate_candidates  # noqa: E402
from rlhf.models import load_policy, use_bf16  # noqa: E402


def run_once(model, tok, prompts, args, lab_attention: bool) -> tuple[float, list[str]]:
    """Seconds to generate the candidates, and their texts in order."""
    with contextlib.nullcontext() if lab_attention else sampling.transformers_decoding():
        t0 = time.perf_counter()
        records = generate_candidates(
            model,
            tok,
            prompts,
            k=args.k,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=False,
        )
        seconds = time.perf_counter() - t0
    return seconds, [c["text"] for r in records for c in r["candidates"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias, model dir or Hub id")
    ap.add_argument("--prompts", type=int, default=128, help="how many of lab:prompts' train prompts")
    ap.add_argument("--k", type=int, default=4, help="answers a prompt")
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--batch_size", type=int, default=128, help="sequences a sampler call (as rlhf generate)")
    ap.add_argument(
        "--precision",
        choices=["auto", "bf16", "no"],
        default="auto",
        help="auto: the weights cast to bf16 where the CPU computes it, as rlhf generate does; no: fp32",
    )
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best kept)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.repeats < 1:
        ap.error(f"--prompts {args.prompts} and --repeats {args.repeats} must both be at least 1")
    try:
        bf16 = use_bf16(args.precision, "cpu")
    except UserError as err:  # bf16 asked of a CPU without it: one line, before any work
        ap.error(str(err))
    model, tok = load_policy(args.model)
    if bf16:
        model = model.to(torch.bfloat16)
    prompts = load_prompts("lab:prompts", split="train")[: args.prompts]
    print(
        f"model {args.model}, {'bf16 weights' if bf16 else 'fp32'}, {len(prompts)} prompts × {args.k} answers,"
        f" {args.max_new_tokens} new tokens, batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    best = {False: float("inf"), True: float("inf")}
    texts = {}
    for _ in range(args.repeats):
        for lab in (False, True):
            seconds, texts[lab] = run_once(model, tok, prompts, args, lab)
            best[lab] = min(best[lab], seconds)
    n = len(texts[True])
    same = sum(a == b for a, b in zip(texts[False], texts[True], strict=True))
    print("| decoding attention | seconds (best) | answers/s |")
    print("|---|---|---|")
    for lab, name in ((False, "transformers' SDPA"), (True, "the sampler's own")):
        print(f"| {name} | {best[lab]:.2f} | {n / best[lab]:.2f} |")
    print(f"speed-up {best[False] / best[True]:.2f}x; same answers {same} of {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
