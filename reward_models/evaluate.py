"""``rlhf rm eval``: how good is a reward model, before PPO trusts it?

On held-out rankings (the ``eval_rankings.jsonl`` that ``rlhf rm train`` writes, or any rankings
file) it reports, in ``metrics.json``, ``metrics.jsonl`` and the W&B run:

- ``eval/pair_accuracy``: strict pairs (different tiers) the model orders the same way (equal
  rewards count ½);
- ``eval/tie_loglik``: mean log P(tie) on tied pairs, ``eval/pair_loglik``: mean log P(observed
  outcome) over every pair, ``eval/tie_accuracy``: pairs whose most likely outcome (win / tie /
  loss) is the observed one. For a Rao–Kupper or Davidson model these use its own θ / ν. A model
  trained without a tie model (bt, grouped_bt, plackett_luce) is given the Rao–Kupper θ that fits
  *these* pairs best (``eval/tie_theta_fitted``): an optimistic bound for it, so a tie-aware model
  that still scores higher is better for sure;
- ``eval/tie_loglik_fitted`` and ``eval/pair_loglik_fitted``: the same two with one tie model for
  every reward model (Rao–Kupper, θ fitted to these pairs): how well the rewards themselves put tied
  responses close together, apart from how well a learned θ / ν transfers to new prompts;
- ``eval/kendall_tau``: mean per-ranking Kendall τ-b between the rewards and the annotator's tiers
  (all-tied rankings give NaN and are counted in ``eval/tau_undefined``, not averaged);
- ``eval/ece``: expected calibration error of ``σ(r_a - r_b)`` as the probability that a beats b
  on strict pairs, with a reliability plot (``reliability.png``, logged as an image);
- ``eval/length_corr`` (Pearson) and ``eval/length_spearman``: reward vs response length in words,
  over unique responses — a warning sign of length hacking when high; ``eval/longer_preferred``: of
  the pairs of one prompt's answers that differ in length, the share whose longer answer the reward
  puts higher (0.5: length plays no part); with a gold, the gold's own (``eval/gold_...``), the
  reward's excess over it (``..._excess``), and its length correlation beyond what its agreement
  with the gold explains (``eval/length_corr_beyond``: an imperfect reward that is the best
  prediction of the gold correlates with length more than the gold by ``1 / corr(reward, gold)``),
  all with intervals (:mod:`reward_models.length_lean`);
- with simulated annotators (records carrying ``gold`` scores, or ``gold=SPEC`` to score now):
  ``eval/gold_pair_accuracy`` (the model against the gold scorer on pairs the gold scorer
  separates), ``eval/gold_spearman`` and ``eval/annotator_gold_accuracy`` (the annotators' own
  agreement with gold on the same pairs: the ceiling a model learning from them should approach);
- RewardBench 2's measures (Malik et al. 2025, arXiv 2506.01937) on the lab's rankings:
  ``eval/best_of_k_accuracy``, rankings with one best candidate whose best the model scores above
  all K - 1 others (chance ``eval/best_of_k_chance`` = 1/K), and ``eval/ties_score`` on rankings
  whose top tier is tied (:func:`ties_score` says how it is adapted); ``eval/gold_best_of_k_accuracy``
  with the gold's best candidate instead; all with 95 % bootstrap intervals over prompts;
- a table ``eval/worst_rankings`` of the rankings the model gets most wrong (lowest τ).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from scipy.stats import kendalltau, spearmanr

from reward_models import losses as L
from reward_models.length_lean import length_lean_metrics
from reward_models.train import DataReport, build_groups, read_records
from rlhf.cli import progress_bar
from rlhf.config import ConfigError, add_config_arguments, config_from_args, option
from rlhf.contracts import prompt_text
from rlhf.errors import UserError
from rlhf.reward_model import (
    encode_conversations,
    is_ensemble_dir,
    load_reward_model,
    read_ensemble,
    read_meta,
    score_ids,
)
from rlhf.rewards import load_reward_fn
from rlhf.scorers import get_scorer
from rlhf.stats import bootstrap_ci
from rlhf.tracking import RunFields, start_stage


@dataclass
class RMEvalConfig(RunFields):
    reward_model: str = option(
        "",
        help="reward-model dir (written by `rlhf rm train`), or an ensemble dir (`--ensemble N`), "
        "evaluated as the reward it gives: its members combined by its rule",
    )
    rankings: str = option("", help="held-out rankings file (e.g. runs/<exp>/rm_train/eval_rankings.jsonl)")
    gold: str = option(
        "", help="gold scorer spec to score candidates now (default: the records' own `gold` field)"
    )
    gold_tie_threshold: float = option(0.0, help="gold scores closer than this are not a gold preference")
    max_length: int = option(
        0,
        help="tokens per sequence (0 = the reward model's training max_length; an ensemble's members "
        "always use their own)",
    )
    batch_size: int = option(16, help="sequences per forward pass")
    n_bins: int = option(10, help="calibration bins")
    worst_n: int = option(10, help="rows in the worst-ranked table")
    seed: int = option(0, help="random seed (unused: evaluation is deterministic)")

    def validate(self) -> None:
        if not self.reward_model:
            raise ConfigError("rm eval: reward_model is required (a dir written by `rlhf rm train`)")
        if not self.rankings:
            raise ConfigError("rm eval: rankings is required (a held-out rankings file)")
        if self.n_bins < 1 or self.batch_size < 1 or self.worst_n < 0:
            raise ConfigError("n_bins and batch_size must be ≥ 1, worst_n ≥ 0")


# ----------------------------------------------------------------------------- pure metrics


def expected_calibration_error(p: torch.Tensor, y: torch.Tensor, n_bins: int) -> tuple[float, list[dict]]:
    """ECE of predicted probabilities ``p [N]`` against outcomes ``y [N]`` (0/1), equal-width bins.

    Returns ``(ece, bins)`` with per-bin ``{lo, hi, n, confidence, accuracy}``.
    """
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.clamp(torch.bucketize(p.double(), edges, right=True) - 1, 0, n_bins - 1)
    bins, ece, n = [], 0.0, max(len(p), 1)
    for b in range(n_bins):
        m = idx == b
        cnt = int(m.sum())
        conf = float(p[m].double().mean()) if cnt else float("nan")
        acc = float(y[m].double().mean()) if cnt else float("nan")
        if cnt:
            ece += cnt / n * abs(acc - conf)
        bins.append(
            {"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": cnt, "confidence": conf, "accuracy": acc}
        )
    return ece, bins


def fit_rao_kupper_theta(d_strict: torch.Tensor, d_tie: torch.Tensor) -> float:
    """The θ ≥ 1 maximising the Rao–Kupper likelihood of strict pairs (``d`` = r_w - r_l) and ties
    (``d`` = r_a - r_b), by a grid over log θ (one parameter, so a grid is exact enough)."""
    best, best_ll = 1.0, -math.inf
    for lt in torch.linspace(1e-3, 6.0, 600, dtype=torch.float64):
        lw, _, _ = L.rao_kupper_log_probs(d_strict.double(), torch.zeros(()), lt)
        _, _, ltie = L.rao_kupper_log_probs(d_tie.double(), torch.zeros(()), lt)
        ll = float(lw.sum() + ltie.sum())
        if ll > best_ll:
            best, best_ll = math.exp(float(lt)), ll
    return best


def ratio_of_sums(units: list[tuple[float, float]]) -> float:
    """``Σ numerators / Σ denominators`` over per-prompt ``(right, total)`` pairs (NaN if no total)."""
    total = sum(t for _, t in units)
    return sum(r for r, _ in units) / total if total else float("nan")


def units_by_prompt(
    right: torch.Tensor, total: torch.Tensor, prompt_of_row: torch.Tensor, n_prompts: int
) -> list[tuple[float, float]]:
    """Per-prompt ``(Σ right, Σ total)`` over the rows of each prompt (any trailing dims summed):
    the units :func:`rlhf.stats.bootstrap_ci` resamples, since pairs of one prompt are not
    independent."""

    def summed(x: torch.Tensor) -> list[float]:
        per_row = x.reshape(len(prompt_of_row), -1).sum(1).double()
        return torch.zeros(n_prompts, dtype=torch.float64).index_add_(0, prompt_of_row, per_row).tolist()

    return list(zip(summed(right), summed(total)))


def best_of_k(rewards: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
    """RewardBench 2's accuracy unit, per ranking ``[R]``: 1 when the single best candidate (a top
    tier of one) scores strictly above every other candidate, else 0; NaN for a ranking with no
    single best (a tied top tier) or fewer than two candidates. Chance is 1/K.
    ``rewards``, ``tiers`` ``[R, K]`` (tier -1 = padding)."""
    valid = tiers >= 0
    top = valid & (tiers == 0)
    applies = (top.sum(1) == 1) & (valid.sum(1) >= 2)
    best = rewards.masked_fill(~top, -math.inf).max(1).values
    others = rewards.masked_fill(~valid | top, -math.inf).max(1).values
    return torch.where(applies, (best > others).double(), torch.nan)


def ties_outcomes(rewards: torch.Tensor, tiers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RewardBench 2's Ties units, per ranking whose top tier holds two or more tied candidates and
    something below them (NaN for the others): ``accurate``, every tied best above every other
    candidate; ``preferred``, the gap between the lowest tied best and the highest other larger than
    the spread among the tied best (the correct answers are told apart from the wrong ones more
    than from each other)."""
    valid = tiers >= 0
    top, rest = valid & (tiers == 0), valid & (tiers > 0)
    applies = (top.sum(1) >= 2) & (rest.sum(1) >= 1)
    lowest_top = rewards.masked_fill(~top, math.inf).min(1).values
    highest_top = rewards.masked_fill(~top, -math.inf).max(1).values
    highest_rest = rewards.masked_fill(~rest, -math.inf).max(1).values
    gap = lowest_top - highest_rest
    accurate = torch.where(applies, (gap > 0).double(), torch.nan)
    preferred = torch.where(applies, (gap > highest_top - lowest_top).double(), torch.nan)
    return accurate, preferred


