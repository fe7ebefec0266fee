"""Benchmark: the lab's rollout sampler against plain ``model.generate``, side by side.

Both sample purely (``top_k=0, top_p=1``, temperature 1) from the same left-padded prompts
(from ``lab:prompts``, or a few inline prompts if the shipped data is missing) with the same
``max_new_tokens``; each row of the table is one batch size. Tokens/s counts *generated*
tokens (up to and including each row's EOS), so early stopping is not rewarded by padding.

    python -m experiments.benchmarks.bench_generation                   # SmolLM2, batch 8 32 64
    python -m experiments.benchmarks.bench_generation --batch-sizes 8 32
    python -m experiments.benchmarks.bench_generation --model tiny      # quick check of the script
    python -m experiments.benchmarks.bench_generation --bf16            # both under bf16 autocast

The last column is the plain forward pass over the same batch (prompt + as many tokens as the
sampler generated, one call): the rate that per-step overhead keeps generation from.

Needs ``rlhf download`` first for SmolLM2. Run it on a quiet machine: any other process halves
both numbers (the ratio is what to compare).
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

from rlhf.data import load_prompts, prompt_text  # noqa: E402
from rlhf.generation import sample_responses  # noqa: E402
from rlhf.models import autocast_bf16, bf16_hardware, format_prompt, load_policy  # noqa: E402

INLINE_PROMPTS = [
    "Give me three tips for sleeping better.",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a ten-year-old.",
    "How do I make a good cup of tea?",
    "What should I pack for a weekend hiking trip?",
    "Describe your ideal Sunday morning.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
]


def load_bench_prompts(n: int) -> list[str]:
    try:
        texts = [prompt_text(p["prompt"]) for p in load_prompts("lab:prompts")]
    except Exception as err:  # the shipped data may not exist yet on a partial checkout
        print(f"(lab:prompts unavailable: {type(err).__name__}; using inline prompts)", file=sys.stderr)
        texts = INLINE_PROMPTS
    return [texts[i % len(texts)] for i in range(n)]


def count_generated(tokens: torch.Tensor, eos_id: int, pad_id: int) -> int:
    """Real generated tokens per row of ``generate``'s output: up to and including the first EOS."""
    total = 0
    for row in tokens.tolist():
        n = 0
        for t in row:
            n += 1
            if t == eos_id:
                break
        total += n
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, model dir or Hub id")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per method (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bf16", action="store_true", help="run both methods (and the forward) under bf16 autocast"
    )
    args = parser.parse_args(argv)
    if args.bf16 and not bf16_hardware("cpu"):
        parser.error("--bf16: this CPU has no bf16 instructions (AVX512-BF16/AMX)")
    amp = (lambda: autocast_bf16("cpu", True)) if args.bf16 else contextlib.nullcontext
    model, tok = load_policy(args.model)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    print(
        f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"torch threads {torch.get_num_threads()}, {args.max_new_tokens} new tokens, pure sampling, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}"
    )
    print(
        f"{'batch':>5} {'ours tok/s':>11} {'generate tok/s':>15} {'ratio':>6}  {'ours s':>7} {'gen s':>7}"
        f" {'forward tok/s':>14}"
    )
    for bs in args.batch_sizes:
        texts = [format_prompt(tok, p) for p in load_bench_prompts(bs)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        # warm-up (allocator, lazy inits) on a tiny slice so neither method pays first-call costs
        sample_responses(
            model,
            enc.input_ids[:2],
            enc.attention_mask[:2],
            max_new_tokens=2,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        best = {}
        for _ in range(args.repeats):
            g = torch.Generator().manual_seed(args.seed)
            t0 = time.perf_counter()
            with amp():
                s = sample_responses(
                    model,
                    enc.input_ids,
                    enc.attention_mask,
                    max_new_tokens=args.max_new_tokens,
                    temperature=1.0,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    generator=g,
                )
            dt = time.perf_counter() - t0
            n = int(s.lengths.sum())
            if "ours" not in best or n / dt > best["ours"][0]:
                best["ours"] = (n / dt, dt)

            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            with torch.inference_mode(), amp():
                out = model.generate(
                    **enc,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
            dt = time.perf_counter() - t0
            n = count_generated(out[:, enc.input_ids.shape[1] :], eos, pad)
            if "gen" not in best or n / dt > best["gen"][0]:
                best["gen"] = (n / dt, dt)
        ours, gen = best["ours"], best["gen"]
        # the forward-pass rate on the same tokens: prompt + the sampler's longest response
        full = torch.cat([enc.input_ids, s.tokens], dim=1)
        mask = torch.cat([enc.attention_mask, s.mask.to(enc.attention_mask.dtype)], dim=1)
        t0 = time.perf_counter()
        with torch.inference_mode(), amp():
            model(input_ids=full, attention_mask=mask, logits_to_keep=1)
        fwd = int(s.lengths.sum()) / (time.perf_counter() - t0)
        print(
            f"{bs:>5} {ours[0]:>11.1f} {gen[0]:>15.1f} {ours[0] / gen[0]:>5.2f}x  {ours[1]:>7.2f} {gen[1]:>7.2f}"
            f" {fwd:>14.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
