"""What a PPO run reports: the metrics of each update, its sample tables, the run's summary and its
learning curves. The metric names are those of docs/ppo.md ("Metrics")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from rlhf.contracts import prompt_text
from rlhf.ppo import math as pm
from rlhf.ppo.rollout import UpdateBatch
from rlhf.ppo.setup import PPORun
from rlhf.stats import mean_diff_ci, welch_ci


def update_metrics(
    run: PPORun, batch: UpdateBatch, stats: dict[str, list[float]], first_ratio: float | None
) -> dict[str, float]:
    """The statistics of one update, averaged over processes (``val/num_eos_tokens`` is summed).
    ``stats`` holds the PPO epochs' values per minibatch; ``first_ratio`` is the first minibatch's
    mean ratio (1 when the old log-probs match training's forward: docs/ppo.md item 5)."""
    accelerator, mask = run.accelerator, batch.mask
    with torch.no_grad():
        kl_sum = batch.kl.sum(-1)
        non_score_sum = batch.non_score_rewards.sum(-1)
        lengths = mask.sum(-1)
        local = {
            "objective/scores": batch.scores.mean(),
            # the scores' second moment, a mean like the rest, so the batch's spread reduces
            # across processes: it becomes objective/scores_std below
            "objective/scores_sq": (batch.scores.double() ** 2).mean(),
            "objective/raw_scores": batch.raw_scores.mean(),
            "objective/kl": kl_sum.mean(),
            "objective/entropy": (-batch.old_logprobs * mask).sum(-1).mean(),
            "objective/non_score_reward": non_score_sum.mean(),
            "objective/rlhf_reward": (batch.scores + non_score_sum).mean(),
            "policy/approxkl_avg": _mean(stats["approxkl"]),
            "policy/clipfrac_avg": _mean(stats["clipfrac"]),
            "policy/entropy_avg": _mean(stats["entropy"]),
            "loss/policy_avg": _mean(stats["pg_loss"]),
            "loss/value_avg": _mean(stats["vf_loss"]),
            "val/clipfrac_avg": _mean(stats["vf_clipfrac"]),
            "val/ratio": _mean(stats["ratio"]),
            "val/ratio_var": _mean(stats["ratio_var"]),
            "val/ratio_first_minibatch": first_ratio,
            "val/explained_variance": pm.explained_variance(batch.values, batch.returns, mask),
            "val/num_eos_tokens": (batch.response == run.stop_id).sum().float(),
            "response/length_mean": lengths.mean(),
            "response/eos_rate": batch.has_stop.float().mean(),
            "val/advantage_mean": pm.masked_mean(batch.advantages, mask),
            "val/value_mean": pm.masked_mean(batch.values, mask),
            "val/return_mean": pm.masked_mean(batch.returns, mask),
        }
        if batch.disagreement is not None:
            local["objective/rm_disagreement"] = batch.disagreement.mean()
        names = list(local)
        vec = torch.tensor([float(local[k]) for k in names], device=accelerator.device)
        vec = accelerator.reduce(vec, reduction="mean") if run.world > 1 else vec
    metrics = {k: float(v) for k, v in zip(names, vec.tolist())}
    metrics["val/num_eos_tokens"] *= run.world  # a count over the whole batch, not a mean
    second_moment = metrics.pop("objective/scores_sq")
    # the spread of the update's rollout scores (over the whole batch, divisor n): what
    # score_gain's interval counts as the noise of a rollout
    metrics["objective/scores_std"] = max(second_moment - metrics["objective/scores"] ** 2, 0.0) ** 0.5
    return metrics


def log_samples(run: PPORun, update: int, prompts: list, texts: list[str], batch: UpdateBatch) -> None:
    """The ``samples`` table: the first ``num_samples`` episodes of this process, with their score,
    KL, gold score (when a gold scorer is set) and the reward ensemble's disagreement (if any)."""
    n = min(run.cfg.num_samples, run.local_batch)
    shown = [prompt_text(p) for p in prompts[:n]]
    gold = run.gold_fn(shown, texts[:n]) if run.gold_fn else [None] * n
    kl_sum = batch.kl.sum(-1)
    columns = ["step", "prompt", "response", "score", "kl", "gold_score"]
    rows = [[update, shown[i], texts[i], float(batch.scores[i]), float(kl_sum[i]), gold[i]] for i in range(n)]
    if batch.disagreement is not None:  # the ensemble's spread beside each score
        columns.append("rm_disagreement")
        rows = [row + [float(batch.disagreement[i])] for i, row in enumerate(rows)]
    run.tracker.log_table("samples", columns, rows, step=update)


def run_summary(
    run: PPORun,
    last_eval: dict[str, float],
    last_metrics: dict[str, float],
    interrupted: bool,
    last_good: Path | None,
) -> dict[str, Any]:
    """The run's ``summary.json`` values (the loop adds the curves' and the policy's paths)."""
    history = run.history
    summary: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "updates": len([h for h in history if "objective/scores" in h]),
        "interrupted": interrupted,
        "checkpoint": str(last_good) if last_good else "",
    }
    if last_metrics:  # this run made at least one update
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
    summary.update(score_gain(history, run.cfg.batch_size))
    return summary


