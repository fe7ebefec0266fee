"""``rlhf dpo``: direct preference optimisation of a policy on rankings with ties.

DPO (Rafailov et al. 2023, arXiv 2305.18290) trains the policy π itself as the reward model: the
implicit reward of a response is ``r(x, y) = β · (log π(y|x) - log π_ref(y|x))``, and the
Bradley–Terry loss on those rewards is the DPO loss ``-log σ(r_w - r_l)``. So every ranking loss
of the reward models (:mod:`reward_models.losses`, docs/rankings.md) becomes a DPO loss when it is
applied to implicit rewards instead of a reward head's scores, and this stage has one loop for
all of them:

- ``bt``: standard DPO, every strict pair of every ranking weighing the same (TRL's ``sigmoid``);
- ``grouped_bt``: the same pairs, each ranking weighing the same (InstructGPT's averaging);
- ``rao_kupper`` / ``davidson``: tie-aware DPO (Chen et al. 2025, arXiv 2409.17431): tied
  responses are evidence that their implicit rewards are equal, with θ / ν fixed or learned;
  ``rao_kupper`` at θ = 1 and ``bt`` are the same loss on strict pairs;
- ``plackett_luce``: listwise DPO over the whole ranking, tiers as tied events (Breslow).

The steps: read and check the rankings (exit 2 listing every bad row) → hold out a fraction of
the prompts → load the policy (an SFT adapter is merged in) and add a LoRA adapter, whose
disabled state is the reference (or, without LoRA, a frozen copy) → the reference's
log-probabilities of every candidate, once → epochs of length-bucketed batches of prompts →
held-out implicit-reward accuracy against the annotators and the gold scorer, and RewardBench 2's
best-of-K accuracy (the implicit reward judged as a reward model, as RewardBench judges DPO
models), with 95 % bootstrap intervals over prompts → the policy dir (LoRA merged), as PPO writes it.

Metrics carry TRL's ``DPOTrainer`` names (``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``), computed over
the strict pairs of the batch's rankings.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from reward_models import losses as L
from reward_models.evaluate import ratio_of_sums, rewardbench2_metrics, units_by_prompt
from reward_models.train import (
    DataReport,
    Group,
    build_groups,
    encode_groups,
    initial_tie_raw,
    initial_tie_value,
    length_batches,
    make_batch,
    ranking_grid,
    read_records,
    split_groups,
    tie_log_param,
    tie_rate,
    tie_values,
)
from rlhf.adapters import AdapterFields
from rlhf.cli import progress_bar
from rlhf.config import ConfigError, add_config_arguments, config_from_args, config_hash, option, to_dict
from rlhf.contracts import prompt_text
from rlhf.errors import UserError
from rlhf.models import (
    MIXED_PRECISION,
    MIXED_PRECISION_HELP,
    adam_kwargs,
    autocast_bf16,
    policy_out_dir,
    policy_to_train,
    policy_to_write,
    resolve_model_path,
    use_bf16,
    write_policy_dir,
)
from rlhf.nonfinite import gradient_norm, stop_if_non_finite
from rlhf.stats import bootstrap_ci
from rlhf.tracking import RunFields, stage_run_dir, start_stage


@dataclass
class DPOStageConfig(RunFields, AdapterFields):
    policy: str = option(
        "smollm2-135m-instruct", help="starting policy: the SFT policy dir, an alias or a model dir"
    )
    rankings: str = option("", help="rankings file (JSONL of the rankings contract, or a dataset dir)")
    eval_fraction: float = option(0.2, help="fraction of the prompts held out for evaluation")
    skip_bad_rows: bool = option(False, help="leave out rankings that break the contract instead of stopping")
    loss: str = option(
        "bt",
        help="bt (standard DPO), grouped_bt (each ranking weighs the same), rao_kupper, davidson "
        "(tie-aware DPO), plackett_luce (listwise DPO, ties as tiers)",
        choices=L.LOSSES,
    )
    beta: float = option(
        0.1, help="β: the implicit reward's scale; larger keeps the policy nearer the reference"
    )
    theta: float | None = option(None, help="Rao–Kupper θ > 1 (null: from the data's tie rate)")
    nu: float | None = option(None, help="Davidson ν > 0 (null: from the data's tie rate)")
    learn_tie_param: bool = option(True, help="learn θ / ν with the policy (else keep them fixed)")
    tie_lr: float = option(0.02, help="learning rate of the learned θ / ν")
    lora: bool = option(
        True,
        help="train an adapter (LoRA unless adapter says otherwise; the reference = the adapter disabled); false = all weights",
    )
    max_length: int = option(
        256, help="tokens per (prompt, response); longer ones lose the start of the prompt"
    )
    batch_size: int = option(4, help="prompts (all their candidates) per optimizer step")
    lr: float = option(5e-5, help="AdamW learning rate")
    max_grad_norm: float = option(1.0, help="gradient clipping")
    epochs: float = option(1.0, help="passes over the training prompts")
    max_steps: int = option(0, help="stop after this many optimizer steps (0 = epochs decide)")
    max_time_s: float = option(
        0.0, help="stop after this many seconds of training (0 = no limit): equal budgets across methods"
    )
    eval_every: int = option(0, help="evaluate on the held-out prompts every N steps (0 = only at the end)")
    mixed_precision: str = option(
        "auto", help="forwards under bf16 autocast. " + MIXED_PRECISION_HELP, choices=MIXED_PRECISION
    )
    output_dir: str = option("", help="policy dir to write (default: <run_dir>/policy)")
    seed: int = option(0, help="random seed")

    def validate(self) -> None:
        self.validate_adapter()
        if not self.rankings:
            raise ConfigError("dpo: rankings is required (a rankings JSONL file, e.g. from `rlhf simulate`)")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: {self.eval_fraction} must be between 0 and 1")
        for name in ("beta", "lr", "epochs", "tie_lr", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be > 0")
        if self.max_time_s < 0:
            raise ConfigError(f"max_time_s: {self.max_time_s} must be ≥ 0 (0 = no limit)")
        for name in ("batch_size", "max_length", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be ≥ 1")
        if self.loss == "rao_kupper" and self.theta is not None and self.theta <= 1:
            raise ConfigError(f"theta: {self.theta} must be > 1 for rao_kupper (θ = 1 allows no ties)")
        if self.loss == "davidson" and self.nu is not None and self.nu <= 0:
            raise ConfigError(f"nu: {self.nu} must be > 0 for davidson")


# ----------------------------------------------------------------------------- the math


def sequence_logps(model, batch) -> torch.Tensor:
    """``log π(y|x)`` of every sequence of a batch ``[N]``: the sum of its response tokens'
    log-probabilities (the prompt's tokens and the padding do not count)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    targets = batch.input_ids[:, 1:, None]
    token_logps = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, -1)
    return (token_logps * batch.pool_mask[:, 1:]).sum(-1)


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's reward ``β · (log π(y|x) - log π_ref(y|x))`` (Rafailov et al. 2023, eq. 5, without
    the prompt-only term β log Z(x), which every response to a prompt shares)."""
    return beta * (policy_logps - reference_logps)


def preference_metrics(rewards: torch.Tensor, logps: torch.Tensor, tiers: torch.Tensor) -> dict[str, float]:
    """TRL's DPO metrics over the strict pairs of ``tiers`` ``[R, K]``: the mean implicit reward and
    log-probability of the preferred and the other response, their margin, and how often the
    preferred one's reward is higher."""
    beats, _ = L.pair_masks(tiers)
    row, win, lose = beats.nonzero(as_tuple=True)
    if not len(row):
        return {}
    chosen, rejected = rewards[row, win].detach(), rewards[row, lose].detach()
    return {
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/margins": float((chosen - rejected).mean()),
        "rewards/accuracies": float((chosen > rejected).float().mean()),
        "logps/chosen": float(logps[row, win].detach().mean()),
        "logps/rejected": float(logps[row, lose].detach().mean()),
    }


