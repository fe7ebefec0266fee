"""``rlhf baseline``: TRL 1.16's critic-free RL trainers (GRPO, RLOO) on the lab's reward and prompts.

The lab's reward function (a reward-model dir, a gold scorer, a user function or a weighted sum:
:func:`rlhf.rewards.load_reward_fn`) is wrapped as a TRL reward function, the prompts are the same
``lab:prompts`` split PPO trains on, and the run is logged to the same W&B group (the
experiment) with ``job_type=baseline``, so a dashboard overlays PPO and its baselines. TRL's
``reward`` is also logged as ``objective/scores`` (PPO's name) for that overlay; everything else TRL logs appears under ``train/``. At the end the policy is
evaluated on held-out prompts with the same :func:`rlhf.evaluate.evaluate_policy` as PPO
(``eval/*``), against the starting policy.

Precision is explicit (``bf16=False`` on a CPU: TRL's default autocast crawls there), gradient
checkpointing is off, nothing goes to the Hub, and TRL's own W&B reporting is off
(``report_to="none"``; the lab's tracker logs instead).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.adapters import lora_config
from rlhf.config import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    config_hash,
    exact_div,
    option,
    to_dict,
)
from rlhf.contracts import prompt_text
from rlhf.evaluate import evaluate_policy, resolve_stop_token
from rlhf.models import (
    load_policy,
    policy_out_dir,
    require_mergeable_start,
    resolve_model_path,
    write_policy_dir,
)
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.prompts import load_prompt_sets
from rlhf.ppo.rollout import encode_queries, left_pad
from rlhf.ppo.value import response_logprobs
from rlhf.rewards import check_reward_spec, load_reward_fn
from rlhf.scorers import get_scorer
from rlhf.sft import bf16_supported
from rlhf.tracking import RunFields, stage_run_dir, start_stage
from rlhf.trainer_callbacks import TrackerCallback


@dataclass
class BaselineConfig(RunFields):
    algorithm: str = option(
        "grpo", help="TRL trainer: grpo (GRPOTrainer) or rloo (RLOOTrainer)", choices=("grpo", "rloo")
    )
    policy: str = option(
        "smollm2-135m-instruct", help="starting policy: the SFT policy dir, an alias or a model dir"
    )
    reward: str | list[dict] = option(
        "vader",
        help="reward: a reward-model dir, a scorer spec, or a list of "
        "{spec, weight} (the same interface as rlhf ppo)",
    )
    gold: str | None = option(None, help="gold scorer for eval/gold_score (e.g. vader)")
    prompts: str = option("lab:prompts", help="prompt source (the same as PPO's)")
    prompts_split: str | None = option("train", help="split to train on")
    eval_split: str | None = option("eval", help="split of held-out prompts for the final evaluation")
    num_eval_prompts: int = option(16, help="held-out prompts for the final evaluation (0 = none)")
    total_episodes: int = option(256, help="completions sampled over the whole run")
    batch_size: int = option(16, help="completions per optimiser step (a multiple of num_generations)")
    num_generations: int = option(4, help="completions per prompt (the group of GRPO / the k of RLOO)")
    response_length: int = option(48, help="maximum new tokens per completion")
    temperature: float = option(0.7, help="sampling temperature")
    learning_rate: float = option(1e-5, help="learning rate (LoRA usually wants ~1e-4 or more)")
    beta: float = option(0.05, help="KL coefficient against the reference policy")
    num_iterations: int = option(1, help="optimisation passes per generated batch (μ)")
    lora: bool = option(False, help="train a LoRA adapter instead of all weights")
    lora_r: int = option(16, help="LoRA rank")
    lora_alpha: int = option(32, help="LoRA alpha")
    logging_steps: int = option(1, help="log every N steps")
    output_dir: str = option(
        "", help="where to write the final policy (default: runs/<experiment>/baseline_<algorithm>/policy)"
    )
    seed: int = option(0, help="random seed")

    def validate(self) -> None:
        for name in ("total_episodes", "batch_size", "num_generations", "response_length", "num_iterations"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be > 0")
        if self.num_generations < 2:
            raise ConfigError("num_generations must be ≥ 2 (the baseline of each completion is its group)")
        exact_div(self.batch_size, self.num_generations, "batch_size / num_generations")
        exact_div(self.total_episodes, self.batch_size, "total_episodes / batch_size")
        if self.temperature <= 0 or self.learning_rate <= 0 or self.beta < 0:
            raise ConfigError("temperature and learning_rate must be > 0, beta ≥ 0")

        check_reward_spec(self.reward)


def trl_reward_func(reward_fn, stop_token_ids: Collection[int] = ()):
    """The lab's reward function as a TRL reward function ``(prompts, completions, **kw) -> list[float]``.

    TRL passes conversational prompts/completions as chat messages; the lab's reward functions take
    the prompt text and the response text (a reward model re-applies its own chat template). TRL's
    ``completion_ids`` keep the stop token of a completion that ended, so the reward sees the same
    finished flags as in the lab's PPO (a reward model appends EOS only to those; docs/ppo.md).
    """

    stops = set(stop_token_ids)

    def lab_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        p = [prompt_text(x) for x in prompts]
        c = [x[-1]["content"] if isinstance(x, list) else str(x) for x in completions]
        finished = None
        if completion_ids is not None and stops:
            finished = [bool(ids) and int(ids[-1]) in stops for ids in completion_ids]
        return [float(v) for v in reward_fn(p, c, finished)]

    lab_reward.__name__ = "lab_reward"  # TRL logs rewards/<name>/mean
    return lab_reward


def _stop_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a completion for TRL: the tokenizer's EOS and every EOS the model declares."""
    declared = model.generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return {tokenizer.eos_token_id, *declared} - {None}


