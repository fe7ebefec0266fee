"""The configuration of ``rlhf ppo`` (:class:`PPOConfig`): every option, its default and its checks.

``validate`` runs before any model loads, so a bad value costs no download or load time. The numbers
behind the defaults are in docs/ppo.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.adapters import AdapterFields
from rlhf.config import ConfigError, exact_div, option
from rlhf.models import MIXED_PRECISION
from rlhf.rewards import check_reward_spec, reward_model_dirs
from rlhf.tracking import RunFields

RANK_SEED_STRIDE = 100_003  # seed + rank · stride: distinct streams per process (docs/ppo.md item 18)


@dataclass
class PPOConfig(RunFields, AdapterFields):
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
        "auto",
        help="every forward (sampling, reward model, reference, training) under bf16 autocast, with "
        "fp32 trainable weights, gradients and Adam (the frozen base's weights kept in bf16, as "
        "autocast computes with them: the same numbers); old log-probs are then recomputed in the training "
        "precision. auto measures: on a CPU with bf16 it times one training micro-step in fp32 and "
        "under autocast and takes autocast only when at least 1.1× faster (on a 2-core AVX512-BF16 "
        "EPYC, not on a 2-core AMX Xeon); on a bf16 GPU auto is bf16. Over three PPO seeds each on "
        "the quickstart, autocast learned as fp32 did (gold win rate 0.785 against 0.743 on average; "
        "the seed moved it by 0.27) in 0.89× the time (docs/environment.md). "
        "bf16: require it (refused before any model loads where the hardware lacks it); no: fp32",
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
    seed: int = option(0, help="random seed (process r uses seed + r·100003 for sampling)")

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
        exact_div(self.batch_size, world_size, f"batch_size / number of processes ({world_size})")
        local_mb = exact_div(
            self.minibatch_size, world_size, f"minibatch_size / number of processes ({world_size})"
        )
        if local_mb % self.micro_batch_size:
            raise ConfigError(
                f"micro_batch_size: {self.micro_batch_size} does not divide the {local_mb} episodes of a "
                f"minibatch per process (minibatch_size {self.minibatch_size} over {world_size} "
                f"process(es)); use a divisor of {local_mb}"
            )
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
    """PPO updates in the run (validated: ``batch_size`` divides ``total_episodes``)."""
    return exact_div(cfg.total_episodes, cfg.batch_size, "total_episodes / batch_size")
