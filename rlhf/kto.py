"""``rlhf kto``: Kahneman–Tversky optimisation (Ethayarajh et al. 2024, arXiv 2402.01306) on rankings.

KTO learns from single responses labelled desirable or undesirable instead of pairs. A ranking
gives those labels (:func:`rlhf.data.kto_label`): a candidate with more of the others ranked below
it than above it is desirable, one with fewer is undesirable, the middle of an odd ranking and a
candidate tied with everything are left out. The rows go to TRL's ``KTOTrainer`` in TRL's
conversational format (:func:`rlhf.data.rankings_to_kto`, what ``rlhf export --format kto``
writes), so TRL applies the chat template the candidates were sampled under and a TRL user
recognises every metric (``rewards/chosen_sum``, ``kl``, ...; logged as ``train/...``).

From the SFT policy (an adapter is merged in first) with a LoRA adapter whose disabled state is
TRL's reference, or all weights against a frozen copy; the policy dir it writes has the adapter
merged, as PPO's and DPO's do, for ``rlhf eval`` to judge.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.adapters import AdapterFields, adapter_config
from rlhf.config import ConfigError, add_config_arguments, config_from_args, config_hash, option, to_dict
from rlhf.contracts import load_rankings
from rlhf.errors import UserError
from rlhf.export import rankings_to_kto
from rlhf.models import (
    frozen_copy,
    load_policy,
    policy_out_dir,
    policy_to_write,
    require_mergeable_start,
    resolve_model_path,
    write_policy_dir,
)
from rlhf.tracking import RunFields, stage_run_dir, start_stage
from rlhf.trainer_callbacks import ProgressCallback, TimeBudgetCallback, TrackerCallback


@dataclass
class KTOStageConfig(RunFields, AdapterFields):
    policy: str = option(
        "smollm2-135m-instruct", help="starting policy: the SFT policy dir, an alias or a model dir"
    )
    rankings: str = option("", help="rankings file (JSONL of the rankings contract, or a dataset dir)")
    beta: float = option(
        0.1, help="β: the implicit reward's scale; larger keeps the policy nearer the reference"
    )
    desirable_weight: float | None = option(
        None,
        help="λ_D: weight of the desirable responses' loss (null: n_undesirable / n_desirable, so both "
        "kinds weigh the same in total, the low end of the KTO paper's recommended λ_D·n_D / λ_U·n_U of 1 to 4/3)",
    )
    undesirable_weight: float = option(1.0, help="λ_U: weight of the undesirable responses' loss")
    lora: bool = option(
        True,
        help="train an adapter (LoRA unless adapter says otherwise; the reference = the adapter disabled); false = all weights",
    )
    max_length: int = option(256, help="tokens per (prompt, response)")
    batch_size: int = option(8, help="responses per optimizer step (KTO's KL estimate needs ≥ 2)")
    lr: float = option(5e-5, help="AdamW learning rate")
    epochs: float = option(1.0, help="passes over the labelled responses")
    max_steps: int = option(0, help="stop after this many optimizer steps (0 = epochs decide)")
    max_time_s: float = option(
        0.0, help="stop after this many seconds of training (0 = no limit): equal budgets across methods"
    )
    logging_steps: int = option(5, help="log every N steps")
    output_dir: str = option("", help="policy dir to write (default: <run_dir>/policy)")
    seed: int = option(0, help="random seed")

    def validate(self) -> None:
        self.validate_adapter()
        if not self.rankings:
            raise ConfigError("kto: rankings is required (a rankings JSONL file, e.g. from `rlhf simulate`)")
        for name in ("beta", "lr", "epochs", "desirable_weight", "undesirable_weight"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be > 0")
        if self.batch_size < 2:
            raise ConfigError(
                f"batch_size: {self.batch_size} must be ≥ 2 (KTO estimates its KL term within a batch)"
            )
        if self.max_time_s < 0:
            raise ConfigError(f"max_time_s: {self.max_time_s} must be ≥ 0 (0 = no limit)")
        for name in ("max_length", "lora_r", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be ≥ 1")


def run_kto(cfg: KTOStageConfig) -> dict[str, Any]:
    """The ``kto`` stage (module docstring); returns its summary with ``policy_dir``."""
    cfg.validate()
    rows = rankings_to_kto(load_rankings(cfg.rankings))  # a bad row stops here, listed with its line
    n_desirable = sum(r["label"] for r in rows)
    if not n_desirable or n_desirable == len(rows):
        raise UserError(
            f"{cfg.rankings}: KTO needs desirable and undesirable responses; the rankings give "
            f"{n_desirable} desirable of {len(rows)} labelled",
            code="no_data",
        )

    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import KTOConfig, KTOTrainer

    resolve_model_path(cfg.policy)  # an unknown policy stops here, before the run dir exists
    require_mergeable_start(cfg.policy, "kto")
    out_dir = policy_out_dir(cfg.output_dir, stage_run_dir(cfg, "kto"))
    tracker = start_stage(cfg, "kto", job_type="kto")
    try:
        run_dir = Path(tracker.run_dir)
        torch.manual_seed(cfg.seed)
        policy, tokenizer = load_policy(cfg.policy, merged=True)
        columns = ("prompt", "completion", "label")
        train = Dataset.from_list([{k: r[k] for k in columns} for r in rows])
        args = KTOConfig(
            output_dir=str(run_dir / "trainer"),
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight or (len(rows) - n_desirable) / n_desirable,
            undesirable_weight=cfg.undesirable_weight,
            learning_rate=cfg.lr,
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps or -1,
            per_device_train_batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            logging_steps=cfg.logging_steps,
            save_strategy="no",  # the policy dir is written once, atomically, below
            report_to="none",  # metrics go through the lab's tracker
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            activation_checkpointing=False,  # small models: recomputation costs more than it saves
            seed=cfg.seed,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        budget = TimeBudgetCallback(cfg.max_time_s or float("inf"))
        trainer = KTOTrainer(
            model=policy,
            ref_model=None if cfg.lora else frozen_copy(policy),
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=adapter_config(cfg, policy) if cfg.lora else None,
            callbacks=[TrackerCallback(tracker), ProgressCallback("kto"), budget],
        )
        trainer.remove_callback(PrinterCallback)
        t0 = time.time()
        out = trainer.train()
        train_s = time.time() - t0

        final, base = policy_to_write(trainer.accelerator.unwrap_model(trainer.model), cfg.policy)
        shutil.rmtree(run_dir / "trainer", ignore_errors=True)  # save_strategy="no": an empty dir
        meta = {
            "base": base,
            "stage": "kto",
            "config_hash": config_hash(cfg),
            "lora_merged": cfg.lora,
            "config": to_dict(cfg),
        }
        write_policy_dir(final.eval(), tokenizer, out_dir, meta)
        tracker.log_artifact(out_dir, name=f"{cfg.experiment}-kto-policy", type="model")
        tracker.log_table(
            "kto/data",
            ["prompt_id", "candidate_label", "label", "annotator"],
            [[r["prompt_id"], r["candidate_label"], r["label"], r["annotator"]] for r in rows[:32]],
        )
        summary = {
            "run_dir": str(run_dir),
            "policy_dir": str(out_dir),
            "kto/responses": len(rows),
            "kto/desirable": n_desirable,
            "kto/steps": out.global_step,
            "train/loss_final": float(out.training_loss),
            "time/train_s": round(train_s, 2),
            "kto/stop": f"time budget of {cfg.max_time_s:g}s reached" if budget.stopped else "done",
        }
        tracker.summary(summary)
        print(
            f"kto: {len(rows)} labelled responses ({n_desirable} desirable), {out.global_step} steps in "
            f"{train_s:.1f}s, train loss {out.training_loss:.4f} → {out_dir}",
            flush=True,
        )
        return summary
    finally:
        tracker.finish()


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "kto",
        help="KTO on rankings: desirable / undesirable responses from each ranking, through TRL's KTOTrainer",
        description=(
            "Kahneman–Tversky optimisation of a policy on rankings: each ranking labels its upper candidates "
            "desirable and its lower ones undesirable (the middle of an odd ranking and candidates tied with "
            "everything are left out), and TRL's KTOTrainer trains on them in TRL's conversational format. "
            "Starts from the SFT policy (LoRA by default) and writes a policy dir that `rlhf eval` reads."
        ),
    )
    add_config_arguments(p, KTOStageConfig)
    p.set_defaults(func=lambda args: run_kto(config_from_args(args, KTOStageConfig)) and 0)
    return p