def run_baseline(cfg: BaselineConfig) -> dict[str, Any]:
    cfg.validate()
    import torch
    from datasets import Dataset

    split_cfg = PPOConfig(
        prompts=cfg.prompts,
        prompts_split=cfg.prompts_split,
        eval_split=cfg.eval_split,
        num_eval_prompts=cfg.num_eval_prompts,
    )
    train_prompts, eval_prompts = load_prompt_sets(split_cfg)  # the same split logic as PPO
    reward_fn = load_reward_fn(cfg.reward)
    gold_fn = get_scorer(cfg.gold) if cfg.gold else None
    stage = f"baseline_{cfg.algorithm}"
    require_mergeable_start(cfg.policy, stage)
    out_dir = policy_out_dir(cfg.output_dir, stage_run_dir(cfg, stage))
    tracker = start_stage(cfg, stage, job_type="baseline")
    run_dir = tracker.run_dir

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(cfg.policy, merged=True)
    reference, _ = load_policy(cfg.policy, merged=True) if eval_prompts else (None, None)

    def chat(p):
        return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)

    train_ds = Dataset.from_list([{"prompt": chat(p["prompt"])} for p in train_prompts])
    steps = cfg.total_episodes // cfg.batch_size
    common = dict(
        output_dir=str(run_dir / "trainer"),
        learning_rate=cfg.learning_rate,
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.response_length,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=0,
        beta=cfg.beta,
        num_iterations=cfg.num_iterations,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        bf16=bf16_supported(),
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,
        disable_dropout=True,
        dataloader_num_workers=0,
    )
    peft_config = None
    if cfg.lora:
        peft_config = lora_config(cfg.lora_r, cfg.lora_alpha)
    if cfg.algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        Trainer, args = GRPOTrainer, GRPOConfig(**common)
    else:
        from trl import RLOOConfig, RLOOTrainer

        Trainer, args = RLOOTrainer, RLOOConfig(**common)
    trainer = Trainer(
        model=model,
        reward_funcs=trl_reward_func(reward_fn, _stop_token_ids(model, tokenizer)),
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        # Only the score shares a meaning with PPO's metric (TRL's kl/entropy are per-token means,
        # PPO's objective/kl is per response), so only it is logged under PPO's name too.
        callbacks=[
            TrackerCallback(
                tracker,
                aliases={"reward": "objective/scores"},
                extra=lambda args, state: {"episodes": state.global_step * args.per_device_train_batch_size},
            )
        ],
    )
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "time/train_s": train_s,
        "perf/episodes_per_s": cfg.total_episodes / train_s,
    }
    final = trainer.model
    if hasattr(final, "peft_config"):
        final = final.merge_and_unload()
    final.eval()

    if eval_prompts:
        stop_id = resolve_stop_token(tokenizer, "eos")
        q, qm = left_pad(
            encode_queries(tokenizer, [p["prompt"] for p in eval_prompts], 256), tokenizer.pad_token_id
        )
        chats = [p["prompt"] for p in eval_prompts]
        ev = dict(
            max_new_tokens=cfg.response_length,
            temperature=cfg.temperature,
            stop_token_id=stop_id,
            batch_size=16,
            seed=cfg.seed + 12345,
        )
        _, ref_rows = evaluate_policy(reference, tokenizer, q, qm, chats, reward_fn, **ev)
        metrics, _ = evaluate_policy(
            final,
            tokenizer,
            q,
            qm,
            chats,
            reward_fn,
            gold_fn=gold_fn,
            ref_logprobs_fn=lambda a, b, c, d: response_logprobs(reference, a, b, c, d, cfg.temperature, 16),
            baseline_scores=torch.tensor([r[2] for r in ref_rows]),
            **ev,
        )
        tracker.log(metrics, step=steps)
        summary.update(metrics)

    meta = {
        "base": resolve_model_path(cfg.policy),
        "stage": stage,
        "config_hash": config_hash(cfg),
        "config": to_dict(cfg),
    }
    write_policy_dir(final, tokenizer, out_dir, meta)
    import shutil

    shutil.rmtree(run_dir / "trainer", ignore_errors=True)
    tracker.log_artifact(out_dir, name=f"{cfg.experiment}-{stage}-policy", type="model")
    if Path(cfg.policy).exists():
        tracker.use_artifact(cfg.policy, name="sft-policy", type="model")
    tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    tracker.finish()
    summary["policy_dir"] = str(out_dir)
    print(
        f"baseline {cfg.algorithm}: {summary['perf/episodes_per_s']:.3f} episodes/s; "
        + ", ".join(f"{k}={v:.4f}" for k, v in summary.items() if k.startswith("eval/"))
    )
    return summary


def add_parser(subparsers):
    p = subparsers.add_parser(
        "baseline",
        help="TRL's RLOO / GRPO on the same prompts and reward, for comparison",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
    )
    add_config_arguments(p, BaselineConfig)

    def _run(args) -> int:
        run_baseline(config_from_args(args, BaselineConfig))
        return 0

    p.set_defaults(func=_run)
    return p