def ties_score(units: list[tuple[float, float, float]]) -> float:
    """RewardBench 2's Ties score from per-prompt ``(Σ accurate, Σ preferred, rankings)``: 0.6 ·
    accuracy + 0.4 · preferred. RewardBench 2 weighs these 0.30 and 0.20 and gives the other half to
    terms that compare each tied prompt with a paired single-answer version of it, which rankings do
    not have; the two kept terms are rescaled to sum to 1."""
    n = sum(u[2] for u in units)
    return (0.6 * sum(u[0] for u in units) + 0.4 * sum(u[1] for u in units)) / n if n else float("nan")


def rewardbench2_metrics(
    rewards: torch.Tensor,
    tiers: torch.Tensor,
    prompt_of_row: torch.Tensor,
    n_prompts: int,
    seed: int,
    key: str,
) -> dict[str, float]:
    """``eval/{key}best_of_k_accuracy`` and ``eval/{key}ties_score`` with 95 % bootstrap intervals over
    prompts, and how many rankings each covers (keys absent when none applies)."""
    metrics: dict[str, float] = {}
    won = best_of_k(rewards, tiers)
    counted = ~won.isnan()
    if counted.any():
        units = units_by_prompt(won.nan_to_num(0.0), counted.double(), prompt_of_row, n_prompts)
        metrics.update(bootstrap_ci(units, ratio_of_sums, seed=seed).as_dict(f"eval/{key}best_of_k_accuracy"))
        metrics[f"eval/{key}best_of_k_rankings"] = int(counted.sum())
        metrics[f"eval/{key}best_of_k_chance"] = float((1 / (tiers >= 0).sum(1).double())[counted].mean())
    accurate, preferred = ties_outcomes(rewards, tiers)
    counted = ~accurate.isnan()
    if counted.any():
        sums = [
            units_by_prompt(x.nan_to_num(0.0), counted.double(), prompt_of_row, n_prompts)
            for x in (accurate, preferred)
        ]
        units = [(a, p, n) for (a, n), (p, _) in zip(*sums)]
        metrics.update(bootstrap_ci(units, ties_score, seed=seed).as_dict(f"eval/{key}ties_score"))
        metrics[f"eval/{key}ties_rankings"] = int(counted.sum())
    return metrics