def score_gain(history: list[dict], episodes_per_update: int) -> dict[str, float]:
    """Did the training score rise? The mean score of the last quarter of the updates' rollouts
    minus the first quarter's, with Welch's 95 % t interval (:func:`rlhf.stats.welch_ci`) that
    counts rollouts: each quarter's mean and variance are pooled from its updates'
    ``objective/scores`` and ``objective/scores_std`` over ``episodes_per_update`` rollouts each.

    Why rollouts, not updates: without learning the policy does not change, so every rollout is an
    independent draw of a prompt and an answer, and the interval is the noise of those draws. An
    interval over the updates' means (three a side for 15 updates) also counts the policy's drift
    within a quarter as noise, and with two or three degrees of freedom it is about three times as
    wide (docs/ppo.md). A history from before ``objective/scores_std`` was logged falls back to it.
    Needs ≥ 8 updates."""
    scored = [h for h in history if "objective/scores" in h]
    q = len(scored) // 4
    if q < 2:
        return {}
    first, last = scored[:q], scored[-q:]
    first_means, last_means = ([h["objective/scores"] for h in quarter] for quarter in (first, last))
    if all("objective/scores_std" in h for h in first + last):
        est = welch_ci(*_pooled(last, episodes_per_update), *_pooled(first, episodes_per_update))
    else:
        est = mean_diff_ci(last_means, first_means)
    return {
        **est.as_dict("ppo/score_gain"),
        "ppo/score_first_quarter": _mean(first_means),
        "ppo/score_last_quarter": _mean(last_means),
    }


def _pooled(updates: list[dict], n: int) -> tuple[float, float, int]:
    """Mean, sample variance and count of the rollouts of ``updates``, each ``n`` rollouts with
    its mean and standard deviation (divisor n): the moments of the rollouts taken together."""
    means = [h["objective/scores"] for h in updates]
    second = [h["objective/scores_std"] ** 2 + m**2 for h, m in zip(updates, means)]
    total = n * len(updates)
    mean = _mean(means)
    variance = (_mean(second) - mean**2) * total / (total - 1)
    return mean, max(variance, 0.0), total


def plot_curves(history: list[dict], path: Path, title: str = "PPO learning curves") -> Path | None:
    """Learning curves (scores, KL, held-out evaluation) as one titled PNG, two rows of panels. On the
    training score, the first and last quarters of the updates are shaded: their difference is the
    ``ppo/score_gain`` of the summary."""
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
    # A Figure without pyplot: no global backend or figure registry (the Agg canvas writes the PNG)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
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
    return path


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
