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
- ``mixed_precision: bf16`` (or ``auto`` where a timed training step was faster) runs every forward under
  bf16 autocast — sampling, reward model, reference, training — with fp32 trainable weights,
  gradients and Adam (the frozen base's linear weights kept in bf16, as autocast computes with
  them: :class:`rlhf.models.FrozenLinearsInBF16`); the old log-probs (and values) then come from a
  forward identical to training's, since bf16 sampling through a KV cache rounds differently (the
  first ratio stays exactly 1); on a CPU under bf16 the models then compute through eager attention
  where a timed micro-step was faster than through SDPA (:func:`rlhf.models.attention_if_faster`);
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
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from rlhf.cli import progress_bar
from rlhf.config import config_hash, to_dict
from rlhf.models import policy_to_write, write_policy_dir
from rlhf.nonfinite import NonFiniteError, stop_if_non_finite
from rlhf.ppo import math as pm
from rlhf.ppo.config import RANK_SEED_STRIDE, PPOConfig, num_updates
from rlhf.ppo.metrics import log_samples, plot_curves, run_summary, score_gain, update_metrics
from rlhf.ppo.prompts import load_prompt_sets, prompt_index
from rlhf.ppo.rollout import UpdateBatch, decode_responses, left_pad, sample_rollout
from rlhf.ppo.setup import PPORun, build_models, set_up
from rlhf.ppo.value import merged_lora, values_and_logprobs

# run_ppo and PPOConfig, plus names kept importable from here for user code (their homes are
# rlhf.ppo.config, rlhf.ppo.prompts, rlhf.ppo.setup and rlhf.ppo.metrics)
__all__ = ["RANK_SEED_STRIDE", "PPOConfig", "num_updates", "prompt_index", "run_ppo", "score_gain"]
_load_prompt_sets = load_prompt_sets  # kept for user code: rlhf.ppo.prompts.load_prompt_sets
_build_models = build_models  # kept for user code: rlhf.ppo.setup.build_models

# what each minibatch of the PPO epochs reports (token-weighted over its micro-batches)
TRAIN_STATS = ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio", "ratio_var")