def _logliks(
    lw: torch.Tensor, lt: torch.Tensor, beats: torch.Tensor, ties: torch.Tensor
) -> tuple[float, float]:
    """Mean log P(tie) over the tied pairs, and mean log P(observed outcome) over every pair
    (NaN where there is none)."""
    tie = float(lt[ties].mean()) if int(ties.sum()) else float("nan")
    observed = torch.cat([lw[beats], lt[ties]])
    return tie, float(observed.mean()) if observed.numel() else float("nan")


def _rank_string(labels: list[str], rewards: list[float]) -> str:
    order = sorted(range(len(labels)), key=lambda i: -rewards[i])
    return " > ".join(labels[i] for i in order)


# ----------------------------------------------------------------------------- the run


def reliability_plot(bins: list[dict], ece: float, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    xs = [(b["lo"] + b["hi"]) / 2 for b in bins if b["n"]]
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(
        xs,
        [b["accuracy"] for b in bins if b["n"]],
        width=1 / len(bins),
        alpha=0.6,
        edgecolor="black",
        label="observed win rate",
    )
    ax.plot(xs, [b["confidence"] for b in bins if b["n"]], "o", color="C3", label="mean predicted")
    ax.set_xlabel("predicted P(a beats b) = σ(r_a - r_b)")
    ax.set_ylabel("observed frequency a beats b")
    ax.set_title(f"{title}\nECE = {ece:.3f}", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def score_one_model(
    cfg: RMEvalConfig, prompts: list, texts: list[str], finished: list[bool]
) -> tuple[torch.Tensor, float, float, int]:
    """``(raw scores, offset, scale, sequences truncated)`` of one reward model: its raw scores, and the
    normalisation it stored, which the reported scores and length correlation apply."""
    model, tokenizer, meta = load_reward_model(cfg.reward_model)
    max_length = cfg.max_length or int(meta.get("max_length", 512))
    norm = meta.get("normalization") or {}
    offset, scale = float(norm.get("offset", 0.0)), float(norm.get("scale", 1.0)) or 1.0
    enc = encode_conversations(tokenizer, prompts, texts, max_length, finished)
    with progress_bar(len(enc.ids), "rm eval: scoring", "seq") as bar:
        raw = score_ids(
            model, enc.ids, tokenizer.pad_token_id, cfg.batch_size, starts=enc.starts, on_batch=bar.update
        )
    return raw, offset, scale, enc.truncated


def score_ensemble(
    cfg: RMEvalConfig, prompts: list, texts: list[str], finished: list[bool]
) -> tuple[torch.Tensor, float, float, int]:
    """The same for an ensemble dir (``rlhf rm train --ensemble N``): the reward PPO would get from it,
    every member normalised on its own and combined by the dir's rule, so offset 0 and scale 1."""
    reward = load_reward_fn(cfg.reward_model, batch_size=cfg.batch_size)
    print(f"rm eval: scoring {len(texts)} responses with {reward.name}", flush=True)
    scores = reward(prompts, texts, finished).double()
    return scores, 0.0, 1.0, max(member.truncated for member in reward.members)


def run_rm_eval(cfg: RMEvalConfig) -> dict:
    """Score held-out rankings with a reward model and write every metric (module docstring)."""
    cfg.validate()
    ensemble = read_ensemble(cfg.reward_model) if is_ensemble_dir(cfg.reward_model) else None
    # fail before anything heavy on a wrong dir; an ensemble's members were trained with one loss
    meta = read_meta(ensemble["members"][0] if ensemble else cfg.reward_model)
    records = read_records(cfg.rankings)
    # an ensemble has no tie model of its own: it is measured under the θ fitted to these pairs
    loss = f"ensemble of {len(ensemble['members'])}" if ensemble else meta.get("loss", "grouped_bt")
    report = DataReport()
    groups = build_groups(records, report, "plackett_luce")  # keep all-tied rankings: they test ties
    if not groups:
        raise UserError(
            f"{cfg.rankings}: no usable rankings to evaluate ({report.records} records; "
            + "; ".join(x.strip() for x in report.lines()[1:3])
            + ")",
            code="no_data",
        )
    if report.used_rankings < report.records:
        for line in report.lines():
            print(line.replace("data:", "eval data:", 1), flush=True)
    tracker = start_stage(cfg, "rm_eval", job_type="reward_model_eval")
    try:
        tracker.use_artifact(cfg.rankings, "eval-rankings", "dataset")
        tracker.use_artifact(cfg.reward_model, "reward-model", "model")
        flat_prompts, flat_texts, flat_finished, where = [], [], [], []
        for gi, g in enumerate(groups):
            for ci, t in enumerate(g.texts):
                flat_prompts.append(g.prompt)
                flat_texts.append(t)
                flat_finished.append(g.finished[ci] if g.finished else True)
                where.append((gi, ci))
        score = score_ensemble if ensemble else score_one_model
        raw, offset, scale, truncated = score(cfg, flat_prompts, flat_texts, flat_finished)
        kmax = max(g.k for g in groups)
        grid = torch.zeros(len(groups), kmax, dtype=torch.float64)
        for (gi, ci), r in zip(where, raw.tolist()):
            grid[gi, ci] = r

        # every ranking as a row: rewards [R, K], tiers [R, K]
        rows, tiers_l, owners = [], [], []
        for gi, g in enumerate(groups):
            for rec, tr in zip(g.records, g.rankings):
                rows.append(gi)
                tiers_l.append(tr + [-1] * (kmax - g.k))
                owners.append((g, rec, tr))
        rewards = grid[torch.tensor(rows)]
        tiers = torch.tensor(tiers_l, dtype=torch.long)
        beats, ties = L.pair_masks(tiers)
        d = rewards[:, :, None] - rewards[:, None, :]
        metrics: dict[str, float] = {"eval/rankings": len(rows), "eval/prompts": len(groups)}

        # strict pairs: accuracy
        n_strict = int(beats.sum())
        metrics["eval/pairs"] = n_strict
        metrics["eval/ties"] = int(ties.sum())
        metrics["eval/pair_accuracy"] = (
            float(((d > 0).double() + 0.5 * (d == 0).double())[beats].sum() / n_strict)
            if n_strict
            else float("nan")
        )
        right = ((d > 0).double() + 0.5 * (d == 0).double()) * beats
        row_group = torch.tensor(rows)
        per_prompt = units_by_prompt(right, beats, row_group, len(groups))
        metrics.update(bootstrap_ci(per_prompt, ratio_of_sums, seed=cfg.seed).as_dict("eval/pair_accuracy"))

        # ties: log-likelihoods and 3-way accuracy under the model's tie model
        d_strict, d_tie = d[beats], d[ties]
        # the Rao–Kupper θ that fits these pairs best: the tie model of a model trained without one,
        # and the common tie model every model is also measured under (the *_fitted figures)
        theta_fit = fit_rao_kupper_theta(d_strict, d_tie)
        if loss == "davidson":
            log_nu = torch.tensor(math.log(float(meta.get("nu", 1.0))), dtype=torch.float64)
            probs = lambda a, b: L.davidson_log_probs(a, b, log_nu)  # noqa: E731
            metrics["eval/tie_nu"] = float(meta.get("nu", 1.0))
        else:
            if loss == "rao_kupper":
                theta = float(meta.get("theta", 2.0))
            else:
                theta = theta_fit
                metrics["eval/tie_theta_fitted"] = theta
            log_theta = torch.tensor(math.log(theta), dtype=torch.float64)
            probs = lambda a, b: L.rao_kupper_log_probs(a, b, log_theta)  # noqa: E731
            metrics["eval/tie_theta"] = theta
        ri, rj = rewards[:, :, None].expand_as(d), rewards[:, None, :].expand_as(d)
        lw, ll, lt = probs(ri, rj)
        metrics["eval/tie_loglik"], metrics["eval/pair_loglik"] = _logliks(lw, lt, beats, ties)
        three = torch.stack([lw, ll, lt], dim=-1).argmax(-1)  # 0 = i wins, 1 = j wins, 2 = tie
        correct = int((three[beats] == 0).sum()) + int((three[ties] == 2).sum())
        metrics["eval/tie_accuracy"] = correct / max(n_strict + int(ties.sum()), 1)
        metrics["eval/tie_recall"] = (
            float((three[ties] == 2).double().mean()) if int(ties.sum()) else float("nan")
        )
        # the same tie model for every reward model: how well the rewards themselves separate ties
        # from wins, whatever each model's own θ / ν learned (or did not learn) in training
        lw_f, _, lt_f = L.rao_kupper_log_probs(ri, rj, torch.tensor(math.log(theta_fit), dtype=torch.float64))
        metrics["eval/tie_loglik_fitted"], metrics["eval/pair_loglik_fitted"] = _logliks(
            lw_f, lt_f, beats, ties
        )

        # calibration: every strict pair oriented by label order, so outcomes are both 0 and 1
        upper = torch.ones(kmax, kmax, dtype=torch.bool).triu(1)
        strict_any = (beats | beats.transpose(1, 2)) & upper
        p = torch.sigmoid(d[strict_any])
        y = beats[strict_any].double()
        ece, bins = expected_calibration_error(p, y, cfg.n_bins)
        metrics["eval/ece"] = ece
        plot = reliability_plot(
            bins,
            ece,
            Path(tracker.run_dir) / "reliability.png",
            f"{Path(cfg.reward_model).name} ({loss}) on {n_strict} strict pairs",
        )
        tracker.log_image("eval/reliability", plot)

        # RewardBench 2's best-of-K accuracy and Ties score on the annotators' rankings
        metrics.update(rewardbench2_metrics(rewards, tiers, row_group, len(groups), cfg.seed, ""))

        # Kendall τ-b per ranking
        taus = []
        table = []
        for r, (g, rec, tr) in enumerate(owners):
            rs = rewards[r, : g.k].tolist()
            tau = kendalltau(rs, [-t for t in tr]).statistic if len(set(tr)) > 1 else float("nan")
            taus.append(tau)
            table.append(
                [
                    g.prompt_id,
                    prompt_text(g.prompt)[:300],
                    rec.get("ranking", ""),
                    _rank_string(g.labels, rs),
                    None if math.isnan(tau) else round(float(tau), 4),
                    json.dumps({lab: round((x - offset) / scale, 3) for lab, x in zip(g.labels, rs)}),
                    str(rec.get("annotator", "")),
                ]
            )
        defined = [t for t in taus if not math.isnan(t)]
        metrics["eval/kendall_tau"] = sum(defined) / len(defined) if defined else float("nan")
        metrics["eval/tau_undefined"] = len(taus) - len(defined)
        tau = torch.tensor(taus, dtype=torch.float64)
        tau_defined = ~tau.isnan()
        per_prompt = units_by_prompt(tau.nan_to_num(0.0), tau_defined, row_group, len(groups))
        metrics.update(bootstrap_ci(per_prompt, ratio_of_sums, seed=cfg.seed).as_dict("eval/kendall_tau"))

        # reward vs length over unique responses (with the gold's own, below)
        lengths = [len(t.split()) for t in flat_texts]
        norm_scores = ((raw.double() - offset) / scale).tolist()
        length_varies = len(set(lengths)) > 1 and len(set(norm_scores)) > 1
        if length_varies:
            metrics["eval/length_spearman"] = float(spearmanr(norm_scores, lengths).statistic)
        metrics["eval/reward_mean"] = float(sum(norm_scores) / len(norm_scores))
        metrics["eval/truncated"] = truncated

        # agreement with the gold scorer
        gold = None
        if cfg.gold:
            scorer = get_scorer(cfg.gold)
            gs = scorer([prompt_text(p) for p in flat_prompts], flat_texts)
            gold = torch.zeros(len(groups), kmax, dtype=torch.float64)
            for (gi, ci), s in zip(where, gs):
                gold[gi, ci] = float(s)
        elif all(isinstance(g.records[0].get("gold"), dict) for g in groups):
            gold = torch.zeros(len(groups), kmax, dtype=torch.float64)
            for gi, g in enumerate(groups):
                for ci, lab in enumerate(g.labels):
                    gold[gi, ci] = float(g.records[0]["gold"].get(lab, float("nan")))
        valid = torch.zeros(len(groups), kmax, dtype=torch.bool)
        length_grid = torch.zeros(len(groups), kmax, dtype=torch.long)
        for gi, g in enumerate(groups):
            valid[gi, : g.k] = True
        for (gi, ci), n_words in zip(where, lengths):
            length_grid[gi, ci] = n_words
        gold_varies = False
        if gold is not None:
            gd = gold[:, :, None] - gold[:, None, :]
            gbeats = (gd > cfg.gold_tie_threshold) & valid[:, :, None] & valid[:, None, :]
            md = grid[:, :, None] - grid[:, None, :]
            n_gold = int(gbeats.sum())
            if n_gold:
                model_right = ((md > 0).double() + 0.5 * (md == 0).double()) * gbeats
                metrics["eval/gold_pair_accuracy"] = float(model_right.sum() / n_gold)
                every_prompt = torch.arange(len(groups))
                per_prompt = units_by_prompt(model_right, gbeats, every_prompt, len(groups))
                metrics.update(
                    bootstrap_ci(per_prompt, ratio_of_sums, seed=cfg.seed).as_dict("eval/gold_pair_accuracy")
                )
                # the annotators on the same gold pairs: strictly right = 1, tied = ½
                gb = gbeats[row_group]
                ti, tj = tiers[:, :, None], tiers[:, None, :]
                ann_right = ((ti < tj).double() + 0.5 * (ti == tj).double()) * gb
                metrics["eval/annotator_gold_accuracy"] = float(ann_right.sum() / gb.sum())
                per_prompt = units_by_prompt(ann_right, gb, row_group, len(groups))
                metrics.update(
                    bootstrap_ci(per_prompt, ratio_of_sums, seed=cfg.seed).as_dict(
                        "eval/annotator_gold_accuracy"
                    )
                )
                metrics["eval/gold_pairs"] = n_gold
            # best-of-K against the gold: its best candidate (where it has one best) scored highest
            gold_tiers = torch.where(
                valid, (gold < gold.masked_fill(~valid, -math.inf).amax(1, keepdim=True)).long(), -1
            )
            every_prompt = torch.arange(len(groups))
            metrics.update(
                rewardbench2_metrics(grid, gold_tiers, every_prompt, len(groups), cfg.seed, "gold_")
            )
            flat_gold = gold[valid].tolist()
            gold_varies = len(set(flat_gold)) > 1
            if gold_varies:
                metrics["eval/gold_spearman"] = float(spearmanr(grid[valid].tolist(), flat_gold).statistic)
        if length_varies:
            # how much the reward leans on length, and the gold's own: a reward should not lean more
            metrics.update(
                length_lean_metrics(
                    grid, gold if gold_varies else None, length_grid, valid, cfg.gold_tie_threshold, cfg.seed
                )
            )

        worst = sorted([row for row in table if row[4] is not None], key=lambda row: row[4])[: cfg.worst_n]
        tracker.log_table(
            "eval/worst_rankings",
            [
                "prompt_id",
                "prompt",
                "annotator_ranking",
                "model_ranking",
                "kendall_tau",
                "rewards_normalised",
                "annotator",
            ],
            worst,
        )
        tracker.log(metrics, step=0)
        tracker.summary(metrics)
        run_dir = Path(tracker.run_dir)
        (run_dir / "metrics.json").write_text(
            json.dumps(
                {
                    "metrics": metrics,
                    "calibration_bins": bins,
                    "reward_model": str(cfg.reward_model),
                    "loss": loss,
                },
                indent=2,
                default=str,
            )
        )
    finally:
        tracker.finish()
    _print(metrics, run_dir)
    return {
        "run_dir": str(run_dir),
        "metrics_file": str(run_dir / "metrics.json"),
        "plot": str(plot),
        **metrics,
    }


def _print(metrics: dict, run_dir: Path) -> None:
    keys = [
        "eval/pair_accuracy",
        "eval/tie_loglik",
        "eval/tie_accuracy",
        "eval/kendall_tau",
        "eval/ece",
        "eval/length_corr",
        "eval/length_corr_beyond",
        "eval/longer_preferred",
        "eval/gold_pair_accuracy",
        "eval/annotator_gold_accuracy",
        "eval/best_of_k_accuracy",
        "eval/ties_score",
    ]

    def fmt(k: str) -> str:
        low, high = metrics.get(k + "_ci_low"), metrics.get(k + "_ci_high")
        ci = f" [{low:.3f}, {high:.3f}]" if low is not None and not math.isnan(low) else ""
        return f"{k.split('/')[1]} {metrics[k]:.3f}{ci}"

    parts = [fmt(k) for k in keys if k in metrics and not math.isnan(metrics[k])]
    print(
        f"rm eval: {int(metrics['eval/rankings'])} rankings, {int(metrics['eval/pairs'])} strict pairs, "
        f"{int(metrics['eval/ties'])} ties: " + ", ".join(parts) + f" → {run_dir}/metrics.json",
        flush=True,
    )


def add_parser(subparsers):
    p = subparsers.add_parser(
        "eval",
        help="evaluate a reward model on held-out rankings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, RMEvalConfig)
    p.set_defaults(func=lambda args: run_rm_eval(config_from_args(args, RMEvalConfig)) and 0)
    return p
