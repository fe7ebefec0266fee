"""``rlhf rm train``: a reward model from whole rankings with ties.

One batch element is one *prompt*: its K candidates are encoded once, and every ranking of that
prompt (one per annotator) is scored against the same K rewards with the chosen loss
(``reward_models.losses``). So each response is encoded once per prompt whatever the loss,
where a pairs-only trainer encodes it once per pair (K-1 times) per annotator.

The loop, top to bottom (:func:`run_rm_train`):

1. read the rankings, check every record, count and report what was wrong (one candidate,
   all tied, labels that do not match the candidates, empty responses, mixed K, too long);
2. split held-out prompts (by a hash of ``prompt_id``, so a prompt is never on both sides), and a
   validation slice of the training prompts that alone decides when to stop;
3. format every (prompt, response) with the policy's chat template, tokenize, truncate from the
   prompt side;
4. with frozen lower layers, compute their hidden states once (the cache);
5. epochs of length-bucketed batches, gradient accumulation, AdamW with warm-up, under
   ``accelerate`` (``accelerate launch --config_file experiments/accelerate/cpu_2proc.yaml`` on
   CPU: each process owns a fixed shard of prompts, gradients are all-reduced);
6. evaluate on the validation prompts every ``eval_every`` steps; keep the best validation loss;
   stop early after ``patience`` evaluations without improvement; score the held-out prompts once
   at the end (never used to choose anything); checkpoint every ``save_every`` steps
   (``resume=true`` continues from the latest one);
7. normalise: score reference-policy samples, store offset/scale so they have mean 0, std 1;
8. write the reward-model dir (HF model + tokenizer + ``rlhf_reward.json``) and log it as the
   run's output artifact (the rankings file is the input artifact).

Metrics (``metrics.jsonl`` and W&B): ``train/loss`` (mean ranking loss of the step),
``train/lr``, ``train/tie_theta`` or ``train/tie_nu`` (learned tie parameter), ``train/rankings_per_s``;
``val/loss`` and ``val/pair_accuracy`` (validation prompts, during training), ``eval/loss`` and
``eval/pair_accuracy`` (held-out prompts, at the end: strict pairs ordered correctly, reward ties
count ½); ``data/*`` the input report; ``norm/offset``, ``norm/scale``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from reward_models import losses as L
from rlhf.config import ConfigError, add_config_arguments, config_from_args, option, to_dict
from rlhf.distributed import require_data_parallel
from rlhf.errors import UserError
from rlhf.models import MIXED_PRECISION, MIXED_PRECISION_HELP, autocast_bf16, use_bf16
from rlhf.nonfinite import gradient_norm, stop_if_non_finite
from rlhf.rewards import parse_ensemble_rule
from rlhf.tracking import Tracker, TrackingConfig, stage_run_dir, start_stage

# ----------------------------------------------------------------------------- config


@dataclass
class RMTrainConfig:
    rankings: str = option("", help="rankings file (JSONL of the rankings contract, or a dataset dir)")
    eval_rankings: str = option(
        "", help="held-out rankings file; empty = split eval_fraction of the prompts off"
    )
    skip_bad_rows: bool = option(
        False,
        help="leave out rankings that break the rankings contract (counted in data/bad_rows) instead "
        "of stopping with exit 2 and a list of every bad row with its line number",
    )
    eval_fraction: float = option(0.2, help="fraction of prompts held out when eval_rankings is empty")
    val_fraction: float = option(
        0.1,
        help="fraction of the training prompts set aside to choose when to stop and which step to keep "
        "(early stopping); the held-out prompts are scored once, at the end, so the figures "
        "reported on them were not used to pick the model (0 = no validation: train all steps)",
    )
    model: str = option(
        "tiny", help="backbone causal LM: tiny, smollm2-135m-instruct, a local dir or a Hub id"
    )
    loss: str = option(
        "grouped_bt",
        help="bt (pairs weigh equally), grouped_bt (InstructGPT), rao_kupper, "
        "davidson (ties), plackett_luce (listwise, ties as tiers)",
        choices=L.LOSSES,
    )
    margin: float = option(0.0, help="Bradley–Terry margin m in -log σ(r_w - r_l - m) (bt, grouped_bt)")
    theta: float | None = option(
        None,
        help="Rao–Kupper θ (> 1): initial value, or the fixed value when learn_tie_param=false "
        "(null: from the training rankings' tie rate t, θ = (1 + t) / (1 - t))",
    )
    nu: float | None = option(
        None,
        help="Davidson ν (> 0): initial value, or the fixed value when learn_tie_param=false "
        "(null: from the training rankings' tie rate t, ν = 2t / (1 - t))",
    )
    learn_tie_param: bool = option(True, help="learn θ / ν with the model (else keep them fixed)")
    tie_lr: float = option(
        0.02,
        help="AdamW learning rate of the learned θ / ν (one scalar: at the model's lr it would "
        "hardly move from its initial value within a run)",
    )
    center_coef: float = option(0.0, help="reward centring: adds coef · mean(r)² to the loss (0 = off)")
    trainable: str = option(
        "top",
        help="top: only the top_layers decoder layers + head train (lower layers "
        "frozen and cached); full: all weights; lora: LoRA adapters + head",
        choices=("top", "full", "lora"),
    )
    top_layers: int = option(2, help="trainable=top: how many top decoder layers train (0 = head only)")
    layers: int = option(
        0,
        help="keep only the backbone's first N decoder layers (0 = all); the middle layers of a "
        "small model carry more of a response's content than its last ones",
    )
    pooling: str = option(
        "mean",
        help="what the scalar head reads: mean = the mean over the response tokens (a per-token "
        "reward, averaged); last = the last token (InstructGPT)",
        choices=("mean", "last"),
    )
    cache_hidden: bool = option(
        True, help="trainable=top: compute the frozen layers once and reuse them every epoch"
    )
    lora_r: int = option(8, help="LoRA rank")
    lora_alpha: int = option(16, help="LoRA alpha")
    lora_targets: list[str] = option(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], help="LoRA target module names"
    )
    max_length: int = option(
        256, help="tokens per (prompt, response); longer ones lose the start of the prompt"
    )
    batch_size: int = option(8, help="prompts (ranking groups) per micro-batch")
    grad_accum: int = option(1, help="micro-batches per optimizer step")
    lr: float = option(1e-4, help="AdamW learning rate")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_steps: int = option(0, help="linear learning-rate warm-up steps")
    epochs: float = option(3.0, help="passes over the training prompts")
    max_steps: int = option(0, help="stop after this many optimizer steps (0 = epochs decide)")
    max_time_s: float = option(0.0, help="stop after this many seconds of training (0 = no limit)")
    eval_every: int = option(
        20, help="evaluate on the validation prompts every N optimizer steps (0 = only at the end)"
    )
    patience: int = option(
        0, help="early stopping: stop after N evaluations without a better validation loss (0 = off)"
    )
    save_every: int = option(0, help="checkpoint every N optimizer steps (0 = off)")
    resume: bool = option(False, help="continue from the latest checkpoint in the run dir")
    normalize: bool = option(True, help="store offset/scale so reference-policy samples score mean 0, std 1")
    norm_policy: str = option(
        "",
        help="reference policy to sample fresh responses from for normalisation "
        "(empty = the candidates of the training rankings)",
    )
    norm_prompts: int = option(64, help="norm_policy: prompts to sample for normalisation")
    norm_max_new_tokens: int = option(48, help="norm_policy: tokens per sampled response")
    score_batch_size: int = option(16, help="sequences per forward pass when scoring without gradients")
    mixed_precision: str = option(
        "auto",
        help="forwards under bf16 autocast (weights, gradients and AdamW stay fp32). " + MIXED_PRECISION_HELP,
        choices=MIXED_PRECISION,
    )
    out: str = option("", help="reward-model dir to write (default: <run_dir>/model)")
    ensemble: int = option(
        1,
        help="train N reward models in this stage, on the same rankings and held-out prompts; they "
        "differ in seed (head and LoRA initialisation, data order) and, with ensemble_layers, in "
        "backbone depth. The model dir then holds member-0..N-1 and rlhf_ensemble.json, and works "
        "as a reward anywhere (docs/reward-models.md, Ensembles)",
    )
    ensemble_layers: list[int] = option(
        default_factory=list,
        help="`layers` of each member, cycled (e.g. [0, 16, 12]; 0 = all): members that differ in "
        "more than the seed disagree more usefully (Eisenstein et al. 2023)",
    )
    ensemble_reward: str = option(
        "mean",
        help="how the ensemble dir scores when named alone as a reward: mean, min or "
        "mean_minus_std[=k]; a reward spec ensemble:RULE:DIR overrides it",
    )
    seed: int = option(0, help="random seed")
    experiment: str = option("default", help="experiment name (W&B group; runs/<experiment>/)")
    runs_dir: str = option("runs", help="root folder of run directories")
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        if not self.rankings:
            raise ConfigError(
                "rm train: rankings is required (a rankings JSONL file, e.g. from `rlhf simulate`)"
            )
        if not 0 < self.eval_fraction < 1 and not self.eval_rankings:
            raise ConfigError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.loss == "rao_kupper" and self.theta is not None and self.theta <= 1:
            raise ConfigError(f"theta must be > 1 for rao_kupper (θ = 1 allows no ties), got {self.theta}")
        if self.loss == "davidson" and self.nu is not None and self.nu <= 0:
            raise ConfigError(f"nu must be > 0 for davidson, got {self.nu}")
        if self.tie_lr <= 0:
            raise ConfigError(f"tie_lr must be > 0, got {self.tie_lr}")
        for name in ("batch_size", "grad_accum", "max_length", "score_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.top_layers < 0:
            raise ConfigError(f"top_layers must be ≥ 0, got {self.top_layers}")
        if self.layers < 0:
            raise ConfigError(f"layers must be ≥ 0 (0 = all), got {self.layers}")
        if self.lr <= 0 or self.epochs <= 0:
            raise ConfigError("lr and epochs must be > 0")
        if self.ensemble < 1:
            raise ConfigError(f"ensemble: {self.ensemble} must be ≥ 1 (1 = one reward model)")
        if any(n < 0 for n in self.ensemble_layers):
            raise ConfigError(f"ensemble_layers: {self.ensemble_layers} must be ≥ 0 each (0 = all)")
        too_shallow = [n for n in self.ensemble_layers if 0 < n < self.top_layers and self.trainable == "top"]
        if too_shallow:
            raise ConfigError(
                f"ensemble_layers: a member of {too_shallow[0]} layers cannot train its top_layers={self.top_layers}"
            )
        parse_ensemble_rule(self.ensemble_reward, "ensemble_reward")


# ----------------------------------------------------------------------------- reading and checking data


def read_records(source: str, *, skip_bad_rows: bool = False, report: DataReport | None = None) -> list[dict]:
    """The rankings of ``source`` (any source :mod:`rlhf.data` reads), each checked against the
    rankings contract (docs/rankings.md). As in every stage, a bad row stops the run: one error lists
    every bad row with its line number (exit 2). With ``skip_bad_rows`` they are left out instead,
    and counted in ``report`` (``data/bad_rows``, with a few of them as examples)."""
    # rlhf.data's reader keeps each row's line number and reports unreadable lines as rows too
    from rlhf.data import DataError, RowError, _read_source, validate_ranking

    rows = _read_source(source)
    errors = list(rows.errors)
    records = []
    for unit, number, rec in rows.rows:
        clean, problems = validate_ranking(rec)
        if clean is None:
            errors += [RowError(number, fld or None, msg, unit) for fld, msg in problems]
        else:
            records.append(clean)
    if not errors:
        return records
    errors.sort(key=lambda e: e.row or 0)
    if not skip_bad_rows:
        raise DataError.from_rows(rows.name, errors, "rankings")
    if report is not None:
        n_bad = len({(e.unit, e.row) for e in errors})
        report.records += n_bad
        report.bad_rows += n_bad
        report.examples += [f"{e} (skipped)" for e in errors[:3]]
    return records


@dataclass
class Group:
    """One prompt's candidates and every ranking of them (tier index per candidate, best = 0)."""

    prompt_id: str
    prompt: Any
    texts: list[str]
    labels: list[str]
    rankings: list[list[int]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # where each response starts in ids
    finished: list[bool] | None = None  # did each candidate end with EOS (None: all did)

    @property
    def k(self) -> int:
        return len(self.texts)

    @property
    def n_tokens(self) -> int:
        return sum(len(i) for i in self.ids)


@dataclass
class DataReport:
    """What was wrong with the input and what was done about it (printed and logged)."""

    records: int = 0
    used_rankings: int = 0
    prompts: int = 0
    bad_rows: int = 0  # rows that break the rankings contract, left out with skip_bad_rows
    one_candidate: int = 0
    label_mismatch: int = 0
    bad_record: int = 0
    all_tied: int = 0
    all_tied_dropped: int = 0
    empty_responses: int = 0
    truncated: int = 0
    response_truncated: int = 0
    k_counts: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def note(self, kind: str, row: int, message: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 5:
            self.examples.append(f"row {row}: {message}")

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        out = {f"{prefix}{k}": v for k, v in vars(self).items() if isinstance(v, int)}
        out[f"{prefix}mixed_k"] = int(len(self.k_counts) > 1)
        return out

    def lines(self) -> list[str]:
        ks = ", ".join(f"K={k}: {n}" for k, n in sorted(self.k_counts.items()))
        out = [
            f"data: {self.records} ranking records → {self.used_rankings} used on {self.prompts} prompts ({ks})"
        ]
        if self.all_tied and not self.all_tied_dropped:
            out.append(f"  {self.all_tied} all tied: kept (the tie-aware loss learns from them)")
        skipped = [
            ("bad_rows", "bad rows (they break the rankings contract): skipped, as skip_bad_rows asks"),
            ("one_candidate", "with fewer than 2 candidates: skipped"),
            ("label_mismatch", "whose ranking labels do not match the candidates: skipped"),
            ("bad_record", "missing fields or malformed: skipped"),
            ("all_tied_dropped", "all tied (no strict pair for this loss): skipped"),
            ("empty_responses", "empty responses: kept (scored as an empty reply)"),
            ("truncated", "sequences longer than max_length: prompt side truncated"),
            ("response_truncated", "sequences whose response alone exceeds max_length: response cut"),
        ]
        for key, text in skipped:
            n = getattr(self, key)
            if n:
                out.append(f"  {n} {text}")
        if len(self.k_counts) > 1:
            out.append(
                "  mixed K: groups are padded to the largest K of their batch (padding carries no loss)"
            )
        out += [f"  e.g. {e}" for e in self.examples]
        return out


def _tiers_of(rec: dict, labels: list[str]) -> list[list[str]]:
    """The record's tiers as label lists; from ``tiers`` or by parsing ``ranking``."""
    from rlhf.rankings import Ranking, parse_ranking

    if rec.get("tiers"):
        return [list(t) for t in Ranking.from_tiers(rec["tiers"], labels).tiers]
    return [list(t) for t in parse_ranking(str(rec.get("ranking", "")), labels).tiers]


def build_groups(records: list[dict], report: DataReport, loss: str) -> list[Group]:
    """Check every record and merge the rankings of each prompt's candidate set into one :class:`Group`."""
    from rlhf.errors import UserError as _UE

    groups: dict[tuple, Group] = {}
    report.records += len(records)
    for row, rec in enumerate(records, 1):
        if not isinstance(rec, dict) or not isinstance(rec.get("candidates"), list) or "prompt" not in rec:
            report.note("bad_record", row, "needs prompt and candidates")
            continue
        cands = rec["candidates"]
        if len(cands) < 2:
            report.note(
                "one_candidate", row, f"prompt_id {rec.get('prompt_id')!r} has {len(cands)} candidate(s)"
            )
            continue
        try:
            labels = [str(c["label"]) for c in cands]
            texts = [c["text"] if isinstance(c["text"], str) else str(c["text"]) for c in cands]
        except (KeyError, TypeError):
            report.note("bad_record", row, "every candidate needs label and text")
            continue
        try:
            tiers = _tiers_of(rec, labels)
        except _UE as err:
            report.note("label_mismatch", row, f"{err} (candidates {', '.join(labels)})")
            continue
        if len(tiers) == 1:
            report.all_tied += 1
            if loss not in L.TIE_AWARE:
                report.all_tied_dropped += 1
                continue
        tier_of = {lab: t for t, tier in enumerate(tiers) for lab in tier}
        key = (str(rec.get("prompt_id", "")), json.dumps(rec["prompt"], sort_keys=True), tuple(texts))
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(str(rec.get("prompt_id", f"row-{row}")), rec["prompt"], texts, labels)
            g.finished = candidates_finished(cands)
            report.empty_responses += sum(1 for t in texts if not t.strip())
        g.rankings.append([tier_of[lab] for lab in labels])
        g.records.append(rec)
        report.used_rankings += 1
    out = list(groups.values())
    report.prompts += len(out)
    for g in out:
        report.k_counts[g.k] = report.k_counts.get(g.k, 0) + 1
    return out


def candidates_finished(candidates: list[dict]) -> list[bool]:
    """Whether each candidate ended with EOS: ``gen.finished`` as ``rlhf generate`` records it
    (a response cut at the length limit has no EOS), True where the record does not say."""
    return [bool((c.get("gen") or {}).get("finished", True)) for c in candidates]


def split_groups(groups: list[Group], fraction: float, seed: int) -> tuple[list[Group], list[Group]]:
    """Held-out prompts chosen by a hash of ``prompt_id`` (stable across runs and K)."""

    def u(g: Group) -> float:
        h = hashlib.sha256(f"{seed}:{g.prompt_id}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    train = [g for g in groups if u(g) >= fraction]
    held = [g for g in groups if u(g) < fraction]
    if not held and len(train) > 1:  # tiny data: keep at least one held-out prompt
        held, train = train[-1:], train[:-1]
    return train, held


def data_hash(records: list[dict]) -> str:
    blob = json.dumps(records, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """A micro-batch: flat sequences of G groups, rankings over them."""

    input_ids: torch.Tensor | None  # [N, T]
    hidden: torch.Tensor | None  # [N, T, H] cached lower-layer states
    attention_mask: torch.Tensor  # [N, T]
    pool_mask: torch.Tensor  # [N, T] the response tokens (mean pooling)
    slot: torch.Tensor  # [N] flat index into the padded [G, Kmax] reward grid
    grid: tuple[int, int]  # (G, Kmax)
    row_of_ranking: torch.Tensor  # [R] which group each ranking belongs to
    tiers: torch.Tensor  # [R, Kmax], -1 padding


def make_batch(groups: list[Group], pad_id: int, cache: dict | None) -> Batch:
    from reward_models.model import pad_hidden, pad_right, response_mask

    kmax = max(g.k for g in groups)
    seqs, starts, slots, hid = [], [], [], []
    rows, tiers = [], []
    for gi, g in enumerate(groups):
        for ci, ids in enumerate(g.ids):
            seqs.append(ids)
            starts.append(g.starts[ci])
            slots.append(gi * kmax + ci)
            if cache is not None:
                hid.append(cache[id(g)][ci])
        for tr in g.rankings:
            rows.append(gi)
            tiers.append(tr + [-1] * (kmax - g.k))
    if cache is not None:
        hidden, mask = pad_hidden(hid)
        input_ids = None
    else:
        input_ids, mask = pad_right(seqs, pad_id)
        hidden = None
    return Batch(
        input_ids,
        hidden,
        mask,
        response_mask(starts, mask),
        torch.tensor(slots),
        (len(groups), kmax),
        torch.tensor(rows),
        torch.tensor(tiers, dtype=torch.long),
    )


def ranking_grid(flat: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-sequence values ``[N]`` laid out as every ranking's candidates ``[R, Kmax]`` (padding 0)."""
    g, k = batch.grid
    grid = flat.new_zeros(g * k).index_copy(0, batch.slot, flat).view(g, k)
    return grid[batch.row_of_ranking]


def batch_rewards(model, batch: Batch) -> torch.Tensor:
    """Rewards of every ranking's candidates ``[R, Kmax]`` (padding slots hold 0)."""
    flat = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        hidden=batch.hidden,
        pool_mask=batch.pool_mask,
    )
    return ranking_grid(flat, batch)


def length_batches(groups: list[Group], batch_size: int, rng: random.Random) -> list[list[Group]]:
    """Groups of similar length batched together (little padding), batch order shuffled."""
    order = sorted(groups, key=lambda g: (max(len(i) for i in g.ids), g.prompt_id))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def tie_log_param(loss: str, raw: torch.Tensor | None) -> torch.Tensor | None:
    """The loss's tie parameter from the raw learned value: log θ = softplus(raw) ≥ 0; log ν = raw."""
    if raw is None:
        return None
    return F.softplus(raw) if loss == "rao_kupper" else raw


def tie_rate(groups: list[Group]) -> float:
    """The fraction of candidate pairs that the rankings tie (every ranking of every group)."""
    tied = total = 0
    for g in groups:
        for tiers in g.rankings:
            for i in range(len(tiers)):
                for j in range(i + 1, len(tiers)):
                    total += 1
                    tied += tiers[i] == tiers[j]
    return tied / total if total else 0.0


def initial_tie_value(loss: str, theta: float | None, nu: float | None, rate: float) -> float | None:
    """θ or ν to start from: the configured value, else the one whose P(tie) at equal rewards is the
    data's tie rate t — Rao–Kupper (θ - 1) / (θ + 1) = t, Davidson ν / (2 + ν) = t (clamped so a
    tie-free data set still allows a few)."""
    t = min(max(rate, 0.01), 0.9)
    if loss == "rao_kupper":
        return theta if theta is not None else (1 + t) / (1 - t)
    if loss == "davidson":
        return nu if nu is not None else 2 * t / (1 - t)
    return None


def initial_tie_raw(loss: str, value: float | None) -> float | None:
    """The raw learned parameter for a θ / ν value (inverse of :func:`tie_log_param`)."""
    if value is None:
        return None
    if loss == "rao_kupper":
        y = math.log(value)  # softplus⁻¹(log θ)
        return y + math.log(-math.expm1(-y))
    return math.log(value)


def tie_values(loss: str, raw: torch.Tensor | None) -> dict[str, float]:
    lp = tie_log_param(loss, raw)
    if lp is None:
        return {}
    lp = lp.detach()
    return {"theta": math.exp(float(lp))} if loss == "rao_kupper" else {"nu": math.exp(float(lp))}


def batch_loss(cfg: RMTrainConfig, model, raw_tie, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    rewards = batch_rewards(model, batch)
    loss, used = L.ranking_loss(
        cfg.loss, rewards, batch.tiers, margin=cfg.margin, tie_param=tie_log_param(cfg.loss, raw_tie)
    )
    loss = loss + L.reward_centering(rewards, batch.tiers, cfg.center_coef)
    return loss, rewards, used


def pair_stats(rewards: torch.Tensor, tiers: torch.Tensor) -> tuple[float, int]:
    """(correct strict pairs, strict pairs): reward ties count ½. ``rewards``/``tiers`` ``[R, K]``."""
    beats, _ = L.pair_masks(tiers)
    d = rewards[:, :, None] - rewards[:, None, :]
    correct = ((d > 0).float() + 0.5 * (d == 0).float())[beats].sum()
    return float(correct), int(beats.sum())


# ----------------------------------------------------------------------------- the run


def encode_groups(groups: list[Group], tokenizer, max_length: int, report: DataReport) -> None:
    from reward_models.model import encode_conversations

    for g in groups:
        enc = encode_conversations(tokenizer, [g.prompt] * g.k, g.texts, max_length, g.finished)
        g.ids, g.starts = enc.ids, enc.starts
        report.truncated += enc.truncated
        report.response_truncated += enc.response_truncated


@torch.no_grad()
def _build_cache(model, groups: list[Group], pad_id: int, batch_size: int, progress: bool) -> dict:
    """Lower-layer hidden states ``[T_i, H]`` of every sequence, keyed by group (computed once)."""
    from reward_models.model import pad_right
    from rlhf.cli import progress_bar

    flat = [(g, ci) for g in groups for ci in range(g.k)]
    flat.sort(key=lambda x: len(x[0].ids[x[1]]))
    cache: dict = {id(g): [None] * g.k for g in groups}
    bar = progress_bar(len(flat), "rm: caching frozen layers", "seq", enabled=progress)
    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        ids, mask = pad_right([g.ids[ci] for g, ci in chunk], pad_id)
        h = model.lower_hidden(ids, mask)
        for j, (g, ci) in enumerate(chunk):
            cache[id(g)][ci] = h[j, : len(g.ids[ci])].clone()
        bar.update(len(chunk))
    bar.close()
    return cache


def evaluate_groups(
    cfg: RMTrainConfig, model, raw_tie, groups: list[Group], pad_id: int, cache: dict | None, accelerator=None
) -> dict[str, float]:
    """Held-out loss (mean over groups) and strict-pair accuracy, summed across processes.

    The forwards go through the unwrapped model: each DDP forward is a collective (it broadcasts
    the module's buffers), and processes whose shards hold different numbers of groups would wait
    on each other forever. Only the sums are reduced."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    was = model.training
    model.eval()
    tot = torch.zeros(4, dtype=torch.float64)  # loss·groups, groups, correct, pairs
    with torch.no_grad():
        for s in range(0, len(groups), cfg.batch_size):
            batch = make_batch(groups[s : s + cfg.batch_size], pad_id, cache)
            loss, rewards, used = batch_loss(cfg, model, raw_tie, batch)
            c, n = pair_stats(rewards, batch.tiers)
            tot += torch.tensor([float(loss) * used, used, c, n], dtype=torch.float64)
    model.train(was)
    if accelerator is not None and accelerator.num_processes > 1:
        tot = accelerator.reduce(tot, reduction="sum")
    return {
        "eval/loss": float(tot[0] / max(tot[1], 1)),
        "eval/pair_accuracy": float(tot[2] / tot[3]) if tot[3] > 0 else float("nan"),
    }


def _latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return ckpts[-1] if ckpts else None


def _save_checkpoint(path: Path, model, optimizer, scheduler, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **state,
        },
        tmp,
    )
    tmp.replace(path)
    for old in sorted(path.parent.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-2]:
        old.unlink()  # keep the two latest


def _load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def reference_scores(
    cfg: RMTrainConfig, model, tokenizer, groups: list[Group], cache: dict | None, progress: bool
) -> tuple[torch.Tensor, str]:
    """Raw rewards of reference-policy samples: fresh samples from ``norm_policy``, or the training
    candidates (they were sampled from the policy the rankings were collected on)."""
    from reward_models.model import score_texts

    if cfg.norm_policy:
        from rlhf.generation import generate_candidates
        from rlhf.models import load_policy

        policy, ptok = load_policy(cfg.norm_policy)
        prompts = [{"prompt_id": g.prompt_id, "prompt": g.prompt} for g in groups[: cfg.norm_prompts]]
        cands = generate_candidates(
            policy,
            ptok,
            prompts,
            k=1,
            max_new_tokens=cfg.norm_max_new_tokens,
            seed=cfg.seed,
            model_name=cfg.norm_policy,
            progress=progress,
        )
        texts = [(c["prompt"], x["text"], x["gen"]["finished"]) for c in cands for x in c["candidates"]]
        scores, _ = score_texts(
            model,
            tokenizer,
            [p for p, _, _ in texts],
            [t for _, t, _ in texts],
            cfg.max_length,
            cfg.score_batch_size,
            finished=[f for _, _, f in texts],
        )
        return scores, f"samples of {cfg.norm_policy} on {len(prompts)} training prompts"
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(groups), cfg.batch_size):
            chunk = groups[s : s + cfg.batch_size]
            b = make_batch(chunk, tokenizer.pad_token_id, cache)
            out.append(
                model(
                    input_ids=b.input_ids,
                    attention_mask=b.attention_mask,
                    hidden=b.hidden,
                    pool_mask=b.pool_mask,
                )
            )
    return torch.cat(out).float(), f"the {sum(g.k for g in groups)} training candidates"


def run_rm_train(cfg: RMTrainConfig) -> dict:
    """Train a reward model on rankings, or ``cfg.ensemble`` of them (see the module docstring);
    returns a summary dict."""
    cfg.validate()
    if cfg.ensemble > 1:
        return _train_ensemble(cfg)
    return _train_one(cfg, split_seed=cfg.seed, stage="rm_train")


def _train_ensemble(cfg: RMTrainConfig) -> dict:
    """``cfg.ensemble`` members trained one after another, each a run of its own
    (``<run_dir>/member-<i>/``), then gathered into one ensemble dir. Every member holds out the
    same prompts (the split follows the stage's seed, not the member's), so their held-out figures
    compare, and none of them trained on another's held-out prompts."""
    from reward_models.model import save_ensemble

    run_dir = stage_run_dir(cfg, "rm_train")
    members = []
    for i in range(cfg.ensemble):
        layers = cfg.ensemble_layers[i % len(cfg.ensemble_layers)] if cfg.ensemble_layers else cfg.layers
        member = dataclasses.replace(cfg, ensemble=1, seed=cfg.seed + i, layers=layers, out="")
        print(
            f"rm train: ensemble member {i + 1}/{cfg.ensemble} (seed {member.seed}, layers {layers or 'all'})",
            flush=True,
        )
        members.append(_train_one(member, split_seed=cfg.seed, stage=f"rm_train/member-{i}"))
    model_dir = Path(cfg.out) if cfg.out else run_dir / "model"
    manifest = {
        "combine": cfg.ensemble_reward,
        "seeds": [cfg.seed + i for i in range(cfg.ensemble)],
        "metrics": [{k: v for k, v in m.items() if k.startswith("rm/final_")} for m in members],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": to_dict(cfg),
    }
    save_ensemble([m["model_dir"] for m in members], model_dir, manifest)
    accuracies = [m.get("rm/final_pair_accuracy", float("nan")) for m in members]
    print(
        f"rm train: ensemble of {cfg.ensemble} → {model_dir} (scores by {cfg.ensemble_reward} when named "
        f"alone as a reward); members' held-out pair accuracy " + ", ".join(f"{a:.3f}" for a in accuracies),
        flush=True,
    )
    return {
        "run_dir": str(run_dir),
        "model_dir": str(model_dir),
        "eval_rankings": members[0]["eval_rankings"],  # the same prompts for every member
        "rm/members": cfg.ensemble,
        **{f"rm/member_{i}_pair_accuracy": a for i, a in enumerate(accuracies)},
        "rm/train_time_s": round(sum(m["rm/train_time_s"] for m in members), 2),
    }


def _train_one(cfg: RMTrainConfig, split_seed: int, stage: str) -> dict:
    """One reward model; ``split_seed`` picks the held-out and validation prompts, ``stage`` names
    the run (and its dir under the experiment)."""
    from accelerate import Accelerator

    from reward_models.model import LoraSettings, build_reward_model, save_reward_model
    from rlhf.cli import progress_bar

    t_start = time.time()
    # 1. read and check the data (before any model loads, so bad input fails fast)
    report = DataReport()
    records = read_records(cfg.rankings, skip_bad_rows=cfg.skip_bad_rows, report=report)
    groups = build_groups(records, report, cfg.loss)
    if cfg.eval_rankings:
        held_report = DataReport()
        held_records = read_records(cfg.eval_rankings, skip_bad_rows=cfg.skip_bad_rows, report=held_report)
        held = build_groups(held_records, held_report, cfg.loss)
        train_groups = groups
        report.bad_rows += held_report.bad_rows
        report.examples += [f"(eval file) {e}" for e in held_report.examples]
    else:
        train_groups, held = split_groups(groups, cfg.eval_fraction, split_seed)
    val: list[Group] = []
    if cfg.val_fraction > 0 and len(train_groups) > 2:
        train_groups, val = split_groups(train_groups, cfg.val_fraction, split_seed + 1)
    if not train_groups:
        raise UserError(
            f"{cfg.rankings}: no usable rankings ({report.records} records; "
            + "; ".join(report.lines()[1:3]).strip()
            + ")",
            code="no_data",
        )

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    require_data_parallel(accelerator, "rm train")
    main = accelerator.is_main_process
    bf16 = use_bf16(cfg.mixed_precision, accelerator.device)

    def amp():
        """Forwards under bf16 autocast where mixed_precision resolved to bf16 (weights stay fp32)."""
        return autocast_bf16(accelerator.device, bf16)

    torch.manual_seed(cfg.seed)
    tracker = start_stage(cfg, stage, job_type="reward_model") if main else Tracker.noop()
    try:
        tracker.use_artifact(cfg.rankings, "rankings", "dataset")
        run_dir = Path(tracker.run_dir) if tracker.run_dir else stage_run_dir(cfg, stage)
        eval_path = run_dir / "eval_rankings.jsonl"
        if main:
            _write_jsonl(eval_path, [r for g in held for r in g.records])

        # 2-3. model, tokenizer, text → tokens
        tie_init = initial_tie_value(cfg.loss, cfg.theta, cfg.nu, tie_rate(train_groups))
        model, tokenizer = build_reward_model(
            cfg.model,
            cfg.trainable,
            cfg.top_layers,
            LoraSettings(cfg.lora_r, cfg.lora_alpha, 0.0, tuple(cfg.lora_targets)),
            tie_param=initial_tie_raw(cfg.loss, tie_init),
            learn_tie_param=cfg.learn_tie_param,
            seed=cfg.seed,
            pooling=cfg.pooling,
            layers=cfg.layers,
        )
        pad_id = tokenizer.pad_token_id
        encode_groups(train_groups, tokenizer, cfg.max_length, report)
        encode_groups(held, tokenizer, cfg.max_length, report)
        encode_groups(val, tokenizer, cfg.max_length, report)
        if main:
            for line in report.lines():
                print(line, flush=True)
            tracker.log(report.metrics(), step=0)
            tracker.summary(report.metrics())
            (run_dir / "data_report.json").write_text(
                json.dumps({**vars(report), "lines": report.lines()}, indent=2, default=str)
            )

        # each process owns a fixed shard of prompts (so its cache covers only its own)
        rank, world = accelerator.process_index, accelerator.num_processes
        by_len = sorted(train_groups, key=lambda g: (g.n_tokens, g.prompt_id))
        my_train = by_len[rank::world]
        my_held = held[rank::world]
        my_val = val[rank::world]

        # 4. the frozen lower layers, once
        cache, cache_time = None, 0.0
        if model.caches_lower_layers and cfg.cache_hidden:
            t0 = time.time()
            with amp():
                cache = _build_cache(model, my_train + my_val + my_held, pad_id, cfg.score_batch_size, main)
            cache_time = time.time() - t0
            if main:
                print(
                    f"rm: cached the {model.n_layers - model.top_layers} frozen layers in {time.time() - t0:.1f}s",
                    flush=True,
                )

        tie = model.tie_param if model.tie_param is not None and model.tie_param.requires_grad else None
        params = [p for p in model.parameters() if p.requires_grad and p is not tie]
        groups = [{"params": params}]
        if tie is not None:  # its own rate, no weight decay (that would pull log ν / raw θ to 0)
            groups.append({"params": [tie], "lr": cfg.tie_lr, "weight_decay": 0.0})
        from rlhf.models import adam_kwargs

        optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            **adam_kwargs([p for g in groups for p in g["params"]]),
        )
        n_batches = math.ceil(len(my_train) / cfg.batch_size)
        if world > 1:  # every process must take the same number of steps
            n_batches = int(accelerator.gather(torch.tensor([n_batches])).min())
        if n_batches < cfg.grad_accum:
            raise ConfigError(
                f"grad_accum={cfg.grad_accum} but an epoch has only {n_batches} micro-batches of "
                f"{cfg.batch_size} prompts per process; lower grad_accum or batch_size"
            )
        steps_per_epoch = max(1, n_batches // cfg.grad_accum)
        total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        )
        model, optimizer = accelerator.prepare(model, optimizer)
        inner = accelerator.unwrap_model(model)
        raw_tie = inner.tie_param

        state = {"step": 0, "best_loss": float("inf"), "bad_evals": 0, "best_step": 0, "rankings_seen": 0}
        best_params = None
        if cfg.resume:
            ckpt = _latest_checkpoint(run_dir)
            if ckpt is None:
                if main:
                    print(
                        f"rm: resume requested but no checkpoint in {run_dir / 'checkpoints'}; starting fresh"
                    )
            else:
                blob = torch.load(ckpt, weights_only=False)
                _load_trainable(inner, blob["model"])
                optimizer.load_state_dict(blob["optimizer"])
                scheduler.load_state_dict(blob["scheduler"])
                state.update({k: blob[k] for k in state if k in blob})
                best_params = blob.get("best_params")
                if main:
                    print(f"rm: resumed from {ckpt} (step {state['step']})", flush=True)

        # 5-6. the loop
        model.train()
        bar = progress_bar(total_steps, f"rm train ({cfg.loss})", "step", enabled=main, initial=state["step"])

        def where(step: int) -> dict[str, Any]:
            """Where a non-finite loss or gradient stopped training, for its error message."""
            return {
                "at": f"step {step}",
                "last_good": _latest_checkpoint(run_dir),
                "hint": "Try a lower lr.",
                "progress": bar,
            }

        t_train, seen_at_start = time.time(), state["rankings_seen"]
        last_eval: dict[str, float] = {}
        stop_reason = "done"
        micro = state["step"] * cfg.grad_accum
        while state["step"] < total_steps:
            epoch, pos = divmod(micro, steps_per_epoch * cfg.grad_accum)
            batches = length_batches(my_train, cfg.batch_size, random.Random(f"{cfg.seed}:{epoch}"))[
                :n_batches
            ]
            batches = batches[: steps_per_epoch * cfg.grad_accum]
            for groups_b in batches[pos:]:
                batch = make_batch(groups_b, pad_id, cache)
                with amp():
                    loss, _, _ = batch_loss(cfg, model, raw_tie, batch)
                stop_if_non_finite(loss, "loss", **where(state["step"] + 1))
                micro += 1
                sync = micro % cfg.grad_accum == 0
                if sync or world == 1:
                    accelerator.backward(loss / cfg.grad_accum)
                else:
                    with accelerator.no_sync(model):
                        accelerator.backward(loss / cfg.grad_accum)
                state["rankings_seen"] += int(batch.tiers.shape[0]) * world
                if not sync:
                    continue
                trained = [p for group in optimizer.param_groups for p in group["params"]]
                stop_if_non_finite(gradient_norm(trained), "gradient norm", **where(state["step"] + 1))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                step = state["step"]
                elapsed = time.time() - t_train
                logs = {
                    "train/loss": float(loss.detach()),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/rankings_per_s": (state["rankings_seen"] - seen_at_start) / max(elapsed, 1e-9),
                }
                logs.update({f"train/tie_{k}": v for k, v in tie_values(cfg.loss, raw_tie).items()})
                bar.update(1)
                bar.set_postfix(
                    loss=f"{float(loss.detach()):.4f}",
                    val_acc=f"{last_eval.get('val/pair_accuracy', float('nan')):.3f}",
                )
                out_of_time = bool(cfg.max_time_s) and time.time() - t_train >= cfg.max_time_s
                if cfg.max_time_s and world > 1:  # clocks differ: all processes stop after the same step
                    flag = torch.tensor([float(out_of_time)], device=accelerator.device)
                    out_of_time = bool(accelerator.reduce(flag, "sum") > 0)
                if val and (
                    (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps or out_of_time
                ):
                    with amp():
                        measured = evaluate_groups(cfg, model, raw_tie, my_val, pad_id, cache, accelerator)
                    last_eval = {"val/" + k.split("/", 1)[1]: v for k, v in measured.items()}
                    logs.update(last_eval)
                    if last_eval["val/loss"] < state["best_loss"] - 1e-6:
                        state.update(best_loss=last_eval["val/loss"], best_step=step, bad_evals=0)
                        best_params = inner.trainable_state()
                    else:
                        state["bad_evals"] += 1
                if main:
                    tracker.log(logs, step=step)
                if cfg.save_every and step % cfg.save_every == 0 and main:
                    _save_checkpoint(
                        run_dir / "checkpoints" / f"step-{step}.pt",
                        inner,
                        optimizer,
                        scheduler,
                        {**state, "best_params": best_params},
                    )
                if cfg.patience and state["bad_evals"] >= cfg.patience:
                    stop_reason = f"early stop: no better validation loss in {cfg.patience} evaluations"
                    break
                if out_of_time:
                    stop_reason = f"time budget of {cfg.max_time_s:g}s reached"
                    break
                if step >= total_steps:
                    break
            else:
                continue
            break
        bar.close()
        train_time = time.time() - t_train
        throughput = (state["rankings_seen"] - seen_at_start) / max(train_time, 1e-9)
        if best_params is not None and state["best_step"] != state["step"]:
            _load_trainable(inner, best_params)  # keep the best validation checkpoint
        with amp():
            final = evaluate_groups(cfg, model, raw_tie, my_held, pad_id, cache, accelerator) if held else {}

        # 7. normalisation on reference-policy samples
        norm = {"offset": 0.0, "scale": 1.0, "n": 0, "source": "none"}
        if cfg.normalize:
            with amp():
                scores, source = reference_scores(cfg, inner, tokenizer, my_train, cache, main)
            if world > 1:  # shards differ in size: gather as Python lists
                from accelerate.utils import gather_object

                scores = torch.tensor(gather_object(scores.tolist()))
            std = float(scores.std()) if scores.numel() > 1 else 1.0
            norm = {
                "offset": float(scores.mean()),
                "scale": std if std > 1e-6 else 1.0,
                "n": int(scores.numel()),
                "source": source,
            }

        # 8. the reward-model dir
        model_dir = Path(cfg.out) if cfg.out else run_dir / "model"
        summary = {
            "run_dir": str(run_dir),
            "model_dir": str(model_dir),
            "eval_rankings": str(eval_path),
            "data/bad_rows": report.bad_rows,  # skipped (skip_bad_rows): in the experiment's summary too
            "rm/steps": state["step"],
            "rm/best_step": state["best_step"],
            "rm/stop": stop_reason,
            "rm/train_time_s": round(train_time, 2),
            "rm/cache_time_s": round(cache_time, 2),
            "rm/rankings_seen": state["rankings_seen"] - seen_at_start,
            "rm/rankings_per_s": throughput,
            "rm/train_prompts": len(train_groups),
            "rm/bf16": int(bf16),
            "rm/eval_prompts": len(held),
            "rm/val_prompts": len(val),
            **{f"rm/final_{k.split('/')[1]}": v for k, v in final.items()},
            "norm/offset": norm["offset"],
            "norm/scale": norm["scale"],
        }
        if main:
            meta = {
                "loss": cfg.loss,
                "base_model": cfg.model,
                "trainable": cfg.trainable,
                "top_layers": cfg.top_layers if cfg.trainable == "top" else None,
                "layers": inner.n_layers,
                "pooling": cfg.pooling,
                "normalization": norm,
                "chat_template": True,
                "max_length": cfg.max_length,
                "training_data": {
                    "path": str(cfg.rankings),
                    "hash": data_hash(records),
                    "rankings": report.used_rankings,
                    "prompts": len(train_groups),
                },
                "margin": cfg.margin,
                "center_coef": cfg.center_coef,
                **tie_values(cfg.loss, raw_tie),
                "tie_initial": tie_init,
                "metrics": final,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": to_dict(cfg),
            }
            save_reward_model(inner, tokenizer, model_dir, meta)
            tracker.log(
                {**final, "norm/offset": norm["offset"], "norm/scale": norm["scale"]}, step=state["step"]
            )
            tracker.summary({k: v for k, v in summary.items() if not isinstance(v, str) or k == "rm/stop"})
            tracker.log_artifact(
                model_dir,
                f"{cfg.experiment}-reward-model",
                "model",
                metadata={"loss": cfg.loss, "base_model": cfg.model, **final},
            )
            acc = final.get("eval/pair_accuracy", float("nan"))
            print(
                f"rm train: {state['step']} steps in {train_time:.1f}s ({throughput:.2f} rankings/s; {stop_reason}); "
                f"held-out pair accuracy {acc:.3f} on {len(held)} prompts; normalised on {norm['source']} "
                f"(offset {norm['offset']:.3f}, scale {norm['scale']:.3f}) → {model_dir} "
                f"[{time.time() - t_start:.1f}s total" + (f", {world} processes]" if world > 1 else "]"),
                flush=True,
            )
        accelerator.wait_for_everyone()
    finally:
        tracker.finish()
    return summary


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="train a reward model on rankings with ties", description=__doc__.split("\n\n")[0]
    )
    add_config_arguments(p, RMTrainConfig)
    # trains in every process of a launch (rlhf/distributed.py)
    p.set_defaults(
        func=lambda args: run_rm_train(config_from_args(args, RMTrainConfig)) and 0, across_processes=True
    )
    return p
