"""PPO for RLHF as one readable loop: ``run_ppo(cfg)``.

Each update reads top to bottom like the paper (Ouyang et al. 2022; the N+ implementation details,
arXiv:2403.17031), numbered:

1. **rollout**: sample one response per prompt from the policy, purely (no top-k/top-p), truncated
   after the first stop token; old log-probs come from the sampler itself;
2. **score**: the reward function on prompt text + decoded response (a reward model, a gold
   scorer, a rule, a user function, or a weighted sum); missing-EOS penalty; optional clipping;
3. **KL-penalised rewards**: reference log-probs, per-token ``-β·KL``, score at the last token;
4. **advantages**: values, GAE (γ, λ), returns = advantages + values, then advantage whitening
   over valid tokens;
5. **PPO epochs**: fresh shuffle per epoch, minibatches split into micro-batches with gradient
   accumulation, clipped policy and value losses, gradient clipping, Adam step;
6. **log**: every metric named in ``docs/ppo.md``; adapt β; anneal the learning rate; sample
   tables, held-out evaluation, checkpoints.

Deviations from the N+ reference code (all on purpose):
- losses are normalised by the minibatch's valid-token count, not averaged per micro-batch, so
  micro-batch × accumulation gives exactly the same update whatever the split;
- ``batch_size`` counts episodes per update over *all* processes (each of N processes samples
  ``batch_size / N``), so a run's algorithm does not change with the number of processes;
- the rollout's log-probs are the old log-probs (no extra forward) unless
  ``recompute_old_logprobs``; ``val/ratio_first_minibatch`` shows the check of docs/ppo.md item 5;
- ``mixed_precision: bf16`` (or ``auto`` where the hardware has bf16) runs every forward under
  bf16 autocast — sampling, reward model, reference, training — with fp32 weights, gradients and
  Adam; the old log-probs (and values) then come from a forward identical to training's, since
  bf16 sampling through a KV cache rounds differently (the first ratio stays exactly 1);
- with LoRA the adapter is merged into the weights while sampling (the base
  weights are restored bit-exactly afterwards, :class:`rlhf.ppo.value.merged_lora`): unmerged LoRA
  layers more than doubled rollout time on a CPU;
- with a shared value head (``value_model=shared``) the rollout's values are read off the
  sampling forwards (the same last hidden states a full forward computes), not a second pass;
- the prompt prefix every query shares (the chat template's system prompt) runs once per forward
  at batch 1 and its KV cache is repeated to the rows (:func:`rlhf.ppo.value.forward_query_response`):
  same outputs and gradients, fewer token forwards;
- Adam is torch's fused implementation where the parameters allow (10× faster steps on a CPU);
- a separate critic is a full trainable copy (of the reward model's backbone or the policy's),
  also with a LoRA policy; a critic as a second adapter (docs/ppo.md item 17) is not implemented — use
  ``value_model=shared`` for the one-copy configuration.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf.adapters import AdapterFields, policy_to_write
from rlhf.config import ConfigError, config_hash, exact_div, option, to_dict
from rlhf.distributed import require_data_parallel
from rlhf.errors import UserError
from rlhf.models import MIXED_PRECISION, MIXED_PRECISION_HELP, load_policy
from rlhf.nonfinite import NonFiniteError, stop_if_non_finite
from rlhf.ppo import math as pm
from rlhf.rewards import check_reward_spec, reward_model_dirs
from rlhf.tracking import TrackingConfig

RANK_SEED_STRIDE = 100_003  # seed + rank · stride: distinct streams per process (docs/ppo.md item 18)


@dataclass
class PPOConfig(AdapterFields):
    # --- what to train, against what
    policy: str = option(
        "smollm2-135m-instruct", help="starting policy: the SFT policy dir, an alias or a model dir"
    )
    reward: str | list[dict] = option(
        "vader",
        help="reward: a reward-model dir (with rlhf_reward.json), a scorer spec "
        "(vader, length:target=N, keywords:good=a|b,bad=c, module:function, "
        "python:file.py:fn), or a list of {spec, weight} summed",
    )
    gold: str | None = option(
        None, help="gold scorer spec for sample tables and eval/gold_score (e.g. vader)"
    )
    prompts: str = option(
        "lab:prompts", help="prompt source: lab:prompts, a .jsonl file, a dataset dir or Hub id"
    )
    prompts_split: str | None = option("train", help="split of the prompts to train on (null = all)")
    eval_split: str | None = option(
        "eval",
        help="split of held-out prompts for eval/* (if it is empty, the last "
        "num_eval_prompts training prompts are held out)",
    )
    num_eval_prompts: int = option(32, help="held-out prompts per evaluation (0 = no evaluation)")
    eval_batch_size: int = option(
        32, help="prompts per sampling batch in evaluation (responses do not depend on it in fp32)"
    )
    max_prompt_tokens: int = option(256, help="keep at most this many (last) tokens of each prompt")
    # --- sizes
    total_episodes: int = option(512, help="episodes (sampled responses) over the whole run")
    batch_size: int = option(64, help="episodes per PPO update, over all processes")
    minibatch_size: int = option(16, help="episodes per optimiser step, over all processes")
    micro_batch_size: int = option(
        8, help="episodes per forward/backward on one process (gradient accumulation makes up the minibatch)"
    )
    ppo_epochs: int = option(4, help="passes over each batch, each with a fresh shuffle")
    response_length: int = option(48, help="maximum new tokens per response")
    rollout_batch_size: int = option(0, help="rows per sampling call (0 = the whole per-process batch)")
    # --- sampling
    temperature: float = option(0.7, help="sampling temperature; every log-prob divides logits by it")
    stop_token: str = option("eos", help="'eos' or a one-token string after which responses are truncated")
    # --- reward shaping
    missing_eos_penalty: float = option(
        0.0,
        help="subtracted from the score of responses that never stopped (0 = off). Scores are in "
        "reward-model units (std 1 on reference samples): a penalty of 1 outweighs most preferences "
        "and PPO learns to stop instead of to please; the reward model already sees whether a "
        "response ended (EOS is appended only when it did)",
    )
    score_clip: float | None = option(
        None, help="clip scores to [-c, c] after normalisation (null = no clipping)"
    )
    kl_coef: float = option(
        0.05, help="β, the per-token KL penalty coefficient (initial value when adaptive)"
    )
    kl_estimator: str = option("k1", help="per-token KL estimator in the reward", choices=("k1", "k3"))
    adaptive_kl: bool = option(False, help="adapt β to reach kl_target (Ziegler et al.)")
    kl_target: float = option(6.0, help="target KL per response for the adaptive controller")
    kl_horizon: float = option(10000.0, help="horizon (episodes) of the adaptive controller")
    # --- advantages and losses
    gamma: float = option(1.0, help="discount γ of GAE")
    lam: float = option(0.95, help="λ of GAE")
    whiten_advantages: bool = option(True, help="whiten advantages over valid tokens")
    cliprange: float = option(0.2, help="ε of the clipped surrogate")
    cliprange_value: float = option(0.2, help="ε of the clipped value loss")
    vf_coef: float = option(0.1, help="value loss coefficient")
    # --- models
    value_model: str = option(
        "critic",
        help="critic = separate backbone + head; shared = head on the policy's backbone",
        choices=("critic", "shared"),
    )
    critic_init: str = option(
        "auto",
        help="initialise the critic from the reward model (when it shares the policy's "
        "tokenizer: auto) or from the policy",
        choices=("auto", "reward", "policy"),
    )
    lora: bool = option(
        False,
        help="train an adapter (LoRA unless adapter says otherwise); the reference is the base with "
        "the adapter disabled",
    )
    # --- optimiser
    learning_rate: float = option(3e-6, help="Adam learning rate (LoRA usually wants ~1e-4 or more)")
    anneal_lr: bool = option(True, help="anneal the learning rate linearly to 0 over the run")
    adam_eps: float = option(1e-5, help="Adam ε")
    max_grad_norm: float = option(1.0, help="gradient clipping norm")
    recompute_old_logprobs: bool = option(
        False, help="recompute old log-probs with a forward pass instead of taking them from the sampler"
    )
    mixed_precision: str = option(
        "no",
        help="every forward (sampling, reward model, reference, training) under bf16 autocast, with "
        "fp32 weights, gradients and Adam; old log-probs are then recomputed in the training "
        "precision. fp32 by default: on a 2-core AMX CPU a SmolLM2 LoRA update took 25 s under "
        "autocast against 21 s in fp32 (autocast re-casts the weights at every forward and adds the "
        "recompute pass); on a bf16 GPU use auto or bf16. " + MIXED_PRECISION_HELP,
        choices=MIXED_PRECISION,
    )
    # --- logging, evaluation, checkpoints
    sample_every: int = option(5, help="log a sample table every N updates (0 = never)")
    num_samples: int = option(4, help="rows of each sample table")
    eval_every: int = option(
        0, help="evaluate on held-out prompts every N updates (0 = at start and end only)"
    )
    save_every: int = option(0, help="checkpoint every N updates (0 = only at the end and on Ctrl-C)")
    keep_checkpoints: int = option(2, help="keep the newest N checkpoints")
    resume: str = option("", help="resume from a checkpoint dir, or 'auto' for the newest of this run")
    output_dir: str = option(
        "", help="where to write the final policy (default: runs/<experiment>/ppo/policy)"
    )
    experiment: str = option("default", help="experiment name: the W&B group and runs/<experiment>/")
    runs_dir: str = option("runs", help="root folder of run directories")
    seed: int = option(0, help="random seed (process r uses seed + r·100003 for sampling)")
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, world_size: int = 1) -> None:
        """Reject bad values before any model loads (sizes divide, reward exists, ranges)."""
        self.validate_adapter()
        for name in (
            "total_episodes",
            "batch_size",
            "minibatch_size",
            "micro_batch_size",
            "ppo_epochs",
            "response_length",
            "max_prompt_tokens",
            "lora_r",
            "num_samples",
            "keep_checkpoints",
            "eval_batch_size",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be > 0")
        num_updates(self)
        exact_div(self.batch_size, self.minibatch_size, "batch_size / minibatch_size")
        local_batch = exact_div(
            self.batch_size, world_size, f"batch_size / number of processes ({world_size})"
        )
        local_mb = exact_div(
            self.minibatch_size, world_size, f"minibatch_size / number of processes ({world_size})"
        )
        if local_mb % self.micro_batch_size:
            raise ConfigError(
                f"micro_batch_size: {self.micro_batch_size} does not divide the {local_mb} episodes of a "
                f"minibatch per process (minibatch_size {self.minibatch_size} over {world_size} "
                f"process(es)); use a divisor of {local_mb}"
            )
        del local_batch
        if self.temperature <= 0:
            raise ConfigError(f"temperature: {self.temperature} must be > 0")
        if not 0 < self.cliprange < 1 or self.cliprange_value <= 0:
            raise ConfigError("cliprange must be in (0, 1) and cliprange_value > 0")
        if not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ConfigError(
                f"gamma must be in (0, 1] and lam in [0, 1], got gamma={self.gamma}, lam={self.lam}"
            )
        if self.kl_coef < 0 or self.learning_rate <= 0 or self.adam_eps <= 0:
            raise ConfigError("kl_coef must be ≥ 0, learning_rate and adam_eps > 0")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0):
            raise ConfigError("adaptive_kl needs kl_target > 0 and kl_horizon > 0")
        if self.score_clip is not None and self.score_clip <= 0:
            raise ConfigError(f"score_clip: {self.score_clip} must be > 0 (or null)")
        if self.critic_init == "reward" and not reward_model_dirs(self.reward):
            raise ConfigError("critic_init=reward needs a reward-model dir as the reward")
        check_reward_spec(self.reward)


def num_updates(cfg: PPOConfig) -> int:
    return exact_div(cfg.total_episodes, cfg.batch_size, "total_episodes / batch_size")


# ----------------------------------------------------------------------------- set-up helpers


def prompt_index(k: int, n: int, seed: int) -> int:
    """Index of the ``k``-th prompt drawn over the run: a fresh seeded permutation per pass.

    The data position is therefore just the number of episodes done (exact resume for free).
    """
    epoch, i = divmod(k, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return int(perm[i])


def _load_prompt_sets(cfg: PPOConfig) -> tuple[list[dict], list[dict]]:
    from rlhf.data import load_prompts

    train = load_prompts(cfg.prompts, split=cfg.prompts_split)
    if not train:
        raise ConfigError(f"prompts {cfg.prompts!r} has no records in split {cfg.prompts_split!r}")
    held: list[dict] = []
    if cfg.num_eval_prompts > 0:
        try:
            held = load_prompts(cfg.prompts, split=cfg.eval_split) if cfg.eval_split else []
        except UserError:
            held = []
        train_ids = {p["prompt_id"] for p in train}
        overlap = bool(held) and all(p["prompt_id"] in train_ids for p in held)
        # No separate held-out split (a plain file puts every record in every split): hold out the
        # last prompts so eval/* measures generalisation, not the training prompts.
        if (not held or overlap) and len(train) > cfg.num_eval_prompts:
            train, held = train[: -cfg.num_eval_prompts], train[-cfg.num_eval_prompts :]
        held = held[: cfg.num_eval_prompts]
    return train, held


def _build_models(cfg: PPOConfig):
    """Policy (+LoRA), reference, value model, tokenizer. Returns (policy, ref_model_or_None, pv, tokenizer)."""
    from rlhf.adapters import policy_to_train
    from rlhf.ppo.value import PolicyAndValue, hidden_size_of, make_value_head

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
        from transformers import AutoModel, AutoTokenizer

        rm_tok = AutoTokenizer.from_pretrained(rm_dirs[0])
        same_vocab = rm_tok.get_vocab() == tokenizer.get_vocab()
        if same_vocab:
            from rlhf.models import disable_dropout

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


def _trainable_state(pv) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pv.named_parameters() if v.requires_grad}


def _plot_curves(history: list[dict], path: Path, title: str = "PPO learning curves") -> Path | None:
    """Learning curves (scores, KL, held-out evaluation) as one titled PNG, two rows of panels. On the
    training score, the first and last quarters of the updates are shaded: their difference is the
    ``ppo/score_gain`` of the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("objective/scores", "reward score (training rollouts)"),
        ("eval/score", "reward score (held out)"),
        ("eval/gold_score", "gold score (held out)"),
        ("objective/kl", "KL to the reference (training)"),
        ("objective/rlhf_reward", "score − β·KL (training)"),
        ("response/length_mean", "response length (tokens)"),
    ]
    keys = [(k, t) for k, t in keys if any(k in h for h in history)]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, (k, label) in zip(axes.flat, keys):
        pts = [(h["_episode"], h[k]) for h in history if k in h and h[k] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        if k == "objective/scores" and len(pts) >= 8:
            q = len(pts) // 4
            ax.axvspan(pts[0][0], pts[q - 1][0], color="grey", alpha=0.15, lw=0)
            ax.axvspan(pts[-q][0], pts[-1][0], color="tab:green", alpha=0.15, lw=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("episodes", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _Interrupt:
    """First Ctrl-C: finish the current update, checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nppo: Ctrl-C — finishing this update, then saving a checkpoint (Ctrl-C again to abort)",
            flush=True,
        )

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------- the loop


def run_ppo(cfg: PPOConfig) -> dict[str, Any]:
    """Train the policy with PPO against the reward function. Returns a summary with ``policy_dir``."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    require_data_parallel(accelerator, "ppo")
    world, rank = accelerator.num_processes, accelerator.process_index
    cfg.validate(world)  # before any model loads
    from rlhf.models import autocast_bf16, use_bf16

    bf16 = use_bf16(cfg.mixed_precision, accelerator.device)

    def amp():
        """Every forward under bf16 autocast when mixed_precision is bf16 (weights stay fp32)."""
        return autocast_bf16(accelerator.device, bf16)

    # bf16 sampling (KV cache, merged LoRA) and a bf16 full forward round differently: the old
    # log-probs must come from the same forward as training's for the first ratio to be 1.
    recompute_old = cfg.recompute_old_logprobs or bf16
    n_updates = num_updates(cfg)
    local_batch = cfg.batch_size // world
    local_mb = cfg.minibatch_size // world
    accum = local_mb // cfg.micro_batch_size

    from rlhf.data import prompt_text
    from rlhf.evaluate import evaluate_policy, resolve_stop_token
    from rlhf.models import write_policy_dir
    from rlhf.ppo.checkpoint import load_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state
    from rlhf.ppo.rollout import decode_responses, encode_queries, left_pad, sample_rollout
    from rlhf.ppo.value import merged_lora, response_logprobs
    from rlhf.rewards import load_reward_fn
    from rlhf.scorers import get_scorer
    from rlhf.tracking import Tracker, stage_run_dir, start_stage

    train_prompts, eval_prompts = _load_prompt_sets(cfg)
    reward_fn = load_reward_fn(cfg.reward, device=str(accelerator.device))
    gold_fn = get_scorer(cfg.gold) if cfg.gold else None
    run_dir = stage_run_dir(cfg, "ppo")
    ckpt_root = run_dir / "checkpoints"
    resume_from = resolve_resume(cfg.resume, ckpt_root)
    done = int(resume_from.name.rsplit("_", 1)[-1]) if resume_from is not None else None
    earlier: list[dict] = []  # a resumed run keeps the metrics of the updates before its checkpoint
    if done is not None and (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if isinstance(rec.get("step"), int) and rec["step"] <= done:
                earlier.append(rec)
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
    policy, ref_model, pv, tokenizer = _build_models(cfg)
    pv.to(accelerator.device)
    if ref_model is not None:
        ref_model.to(accelerator.device)
    stop_id = resolve_stop_token(tokenizer, cfg.stop_token)
    pad_id = tokenizer.pad_token_id
    params = [p for p in pv.parameters() if p.requires_grad]
    from rlhf.models import adam_kwargs

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
    # the sampler draws on the model's device (torch.multinomial needs a generator there)
    sample_gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + rank * RANK_SEED_STRIDE)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1 + rank * RANK_SEED_STRIDE)
    gens = {"sample": sample_gen, "shuffle": shuffle_gen}

    start_update = 0
    if resume_from is not None:
        state, rng = load_checkpoint(resume_from, rank)
        if state["n_updates"] != n_updates:
            raise ConfigError(
                f"resume: the checkpoint was made for {state['n_updates']} updates, this config has "
                f"{n_updates}; keep total_episodes and batch_size as they were"
            )
        missing = set(_trainable_state(pv)) - set(state["trainable"])
        if missing:
            raise UserError(
                f"resume: {resume_from} does not match this model/config (missing {sorted(missing)[0]})",
                code="bad_checkpoint",
            )
        pv.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl"])
        set_rng_state(rng, gens)
        start_update = int(state["update"])
        accelerator.print(f"ppo: resumed from {resume_from} at update {start_update}/{n_updates}", flush=True)

    def policy_model():
        return accelerator.unwrap_model(pv_train).policy

    def ref_logprobs(q, qm, r, rm):
        """Reference log-probs: the frozen copy, or the LoRA policy with its adapter disabled."""
        if ref_model is not None:
            return response_logprobs(ref_model, q, qm, r, rm, cfg.temperature, cfg.micro_batch_size)
        with policy_model().disable_adapter():
            return response_logprobs(policy_model(), q, qm, r, rm, cfg.temperature, cfg.micro_batch_size)

    def policy_logprobs(q, qm, r, rm):
        """The policy's log-probs from a full forward, like the reference's (LoRA unmerged)."""
        return response_logprobs(policy_model(), q, qm, r, rm, cfg.temperature, cfg.micro_batch_size)

    # Tokenize every prompt once; queries are left-padded per batch.
    train_ids = encode_queries(tokenizer, [p["prompt"] for p in train_prompts], cfg.max_prompt_tokens)
    eval_q = eval_qm = None
    eval_chats: list = []
    baseline_scores = None
    eval_common = dict(
        max_new_tokens=cfg.response_length,
        temperature=cfg.temperature,
        stop_token_id=stop_id,
        batch_size=cfg.eval_batch_size,
        seed=cfg.seed + 12345,
    )
    if eval_prompts and accelerator.is_main_process:
        eval_q, eval_qm = left_pad(
            encode_queries(tokenizer, [p["prompt"] for p in eval_prompts], cfg.max_prompt_tokens), pad_id
        )
        eval_q, eval_qm = eval_q.to(accelerator.device), eval_qm.to(accelerator.device)
        eval_chats = [p["prompt"] for p in eval_prompts]
        # The reference (SFT) policy's responses, scored once: the bar for eval/win_rate.
        ref_gen_model = ref_model
        ctx = policy_model().disable_adapter() if ref_model is None else contextlib.nullcontext()
        with ctx, amp():
            ref_eval, ref_rows = evaluate_policy(
                ref_gen_model or policy_model(),
                tokenizer,
                eval_q,
                eval_qm,
                eval_chats,
                reward_fn,
                gold_fn=gold_fn,
                progress="ppo: eval reference",
                **eval_common,
            )
        baseline_scores = torch.tensor([row[2] for row in ref_rows])
        tracker.summary({f"eval/reference_{k.split('/', 1)[1]}": v for k, v in ref_eval.items()})

    def run_evaluation(update: int) -> dict[str, float]:
        if eval_q is None:
            return {}
        with amp():
            metrics, _rows = evaluate_policy(
                policy_model(),
                tokenizer,
                eval_q,
                eval_qm,
                eval_chats,
                reward_fn,
                ref_logprobs_fn=ref_logprobs,
                # bf16: the policy's log-probs from a forward like the reference's (the sampler's
                # KV-cache path rounds differently: KL 0.13 at update 0 instead of 0)
                policy_logprobs_fn=policy_logprobs if bf16 else None,
                gold_fn=gold_fn,
                baseline_scores=baseline_scores,
                sampling_context=lambda: merged_lora(policy_model()),
                progress="ppo: eval",
                **eval_common,
            )
        tracker.log(metrics, step=update)
        history.append({"_episode": update * cfg.batch_size, **metrics})
        return metrics

    def checkpoint(update: int) -> Path:
        state = None
        if accelerator.is_main_process:
            state = {
                "update": update,
                "n_updates": n_updates,
                "trainable": _trainable_state(accelerator.unwrap_model(pv_train)),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "kl": kl_ctl.state_dict(),
                "config_hash": config_hash(cfg),
            }
        return save_checkpoint(
            ckpt_root,
            update,
            state,
            rng_state(gens),
            rank,
            accelerator.is_main_process,
            cfg.keep_checkpoints,
            barrier=accelerator.wait_for_everyone,
        )

    history: list[dict] = [{"_episode": (r["step"] or 0) * cfg.batch_size, **r} for r in earlier]
    accelerator.print(
        f"ppo: {n_updates} updates × {cfg.batch_size} episodes ({world} process{'es' if world > 1 else ''}), "
        f"{cfg.ppo_epochs} epochs, minibatch {cfg.minibatch_size}, micro-batch {cfg.micro_batch_size} × {accum} "
        f"accumulation; value model: {cfg.value_model}; {'LoRA' if cfg.lora else 'full fine-tuning'}; "
        f"{'bf16 autocast' if bf16 else 'fp32'}",
        flush=True,
    )
    tracker.summary({"perf/bf16_autocast": int(bf16)})  # what mixed_precision resolved to
    last_eval: dict[str, float] = {}
    if start_update == 0 and eval_q is not None:
        last_eval = run_evaluation(0)
    first_metrics: dict[str, float] | None = None
    last_metrics: dict[str, float] = {}
    interrupted = False
    last_good = None

    def where(update: int, epoch: int) -> dict[str, Any]:
        """Where a non-finite loss or gradient stopped the run, for its error message."""
        return {
            "at": f"update {update}, epoch {epoch + 1}",
            "last_good": last_good,
            "hint": "Try a lower learning_rate or score_clip.",
        }

    from rlhf.cli import progress_bar

    bar = progress_bar(n_updates, "ppo", "update", enabled=accelerator.is_main_process, initial=start_update)
    # The bar is closed however the loop ends, so an error message starts on a line of its own.
    with bar, _Interrupt() as interrupt:
        for update in range(start_update + 1, n_updates + 1):
            t_start = time.time()
            # 1. rollout ---------------------------------------------------------------------------
            k0 = (update - 1) * cfg.batch_size + rank * local_batch
            idx = [prompt_index(k0 + i, len(train_ids), cfg.seed) for i in range(local_batch)]
            query, qmask = left_pad([train_ids[i] for i in idx], pad_id)
            query, qmask = query.to(accelerator.device), qmask.to(accelerator.device)
            # A shared value head reads the policy's own last hidden state: the sampling forwards
            # compute exactly those states, so the rollout's values come with the samples (no
            # second pass over query + response). A critic is another network: it needs its pass.
            values_from_sampler = cfg.value_model == "shared" and not recompute_old
            # LoRA folded in for sampling speed; base restored exactly
            with merged_lora(policy_model()), amp():
                ro = sample_rollout(
                    policy_model(),
                    query,
                    qmask,
                    max_new_tokens=cfg.response_length,
                    temperature=cfg.temperature,
                    stop_token_id=stop_id,
                    pad_token_id=pad_id,
                    generator=sample_gen,
                    batch_size=cfg.rollout_batch_size,
                    value_head=accelerator.unwrap_model(pv_train).value_head if values_from_sampler else None,
                )
            response, rmask = ro.tokens, ro.mask
            mask_f = rmask.float()
            t_gen = time.time() - t_start
            # Values (and, if asked, old log-probs) of the rollout policy through the same forward as
            # training's (LoRA unmerged, same precision), in the first epoch's micro-batches: its
            # shuffle is drawn now, since a micro-batch's padding depends on its rows and bf16 rounds
            # by grouping. Only then is the first minibatch's ratio exactly 1.
            perm0 = torch.randperm(local_batch, generator=shuffle_gen).to(accelerator.device)
            with torch.no_grad(), amp():
                values_pass = torch.zeros_like(response, dtype=torch.float32)
                old_pass = torch.zeros_like(response, dtype=torch.float32)
                n_pass = 0 if values_from_sampler else local_batch  # rows needing a value pass
                for i in range(0, n_pass, cfg.micro_batch_size):
                    rows = perm0[i : i + cfg.micro_batch_size]
                    logits, v = accelerator.unwrap_model(pv_train)(
                        query[rows],
                        qmask[rows],
                        response[rows],
                        rmask[rows],
                        need_logits=recompute_old,
                    )
                    values_pass[rows] = v.float()
                    if recompute_old:
                        old_pass[rows] = pm.logprobs_from_logits(logits, response[rows], cfg.temperature)
            t_values = time.time() - t_start - t_gen

            # 2. score ------------------------------------------------------------------------------
            t0 = time.time()
            texts = decode_responses(tokenizer, response, rmask, ro.has_stop)
            prompts = [train_prompts[i]["prompt"] for i in idx]
            with amp():
                raw_scores = reward_fn(prompts, texts, ro.has_stop.tolist())
            # an ensemble's spread per response: large where the policy leaves what its members learned
            disagreement = getattr(reward_fn, "last_disagreement", None)
            raw = torch.as_tensor(raw_scores, dtype=torch.float32).reshape(-1).to(accelerator.device)
            if not pm.is_finite(raw):
                raise NonFiniteError(
                    f"the reward function returned a non-finite score at update {update}; stopped "
                    f"(last good checkpoint: {last_good or 'none'})"
                )
            scores = raw.clamp(-cfg.score_clip, cfg.score_clip) if cfg.score_clip else raw
            if cfg.missing_eos_penalty:
                scores = pm.apply_missing_eos_penalty(scores, ro.has_stop, cfg.missing_eos_penalty)
            t_score = time.time() - t0 + t_values

            # 3. KL-penalised rewards ---------------------------------------------------------------
            t0 = time.time()
            with torch.no_grad():
                with amp():
                    # in the first epoch's micro-batches too (same padding as the policy's pass)
                    ref_logp = torch.empty_like(mask_f)
                    ref_logp[perm0] = ref_logprobs(query[perm0], qmask[perm0], response[perm0], rmask[perm0])
                t_score += time.time() - t0  # scoring passes: reward, values, reference
                t0 = time.time()
                values = (ro.values if values_from_sampler else values_pass) * mask_f
                old_logp = (old_pass if recompute_old else ro.logprobs) * mask_f
                kl = pm.kl_per_token(old_logp, ref_logp, cfg.kl_estimator) * mask_f
                beta = kl_ctl.value
                rewards, non_score = pm.kl_penalized_rewards(scores, kl, mask_f, beta)

                # 4. advantages ---------------------------------------------------------------------
                adv, returns = pm.gae(rewards, values, mask_f, cfg.gamma, cfg.lam)  # returns before whitening
                if cfg.whiten_advantages:
                    adv = pm.masked_whiten(adv, mask_f)

            # 5. PPO epochs of minibatch updates ---------------------------------------------------
            stats: dict[str, list[float]] = {
                k: []
                for k in (
                    "approxkl",
                    "clipfrac",
                    "pg_loss",
                    "vf_loss",
                    "vf_clipfrac",
                    "entropy",
                    "ratio",
                    "ratio_var",
                )
            }
            first_ratio = None
            for epoch in range(cfg.ppo_epochs):
                perm = (
                    perm0
                    if epoch == 0
                    else torch.randperm(local_batch, generator=shuffle_gen).to(accelerator.device)
                )
                for mb_start in range(0, local_batch, local_mb):
                    mb_idx = perm[mb_start : mb_start + local_mb]
                    n_tok = mask_f[mb_idx].sum().clamp(min=1.0)
                    mb_stats = dict.fromkeys(stats, 0.0)
                    for m in range(accum):
                        mi = mb_idx[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size]
                        w = float(
                            mask_f[mi].sum() / n_tok
                        )  # this micro-batch's share of the minibatch's tokens
                        sync = accelerator.no_sync(pv_train) if m < accum - 1 else contextlib.nullcontext()
                        with sync:
                            with amp():
                                logits, vpred = pv_train(query[mi], qmask[mi], response[mi], rmask[mi])
                            new_logp = pm.logprobs_from_logits(logits, response[mi], cfg.temperature)
                            pg_loss, st = pm.policy_loss(
                                new_logp, old_logp[mi], adv[mi], mask_f[mi], cfg.cliprange, n_tokens=n_tok
                            )
                            vf_loss, vf_clipfrac = pm.value_loss(
                                vpred,
                                values[mi],
                                returns[mi],
                                mask_f[mi],
                                cfg.cliprange_value,
                                n_tokens=n_tok,
                            )
                            loss = pg_loss + cfg.vf_coef * vf_loss
                            stop_if_non_finite(loss, "loss", **where(update, epoch))
                            accelerator.backward(loss)
                        with torch.no_grad():
                            ent = pm.masked_mean(
                                pm.entropy_from_logits(logits.detach(), cfg.temperature), mask_f[mi]
                            )
                        for key, val in (
                            ("approxkl", st.approxkl * w),
                            ("clipfrac", st.clipfrac * w),
                            ("pg_loss", pg_loss.detach()),
                            ("vf_loss", vf_loss.detach()),
                            ("vf_clipfrac", vf_clipfrac * w),
                            ("entropy", ent * w),
                            ("ratio", st.ratio_mean * w),
                            ("ratio_var", st.ratio_var * w),
                        ):
                            mb_stats[key] += float(val)
                    if epoch == 0 and mb_start == 0:
                        first_ratio = mb_stats["ratio"]
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    stop_if_non_finite(grad_norm, "gradient norm", **where(update, epoch))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    for key, val in mb_stats.items():
                        stats[key].append(val)
            t_train = time.time() - t0

            # 6. log --------------------------------------------------------------------------------
            with torch.no_grad():
                kl_sum = kl.sum(-1)
                non_score_sum = non_score.sum(-1)
                lengths = mask_f.sum(-1)
                local = {
                    "objective/scores": scores.mean(),
                    "objective/raw_scores": raw.mean(),
                    "objective/kl": kl_sum.mean(),
                    "objective/entropy": (-old_logp * mask_f).sum(-1).mean(),
                    "objective/non_score_reward": non_score_sum.mean(),
                    "objective/rlhf_reward": (scores + non_score_sum).mean(),
                    "policy/approxkl_avg": _mean(stats["approxkl"]),
                    "policy/clipfrac_avg": _mean(stats["clipfrac"]),
                    "policy/entropy_avg": _mean(stats["entropy"]),
                    "loss/policy_avg": _mean(stats["pg_loss"]),
                    "loss/value_avg": _mean(stats["vf_loss"]),
                    "val/clipfrac_avg": _mean(stats["vf_clipfrac"]),
                    "val/ratio": _mean(stats["ratio"]),
                    "val/ratio_var": _mean(stats["ratio_var"]),
                    "val/ratio_first_minibatch": first_ratio,
                    "val/explained_variance": pm.explained_variance(values, returns, mask_f),
                    "val/num_eos_tokens": (response == stop_id).sum().float(),
                    "response/length_mean": lengths.mean(),
                    "response/eos_rate": ro.has_stop.float().mean(),
                    "val/advantage_mean": pm.masked_mean(adv, mask_f),
                    "val/value_mean": pm.masked_mean(values, mask_f),
                    "val/return_mean": pm.masked_mean(returns, mask_f),
                }
                if disagreement is not None:
                    local["objective/rm_disagreement"] = disagreement.mean()
                names = list(local)
                vec = torch.tensor([float(local[k]) for k in names], device=accelerator.device)
                vec = accelerator.reduce(vec, reduction="mean") if world > 1 else vec
            metrics = {k: float(v) for k, v in zip(names, vec.tolist())}
            metrics["val/num_eos_tokens"] *= world  # a count over the whole batch, not a mean
            if not all(math.isfinite(v) for v in metrics.values()):
                raise NonFiniteError(
                    f"non-finite training statistics at update {update} "
                    f"(last good checkpoint: {last_good or 'none'})"
                )
            elapsed = time.time() - t_start
            metrics.update(
                {
                    "objective/kl_coef": beta,
                    "lr": scheduler.get_last_lr()[0],
                    "episodes": update * cfg.batch_size,
                    "time/generate_s": t_gen,
                    "time/score_s": t_score,
                    "time/train_s": t_train,
                    "perf/episodes_per_s": cfg.batch_size / elapsed,
                    "perf/tokens_per_s": metrics["response/length_mean"] * cfg.batch_size / elapsed,
                }
            )
            kl_ctl.update(metrics["objective/kl"], cfg.batch_size)
            scheduler.step()
            tracker.log(metrics, step=update)
            history.append({"_episode": update * cfg.batch_size, **metrics})
            first_metrics = first_metrics or metrics
            last_metrics = metrics
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}")

            if (
                cfg.sample_every
                and (update % cfg.sample_every == 0 or update == 1)
                and accelerator.is_main_process
            ):
                n = min(cfg.num_samples, local_batch)
                shown = [prompt_text(p) for p in prompts[:n]]
                gold = gold_fn(shown, texts[:n]) if gold_fn else [None] * n
                columns = ["step", "prompt", "response", "score", "kl", "gold_score"]
                rows = [
                    [update, shown[i], texts[i], float(scores[i]), float(kl_sum[i]), gold[i]]
                    for i in range(n)
                ]
                if disagreement is not None:  # the ensemble's spread beside each score
                    columns.append("rm_disagreement")
                    rows = [row + [float(disagreement[i])] for i, row in enumerate(rows)]
                tracker.log_table("samples", columns, rows, step=update)
            if cfg.eval_every and update % cfg.eval_every == 0 and update != n_updates:
                last_eval = run_evaluation(update)
            stop = interrupt.requested
            if world > 1:  # a Ctrl-C seen by any process stops all of them after the same update
                stop = bool(
                    accelerator.reduce(torch.tensor([float(stop)], device=accelerator.device), "sum") > 0
                )
            if (cfg.save_every and update % cfg.save_every == 0) or stop or update == n_updates:
                last_good = checkpoint(update)
            if stop:
                interrupted = True
                accelerator.print(
                    f"ppo: interrupted after update {update}; checkpoint {last_good}. Resume with "
                    f"resume=auto (or resume={last_good}).",
                    flush=True,
                )
                break

    if not interrupted and eval_q is not None and start_update < n_updates:
        last_eval = run_evaluation(n_updates)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else run_dir / "policy"
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "updates": len([h for h in history if "objective/scores" in h]),
        "interrupted": interrupted,
        "checkpoint": str(last_good) if last_good else "",
    }
    if first_metrics:
        summary.update(
            {
                # the run's first update, also after a resume (history holds the earlier updates)
                "objective/scores_first": next(
                    h["objective/scores"] for h in history if "objective/scores" in h
                ),
                "objective/scores_last": last_metrics["objective/scores"],
                "objective/kl_last": last_metrics["objective/kl"],
                "perf/episodes_per_s_mean": _mean(
                    [h["perf/episodes_per_s"] for h in history if "perf/episodes_per_s" in h]
                ),
            }
        )
    summary.update({k: v for k, v in last_eval.items()})
    summary.update(score_gain([h["objective/scores"] for h in history if "objective/scores" in h]))
    if accelerator.is_main_process:
        png = _plot_curves(
            history, run_dir / "learning_curves.png", f"PPO on {cfg.experiment}: {reward_fn.name}"
        )
        if png is not None:
            tracker.log_image("learning_curves", png)
            summary["learning_curves"] = str(png)
        if not interrupted:
            final, base = policy_to_write(accelerator.unwrap_model(pv_train).policy, cfg.policy)
            meta = {
                "base": base,
                "stage": "ppo",
                "config_hash": config_hash(cfg),
                "lora_merged": cfg.lora,
                "config": to_dict(cfg),
            }
            write_policy_dir(final, tokenizer, out_dir, meta)
            tracker.log_artifact(
                out_dir,
                name=f"{cfg.experiment}-ppo-policy",
                type="model",
                metadata={"config_hash": meta["config_hash"]},
            )
            summary["policy_dir"] = str(out_dir)
        tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    accelerator.wait_for_everyone()
    tracker.finish()
    if accelerator.is_main_process and first_metrics:
        print(
            f"ppo: score {summary['objective/scores_first']:.4f} → {summary['objective/scores_last']:.4f}, "
            f"KL {summary['objective/kl_last']:.3f}, {summary['perf/episodes_per_s_mean']:.3f} episodes/s"
            + (f"; policy: {out_dir}" if not interrupted else ""),
            flush=True,
        )
    return summary


def score_gain(scores_per_update: list[float]) -> dict[str, float]:
    """Did the training score rise? The mean score of the last quarter of updates minus the first
    quarter's, with a 95 % Welch interval that treats each update's mean score as one
    measurement (so the noise between updates, drift included, sets the width). Needs ≥ 8 updates."""
    from rlhf.stats import mean_diff_ci

    q = len(scores_per_update) // 4
    if q < 2:
        return {}
    est = mean_diff_ci(scores_per_update[-q:], scores_per_update[:q])
    return {
        **est.as_dict("ppo/score_gain"),
        "ppo/score_first_quarter": sum(scores_per_update[:q]) / q,
        "ppo/score_last_quarter": sum(scores_per_update[-q:]) / q,
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