def gold_pair_units(groups: list[Group], rewards: list[torch.Tensor]) -> list[tuple[float, float]]:
    """Per prompt, (pairs the implicit rewards order as the gold scores do, pairs the gold orders):
    the units of the gold accuracy's bootstrap. Reward ties count ½; gold ties are not pairs."""
    units = []
    for g, r in zip(groups, rewards):
        gold = g.records[0].get("gold") or {}
        if len(gold) < len(g.labels):
            continue
        s = [gold[label] for label in g.labels]
        right = pairs = 0.0
        for i in range(g.k):
            for j in range(i + 1, g.k):
                if s[i] == s[j]:
                    continue
                d = float(r[i] - r[j]) * (1 if s[i] > s[j] else -1)
                right += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
                pairs += 1
        units.append((right, pairs))
    return units


# ----------------------------------------------------------------------------- the run


@torch.no_grad()
def reference_logps(model, groups: list[Group], pad_id: int, batch_size: int, amp) -> dict[int, torch.Tensor]:
    """``log π_ref`` of every candidate of every group, keyed by ``id(group)``: computed once."""
    out = {}
    bar = progress_bar(len(groups), "dpo: reference log-probs", "prompt")
    for s in range(0, len(groups), batch_size):
        chunk = groups[s : s + batch_size]
        with amp():
            flat = sequence_logps(model, make_batch(chunk, pad_id, None))
        for g, values in zip(chunk, flat.split([g.k for g in chunk])):
            out[id(g)] = values
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def evaluate_held_out(
    cfg: DPOStageConfig, policy, raw_tie, held: list[Group], ref: dict, pad_id: int, amp
) -> tuple[dict, list[torch.Tensor]]:
    """Held-out loss and implicit-reward accuracy against the annotators and the gold, with 95 %
    bootstrap intervals over prompts; and each held-out group's implicit rewards ``[K]``."""
    policy.eval()
    rewards_by_group, loss_sum, used_sum = [], 0.0, 0
    kmax = max(g.k for g in held)
    ranking_rows, ranking_tiers, ranking_prompt = [], [], []  # every ranking, padded to kmax
    for s in range(0, len(held), cfg.batch_size):
        chunk = held[s : s + cfg.batch_size]
        batch = make_batch(chunk, pad_id, None)
        with amp():
            logps = sequence_logps(policy, batch)
        flat = implicit_rewards(logps, torch.cat([ref[id(g)] for g in chunk]), cfg.beta)
        rewards = ranking_grid(flat, batch)
        loss, used = L.ranking_loss(
            cfg.loss, rewards, batch.tiers, tie_param=tie_log_param(cfg.loss, raw_tie)
        )
        loss_sum, used_sum = loss_sum + float(loss) * used, used_sum + used
        pad = kmax - rewards.shape[1]
        ranking_rows.append(torch.nn.functional.pad(rewards.double(), (0, pad)))
        ranking_tiers.append(torch.nn.functional.pad(batch.tiers, (0, pad), value=-1))
        ranking_prompt.append(batch.row_of_ranking + s)
        rewards_by_group += list(flat.split([g.k for g in chunk]))
    policy.train()
    rewards, tiers, prompt_of_row = (
        torch.cat(ranking_rows),
        torch.cat(ranking_tiers),
        torch.cat(ranking_prompt),
    )
    # strict pairs the implicit rewards order as the annotators did (equal rewards ½), per prompt
    beats, _ = L.pair_masks(tiers)
    d = rewards[:, :, None] - rewards[:, None, :]
    right = ((d > 0).double() + 0.5 * (d == 0).double()) * beats
    annotator_units = units_by_prompt(right, beats, prompt_of_row, len(held))
    metrics = {"eval/loss": loss_sum / max(used_sum, 1), "eval/prompts": len(held)}
    metrics.update(bootstrap_ci(annotator_units, ratio_of_sums, seed=cfg.seed).as_dict("eval/pair_accuracy"))
    metrics.update(rewardbench2_metrics(rewards, tiers, prompt_of_row, len(held), cfg.seed, ""))
    gold_units = gold_pair_units(held, rewards_by_group)
    if gold_units:
        metrics.update(
            bootstrap_ci(gold_units, ratio_of_sums, seed=cfg.seed).as_dict("eval/gold_pair_accuracy")
        )
    return metrics, rewards_by_group


