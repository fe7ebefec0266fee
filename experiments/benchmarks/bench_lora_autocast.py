"""How much of a small LoRA change survives bf16 autocast? Why PPO's precision was put to a test of learning.

A LoRA policy starts as its base: ``B = 0``, and PPO's first updates move it by a little. Under
bf16 autocast the base layers' outputs are bf16 (8 bits of mantissa), and the adapter's
contribution is added to them there, so a change much smaller than their rounding is lost. This
script gives SmolLM2-135M-Instruct a LoRA adapter (r 16 and α 32 as PPO's, on every linear layer
where PPO's default adapts q/k/v/o) with ``B`` drawn at a given scale, and compares the change it makes to the next-token log-probs (adapter
on minus adapter off, on random token sequences) in fp32 and under autocast:

    .venv/bin/python -m experiments.benchmarks.bench_lora_autocast --scales 1e-4,1e-3,1e-2

It prints, per scale, the mean size of the fp32 change, the error of the autocast change relative
to it, and their correlation (1: autocast sees the same change; 0: noise).
"""

from __future__ import annotations

import argparse
import sys

from rlhf.offline import set_offline_defaults  # imports nothing heavy

# Set before the imports below: the Hugging Face libraries read them when first imported.
set_offline_defaults()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from rlhf.models import autocast_bf16, load_policy  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--scales", default="1e-4,1e-3,1e-2", help="comma-separated scales of LoRA's B")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        ap.error(f"--scales {args.scales!r}: expected comma-separated numbers")
    torch.manual_seed(args.seed)
    model, _ = load_policy(args.model, merged=True)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(model, lora).eval()
    ids = torch.randint(100, model.config.vocab_size, (4, 60))
    # the base's log-probs (adapter off) do not depend on B: once per precision
    base = {amp: logprobs(model, ids, amp, adapter=False) for amp in (False, True)}
    print("| B scale | mean |Δ log-prob| in fp32 | autocast's error, relative | correlation |")
    print("|---|---|---|---|")
    for scale in scales:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * scale)
            fp32, bf16 = (logprobs(model, ids, amp, adapter=True) - base[amp] for amp in (False, True))
        error = float((bf16 - fp32).norm() / fp32.norm())
        corr = float(torch.corrcoef(torch.stack([bf16.flatten(), fp32.flatten()]))[0, 1])
        print(f"| {scale:g} | {float(fp32.abs().mean()):.2e} | {error:.2f} | {corr:.3f} |")
    return 0


@torch.no_grad()
def logprobs(model, ids: torch.Tensor, amp: bool, adapter: bool) -> torch.Tensor:
    """Next-token log-probs over ``ids`` with the adapter on or off, under autocast or in fp32."""
    with autocast_bf16("cpu", amp):
        if adapter:
            logits = model(input_ids=ids).logits
        else:
            with model.disable_adapter():
                logits = model(input_ids=ids).logits
    return torch.log_softmax(logits.float(), -1)


if __name__ == "__main__":
    sys.exit(main())