def run_ppo(cfg: PPOConfig) -> dict[str, Any]:
    """Train the policy with PPO against the reward function. Returns a summary with ``policy_dir``."""
    run = set_up(cfg)
    accelerator, tracker, amp = run.accelerator, run.tracker, run.amp
    local_batch, device = run.local_batch, run.accelerator.device
    last_eval = run.evaluate(0) if run.start_update == 0 else {}
    last_metrics: dict[str, float] = {}
    interrupted = False
    last_good = None

    bar = progress_bar(
        run.n_updates, "ppo", "update", enabled=accelerator.is_main_process, initial=run.start_update
    )
    # The bar is closed however the loop ends, so an error message starts on a line of its own.
    with bar, _Interrupt() as interrupt:
        for update in range(run.start_update + 1, run.n_updates + 1):
            t_start = time.time()
            # 1. rollout ---------------------------------------------------------------------------
            k0 = (update - 1) * cfg.batch_size + run.rank * local_batch
            idx = [prompt_index(k0 + i, len(run.train_ids), cfg.seed) for i in range(local_batch)]
            query, qmask = left_pad([run.train_ids[i] for i in idx], run.pad_id)
            query, qmask = query.to(device), qmask.to(device)
            # A shared value head reads the policy's own last hidden state: the sampling forwards
            # compute exactly those states, so the rollout's values come with the samples (no
            # second pass over query + response). A critic is another network: it needs its pass.
            values_from_sampler = cfg.value_model == "shared" and not run.recompute_old
            # LoRA folded in for sampling speed; base restored exactly
            with merged_lora(run.policy(), run.frozen_bf16), amp():
                ro = sample_rollout(
                    run.policy(),
                    query,
                    qmask,
                    max_new_tokens=cfg.response_length,
                    temperature=cfg.temperature,
                    stop_token_id=run.stop_id,
                    pad_token_id=run.pad_id,
                    generator=run.sample_gen,
                    batch_size=cfg.rollout_batch_size,
                    value_head=run.pv.value_head if values_from_sampler else None,
                )
            response, rmask = ro.tokens, ro.mask
            mask_f = rmask.float()
            t_gen = time.time() - t_start
            # Values (and, if asked, old log-probs) of the rollout policy through the same forward as
            # training's (LoRA unmerged, same precision), in the first epoch's micro-batches: its
            # shuffle is drawn now. Only then is the first minibatch's ratio exactly 1.
            perm0 = torch.randperm(local_batch, generator=run.shuffle_gen).to(device)
            values, old_logp = ro.values, ro.logprobs
            if not values_from_sampler:
                with amp():
                    values, recomputed = values_and_logprobs(
                        run.pv,
                        query,
                        qmask,
                        response,
                        rmask,
                        perm0,
                        cfg.micro_batch_size,
                        cfg.temperature,
                        need_logprobs=run.recompute_old,
                    )
                old_logp = recomputed if run.recompute_old else ro.logprobs
            t_values = time.time() - t_start - t_gen

            # 2. score ------------------------------------------------------------------------------
            t0 = time.time()
            texts = decode_responses(run.tokenizer, response, rmask, ro.has_stop)
            prompts = [run.train_prompts[i]["prompt"] for i in idx]
            with amp():
                raw_scores = run.reward_fn(prompts, texts, ro.has_stop.tolist())
            # an ensemble's spread per response: large where the policy leaves what its members learned
            disagreement = getattr(run.reward_fn, "last_disagreement", None)
            raw = torch.as_tensor(raw_scores, dtype=torch.float32).reshape(-1).to(device)
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
            # in the first epoch's micro-batches too (same padding as the policy's pass)
            with torch.no_grad(), amp():
                ref_logp = torch.empty_like(mask_f)
                ref_logp[perm0] = run.ref_logprobs(query[perm0], qmask[perm0], response[perm0], rmask[perm0])
            t_score += time.time() - t0  # scoring passes: reward, values, reference
            t0 = time.time()
            with torch.no_grad():  # a user's reward function may hand back scores with a graph
                values, old_logp = values * mask_f, old_logp * mask_f
                kl = pm.kl_per_token(old_logp, ref_logp, cfg.kl_estimator) * mask_f
                beta = run.kl_ctl.value
                rewards, non_score = pm.kl_penalized_rewards(scores, kl, mask_f, beta)

            # 4. advantages -------------------------------------------------------------------------
            with torch.no_grad():
                adv, returns = pm.gae(rewards, values, mask_f, cfg.gamma, cfg.lam)  # returns before whitening
                if cfg.whiten_advantages:
                    adv = pm.masked_whiten(adv, mask_f)
            batch = UpdateBatch(
                query=query,
                query_mask=qmask,
                response=response,
                response_mask=rmask,
                mask=mask_f,
                has_stop=ro.has_stop,
                old_logprobs=old_logp,
                values=values,
                advantages=adv,
                returns=returns,
                raw_scores=raw,
                scores=scores,
                kl=kl,
                non_score_rewards=non_score,
                disagreement=disagreement,
            )

            # 5. PPO epochs of minibatch updates ---------------------------------------------------
            stats: dict[str, list[float]] = {k: [] for k in TRAIN_STATS}
            first_ratio = None
            for epoch in range(cfg.ppo_epochs):
                perm = (
                    perm0 if epoch == 0 else torch.randperm(local_batch, generator=run.shuffle_gen).to(device)
                )
                where = _where_stopped(update, epoch, last_good)
                for mb_start in range(0, local_batch, run.local_minibatch):
                    mb_stats = _accumulate_gradients(
                        run, batch, perm[mb_start : mb_start + run.local_minibatch], where
                    )
                    if epoch == 0 and mb_start == 0:
                        first_ratio = mb_stats["ratio"]
                    grad_norm = accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
                    stop_if_non_finite(grad_norm, "gradient norm", **where)
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
                    for key, val in mb_stats.items():
                        stats[key].append(val)
            t_train = time.time() - t0

            # 6. log --------------------------------------------------------------------------------
            metrics = update_metrics(run, batch, stats, first_ratio)
            if not all(math.isfinite(v) for v in metrics.values()):
                raise NonFiniteError(
                    f"non-finite training statistics at update {update} "
                    f"(last good checkpoint: {last_good or 'none'})"
                )
            elapsed = time.time() - t_start
            metrics.update(
                {
                    "objective/kl_coef": beta,
                    "lr": run.scheduler.get_last_lr()[0],
                    "episodes": update * cfg.batch_size,
                    "time/generate_s": t_gen,
                    "time/score_s": t_score,
                    "time/train_s": t_train,
                    "perf/episodes_per_s": cfg.batch_size / elapsed,
                    "perf/tokens_per_s": metrics["response/length_mean"] * cfg.batch_size / elapsed,
                }
            )
            run.kl_ctl.update(metrics["objective/kl"], cfg.batch_size)
            run.scheduler.step()
            tracker.log(metrics, step=update)
            run.history.append({"_episode": update * cfg.batch_size, **metrics})
            last_metrics = metrics
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}")

            if (
                cfg.sample_every
                and (update % cfg.sample_every == 0 or update == 1)
                and accelerator.is_main_process
            ):
                log_samples(run, update, prompts, texts, batch)
            if cfg.eval_every and update % cfg.eval_every == 0 and update != run.n_updates:
                last_eval = run.evaluate(update)
            stop = interrupt.requested
            if run.world > 1:  # a Ctrl-C seen by any process stops all of them after the same update
                stop = bool(accelerator.reduce(torch.tensor([float(stop)], device=device), "sum") > 0)
            if (cfg.save_every and update % cfg.save_every == 0) or stop or update == run.n_updates:
                last_good = run.checkpoint(update)
            if stop:
                interrupted = True
                accelerator.print(
                    f"ppo: interrupted after update {update}; checkpoint {last_good}. Resume with "
                    f"resume=auto (or resume={last_good}).",
                    flush=True,
                )
                break

    if not interrupted and run.held_out is not None and run.start_update < run.n_updates:
        last_eval = run.evaluate(run.n_updates)
    summary = run_summary(run, last_eval, last_metrics, interrupted, last_good)
    if accelerator.is_main_process:
        title = f"PPO on {cfg.experiment}: {run.reward_fn.name}"
        png = plot_curves(run.history, run.run_dir / "learning_curves.png", title)
        if png is not None:
            tracker.log_image("learning_curves", png)
            summary["learning_curves"] = str(png)
        if not interrupted:
            _write_policy(run)
            summary["policy_dir"] = str(run.out_dir)
        tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    accelerator.wait_for_everyone()
    tracker.finish()
    if accelerator.is_main_process and last_metrics:
        print(
            f"ppo: score {summary['objective/scores_first']:.4f} → {summary['objective/scores_last']:.4f}, "
            f"KL {summary['objective/kl_last']:.3f}, {summary['perf/episodes_per_s_mean']:.3f} episodes/s"
            + (f"; policy: {run.out_dir}" if not interrupted else ""),
            flush=True,
        )
    return summary