def run_dpo(cfg: DPOStageConfig) -> dict[str, Any]:
    """The ``dpo`` stage (module docstring); returns its summary with ``policy_dir``."""

    cfg.validate()
    t_start = time.time()
    report = DataReport()
    records = read_records(cfg.rankings, skip_bad_rows=cfg.skip_bad_rows, report=report)
    train, held = split_groups(build_groups(records, report, cfg.loss), cfg.eval_fraction, cfg.seed)
    if not train:
        raise UserError(f"{cfg.rankings}: no usable rankings ({report.records} records)", code="no_data")
    resolve_model_path(cfg.policy)  # an unknown policy stops here, before the run dir exists
    out_dir = policy_out_dir(cfg.output_dir, stage_run_dir(cfg, "dpo"))
    tracker = start_stage(cfg, "dpo", job_type="dpo")
    try:
        torch.manual_seed(cfg.seed)
        policy, reference, tokenizer = policy_to_train(cfg.policy, cfg.lora, cfg)
        for line in report.lines():
            print(line, flush=True)
        encode_groups(train + held, tokenizer, cfg.max_length, report)
        pad_id = tokenizer.pad_token_id
        device = next(policy.parameters()).device
        bf16 = use_bf16(cfg.mixed_precision, device)

        def amp():
            return autocast_bf16(device, bf16)

        with policy.disable_adapter() if reference is None else torch.no_grad():
            ref = reference_logps(reference or policy, train + held, pad_id, cfg.batch_size, amp)

        tie_init = initial_tie_value(cfg.loss, cfg.theta, cfg.nu, tie_rate(train))
        raw = initial_tie_raw(cfg.loss, tie_init)
        raw_tie = None if raw is None else torch.nn.Parameter(torch.tensor(float(raw)), cfg.learn_tie_param)
        params = [p for p in policy.parameters() if p.requires_grad]
        groups = [{"params": params}]
        if raw_tie is not None and cfg.learn_tie_param:
            groups.append({"params": [raw_tie], "lr": cfg.tie_lr})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0, **adam_kwargs(params))
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

        # the loop: one optimizer step per batch of prompts, every ranking of them at once
        policy.train()
        bar = progress_bar(total_steps, f"dpo ({cfg.loss})", "step")
        step, history, last_eval, out_of_time = 0, [], {}, False
        t_train = time.time()
        while step < total_steps and not out_of_time:
            epoch = step // steps_per_epoch
            for batch_groups in length_batches(train, cfg.batch_size, random.Random(f"{cfg.seed}:{epoch}")):
                batch = make_batch(batch_groups, pad_id, None)
                with amp():
                    logps = sequence_logps(policy, batch)
                flat = implicit_rewards(logps, torch.cat([ref[id(g)] for g in batch_groups]), cfg.beta)
                rewards = ranking_grid(flat, batch)
                tie = tie_log_param(cfg.loss, raw_tie)
                loss, _used = L.ranking_loss(cfg.loss, rewards, batch.tiers, tie_param=tie)
                where = {
                    "at": f"step {step + 1}",
                    "last_good": None,
                    "hint": "Try a lower lr.",
                    "progress": bar,
                }
                stop_if_non_finite(loss, "loss", **where)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                stop_if_non_finite(gradient_norm(params), "gradient norm", **where)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                step += 1
                logs = {"train/loss": float(loss.detach()), "train/epoch": step / steps_per_epoch}
                logs.update(preference_metrics(rewards, ranking_grid(logps, batch), batch.tiers))
                logs.update({f"train/tie_{k}": v for k, v in tie_values(cfg.loss, raw_tie).items()})
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    last_eval, _ = evaluate_held_out(cfg, policy, raw_tie, held, ref, pad_id, amp)
                    logs.update(last_eval)
                tracker.log(logs, step=step)
                history.append(logs)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{logs['train/loss']:.4f}", acc=f"{logs.get('rewards/accuracies', math.nan):.2f}"
                )
                out_of_time = bool(cfg.max_time_s) and time.time() - t_train >= cfg.max_time_s
                if step >= total_steps or out_of_time:
                    break
        bar.close()
        train_s = time.time() - t_train

        final, held_rewards = evaluate_held_out(cfg, policy, raw_tie, held, ref, pad_id, amp)
        tracker.log(final, step=step)
        _log_held_out_table(tracker, held[:8], held_rewards[:8])

        model, base = policy_to_write(policy, cfg.policy)
        meta = {
            "base": base,
            "stage": "dpo",
            "loss": cfg.loss,
            "beta": cfg.beta,
            "config_hash": config_hash(cfg),
            "lora_merged": cfg.lora,
            "config": to_dict(cfg),
        }
        write_policy_dir(model.eval(), tokenizer, out_dir, meta)
        tracker.log_artifact(
            out_dir, name=f"{cfg.experiment}-dpo-policy", type="model", metadata={"loss": cfg.loss}
        )
        summary = {
            "run_dir": str(tracker.run_dir),
            "policy_dir": str(out_dir),
            "dpo/steps": step,
            "dpo/train_prompts": len(train),
            "dpo/bf16": int(bf16),
            "time/train_s": round(train_s, 2),
            "time/total_s": round(time.time() - t_start, 2),
            "dpo/stop": f"time budget of {cfg.max_time_s:g}s reached" if out_of_time else "done",
            **{f"{k}_last": v for k, v in history[-1].items() if k.startswith(("train/loss", "rewards/"))},
            **final,
            **{f"dpo/{k}": v for k, v in tie_values(cfg.loss, raw_tie).items()},
        }
        tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        gold = (
            f", vs gold {final['eval/gold_pair_accuracy']:.3f} "
            f"[{final['eval/gold_pair_accuracy_ci_low']:.3f}, {final['eval/gold_pair_accuracy_ci_high']:.3f}]"
            if "eval/gold_pair_accuracy" in final
            else ""
        )
        print(
            f"dpo ({cfg.loss}, β {cfg.beta:g}): {step} steps in {train_s:.1f}s; held-out implicit-reward "
            f"accuracy vs annotators {final['eval/pair_accuracy']:.3f} on {len(held)} prompts{gold} → {out_dir}",
            flush=True,
        )
        return summary
    finally:
        tracker.finish()


