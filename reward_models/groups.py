"""Rankings → prompt groups → micro-batches, for reward-model training (and DPO, which reuses them).

One :class:`Group` is one prompt's candidates with every ranking of them (one per annotator), so
each candidate is encoded once per prompt whatever the loss. The steps, in the order
:mod:`reward_models.train` runs them:

1. :func:`read_records` reads the rankings and checks each against the rankings contract;
2. :func:`build_groups` merges each prompt's rankings into a group, counting what was wrong in a
   :class:`DataReport` (one candidate, all tied, labels that do not match the candidates, ...);
3. :func:`split_groups` holds prompts out by a hash of ``prompt_id``;
4. :func:`encode_groups` tokenizes every (prompt, response) with the chat template;
5. :func:`length_batches` batches groups of similar length, :func:`make_batch` pads one batch.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from reward_models import losses as L
from rlhf.contracts import candidates_finished, validate_ranking
from rlhf.datafiles import DataError, RowError, read_source
from rlhf.errors import UserError
from rlhf.rankings import Ranking, parse_ranking
from rlhf.reward_model import encode_conversations, pad_hidden, pad_right, response_mask

# ----------------------------------------------------------------------------- reading and checking data


def read_records(source: str, *, skip_bad_rows: bool = False, report: DataReport | None = None) -> list[dict]:
    """The rankings of ``source`` (any source :mod:`rlhf.data` reads), each checked against the
    rankings contract (docs/rankings.md). As in every stage, a bad row stops the run: one error lists
    every bad row with its line number (exit 2). With ``skip_bad_rows`` they are left out instead,
    and counted in ``report`` (``data/bad_rows``, with a few of them as examples)."""
    # rlhf.data's reader keeps each row's line number and reports unreadable lines as rows too
    rows = read_source(source)
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
    weights: list[float] | None = None  # each ranking's weight in the loss (None: all weigh the same)

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
    if rec.get("tiers"):
        return [list(t) for t in Ranking.from_tiers(rec["tiers"], labels).tiers]
    return [list(t) for t in parse_ranking(str(rec.get("ranking", "")), labels).tiers]


def build_groups(records: list[dict], report: DataReport, loss: str) -> list[Group]:
    """Check every record and merge the rankings of each prompt's candidate set into one :class:`Group`."""
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
        except UserError as err:
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


def encode_groups(groups: list[Group], tokenizer, max_length: int, report: DataReport) -> None:
    """Tokenize every (prompt, response) of ``groups`` with the chat template, in place (``ids``,
    ``starts``); truncations are counted in ``report``."""
    for g in groups:
        enc = encode_conversations(tokenizer, [g.prompt] * g.k, g.texts, max_length, g.finished)
        g.ids, g.starts = enc.ids, enc.starts
        report.truncated += enc.truncated
        report.response_truncated += enc.response_truncated


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
    weights: torch.Tensor | None = None  # [R] each ranking's weight in the loss (None: unweighted)
    features: torch.Tensor | None = None  # [N, F] cached input of a head over several layers' means


def make_batch(groups: list[Group], pad_id: int, cache: dict | None) -> Batch:
    kmax = max(g.k for g in groups)
    seqs, starts, slots, hid = [], [], [], []
    rows, tiers, weights = [], [], []
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
        weights += g.weights if g.weights is not None else [1.0] * len(g.rankings)
    weighted = any(g.weights is not None for g in groups)
    # the cache holds per-token states [T_i, H] of the frozen layers, or each sequence's whole
    # input to the head [F] (RewardModel.caches_features): then the tokens are not needed
    features = torch.stack(hid) if cache is not None and hid[0].dim() == 1 else None
    input_ids = hidden = None
    if cache is not None and features is None:
        hidden, mask = pad_hidden(hid)
    else:  # the mask (and pool mask) from the token ids; the ids themselves only when read
        ids, mask = pad_right(seqs, pad_id)
        input_ids = ids if features is None else None
    return Batch(
        input_ids,
        hidden,
        mask,
        response_mask(starts, mask),
        torch.tensor(slots),
        (len(groups), kmax),
        torch.tensor(rows),
        torch.tensor(tiers, dtype=torch.long),
        torch.tensor(weights) if weighted else None,
        features,
    )


def ranking_grid(flat: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-sequence values ``[N]`` laid out as every ranking's candidates ``[R, Kmax]`` (padding 0)."""
    g, k = batch.grid
    grid = flat.new_zeros(g * k).index_copy(0, batch.slot, flat).view(g, k)
    return grid[batch.row_of_ranking]


def length_batches(groups: list[Group], batch_size: int, rng: random.Random) -> list[list[Group]]:
    """Groups of similar length batched together (little padding), batch order shuffled."""
    order = sorted(groups, key=lambda g: (max(len(i) for i in g.ids), g.prompt_id))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches
