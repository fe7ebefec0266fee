"""``rlhf generate``: K candidate responses per prompt from a policy, through the lab's sampler
(:mod:`rlhf.sampling`), written as the candidates contract for annotation."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.cli import progress_bar
from rlhf.config import add_config_arguments, config_from_args, option
from rlhf.contracts import load_prompts, prompt_text
from rlhf.datafiles import write_jsonl
from rlhf.errors import ConfigError, UserError
from rlhf.models import (
    MIXED_PRECISION,
    MIXED_PRECISION_HELP,
    format_prompt,
    load_sampling_policy,
    resolve_model_path,
)

# The sampler's names, importable from here as before it had its own module (user code, benchmarks).
from rlhf.sampling import MIN_SHARED_PREFIX as MIN_SHARED_PREFIX
from rlhf.sampling import Samples as Samples
from rlhf.sampling import common_prefix_length as common_prefix_length
from rlhf.sampling import filter_logits as filter_logits
from rlhf.sampling import response_text, sample_responses
from rlhf.sampling import row_uniforms as row_uniforms
from rlhf.sampling import sample_from_logits as sample_from_logits
from rlhf.sampling import shared_prefix_cache as shared_prefix_cache
from rlhf.sampling import split_common_prefix as split_common_prefix
from rlhf.tracking import RunFields, stage_run_dir, start_stage

# ----------------------------------------------------------------------------- candidates


def _labels(k: int) -> list[str]:
    # Same labels as rlhf.rankings.labels_for (A, B, C, ...); K ≤ 26 is checked by the config.
    return [chr(ord("A") + i) for i in range(k)]


def generate_candidates(
    model,
    tokenizer,
    prompts: list[dict],
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    model_name: str = "",
    progress: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
    stats: dict | None = None,
) -> list[dict]:
    """K sampled responses per prompt, as records of the candidates contract.

    ``prompts`` are prompt records (``prompt_id``, ``prompt`` as text or chat messages).
    ``batch_size`` counts sequences: each sampler call takes ``max(1, batch_size // k)`` prompts
    and samples K responses for each from one prefill. Prompts are grouped by length (less
    padding) but the output keeps the input order. Same seed, same inputs and batch size →
    identical candidates. ``stats`` (optional dict) receives ``n_tokens`` and ``seconds``.
    """

    if not 1 <= k <= 26:
        raise UserError(f"k must be between 1 and 26 (one label per letter), got {k}", code="config")
    labels = _labels(k)
    gen = torch.Generator().manual_seed(seed)
    encoded = [
        tokenizer(format_prompt(tokenizer, p["prompt"]), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    per_call = max(1, batch_size // k)
    results: list[list[dict] | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    n_tokens, t0 = 0, time.perf_counter()
    bar = progress_bar(len(prompts) * k, "generate", "resp", enabled=progress)
    for start in range(0, len(order), per_call):
        idx = order[start : start + per_call]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[r, width - len(encoded[i]) :] = 1
        s = sample_responses(
            model,
            ids.to(device),
            mask.to(device),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            generator=gen,
            top_k=top_k,
            top_p=top_p,
            num_samples=k,
        )
        tokens, lengths, finished = s.tokens.cpu(), s.lengths.tolist(), s.finished.tolist()
        for r, i in enumerate(idx):
            cands = []
            for j in range(k):
                row = r * k + j
                n = lengths[row]
                cands.append(
                    {
                        "label": labels[j],
                        "text": response_text(tokenizer, tokens[row, :n].tolist(), finished[row]),
                        "model": model_name,
                        "gen": {
                            "temperature": temperature,
                            "max_new_tokens": max_new_tokens,
                            "seed": seed,
                            "finished": bool(finished[row]),
                            "n_tokens": int(n),
                        },
                    }
                )
                n_tokens += int(n)
            results[i] = cands
        bar.update(len(idx) * k)
        bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    if stats is not None:
        stats.update(n_tokens=n_tokens, seconds=time.perf_counter() - t0)
    return [
        {"prompt_id": p["prompt_id"], "prompt": p["prompt"], "candidates": results[i]}
        for i, p in enumerate(prompts)
    ]


# ----------------------------------------------------------------------------- `rlhf generate`


@dataclass
class GenerateConfig(RunFields):
    model: str = option(
        "smollm2-135m-instruct",
        help="policy to sample from: alias (smollm2-135m-instruct, tiny), model/policy dir or Hub id",
    )
    prompts: str = option(
        "lab:prompts",
        help="prompts: .jsonl/.json/.parquet file, saved dataset dir, Hub id "
        "or lab:prompts (the shipped prompts)",
    )
    split: str | None = option("train", help="only prompts of this split (null: all)")
    limit: int | None = option(None, help="use only the first N prompts (null: all)")
    k: int = option(4, help="candidates per prompt (2..26; labelled A, B, C, ...)")
    max_new_tokens: int = option(64, help="maximum response length in tokens")
    temperature: float = option(1.0, help="sampling temperature (> 0)")
    top_p: float = option(1.0, help="nucleus sampling mass (1.0 = off: pure sampling)")
    top_k: int = option(0, help="sample only from the k most likely tokens (0 = off: pure sampling)")
    batch_size: int = option(16, help="sequences per sampling batch (prompts per batch = batch_size // k)")
    mixed_precision: str = option(
        "auto",
        help="sample with the weights cast to bf16 (2.2× faster than fp32 on an AMX CPU at batch 64; "
        "autocast over fp32 weights was slower than fp32 there). " + MIXED_PRECISION_HELP,
        choices=MIXED_PRECISION,
    )
    seed: int = option(0, help="random seed: the same seed gives the same candidates")
    out: str | None = option(None, help="output JSONL (default: <run_dir>/candidates.jsonl)")

    def validate(self) -> None:
        if not 2 <= self.k <= 26:
            raise ConfigError(f"k: {self.k} is out of range; K must be between 2 and 26 (labels A..Z)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: {self.max_new_tokens} must be at least 1")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: {self.temperature} must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k: {self.top_k} must be >= 0 (0 = off)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: {self.batch_size} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: {self.limit} must be at least 1 (or null for all prompts)")
        if self.out is not None and not self.out.endswith(".jsonl"):
            raise ConfigError(f"out: {self.out!r} must be a .jsonl path")


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """The ``generate`` stage: K candidates per prompt → ``candidates.jsonl`` (+ W&B run)."""

    cfg.validate()
    # Inputs are checked before anything is written or loaded: bad prompts → one line, no run dir.
    prompts = load_prompts(cfg.prompts, split=cfg.split)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise UserError(
            f"no prompts in {cfg.prompts!r}" + (f" with split {cfg.split!r}" if cfg.split else ""),
            code="no_prompts",
        )
    resolve_model_path(cfg.model)  # unknown model / corrupt cache fail here, before the run starts
    out = Path(cfg.out) if cfg.out else stage_run_dir(cfg, "generate") / "candidates.jsonl"
    tracker = start_stage(cfg, "generate")
    try:
        if Path(cfg.prompts).exists():
            tracker.use_artifact(cfg.prompts, name="prompts", type="dataset")
        model, tokenizer, bf16 = load_sampling_policy(cfg.model, cfg.mixed_precision)
        stats: dict[str, float] = {}
        records = generate_candidates(
            model,
            tokenizer,
            prompts,
            k=cfg.k,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            model_name=cfg.model,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            stats=stats,
        )
        write_jsonl(out, records)
        cands = [c for r in records for c in r["candidates"]]
        metrics = {
            "gen/tokens_per_s": stats["n_tokens"] / max(stats["seconds"], 1e-9),
            "gen/n_tokens": stats["n_tokens"],
            "gen/seconds": stats["seconds"],
            "gen/n_prompts": len(records),
            "gen/n_candidates": len(cands),
            "gen/eos_rate": sum(c["gen"]["finished"] for c in cands) / len(cands),
            "gen/bf16": int(bf16),
            "gen/length_mean": sum(c["gen"]["n_tokens"] for c in cands) / len(cands),
        }
        tracker.log(metrics)

        tracker.log_table(
            "gen/samples",
            ["prompt_id", "prompt", "label", "response", "n_tokens", "finished"],
            [
                [
                    r["prompt_id"],
                    prompt_text(r["prompt"]),
                    c["label"],
                    c["text"],
                    c["gen"]["n_tokens"],
                    c["gen"]["finished"],
                ]
                for r in records[:8]
                for c in r["candidates"]
            ],
        )
        tracker.log_artifact(
            out,
            name=f"{cfg.experiment}-candidates",
            type="dataset",
            metadata={
                "model": cfg.model,
                "k": cfg.k,
                "n_prompts": len(records),
                "seed": cfg.seed,
                "temperature": cfg.temperature,
            },
        )
        tracker.summary(metrics)
        print(
            f"generate: {len(records)} prompts × {cfg.k} candidates → {out} "
            f"({metrics['gen/tokens_per_s']:.1f} tokens/s, EOS rate {metrics['gen/eos_rate']:.2f})"
        )
        return {"run_dir": str(tracker.run_dir), "candidates": str(out), **metrics}
    finally:
        tracker.finish()


def _cmd_generate(args: argparse.Namespace) -> int:

    run_generate(config_from_args(args, GenerateConfig))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:

    parser = subparsers.add_parser(
        "generate",
        help="sample K candidate responses per prompt from a policy",
        description=(
            "Sample K candidate responses per prompt from a policy (batched, KV cache, pure sampling "
            "by default, seeded) and write them as candidates JSONL (prompt_id, prompt, candidates "
            "[{label, text, model, gen}]) for annotation or simulated rankings. Shows a progress bar "
            "with tokens/s; logs tokens/s and a sample table to W&B (offline unless configured) and "
            "the candidates file as a dataset artifact."
        ),
    )
    add_config_arguments(parser, GenerateConfig)
    parser.set_defaults(func=_cmd_generate)
    return parser