def _log_held_out_table(tracker, groups: list[Group], rewards: list[torch.Tensor]) -> None:
    """A few held-out prompts with each candidate's tier and the implicit reward the final evaluation
    gave it (a reader checks that the preferred answers got the higher rewards)."""
    rows = []
    for g, values in zip(groups, rewards):
        for ci, label in enumerate(g.labels):
            rows.append(
                [g.prompt_id, prompt_text(g.prompt), label, g.texts[ci], g.rankings[0][ci], float(values[ci])]
            )
    tracker.log_table(
        "dpo/held_out", ["prompt_id", "prompt", "label", "response", "tier", "implicit_reward"], rows
    )


def add_parser(subparsers):
    p = subparsers.add_parser(
        "dpo",
        help="direct preference optimisation on rankings: DPO, tie-aware and listwise DPO",
        description=(
            "Direct preference optimisation of a policy on rankings with ties: the policy is its own reward "
            "model (implicit reward β·(log π - log π_ref)), trained with the reward models' ranking losses. "
            "--loss bt is standard DPO, rao_kupper and davidson are tie-aware DPO, plackett_luce is listwise "
            "DPO over whole rankings (docs/rankings.md). Starts from the SFT policy (LoRA by default, whose "
            "disabled adapter is the reference), reports TRL's DPO metrics and the held-out implicit-reward "
            "accuracy against the annotators and the gold with 95 % intervals, and writes a policy dir that "
            "`rlhf eval` and `rlhf ppo` read."
        ),
    )
    add_config_arguments(p, DPOStageConfig)
    p.set_defaults(func=lambda args: run_dpo(config_from_args(args, DPOStageConfig)) and 0)
    return p
