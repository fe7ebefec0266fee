"""``rlhf sft``: supervised fine-tuning of the pretrained base on demonstrations (TRL's SFTTrainer).

The demonstrations (the lab's shipped ones, ``lab:demonstrations``, or any dataset in the
prompt/completion or chat ``messages`` formats) are turned into TRL's *conversational* formats,
so TRL applies the policy's chat template exactly as PPO will see it and computes the loss on
the completion (assistant) tokens only. Full fine-tuning or LoRA. A held-out slice gives the
evaluation loss. The result is a policy directory (``rlhf_policy.json``) that ``rlhf ppo`` starts
from.

Precision is set explicitly (``mixed_precision``: bf16 autocast only where the hardware computes
it, since emulated bf16 makes every matmul crawl, docs/environment.md; on a CPU the lab autocasts
the loss itself, TRL's flag doing nothing there), W&B reporting inside TRL is off
(``report_to="none"``) and the metrics go through the lab's tracker instead, with
``job_type=sft``.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.adapters import AdapterFields, adapter_config
from rlhf.config import ConfigError, add_config_arguments, config_from_args, config_hash, option, to_dict
from rlhf.contracts import load_demonstrations
from rlhf.models import (
    MIXED_PRECISION,
    MIXED_PRECISION_HELP,
    FrozenLinearsInBF16,
    autocast_bf16,
    bf16_hardware,
    load_policy,
    policy_out_dir,
    resolve_model_path,
    use_bf16,
    write_policy_dir,
)
from rlhf.tracking import RunFields, Tracker, stage_run_dir, start_stage
from rlhf.trainer_callbacks import ProgressCallback, TrackerCallback


@dataclass
class SFTConfig(RunFields, AdapterFields):
    model: str = option(
        "smollm2-135m-instruct", help="base model: alias (smollm2-135m-instruct, tiny), local dir or Hub id"
    )
    demonstrations: str = option(
        "lab:demonstrations",
        help="demonstrations: lab:demonstrations, a .jsonl/.json/.parquet "
        "file, a save_to_disk dir or a Hub id (prompt/completion or messages)",
    )
    split: str | None = option("train", help="split of the demonstrations to train on (null = all records)")
    eval_split: str | None = option(
        "eval",
        help="split to evaluate on; null = hold out eval_fraction of the "
        "training records (also used when the data has no split field)",
    )
    eval_fraction: float = option(
        0.1,
        help="fraction of the demonstrations held out for the evaluation loss "
        "(when eval_split is null; 0 = no evaluation)",
    )
    max_examples: int = option(0, help="use at most this many training demonstrations (0 = all)")
    output_dir: str = option("", help="where to write the policy dir (default: runs/<experiment>/sft/policy)")
    lora: bool = option(
        False, help="train an adapter (LoRA unless adapter says otherwise) instead of all weights"
    )
    learning_rate: float = option(2e-5, help="peak learning rate (LoRA usually wants ~1e-4 or more)")
    lr_scheduler: str = option(
        "linear", help="learning-rate schedule", choices=("linear", "cosine", "constant")
    )
    warmup_ratio: float = option(0.0, help="fraction of steps for linear warm-up")
    epochs: float = option(1.0, help="passes over the training demonstrations")
    max_steps: int = option(-1, help="stop after this many optimiser steps (-1 = use epochs)")
    batch_size: int = option(8, help="demonstrations per optimiser step (per device) before accumulation")
    grad_accum: int = option(1, help="gradient accumulation steps")
    max_length: int = option(512, help="truncate tokenized conversations to this many tokens")
    completion_only_loss: bool = option(
        True, help="loss on the completion (assistant) tokens only, not the prompt"
    )
    max_grad_norm: float = option(1.0, help="gradient clipping norm")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    logging_steps: int = option(5, help="log the training loss every N optimiser steps")
    eval_steps: int = option(0, help="evaluate every N steps (0 = only at the end)")
    seed: int = option(0, help="random seed (data order, LoRA init)")
    mixed_precision: str = option(
        "auto",
        help="forward and loss under bf16 autocast (trainable weights, gradients and AdamW stay fp32; "
        "a LoRA's frozen base is kept in bf16, as autocast computes with it); on a CPU "
        "the lab's own autocast, since TRL's bf16 flag does nothing there. A LoRA SFT step on "
        "SmolLM2 ran 1.38x faster on a 2-core AVX512-BF16 EPYC, the quickstart's SFT stage 83 s "
        "against 102 s with the same held-out loss (docs/environment.md). " + MIXED_PRECISION_HELP,
        choices=MIXED_PRECISION,
    )

    def validate(self) -> None:
        self.validate_adapter()
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: {self.eval_fraction} must be in [0, 1)")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "lora_r"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be > 0")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("epochs must be > 0 (or set max_steps)")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate: {self.learning_rate} must be > 0")


def to_trl_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A demonstration → TRL's conversational format (``messages``, or ``prompt``/``completion`` turns).

    Conversational records make TRL apply the chat template (the one PPO samples with) and, for
    prompt/completion, mask the prompt out of the loss.
    """
    if "messages" in rec and rec["messages"]:
        return {"messages": list(rec["messages"])}
    prompt, completion = rec["prompt"], rec["completion"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, dict) and "messages" in prompt:
        prompt = list(prompt["messages"])
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    return {"prompt": list(prompt), "completion": list(completion)}


