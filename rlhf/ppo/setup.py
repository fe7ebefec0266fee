"""Set-up of a PPO run: from a :class:`~rlhf.ppo.config.PPOConfig` to the one :class:`PPORun` that
:func:`rlhf.ppo.loop.run_ppo` steps through its updates.

:func:`set_up` builds, in this order: the accelerator and the checked config; the prompt sets, the
reward and gold functions; the run directory, the checkpoint to resume from and the metrics logged
before it; the tracker; the models (policy, reference, value model); optimiser, learning-rate
schedule, KL controller and the run's random generators; the checkpoint's state; the tokenized
prompts; and the reference policy's scores on the held-out prompts. The seed is set just before the
models are built, so the seeded results depend on this order.

:class:`PPORun` also carries what the loop does with the models besides an update: reference
log-probs, held-out evaluation and checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from transformers import AutoModel, AutoTokenizer

from rlhf.config import ConfigError, config_hash
from rlhf.distributed import require_data_parallel
from rlhf.errors import UserError
from rlhf.evaluate import evaluate_policy, resolve_stop_token
from rlhf.models import (
    FrozenLinearsInBF16,
    adam_kwargs,
    attention_if_faster,
    autocast_bf16,
    autocast_if_faster,
    disable_dropout,
    load_policy,
    policy_out_dir,
    policy_to_train,
    set_attention,
    use_bf16,
)
from rlhf.ppo import math as pm
from rlhf.ppo.checkpoint import load_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state
from rlhf.ppo.config import RANK_SEED_STRIDE, PPOConfig, num_updates
from rlhf.ppo.prompts import load_prompt_sets
from rlhf.ppo.rollout import encode_queries, left_pad
from rlhf.ppo.value import PolicyAndValue, hidden_size_of, make_value_head, merged_lora, response_logprobs
from rlhf.rewards import load_reward_fn, reward_model_dirs
from rlhf.scorers import get_scorer
from rlhf.tracking import Tracker, read_metrics, stage_run_dir, start_stage


@dataclass
class HeldOut:
    """The held-out prompts of ``eval/*`` (main process only), tokenized once, and the reference
    policy's scores on them: the bar for ``eval/win_rate``."""

    query: torch.Tensor
    query_mask: torch.Tensor
    prompts: list
    reference_scores: torch.Tensor


@dataclass
class PPORun:
    """Everything :func:`set_up` built for one run.

    ``pv`` is the policy-and-value model, ``pv_train`` the same model as the accelerator prepared it
    for training (DDP under several processes); ``reference`` is the frozen reference, or None with
    LoRA (then the reference is the policy with its adapter disabled). Sizes are per process:
    ``local_batch`` episodes per update, ``local_minibatch`` per optimiser step, ``accumulation``
    micro-batches per minibatch.
    """

    cfg: PPOConfig
    accelerator: Accelerator
    bf16: bool
    # under bf16, the frozen base's (and a frozen reference's) linear weights are kept in bf16 for
    # the run, as autocast would cast them at every op; fp32 again before the policy is written
    frozen_bf16: FrozenLinearsInBF16
    # old log-probs from a forward like training's, not the sampler's: when asked, and under bf16,
    # where sampling (KV cache, merged LoRA) and a full forward round differently (the first ratio
    # is 1 only with the same forward)
    recompute_old: bool
    n_updates: int
    local_batch: int
    local_minibatch: int
    accumulation: int
    train_prompts: list[dict]
    reward_fn: Callable
    gold_fn: Callable | None
    run_dir: Path
    out_dir: Path  # where the trained policy goes
    tracker: Tracker
    tokenizer: Any
    pv: PolicyAndValue
    pv_train: torch.nn.Module
    reference: torch.nn.Module | None
    stop_id: int
    pad_id: int
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    kl_ctl: pm.FixedKLController | pm.AdaptiveKLController
    sample_gen: torch.Generator
    shuffle_gen: torch.Generator
    start_update: int = 0  # the update of the checkpoint resumed from
    train_ids: list[list[int]] = field(default_factory=list)  # token ids of every training prompt
    held_out: HeldOut | None = None
    # every logged update and evaluation (a resumed run's earlier ones included): summary and curves
    history: list[dict] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """The run's own random streams, saved in every checkpoint."""
        return {"sample": self.sample_gen, "shuffle": self.shuffle_gen}

    def amp(self):
        """Every forward under bf16 autocast when mixed_precision is bf16 (trainable weights stay
        fp32; the frozen linears are kept in bf16, ``frozen_bf16``)."""
        return autocast_bf16(self.accelerator.device, self.bf16)

    def policy(self):
        return self.pv.policy

    def ref_logprobs(self, q, qm, r, rm):
        """Reference log-probs: the frozen copy, or the LoRA policy with its adapter disabled."""
        cfg = self.cfg
        if self.reference is not None:
            return response_logprobs(self.reference, q, qm, r, rm, cfg.temperature, cfg.micro_batch_size)
        with self.policy().disable_adapter():
            return response_logprobs(self.policy(), q, qm, r, rm, cfg.temperature, cfg.micro_batch_size)

    def policy_logprobs(self, q, qm, r, rm):
        """The policy's log-probs from a full forward, like the reference's (LoRA unmerged)."""
        return response_logprobs(self.policy(), q, qm, r, rm, self.cfg.temperature, self.cfg.micro_batch_size)

    @property
    def eval_sampling(self) -> dict[str, Any]:
        """How evaluation samples: the policy's and the reference's responses alike."""
        return dict(
            max_new_tokens=self.cfg.response_length,
            temperature=self.cfg.temperature,
            stop_token_id=self.stop_id,
            batch_size=self.cfg.eval_batch_size,
            seed=self.cfg.seed + 12345,
        )

    def evaluate(self, update: int) -> dict[str, float]:
        """The policy on the held-out prompts (``eval/*``), logged at ``update``; {} without them."""
        if self.held_out is None:
            return {}
        with self.amp():
            metrics, _rows = evaluate_policy(
                self.policy(),
                self.tokenizer,
                self.held_out.query,
                self.held_out.query_mask,
                self.held_out.prompts,
                self.reward_fn,
                ref_logprobs_fn=self.ref_logprobs,
                # bf16: the policy's log-probs from a forward like the reference's (the sampler's
                # KV-cache path rounds differently: KL 0.13 at update 0 instead of 0)
                policy_logprobs_fn=self.policy_logprobs if self.bf16 else None,
                gold_fn=self.gold_fn,
                baseline_scores=self.held_out.reference_scores,
                sampling_context=lambda: merged_lora(self.policy(), self.frozen_bf16),
                progress="ppo: eval",
                **self.eval_sampling,
            )
        self.tracker.log(metrics, step=update)
        self.history.append({"_episode": update * self.cfg.batch_size, **metrics})
        return metrics

    def checkpoint(self, update: int) -> Path:
        """Save checkpoint ``update``: every process calls this (each saves its random streams)."""
        state = None
        if self.accelerator.is_main_process:
            state = {
                "update": update,
                "n_updates": self.n_updates,
                "trainable": trainable_state(self.pv),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "kl": self.kl_ctl.state_dict(),
                "config_hash": config_hash(self.cfg),
            }
        return save_checkpoint(
            self.run_dir / "checkpoints",
            update,
            state,
            rng_state(self.generators),
            self.rank,
            self.accelerator.is_main_process,
            self.cfg.keep_checkpoints,
            barrier=self.accelerator.wait_for_everyone,
        )


def set_up(cfg: PPOConfig) -> PPORun:
    """Build everything a PPO run needs, in the order of the module docstring."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    require_data_parallel(accelerator, "ppo")
    world, rank = accelerator.num_processes, accelerator.process_index
    cfg.validate(world)  # before any model loads
    use_bf16(cfg.mixed_precision, accelerator.device)  # bf16 without the hardware: refused here
    n_updates = num_updates(cfg)
    local_minibatch = cfg.minibatch_size // world

    train_prompts, eval_prompts = load_prompt_sets(cfg)
    reward_fn = load_reward_fn(cfg.reward, device=str(accelerator.device))
    gold_fn = get_scorer(cfg.gold) if cfg.gold else None
    run_dir = stage_run_dir(cfg, "ppo")
    out_dir = policy_out_dir(cfg.output_dir, run_dir)
    resume_from = resolve_resume(cfg.resume, run_dir / "checkpoints")
    done = int(resume_from.name.rsplit("_", 1)[-1]) if resume_from is not None else None
    earlier = _metrics_up_to(run_dir, done)
    accelerator.wait_for_everyone()  # every process has read the metrics before the main one trims them
    tracker = (
        start_stage(cfg, "ppo", job_type="ppo", resumed_at=done)
        if accelerator.is_main_process
        else Tracker.noop()
    )
    for spec in reward_model_dirs(cfg.reward):
        tracker.use_artifact(spec, name="reward-model", type="model")
    if Path(cfg.policy).exists():
        tracker.use_artifact(cfg.policy, name="sft-policy", type="model")

    torch.manual_seed(cfg.seed)  # same model init (LoRA, heads) on every process
    _policy, reference, pv, tokenizer = build_models(cfg)
    pv.to(accelerator.device)
    if reference is not None:
        reference.to(accelerator.device)
    frozen_bf16 = FrozenLinearsInBF16(pv, reference)
    micro_step = _timing_micro_step(cfg, pv, tokenizer, train_prompts, accelerator.device)
    bf16, timings = _choose_precision(cfg, micro_step, accelerator, frozen_bf16)
    if bf16:
        frozen_bf16.cast()
    attention, attention_timings = _choose_attention(pv, reference, micro_step, accelerator, bf16)
    stop_id = resolve_stop_token(tokenizer, cfg.stop_token)
    params = [p for p in pv.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.adam_eps, **adam_kwargs(params))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: max(0.0, 1.0 - u / n_updates) if cfg.anneal_lr else 1.0
    )
    kl_ctl = (
        pm.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.adaptive_kl
        else pm.FixedKLController(cfg.kl_coef)
    )
    pv_train, optimizer = accelerator.prepare(pv, optimizer)
    run = PPORun(
        cfg=cfg,
        accelerator=accelerator,
        bf16=bf16,
        frozen_bf16=frozen_bf16,
        recompute_old=cfg.recompute_old_logprobs or bf16,
        n_updates=n_updates,
        local_batch=cfg.batch_size // world,
        local_minibatch=local_minibatch,
        accumulation=local_minibatch // cfg.micro_batch_size,
        train_prompts=train_prompts,
        reward_fn=reward_fn,
        gold_fn=gold_fn,
        run_dir=run_dir,
        out_dir=out_dir,
        tracker=tracker,
        tokenizer=tokenizer,
        pv=pv,
        pv_train=pv_train,
        reference=reference,
        stop_id=stop_id,
        pad_id=tokenizer.pad_token_id,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        kl_ctl=kl_ctl,
        # the sampler draws on the model's device (torch.multinomial needs a generator there)
        sample_gen=torch.Generator(device=accelerator.device).manual_seed(cfg.seed + rank * RANK_SEED_STRIDE),
        shuffle_gen=torch.Generator().manual_seed(cfg.seed + 1 + rank * RANK_SEED_STRIDE),
    )
    if resume_from is not None:
        run.start_update = _resume(run, resume_from)

    # Tokenize every prompt once; queries are left-padded per batch.
    run.train_ids = encode_queries(tokenizer, [p["prompt"] for p in train_prompts], cfg.max_prompt_tokens)
    if eval_prompts and accelerator.is_main_process:
        run.held_out = _score_reference(run, eval_prompts)
    run.history = [{"_episode": (r["step"] or 0) * cfg.batch_size, **r} for r in earlier]
    accelerator.print(
        f"ppo: {n_updates} updates × {cfg.batch_size} episodes ({world} process{'es' if world > 1 else ''}), "
        f"{cfg.ppo_epochs} epochs, minibatch {cfg.minibatch_size}, micro-batch {cfg.micro_batch_size} × "
        f"{run.accumulation} accumulation; value model: {cfg.value_model}; "
        f"{_adapter_words(cfg)}; {'bf16 autocast' if bf16 else 'fp32'}"
        + (
            f" (auto: a training micro-step took {timings['bf16_s']:.2f} s under autocast, "
            f"{timings['fp32_s']:.2f} s in fp32)"
            if timings
            else ""
        )
        + (
            f"; {attention} attention (a micro-step took {attention_timings['eager_s']:.2f} s through "
            f"eager attention, {attention_timings['sdpa_s']:.2f} s through SDPA)"
            if attention_timings
            else ""
        ),
        flush=True,
    )
    # what mixed_precision and the attention resolved to, and the timings that decided them
    tracker.summary(
        {
            "perf/bf16_autocast": int(bf16),
            **{f"perf/autocast_probe_{k}": v for k, v in timings.items()},
            **({"perf/eager_attention": int(attention == "eager")} if attention else {}),
            **{f"perf/attention_probe_{k}": v for k, v in attention_timings.items()},
        }
    )
    return run


# The rows of the micro-step the precision and attention are chosen by: the quickstart's micro-batch
# of 16 made the two choices' 12 timed steps cost about 29 s; at 8 rows the ratios were alike
# (autocast 1.28× against 1.39× at 16, eager attention 1.25× against 1.32×) for half the time.
TIMED_ROWS = 8


def _timing_micro_step(
    cfg: PPOConfig, pv: PolicyAndValue, tokenizer, train_prompts: list[dict], device: torch.device
) -> Callable[[], None]:
    """One training micro-step of these very models, to time: a forward and backward over the first
    training prompts (at most :data:`TIMED_ROWS`) with responses of full length. The models are in
    eval mode with dropout off, so the step draws no random numbers."""
    queries = [p["prompt"] for p in train_prompts[: min(cfg.micro_batch_size, TIMED_ROWS)]]
    query, query_mask = left_pad(
        encode_queries(tokenizer, queries, cfg.max_prompt_tokens), tokenizer.pad_token_id
    )
    query, query_mask = query.to(device), query_mask.to(device)
    response = query[:, -1:].expand(-1, cfg.response_length)  # any tokens: only the shapes are timed
    response_mask = torch.ones_like(response)

    def micro_step() -> None:
        logits, values = pv(query, query_mask, response, response_mask)
        (logits.float().logsumexp(-1).mean() + values.mean()).backward()
        pv.zero_grad(set_to_none=True)

    return micro_step


def _choose_precision(
    cfg: PPOConfig,
    micro_step: Callable[[], None],
    accelerator: Accelerator,
    frozen_bf16: FrozenLinearsInBF16,
) -> tuple[bool, dict[str, float]]:
    """``mixed_precision`` resolved on this machine (:func:`rlhf.models.autocast_if_faster`) by
    timing ``micro_step``, under autocast with the frozen weights in bf16 as the run would keep
    them. Every process takes the main process's choice."""
    bf16, timings = autocast_if_faster(cfg.mixed_precision, accelerator.device, micro_step, frozen_bf16)
    if timings:  # only a timed choice can differ between processes
        bf16, timings = _main_process_choice(accelerator, bf16, timings)
    return bf16, timings


def _choose_attention(
    pv: PolicyAndValue,
    reference: torch.nn.Module | None,
    micro_step: Callable[[], None],
    accelerator: Accelerator,
    bf16: bool,
) -> tuple[str | None, dict[str, float]]:
    """The attention every network of the run computes through (policy, critic, a frozen reference),
    chosen by timing ``micro_step`` in the run's precision (:func:`rlhf.models.attention_if_faster`).
    The reference runs what the policy runs, so that a policy equal to it has a KL of exactly 0.
    Only under bf16: the slow kernel it avoids is SDPA's bf16 backward on a CPU, and in fp32 the two
    ran level (docs/environment.md). Every process takes the main process's choice."""
    if not bf16:
        return None, {}
    models = [m for m in (pv.policy, pv.critic, reference) if m is not None]
    with autocast_bf16(accelerator.device, True):
        attention, timings = attention_if_faster(models, accelerator.device, micro_step)
    if timings:
        attention, timings = _main_process_choice(accelerator, attention, timings)
        for model in models:
            set_attention(model, attention)
    return attention, timings


def _main_process_choice(accelerator: Accelerator, choice: Any, timings: dict[str, float]):
    """``(choice, timings)`` as the main process measured them, on every process."""
    if accelerator.num_processes > 1:
        both = [choice, timings]
        broadcast_object_list(both)
        choice, timings = both
    return choice, timings


def _metrics_up_to(run_dir: Path, update: int | None) -> list[dict]:
    """What a resumed run logged up to its checkpoint's ``update`` (none for a fresh run): its
    summary and curves go on from these records."""
    if update is None:
        return []
    return [
        rec for rec in read_metrics(run_dir) if isinstance(rec.get("step"), int) and rec["step"] <= update
    ]


def _resume(run: PPORun, checkpoint_dir: Path) -> int:
    """Load weights, optimiser, schedule, KL controller and random streams; returns the update done."""
    state, rng = load_checkpoint(checkpoint_dir, run.rank)
    if state["n_updates"] != run.n_updates:
        raise ConfigError(
            f"resume: the checkpoint was made for {state['n_updates']} updates, this config has "
            f"{run.n_updates}; keep total_episodes and batch_size as they were"
        )
    missing = set(trainable_state(run.pv)) - set(state["trainable"])
    if missing:
        raise UserError(
            f"resume: {checkpoint_dir} does not match this model/config (missing {sorted(missing)[0]})",
            code="bad_checkpoint",
        )
    run.pv.load_state_dict(state["trainable"], strict=False)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.kl_ctl.load_state_dict(state["kl"])
    set_rng_state(rng, run.generators)
    update = int(state["update"])
    run.accelerator.print(
        f"ppo: resumed from {checkpoint_dir} at update {update}/{run.n_updates}", flush=True
    )
    return update


def _score_reference(run: PPORun, eval_prompts: list[dict]) -> HeldOut:
    """Tokenize the held-out prompts and score the reference (SFT) policy's responses on them, once
    (``eval/reference_*`` in the summary)."""
    cfg, device = run.cfg, run.accelerator.device
    prompts = [p["prompt"] for p in eval_prompts]
    query, query_mask = left_pad(encode_queries(run.tokenizer, prompts, cfg.max_prompt_tokens), run.pad_id)
    query, query_mask = query.to(device), query_mask.to(device)
    adapter_off = run.policy().disable_adapter() if run.reference is None else contextlib.nullcontext()
    with adapter_off, run.amp():
        ref_eval, ref_rows = evaluate_policy(
            run.reference if run.reference is not None else run.policy(),
            run.tokenizer,
            query,
            query_mask,
            prompts,
            run.reward_fn,
            gold_fn=run.gold_fn,
            progress="ppo: eval reference",
            **run.eval_sampling,
        )
    reference_scores = torch.tensor([row[2] for row in ref_rows])
    run.tracker.summary({f"eval/reference_{k.split('/', 1)[1]}": v for k, v in ref_eval.items()})
    return HeldOut(query, query_mask, prompts, reference_scores)


def build_models(cfg: PPOConfig):
    """Policy (+LoRA), reference, value model, tokenizer. Returns (policy, ref_model_or_None, pv, tokenizer)."""
    # An SFT adapter policy is folded in: PPO's reference is this merged SFT policy.
    policy, ref_model, tokenizer = policy_to_train(cfg.policy, cfg.lora, cfg)
    critic = _build_critic(cfg, tokenizer) if cfg.value_model == "critic" else None
    head = make_value_head(hidden_size_of(critic if critic is not None else policy))
    pv = PolicyAndValue(policy, head, critic)
    pv.eval()  # dropout is already 0; eval() also keeps any other train-time behaviour off
    return policy, ref_model, pv, tokenizer


def _build_critic(cfg: PPOConfig, tokenizer):
    """The critic backbone: the reward model's (same tokenizer) or a copy of the policy's."""
    rm_dirs = reward_model_dirs(cfg.reward)
    if cfg.critic_init in ("auto", "reward") and rm_dirs:
        rm_tok = AutoTokenizer.from_pretrained(rm_dirs[0])
        same_vocab = rm_tok.get_vocab() == tokenizer.get_vocab()
        if same_vocab:
            critic = AutoModel.from_pretrained(rm_dirs[0], dtype=torch.float32)
            if critic.get_input_embeddings().weight.shape[0] < len(tokenizer):
                critic.resize_token_embeddings(len(tokenizer))
            return disable_dropout(critic).eval()
        if cfg.critic_init == "reward":
            raise ConfigError(
                f"critic_init=reward: the reward model {rm_dirs[0]} has a different tokenizer from "
                "the policy; use critic_init=policy or value_model=shared"
            )
    # A fresh load: the training policy's decoder may already carry the adapter's layers
    start_policy, _ = load_policy(cfg.policy, merged=True)
    critic = start_policy.get_decoder()
    critic.requires_grad_(True)
    return critic.eval()


def trainable_state(pv) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters: what a checkpoint saves of the models."""
    return {k: v.detach().clone() for k, v in pv.named_parameters() if v.requires_grad}


def _adapter_words(cfg: PPOConfig) -> str:
    """What trains, for the set-up line: LoRA (in which layers) or the whole model."""
    if not cfg.lora:
        return "full fine-tuning"
    if cfg.adapter != "lora":
        return cfg.adapter
    return f"LoRA in the last {cfg.lora_layers} layers" if cfg.lora_layers else "LoRA"