def _accumulate_gradients(
    run: PPORun, batch: UpdateBatch, mb_idx: torch.Tensor, where: dict[str, Any]
) -> dict[str, float]:
    """Forward and backward over the micro-batches of one minibatch (gradient accumulation; DDP
    syncs gradients on the last one). Losses are normalised by the minibatch's valid-token count,
    so the split does not change the update; the minibatch's statistics are weighted the same way."""
    cfg, accelerator, mask = run.cfg, run.accelerator, batch.mask
    n_tok = mask[mb_idx].sum().clamp(min=1.0)
    mb_stats = dict.fromkeys(TRAIN_STATS, 0.0)
    for m in range(run.accumulation):
        mi = mb_idx[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size]
        w = float(mask[mi].sum() / n_tok)  # this micro-batch's share of the minibatch's tokens
        sync = accelerator.no_sync(run.pv_train) if m < run.accumulation - 1 else contextlib.nullcontext()
        with sync:
            with run.amp():
                logits, vpred = run.pv_train(
                    batch.query[mi], batch.query_mask[mi], batch.response[mi], batch.response_mask[mi]
                )
            new_logp, entropy = pm.logprobs_and_entropy(logits, batch.response[mi], cfg.temperature)
            pg_loss, st = pm.policy_loss(
                new_logp,
                batch.old_logprobs[mi],
                batch.advantages[mi],
                mask[mi],
                cfg.cliprange,
                n_tokens=n_tok,
            )
            vf_loss, vf_clipfrac = pm.value_loss(
                vpred, batch.values[mi], batch.returns[mi], mask[mi], cfg.cliprange_value, n_tokens=n_tok
            )
            loss = pg_loss + cfg.vf_coef * vf_loss
            stop_if_non_finite(loss, "loss", **where)
            accelerator.backward(loss)
        ent = pm.masked_mean(entropy, mask[mi])
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
    return mb_stats


def _where_stopped(update: int, epoch: int, last_good: Path | None) -> dict[str, Any]:
    """Where a non-finite loss or gradient stopped the run, for its error message."""
    return {
        "at": f"update {update}, epoch {epoch + 1}",
        "last_good": last_good,
        "hint": "Try a lower learning_rate or score_clip.",
    }


def _write_policy(run: PPORun) -> None:
    """The trained policy as a policy dir (LoRA merged) in ``run.out_dir``, logged as the run's model
    artifact."""
    cfg = run.cfg
    run.frozen_bf16.restore()  # the base in fp32 again: the adapter is merged into it
    final, base = policy_to_write(run.policy(), cfg.policy)
    meta = {
        "base": base,
        "stage": "ppo",
        "config_hash": config_hash(cfg),
        "lora_merged": cfg.lora,
        "config": to_dict(cfg),
    }
    write_policy_dir(final, run.tokenizer, run.out_dir, meta)
    run.tracker.log_artifact(
        run.out_dir,
        name=f"{cfg.experiment}-ppo-policy",
        type="model",
        metadata={"config_hash": meta["config_hash"]},
    )


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