def split_heldout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle deterministically, hold out ``ceil(fraction · n)`` records (at least 1 when fraction > 0)."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, math.ceil(fraction * len(records))))
    held = {i for i in order[:n_eval]}
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in order[:n_eval]]


def bf16_supported() -> bool:
    """bf16 for TRL's trainers only on a CUDA device that has it; never on a CPU (TRL's flag does
    nothing useful there: docs/environment.md, and bench_ppo_vs_trl.py found it a no-op)."""

    return bf16_hardware("cuda")


def sft_trainer_class(cpu_bf16: bool):
    """TRL's ``SFTTrainer``, or with ``cpu_bf16`` one whose loss (forward included, in training and
    in evaluation) runs under CPU bf16 autocast: TRL's own ``bf16`` flag does nothing on a CPU."""
    from trl import SFTTrainer

    if not cpu_bf16:
        return SFTTrainer

    class CPUAutocastSFTTrainer(SFTTrainer):
        def compute_loss(self, *args, **kwargs):
            with autocast_bf16("cpu", True):
                return super().compute_loss(*args, **kwargs)

    return CPUAutocastSFTTrainer


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on the demonstrations; write the policy dir. Returns a summary."""
    cfg.validate()

    # Data first: a bad file fails in a second, before any model loads.
    train_records = load_demonstrations(cfg.demonstrations, split=cfg.split)
    has_splits = any(r.get("split") is not None for r in train_records)
    if cfg.eval_split and has_splits:
        eval_records = [
            r
            for r in load_demonstrations(cfg.demonstrations, split=cfg.eval_split)
            if r.get("split") == cfg.eval_split
        ]
    else:  # no split field in the data: every record is in every split, so hold some out
        train_records, eval_records = split_heldout(train_records, cfg.eval_fraction, cfg.seed)
    if cfg.max_examples > 0:
        train_records = train_records[: cfg.max_examples]
    if not train_records:
        raise ConfigError(
            f"demonstrations {cfg.demonstrations!r} (split {cfg.split!r}) has no records to train on"
        )
    run_dir = stage_run_dir(cfg, "sft")
    out_dir = policy_out_dir(cfg.output_dir, run_dir)

    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig as TRLSFTConfig

    use_cuda = torch.cuda.is_available()
    # bf16 without the hardware is refused here, before any model loads
    bf16 = use_bf16(cfg.mixed_precision, "cuda" if use_cuda else "cpu")
    # Under `accelerate launch` every process trains (TRL's Trainer runs data-parallel), but only the
    # main one tracks, writes the policy and prints: one W&B run, one writer.
    is_main = PartialState(cpu=not use_cuda).is_main_process
    # start_stage records the demonstrations (lab:demonstrations included) as the run's input dataset
    tracker = start_stage(cfg, "sft", job_type="sft") if is_main else Tracker.noop()

    torch.manual_seed(cfg.seed)
    base_path = resolve_model_path(cfg.model)
    if is_main and Path(base_path).is_dir():  # the base model is an input too (an alias or a folder)
        tracker.use_artifact(base_path, name=f"base-{cfg.model}", type="model")
    model, tokenizer = load_policy(cfg.model)
    peft_config = None
    if cfg.lora:
        peft_config = adapter_config(cfg, model)

    train_ds = Dataset.from_list([to_trl_record(r) for r in train_records])
    eval_ds = Dataset.from_list([to_trl_record(r) for r in eval_records]) if eval_records else None
    args = TRLSFTConfig(
        output_dir=str(run_dir / "trainer"),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        eval_strategy=("steps" if cfg.eval_steps > 0 else "no") if eval_ds is not None else "no",
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        save_strategy="no",  # the policy dir is written once, atomically, below
        report_to="none",  # metrics go through the lab's tracker (callback below)
        # Never leave precision to TRL's defaults: bf16 autocast on a CPU without bf16 is ~12× slower.
        # On a CPU TRL's flag does nothing; the trainer below autocasts there itself.
        bf16=bf16 and use_cuda,
        fp16=False,
        use_cpu=not use_cuda,
        activation_checkpointing=False,  # small models: recomputation costs more than it saves
        packing=False,
        dataset_num_proc=None,
        dataloader_num_workers=0,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Trainer's bar and its printed log dicts give way to the lab's bar (ProgressCallback).
        disable_tqdm=True,
        save_only_model=True,
        ddp_find_unused_parameters=False,  # every trainable weight takes part in every forward
    )
    trainer = sft_trainer_class(cpu_bf16=bf16 and not use_cuda)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[TrackerCallback(tracker), *([ProgressCallback("sft")] if is_main else [])],
    )
    trainer.remove_callback(PrinterCallback)  # what Trainer prints logs with when disable_tqdm is set
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    # Under the lab's CPU autocast a LoRA base is frozen: its linear weights are kept in bf16 for the
    # training and the evaluation, as autocast computes with them (the same numbers, no cast at every
    # op; docs/environment.md), and put back in fp32 before the policy is written.
    frozen = FrozenLinearsInBF16(trainer.model if bf16 and not use_cuda else None)
    t0 = time.time()
    with frozen:
        train_out = trainer.train()
        train_s = time.time() - t0
        metrics = trainer.evaluate() if eval_ds is not None else None
    summary: dict[str, Any] = {
        "train/loss_final": float(train_out.training_loss),
        "time/train_s": train_s,
        "train/examples": len(train_records),
        "train/trainable_params": n_trainable,
        "sft/bf16": int(bf16),
    }
    if metrics is not None:
        summary["eval/loss"] = float(metrics["eval_loss"])  # the callback has logged it as eval/loss

    trainer.accelerator.wait_for_everyone()
    full_state = None
    if trainer.accelerator.distributed_type == DistributedType.FSDP:
        # Sharded weights exist whole only once every process has sent its shard to the main one.
        full_state = trainer.accelerator.get_state_dict(trainer.model)
    if not is_main:
        trainer.accelerator.wait_for_everyone()  # until the main process has written the policy
        return {"run_dir": str(run_dir), "policy_dir": str(out_dir), **summary}
    final = trainer.accelerator.unwrap_model(trainer.model)
    final.eval()
    shutil.rmtree(run_dir / "trainer", ignore_errors=True)  # save_strategy="no": only TRL's empty output dir
    meta = {
        "base": base_path,
        "stage": "sft",
        "config_hash": config_hash(cfg),
        "lora": cfg.lora,
        "demonstrations": cfg.demonstrations,
        "config": to_dict(cfg),
    }
    write_policy_dir(final, tokenizer, out_dir, meta, state_dict=full_state)
    tracker.log_artifact(
        out_dir,
        name=f"{cfg.experiment}-sft-policy",
        type="model",
        metadata={"base": base_path, "lora": cfg.lora, "config_hash": meta["config_hash"]},
    )
    tracker.summary(summary)
    tracker.finish()
    print(
        f"sft: wrote policy to {out_dir}  (train loss {summary['train/loss_final']:.4f}"
        + (f", held-out loss {summary['eval/loss']:.4f})" if "eval/loss" in summary else ")")
    )
    trainer.accelerator.wait_for_everyone()
    return {"run_dir": str(run_dir), "policy_dir": str(out_dir), **summary}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning of the base model on demonstrations",
        description=__doc__.split("\n\n")[0] + "\n\nEvery option below is a field of the "
        "stage config; give --config FILE.yaml and override any field.",
    )
    add_config_arguments(p, SFTConfig)

    def _run(args) -> int:
        run_sft(config_from_args(args, SFTConfig))
        return 0

    p.set_defaults(func=_run, across_processes=True)  # trains in every process of a launch
    return p
