"""``rlhf eval``: score a policy on held-out prompts.

For each held-out prompt the policy samples one response (pure sampling at the given
temperature, a fixed seed so two policies are compared on equal terms) and we report:

- ``eval/score``: the reward function's score (a reward model is normalised by its
  ``rlhf_reward.json``), ``eval/gold_score`` when a gold scorer is set;
- ``eval/kl``: KL(policy ‖ reference) per response, the sum over its tokens of
  ``logp - ref_logp`` (k1, unbiased) on the policy's own samples;
- ``eval/length`` (tokens, EOS included), ``eval/eos_rate`` (responses that stopped);
- ``eval/win_rate``: the fraction of prompts on which the policy's response scores higher than
  the reference policy's response under the reward function (ties count one half).

The same :func:`evaluate_policy` runs inside PPO every ``eval_every`` updates, so the numbers of
``rlhf eval`` and the PPO curves are the same quantities.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from rlhf.cli import progress_bar
from rlhf.config import ConfigError, add_config_arguments, config_from_args, option
from rlhf.contracts import load_prompts, prompt_text
from rlhf.held_out_answers import answer_records, write_answers
from rlhf.models import MIXED_PRECISION, MIXED_PRECISION_HELP, load_sampling_policy, use_bf16
from rlhf.ppo.rollout import decode_responses, encode_queries, left_pad, sample_rollout
from rlhf.ppo.value import response_logprobs
from rlhf.rewards import load_reward_fn
from rlhf.scorers import get_scorer
from rlhf.stats import mean_bootstrap_ci, win_rate_ci
from rlhf.tracking import RunFields, start_stage


@dataclass
class HeldOutSampling:
    """How policies answer held-out prompts: one block for every command that samples them to
    judge a policy (``rlhf eval``, ``rlhf arena``), so both read the same prompts the same way."""

    prompts: str = option(
        "lab:prompts", help="prompt source (lab:prompts, a .jsonl file, a dataset dir or Hub id)"
    )
    split: str | None = option("eval", help="split of the prompts (null = all records)")
    num_prompts: int = option(64, help="at most this many prompts (0 = all)")
    max_prompt_tokens: int = option(256, help="keep at most this many (last) prompt tokens")
    max_new_tokens: int = option(48, help="response length limit in tokens")
    temperature: float = option(0.7, help="sampling temperature (use the one PPO trained with)")
    stop_token: str = option("eos", help="'eos' or a token string at which responses end")
    batch_size: int = option(16, help="prompts per generation batch")
    seed: int = option(0, help="sampling seed (the same seed gives every policy the same random stream)")
    mixed_precision: str = option(
        "auto",
        help="sample and score with the policies' weights cast to bf16 (about 2× faster than fp32 on "
        "2-core CPUs); eval then takes both sides of the KL from full forwards in bf16. "
        + MIXED_PRECISION_HELP,
        choices=MIXED_PRECISION,
    )

    def answer_settings(self) -> dict[str, Any]:
        """The settings that decide the answers: all but how many prompts and how they are batched
        (which moves only their rounding, as any other sampling of the same policy would).
        :mod:`rlhf.held_out_answers` reuses answers only where these are equal."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(HeldOutSampling)
            if f.name not in ("num_prompts", "batch_size")
        }

    def validate_sampling(self) -> None:
        use_bf16(self.mixed_precision)  # bf16 on hardware without it: refused before any model loads
        if self.temperature <= 0:
            raise ConfigError(f"temperature: {self.temperature} must be > 0")
        if self.num_prompts < 0:
            raise ConfigError(f"num_prompts: {self.num_prompts} must be ≥ 0")
        for name in ("max_new_tokens", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be > 0")


@dataclass
class EvalConfig(RunFields, HeldOutSampling):
    policy: str = option("smollm2-135m-instruct", help="policy to evaluate: a policy dir, alias or model dir")
    reference: str = option(
        "", help="reference policy for KL and win rate (e.g. the SFT policy dir); empty = no KL / win rate"
    )
    reward: str = option(
        "vader",
        help="reward: a reward-model dir (rlhf_reward.json) or a scorer spec "
        "(vader, length:target=N, keywords:good=a|b, module:function)",
    )
    gold: str | None = option(None, help="gold scorer spec for eval/gold_score (e.g. vader); null = none")

    def validate(self) -> None:
        self.validate_sampling()


@torch.no_grad()
def sample_one_each(
    policy,
    tokenizer,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    stop_token_id: int,
    batch_size: int,
    seed: int,
    sampling_context: Callable | None = None,
    progress: str | None = "eval",
):
    """One response per query, query ``i`` from its own random stream seeded ``seed, i``: returns
    the rollout (tokens, mask, stop flags, log-probs) and the decoded responses. The responses do
    not depend on ``batch_size`` in fp32 (up to rare rounding; with bf16 weights they do:
    :func:`rlhf.sampling.row_uniforms`), and two policies sampled with the same seed draw the same random
    numbers per prompt, so they are compared on equal terms (common random numbers)."""
    bar = progress_bar(len(query), progress or "", "prompt", enabled=progress is not None, transient=True)
    with bar, sampling_context() if sampling_context is not None else contextlib.nullcontext():
        ro = sample_rollout(
            policy,
            query,
            query_mask,
            generator=None,
            on_batch=bar.update,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_token_id=stop_token_id,
            pad_token_id=tokenizer.pad_token_id,
            batch_size=batch_size,
            row_seeds=eval_row_seeds(seed, query.shape[0]),
        )
    return ro, decode_responses(tokenizer, ro.tokens, ro.mask, ro.has_stop)


@torch.no_grad()
def evaluate_policy(
    policy,
    tokenizer,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    prompts: Sequence[Any],
    reward_fn: Callable,
    *,
    ref_logprobs_fn: Callable | None = None,
    policy_logprobs_fn: Callable | None = None,
    gold_fn: Callable | None = None,
    baseline_scores: torch.Tensor | None = None,
    max_new_tokens: int,
    temperature: float,
    stop_token_id: int,
    batch_size: int,
    seed: int,
    sampling_context: Callable | None = None,
    progress: str | None = "eval",
    on_answers: Callable[[list[dict]], None] | None = None,
) -> tuple[dict[str, float], list[list]]:
    """Sample, score and measure one response per query. Returns ``(metrics, rows)``.

    ``prompts`` are the prompts as in the data contracts (text or chat messages): the reward
    function gets them as they are, the gold scorer and the rows get their text. Query ``i``
    samples from its own random stream seeded ``seed, i`` (:func:`rlhf.sampling.row_uniforms`):
    the responses do not depend on ``batch_size`` in fp32 (up to rare rounding; with bf16 weights
    they do, :func:`rlhf.sampling.row_uniforms`), and two policies evaluated with the same seed
    draw the same random numbers per prompt.

    ``ref_logprobs_fn(query, query_mask, tokens, mask) -> [N, T]`` gives the reference's log-probs
    (None: no KL); ``policy_logprobs_fn`` (same signature) the policy's, from a forward in the
    reference's precision, where the sampler's own log-probs would round differently (bf16); by
    default the sampler's are used. ``rows`` are ``[prompt, response, score, kl, gold]`` for a sample table.
    ``sampling_context()`` wraps the sampling only (PPO passes one that merges a LoRA adapter).
    ``progress`` labels the bar that follows the sampling, None draws none. The bar clears its line
    when done: inside PPO it sits under PPO's own bar. ``on_answers`` receives the sampled answers
    (:func:`rlhf.held_out_answers.answer_records`), for a caller that writes them.
    """
    prompt_texts = [prompt_text(p) for p in prompts]
    ro, responses = sample_one_each(
        policy,
        tokenizer,
        query,
        query_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop_token_id=stop_token_id,
        batch_size=batch_size,
        seed=seed,
        sampling_context=sampling_context,
        progress=progress,
    )
    if on_answers is not None:
        on_answers(answer_records(ro, responses))
    finished = ro.has_stop.tolist()
    scores = torch.as_tensor(reward_fn(list(prompts), responses, finished), dtype=torch.float32).reshape(-1)
    metrics: dict[str, float] = {
        "eval/score": float(scores.mean()),
        "eval/length": float(ro.mask.sum(-1).float().mean()),
        "eval/eos_rate": float(ro.has_stop.float().mean()),
    }
    kl = torch.zeros(len(responses))
    if ref_logprobs_fn is not None:
        ref = ref_logprobs_fn(query, query_mask, ro.tokens, ro.mask)
        logp = (
            ro.logprobs
            if policy_logprobs_fn is None
            else policy_logprobs_fn(query, query_mask, ro.tokens, ro.mask)
        )
        kl = ((logp - ref) * ro.mask).sum(-1)
        metrics["eval/kl"] = float(kl.mean())
    gold = [None] * len(responses)
    if gold_fn is not None:
        gold = [float(g) for g in gold_fn(list(prompt_texts), responses)]
        metrics["eval/gold_score"] = sum(gold) / len(gold)
    if baseline_scores is not None:
        metrics["eval/win_rate"] = win_rate_ci(scores.tolist(), baseline_scores.tolist(), n_resamples=0).value
    rows = [[p, r, float(s), float(k), g] for p, r, s, k, g in zip(prompt_texts, responses, scores, kl, gold)]
    return metrics, rows


def comparison_metrics(rows: list[list], ref_rows: list[list], seed: int = 0) -> dict[str, float]:
    """The policy against the reference on the same prompts, each figure with its 95 % interval
    (bootstrap over prompts, :mod:`rlhf.stats`): win rates by the reward function and by the gold
    scorer (ties ½), and the mean per-prompt differences of their scores. ``rows`` as returned by
    :func:`evaluate_policy` (``[prompt, response, score, kl, gold]``), in the same prompt order."""

    out: dict[str, float] = {"eval/prompts": len(rows)}
    score, ref_score = [r[2] for r in rows], [r[2] for r in ref_rows]
    out.update(win_rate_ci(score, ref_score, seed=seed).as_dict("eval/win_rate"))
    out.update(
        mean_bootstrap_ci([a - b for a, b in zip(score, ref_score)], seed=seed).as_dict("eval/score_diff")
    )
    if rows and rows[0][4] is not None and ref_rows[0][4] is not None:
        gold, ref_gold = [r[4] for r in rows], [r[4] for r in ref_rows]
        out.update(win_rate_ci(gold, ref_gold, seed=seed).as_dict("eval/gold_win_rate"))
        out.update(
            mean_bootstrap_ci([a - b for a, b in zip(gold, ref_gold)], seed=seed).as_dict(
                "eval/gold_score_diff"
            )
        )
    return out


def eval_row_seeds(seed: int, n: int) -> list[int]:
    """The random-stream seed of each of ``n`` evaluation prompts (prompt ``i`` → its own stream)."""
    return [seed * 1_000_003 + i for i in range(n)]


def resolve_stop_token(tokenizer, stop_token: str) -> int:
    """``eos`` → the tokenizer's EOS id; otherwise a string that must be exactly one token."""
    if stop_token == "eos":
        return int(tokenizer.eos_token_id)
    ids = tokenizer(stop_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(
            f"stop_token: {stop_token!r} is {len(ids)} tokens for this tokenizer; it must be exactly one "
            "token (or 'eos')"
        )
    return int(ids[0])


def load_eval_prompts(source: str, split: str | None, limit: int) -> list[dict]:

    records = load_prompts(source, split=split)
    if not records:
        raise ConfigError(f"prompts {source!r} has no records in split {split!r}")
    return records[:limit] if limit > 0 else records


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.policy`` (and, for the win rate, ``cfg.reference``) on held-out prompts."""
    cfg.validate()

    records = load_eval_prompts(cfg.prompts, cfg.split, cfg.num_prompts)
    reward_fn = load_reward_fn(cfg.reward)
    gold_fn = get_scorer(cfg.gold) if cfg.gold else None
    tracker = start_stage(cfg, "eval", job_type="eval")
    t0 = time.time()
    policy, tokenizer, bf16 = load_sampling_policy(cfg.policy, cfg.mixed_precision)
    stop_id = resolve_stop_token(tokenizer, cfg.stop_token)
    query, qmask = left_pad(
        encode_queries(tokenizer, [r["prompt"] for r in records], cfg.max_prompt_tokens),
        tokenizer.pad_token_id,
    )
    prompts = [r["prompt"] for r in records]
    common = dict(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        stop_token_id=stop_id,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    ref_fn, policy_fn, baseline = None, None, None
    ref_metrics: dict[str, float] = {}
    answers: dict[str, list[dict]] = {}  # policy path → its answers, written for `rlhf arena` to reuse
    if cfg.reference:
        reference, _, _ = load_sampling_policy(cfg.reference, cfg.mixed_precision)
        ref_metrics, ref_rows = evaluate_policy(
            reference,
            tokenizer,
            query,
            qmask,
            prompts,
            reward_fn,
            gold_fn=gold_fn,
            progress="eval: reference",
            on_answers=lambda sampled: answers.__setitem__(cfg.reference, sampled),
            **common,
        )
        baseline = torch.tensor([r[2] for r in ref_rows])

        def full_forward_logprobs(model):
            return lambda q, qm, r, rm: response_logprobs(
                model, q, qm, r, rm, cfg.temperature, cfg.batch_size
            )

        ref_fn = full_forward_logprobs(reference)
        if bf16:
            # The bf16 sampler's log-probs come from cached one-token steps, which round otherwise
            # than the reference's full forward; the policy's own full forward rounds the same way,
            # so a policy's KL to itself stays exactly 0.
            policy_fn = full_forward_logprobs(policy)

        tracker.use_artifact(cfg.reference, name="reference-policy", type="model")
    if Path(cfg.policy).exists():
        tracker.use_artifact(cfg.policy, name="policy", type="model")
    metrics, rows = evaluate_policy(
        policy,
        tokenizer,
        query,
        qmask,
        prompts,
        reward_fn,
        ref_logprobs_fn=ref_fn,
        policy_logprobs_fn=policy_fn,
        gold_fn=gold_fn,
        baseline_scores=baseline,
        progress="eval: policy",
        on_answers=lambda sampled: answers.__setitem__(cfg.policy, sampled),
        **common,
    )
    for k, v in ref_metrics.items():
        if k in ("eval/score", "eval/gold_score", "eval/length", "eval/eos_rate"):
            metrics["eval/reference_" + k.split("/", 1)[1]] = v
    if cfg.reference:
        metrics.update(comparison_metrics(rows, ref_rows, seed=cfg.seed))
    metrics["time/eval_s"] = time.time() - t0
    metrics["eval/bf16"] = int(bf16)
    tracker.log(metrics, step=0)
    tracker.log_table("eval/samples", ["prompt", "response", "score", "kl", "gold_score"], rows, step=0)
    tracker.summary(metrics)
    tracker.finish()
    responses = write_answers(Path(tracker.run_dir), cfg, records, answers)
    print("eval: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return {"run_dir": str(tracker.run_dir), "responses": str(responses), **metrics}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "eval",
        help="score a policy on held-out prompts (reward model, gold scorer, KL, length)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the docstring's list of metrics
    )
    add_config_arguments(p, EvalConfig)

    def _run(args) -> int:
        run_eval(config_from_args(args, EvalConfig))
        return 0

    p.set_defaults(func=_run)
    return p
