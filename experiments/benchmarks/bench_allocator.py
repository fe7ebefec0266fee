"""Benchmark: PPO's training micro-steps with freed memory kept for reuse against handed back.

Every ``rlhf`` command tells glibc's malloc to keep the memory a process frees
(:func:`rlhf.allocator.keep_freed_memory`): otherwise each step's large tensors arrive in freshly
mapped pages that the kernel faults in and zeroes. The setting holds for a whole process, so this
script runs the same work in child processes, the sides alternating: PPO's own policy-and-value
model (LoRA over the start policy, a value head on its backbone, the frozen weights in bf16 under
autocast where the CPU has bf16), ``--steps`` training micro-steps (forward and backward), the
first two not timed. It prints, for each side, the best time of the timed steps, the page faults
and the system time of the child, and the ratio. The steps compute the same numbers either way:
only where the memory comes from differs (checked: the log-probs and gradients are printed as a
checksum per side).

    .venv/bin/python -m experiments.benchmarks.bench_allocator                 # SmolLM2, 8 rows × 48 tokens
    .venv/bin/python -m experiments.benchmarks.bench_allocator --policy runs/quickstart/sft/policy --micro_batch 16
    .venv/bin/python -m experiments.benchmarks.bench_allocator --policy tiny --tokens 6 --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from rlhf.offline import set_offline_defaults  # imports nothing heavy

# Set before the imports below: the Hugging Face libraries read them when first imported.
set_offline_defaults()

from experiments.benchmarks.ppo_models import (  # noqa: E402
    add_micro_step_arguments,
    micro_step_inputs,
    ppo_models_with_an_adapter,
    training_micro_step,
)
from rlhf.allocator import ENV, keep_freed_memory  # noqa: E402
from rlhf.models import autocast_bf16, bf16_hardware  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIDES = {"kept": "1", "handed back": "0"}
WARM_UP_STEPS = 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_micro_step_arguments(ap)
    ap.add_argument(
        "--steps", type=int, default=6, help=f"micro-steps a child runs; the first {WARM_UP_STEPS} untimed"
    )
    ap.add_argument("--repeats", type=int, default=2, help="children of each side, alternating (best kept)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a child: run the steps
    args = ap.parse_args(argv)
    if min(args.micro_batch, args.tokens, args.repeats) < 1 or args.steps <= WARM_UP_STEPS:
        ap.error(f"--micro_batch, --tokens and --repeats must be at least 1, --steps above {WARM_UP_STEPS}")
    if args.worker:
        return _work(args)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for side, flag in SIDES.items():
            run = _child(sys.argv[1:] if argv is None else argv, flag)
            if side not in best or run["step_s"] < best[side]["step_s"]:
                best[side] = run
    kept, returned = best["kept"], best["handed back"]
    print(f"policy {args.policy}, {args.micro_batch} rows × {args.tokens} tokens, {args.steps} steps a child")
    print("| freed memory | best step (s) | page faults | system time (s) | checksum |")
    print("|---|---|---|---|---|")
    for side, run in best.items():
        print(
            f"| {side} | {run['step_s']:.3f} | {run['faults']} | {run['system_s']:.2f} | {run['checksum']:.6e} |"
        )
    print(f"kept vs handed back: {returned['step_s'] / kept['step_s']:.2f}x per step")
    return 0


def _child(argv: list[str], flag: str) -> dict:
    """Run the steps in a child process with the setting on or off; its result and its resource use."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.bench_allocator", *argv, "--worker"],
        env={**os.environ, ENV: flag},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        **json.loads(out.stdout.strip().splitlines()[-1]),
        "faults": after.ru_minflt - before.ru_minflt,
        "system_s": after.ru_stime - before.ru_stime,
    }


def _work(args: argparse.Namespace) -> int:
    """The child: PPO's micro-steps; prints one JSON line (best step time, checksum)."""
    keep_freed_memory()  # as `rlhf` does; it does nothing when the parent set the variable to 0
    cfg, _, pv, tok, frozen = ppo_models_with_an_adapter(args.policy)
    query, qmask, response, rmask = micro_step_inputs(cfg, tok, args.micro_batch, args.tokens)
    bf16 = bf16_hardware("cpu")
    best, checksum = float("inf"), 0.0
    with autocast_bf16("cpu", bf16), frozen if bf16 else contextlib.nullcontext():
        for step in range(args.steps):
            t0 = time.perf_counter()
            logprobs, grads = training_micro_step(pv, query, qmask, response, rmask)
            if step >= WARM_UP_STEPS:
                best = min(best, time.perf_counter() - t0)
            checksum = float(logprobs.double().sum() + grads.double().sum())
    print(json.dumps({"step_s": best, "checksum": checksum}))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
