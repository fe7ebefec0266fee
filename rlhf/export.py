"""Rankings as training datasets: derived pairs (docs/rankings.md "Derived pairs"), TRL's
preference and KTO formats, one schema for exported rankings, annotators' edits as SFT
demonstrations, and the ``rlhf export`` command."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, add_config_arguments, config_from_args, option
from rlhf.contracts import candidates_finished, load_rankings, prompt_text
from rlhf.datafiles import DataError, output_kind, save_records, write_jsonl
from rlhf.models import format_conversation, format_prompt, load_tokenizer
from rlhf.rankings import Ranking, parse_ranking
from rlhf.tracking import RunFields, stage_run_dir, start_stage

# ----------------------------------------------------------------------------- derived pairs


def ranking_of(rec: dict) -> Ranking:
    """The :class:`Ranking` of a (validated) rankings record."""
    labels = [c["label"] for c in rec["candidates"]]
    if rec.get("tiers"):
        return Ranking.from_tiers(rec["tiers"], labels)
    return parse_ranking(rec["ranking"], labels)


def rankings_to_pairs(rankings: Iterable[dict]) -> list[dict]:
    """Every pair of candidates of every ranking (docs/rankings.md, "Derived pairs").

    Per ranking of K candidates: C(K, 2) rows, the strict ones first (``chosen`` = the winner's
    text, ``tie`` false), then the tied ones (``tie`` true, ``chosen`` the earlier label). Rows
    have ``prompt_id``, ``prompt`` (plain text), ``chosen``, ``rejected``, ``tie``, ``annotator``,
    ``chosen_label``, ``rejected_label``. TRL would read the tie rows as preferences too: give TRL
    :func:`rankings_to_trl`'s rows instead.
    """
    out = []
    for rec in rankings:
        ranking = ranking_of(rec)
        text = {c["label"]: c["text"] for c in rec["candidates"]}
        base = {"prompt_id": str(rec["prompt_id"]), "prompt": prompt_text(rec["prompt"])}
        annotator = rec.get("annotator") or "unknown"
        for tie, pairs in ((False, ranking.pairs()), (True, ranking.ties())):
            for a, b in pairs:
                out.append(
                    {
                        **base,
                        "chosen": text[a],
                        "rejected": text[b],
                        "tie": tie,
                        "annotator": annotator,
                        "chosen_label": a,
                        "rejected_label": b,
                    }
                )
    return out


def prompt_messages(prompt: Any) -> list[dict]:
    """A prompt as chat messages: text is one user turn, the conversation ``rlhf.models.format_prompt``
    renders. No system message is added: the chat template adds its own default when it has one
    (SmolLM2's does), in the lab and in TRL alike, so both render the same text."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(message) for message in prompt]


TRL_STYLES = ("conversational", "standard")  # TRL's dataset formats (trl/data_utils.py)


def rankings_to_trl(
    rankings: Iterable[dict], style: str = "conversational", tokenizer: Any = None
) -> tuple[list[dict], list[dict]]:
    """``(preferences, ties)``: the derived pairs split for TRL's RewardTrainer and DPOTrainer.

    TRL reads every row of a preference dataset as "chosen beats rejected", so the strict pairs
    go to ``preferences`` (``prompt``, ``chosen``, ``rejected``, then ``prompt_id``, ``annotator``,
    ``chosen_label``, ``rejected_label``, which TRL's trainers drop) and the tied pairs to
    ``ties`` (``prompt``, ``response_a``, ``response_b``, ``tie``: true, ``prompt_id``,
    ``annotator``, ``label_a``, ``label_b``: not loadable as preferences by mistake). Pairs come
    in :func:`rankings_to_pairs`' order.

    ``style`` is one of TRL's dataset formats (trl/data_utils.py): ``conversational`` (chat
    messages; TRL applies the tokenizer's chat template) or ``standard`` (plain strings, formatted
    here with ``tokenizer``'s chat template exactly as the lab formats them, EOS after the
    responses that ended).
    """
    if style not in TRL_STYLES:
        raise ConfigError(f"unknown TRL style {style!r}; valid styles: {', '.join(TRL_STYLES)}")
    if style == "standard" and tokenizer is None:
        raise ConfigError(
            "the standard TRL style needs the tokenizer whose chat template formats the prompts"
        )
    preferences, ties = [], []
    for rec in rankings:
        prompt, completion = _trl_prompt_and_completions(rec, style, tokenizer)
        for pair in rankings_to_pairs([rec]):
            a, b = pair["chosen_label"], pair["rejected_label"]
            who = {"prompt_id": pair["prompt_id"], "annotator": pair["annotator"]}
            if pair["tie"]:
                ties.append(
                    {
                        "prompt": prompt,
                        "response_a": completion[a],
                        "response_b": completion[b],
                        "tie": True,
                        **who,
                        "label_a": a,
                        "label_b": b,
                    }
                )
            else:
                preferences.append(
                    {
                        "prompt": prompt,
                        "chosen": completion[a],
                        "rejected": completion[b],
                        **who,
                        "chosen_label": a,
                        "rejected_label": b,
                    }
                )
    return preferences, ties


def kto_label(ranking: Ranking, label: str) -> bool | None:
    """KTO's binary label of one candidate of a ranking: desirable (True) when more candidates are
    ranked below it than above it, undesirable (False) when fewer, none (None) when as many, as for
    the middle of an odd ranking or a candidate tied with everything. A strict ranking of 4 gives
    its top two True and its bottom two False; tiers count whole (``A > B = C > D``: A True, D
    False, B and C none)."""
    tier = next(t for t, members in enumerate(ranking.tiers) if label in members)
    above = sum(len(members) for members in ranking.tiers[:tier])
    below = sum(len(members) for members in ranking.tiers[tier + 1 :])
    return None if above == below else below > above


def rankings_to_kto(
    rankings: Iterable[dict], style: str = "conversational", tokenizer: Any = None
) -> list[dict]:
    """Unpaired rows for TRL's KTOTrainer (``prompt``, ``completion``, ``label``, then ``prompt_id``,
    ``annotator``, ``candidate_label``): every candidate a ranking labels (:func:`kto_label`), in
    TRL's ``style`` as :func:`rankings_to_trl` writes it."""
    if style not in TRL_STYLES:
        raise ConfigError(f"unknown TRL style {style!r}; valid styles: {', '.join(TRL_STYLES)}")
    rows = []
    for rec in rankings:
        prompt, completion = _trl_prompt_and_completions(rec, style, tokenizer)
        ranking = ranking_of(rec)
        for cand in rec["candidates"]:
            desirable = kto_label(ranking, cand["label"])
            if desirable is None:
                continue
            rows.append(
                {
                    "prompt": prompt,
                    "completion": completion[cand["label"]],
                    "label": desirable,
                    "prompt_id": str(rec["prompt_id"]),
                    "annotator": rec.get("annotator") or "unknown",
                    "candidate_label": cand["label"],
                }
            )
    return rows


def _trl_prompt_and_completions(rec: dict, style: str, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """A ranking's prompt and each candidate's completion (by label) in TRL's ``style``."""
    texts = {c["label"]: c["text"] for c in rec["candidates"]}
    if style == "conversational":
        completions = {label: [{"role": "assistant", "content": text}] for label, text in texts.items()}
        return prompt_messages(rec["prompt"]), completions

    # `rlhf generate` records whether a response ended with EOS; a response cut at the length
    # limit is formatted without it, as the lab's reward model reads it (docs/reward-models.md).
    labels = [c["label"] for c in rec["candidates"]]
    ended = dict(zip(labels, candidates_finished(rec["candidates"])))
    prompt = format_prompt(tokenizer, rec["prompt"])
    completions = {
        label: format_conversation(tokenizer, rec["prompt"], text, eos=ended[label])[len(prompt) :]
        for label, text in texts.items()
    }
    return prompt, completions


# ----------------------------------------------------------------------------- edits as demonstrations


def rankings_to_demonstrations(rankings: Iterable[dict]) -> list[dict]:
    """One SFT demonstration per ranking with an ``edit`` (docs/rankings.md "Edits"), in rankings order.

    The annotator's corrected version of the best response is a demonstration of what the policy
    should have said, in the demonstrations contract ``rlhf sft`` reads (TRL's prompt/completion
    format): ``prompt`` as the ranking has it (text, or the chat messages unchanged), ``completion``
    the edit (text after a text prompt, one assistant message after a chat, as the contract
    requires), then ``prompt_id``, ``annotator``, ``source`` (``"edit"``), ``edit_of`` (the label
    of the edited candidate) and ``split`` (the ranking's, null when it has none; every row has
    every column, so parquet keeps them all). Several annotators who edited the same prompt give
    one demonstration each: they are separate judgements of the best answer, and an edit more than
    one of them wrote weighs accordingly.
    """
    out = []
    for rec in rankings:
        edit = rec.get("edit")
        if edit is None:
            continue
        prompt = rec["prompt"]
        completion = edit if isinstance(prompt, str) else [{"role": "assistant", "content": edit}]
        out.append(
            {
                "prompt": prompt,
                "completion": completion,
                "prompt_id": str(rec["prompt_id"]),
                "annotator": rec.get("annotator") or "unknown",
                "source": "edit",
                "edit_of": rec["edit_of"],
                "split": rec.get("split"),
            }
        )
    return out


# ----------------------------------------------------------------------------- exported rankings


def ranking_for_export(rec: dict) -> dict:
    """A validated ranking as exported: the same columns, of the same types, for any ranking.

    ``gold`` becomes a list aligned with ``candidates`` (an object keyed A, B, C, ... loads in
    ``datasets`` as a struct whose fields change with K) and is null when the ranking has no gold
    scores, as is ``gold_scorer``: human and simulated rankings share one schema. The lab's
    loaders read the list back into the ``{label: score}`` object (:func:`_check_gold`).
    ``edit`` and ``edit_of`` are in every row too, null where the annotator edited nothing: parquet
    takes its columns from the first row, so a field that only some rows have could be lost.
    """
    labels = [c["label"] for c in rec["candidates"]]
    gold = rec.get("gold")
    out = {k: v for k, v in rec.items() if k not in ("gold", "gold_scorer", "edit", "edit_of")}
    out["gold"] = [gold.get(label) for label in labels] if gold else None
    out["gold_scorer"] = rec.get("gold_scorer")
    out["edit"] = rec.get("edit")
    out["edit_of"] = rec.get("edit_of")
    return out


def exported_rankings_types() -> dict[str, Any]:
    """Arrow types of the exported rankings' columns that can be all null or all empty in a file.

    JSON Lines carries no types, so ``datasets`` infers ``null`` for a column that is null in
    every row; parquet and dataset folders store these types instead (:func:`save_records`).
    """
    import pyarrow as pa

    return {
        "flags": pa.list_(pa.string()),
        "created_at": pa.string(),
        "gold": pa.list_(pa.float64()),
        "gold_scorer": pa.string(),
        "edit": pa.string(),
        "edit_of": pa.string(),
        "proposal_shown": pa.bool_(),  # the annotation app's: null where no proposal existed
        "seen_proposal": pa.string(),  # the annotation app's: the proposed ranking shown, or null
    }


# ----------------------------------------------------------------------------- rlhf export

# What each format is for (docs/architecture.md, "Data contracts"):
#   rankings: the validated rankings, ties included, for the lab's losses over whole rankings;
#   pairs:    every derived pair with its `tie` flag, for pair losses that model ties;
#   trl:      strict pairs only, for TRL's RewardTrainer and DPOTrainer; ties in a file beside it;
#   kto:      single responses labelled desirable or undesirable, for TRL's KTOTrainer;
#   demonstrations: the annotators' edits of the best response, for `rlhf sft`.
EXPORT_FORMATS = ("pairs", "rankings", "trl", "kto", "demonstrations")


@dataclass
class ExportConfig(RunFields):
    rankings: str = option(
        "",
        help="rankings to export: JSONL/JSON/parquet file or dataset folder "
        "(e.g. from `rlhf simulate` or `rlhf annotate export`)",
    )
    format: str = option(
        "pairs",
        help="pairs = every pair of candidates per ranking, tie rows included (pair losses with ties); "
        "rankings = the validated rankings themselves; trl = strict pairs only for TRL's "
        "RewardTrainer/DPOTrainer, tied pairs written to <out stem>.ties.jsonl beside it; kto = "
        "single responses labelled desirable (upper half of a ranking) or undesirable (lower half) "
        "for TRL's KTOTrainer; demonstrations = one SFT demonstration (prompt + the annotator's edit of the "
        "best response) per ranking with an edit, for `rlhf sft --demonstrations`",
        choices=EXPORT_FORMATS,
    )
    trl_style: str = option(
        "conversational",
        help="formats trl and kto: conversational = prompt/chosen/rejected as chat messages (TRL applies the "
        "chat template); standard = plain strings with the chat template of --model already applied",
        choices=TRL_STYLES,
    )
    model: str = option(
        "",
        help="format trl, style standard: the model (alias or dir) whose chat template the "
        "responses were sampled under, e.g. smollm2-135m-instruct",
    )
    out: str = option(
        "",
        help="output: a .jsonl or .parquet file, or a folder name for an HF dataset "
        "(default: <run_dir>/<format>.jsonl)",
    )
    drop_ties: bool = option(
        False,
        help="leave out tie pairs (format pairs), all-tied rankings (format rankings) "
        "or the ties file (format trl)",
    )
    seed: int = option(0, help="random seed (export is deterministic; kept so every stage config has one)")

    def validate(self) -> None:
        if not self.rankings:
            raise ConfigError("export: --rankings is required (a rankings JSONL file or dataset folder)")
        check_export_options(self.format, self.trl_style, self.model)
        if self.out:
            try:
                output_kind(self.out)
            except DataError as err:
                raise ConfigError(str(err)) from None


def check_export_options(fmt: str, trl_style: str = "conversational", model: str | None = None) -> None:
    """One clear error for an unknown format or TRL style, or a standard TRL export without a model."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; valid formats: {', '.join(EXPORT_FORMATS)}")
    if fmt not in ("trl", "kto"):
        return
    if trl_style not in TRL_STYLES:
        raise ConfigError(f"unknown TRL style {trl_style!r}; valid styles: {', '.join(TRL_STYLES)}")
    if trl_style == "standard" and not model:
        raise ConfigError(
            "export: the standard TRL style needs --model, the model whose chat template the responses "
            "were sampled under (e.g. --model smollm2-135m-instruct)"
        )


@dataclass
class Export:
    """What one export writes: ``records`` at the output and, for format trl, ``ties`` beside it."""

    format: str
    records: list[dict]
    ties: list[dict] | None = None


def build_export(
    rankings: Sequence[dict],
    fmt: str,
    *,
    drop_ties: bool = False,
    trl_style: str = "conversational",
    model: str | None = None,
) -> Export:
    """The records of one export format from validated rankings (the one home of every format,
    used by ``rlhf export`` and ``rlhf annotate export``)."""
    check_export_options(fmt, trl_style, model)
    if fmt == "pairs":
        return Export(fmt, [p for p in rankings_to_pairs(rankings) if not (drop_ties and p["tie"])])
    if fmt == "rankings":
        kept = [r for r in rankings if not (drop_ties and "all_tied" in r["flags"])]
        return Export(fmt, [ranking_for_export(r) for r in kept])
    if fmt == "demonstrations":
        demonstrations = rankings_to_demonstrations(rankings)
        if not demonstrations:
            raise DataError(
                f"no demonstrations to export: none of these {len(rankings)} rankings has an `edit` "
                "(the annotator's corrected version of the best response)",
                code="empty",
            )
        return Export(fmt, demonstrations)
    tokenizer = None
    if trl_style == "standard":
        tokenizer = load_tokenizer(model)
    if fmt == "kto":
        return Export(fmt, rankings_to_kto(rankings, trl_style, tokenizer))
    preferences, ties = rankings_to_trl(rankings, trl_style, tokenizer)
    if not preferences:
        raise DataError(
            f"no strict preference to export: all {len(ties)} pairs of these {len(rankings)} rankings "
            "are ties, and TRL's trainers read every row as chosen beats rejected",
            code="empty",
        )
    return Export(fmt, preferences, None if drop_ties else ties)


def ties_path(out: str | os.PathLike) -> Path:
    """Where format trl writes the tied pairs: ``<out stem>.ties.jsonl`` beside the output."""
    out = Path(out)
    return out.with_name(f"{out.stem}.ties.jsonl")


def write_export(export: Export, out: str | os.PathLike) -> tuple[Path, Path | None]:
    """Write an export (atomically, file by file); returns the output and the ties file (or None)."""
    column_types = exported_rankings_types() if export.format == "rankings" else None
    path = save_records(export.records, out, column_types)
    if export.ties is None:
        return path, None
    return path, write_jsonl(ties_path(out), export.ties)


def export_stats(rankings: Sequence[dict], pairs: Sequence[dict]) -> dict[str, int]:
    """Counts printed and logged by ``rlhf export``."""
    return {
        "export/rankings": len(rankings),
        "export/prompts": len({r["prompt_id"] for r in rankings}),
        "export/strict_pairs": sum(1 for p in pairs if not p["tie"]),
        "export/tie_pairs": sum(1 for p in pairs if p["tie"]),
        "export/all_tied_rankings": sum(
            1
            for r in rankings
            if Ranking.from_tiers(r["tiers"], [c["label"] for c in r["candidates"]]).all_tied
        ),
    }


def run_export(cfg: ExportConfig) -> dict:
    """Load and validate rankings, write one export format, log the file(s) as W&B datasets.

    Everything is validated before the run dir or the output is touched, so bad input leaves no
    file behind.
    """

    cfg.validate()
    rankings = load_rankings(cfg.rankings)
    stats = export_stats(rankings, rankings_to_pairs(rankings))
    export = build_export(
        rankings, cfg.format, drop_ties=cfg.drop_ties, trl_style=cfg.trl_style, model=cfg.model
    )
    stats["export/written"] = len(export.records)
    out = Path(cfg.out) if cfg.out else stage_run_dir(cfg, "export") / f"{cfg.format}.jsonl"
    tracker = start_stage(cfg, "export")
    try:
        tracker.use_artifact(cfg.rankings, "rankings", "dataset")
        path, ties = write_export(export, out)
        tracker.log(stats, step=0)
        tracker.summary(stats)
        if cfg.format == "pairs":
            cols = [
                "prompt_id",
                "chosen_label",
                "rejected_label",
                "tie",
                "annotator",
                "prompt",
                "chosen",
                "rejected",
            ]
            tracker.log_table(
                "export/sample_pairs", cols, [[p[c] for c in cols] for p in export.records[:20]], step=0
            )
        metadata = {"format": cfg.format, "drop_ties": cfg.drop_ties, "source": cfg.rankings, **stats}
        if cfg.format in ("trl", "kto"):
            metadata["trl_style"] = cfg.trl_style
        tracker.log_artifact(path, f"{cfg.experiment}-{cfg.format}", "dataset", metadata=metadata)
        if ties is not None:
            tracker.log_artifact(ties, f"{cfg.experiment}-{cfg.format}-ties", "dataset", metadata=metadata)
    finally:
        tracker.finish()
    dropped = " (ties dropped)" if cfg.drop_ties else ""
    beside = f"; {len(export.ties)} tied pairs → {ties}" if ties is not None else ""
    print(
        f"export: {stats['export/rankings']} rankings of {stats['export/prompts']} prompts → "
        f"{stats['export/strict_pairs']} strict pairs, {stats['export/tie_pairs']} tie pairs, "
        f"{stats['export/all_tied_rankings']} all-tied rankings; wrote {len(export.records)} "
        f"{cfg.format}{dropped} → {path}{beside}"
    )
    result = {"run_dir": str(tracker.run_dir), "out": str(path), "format": cfg.format, **stats}
    if ties is not None:
        result["ties_out"] = str(ties)
    return result


def add_parser(subparsers):
    p = subparsers.add_parser(
        "export",
        help="turn rankings into a training dataset (rankings, derived pairs, TRL's formats, or "
        "edits as SFT demonstrations)",
        description=(
            "Validate rankings (every bad row is reported with its line number) and write them, or the "
            "pairs derived from them, as JSONL, parquet or an HF dataset folder. From C > B = D > A the "
            "pairs are (C,B) (C,D) (C,A) (B,A) (D,A) plus the tie {B,D}. --format pairs keeps the tie "
            "as a row with tie=true (for pair losses that model ties); --format trl writes the strict pairs "
            "in TRL's preference format for RewardTrainer/DPOTrainer and the ties to <out "
            "stem>.ties.jsonl beside it. --format demonstrations writes the annotators' edits of the "
            "best response as SFT demonstrations (prompt + completion) for `rlhf sft`, one per edit: "
            "several annotators' edits of one prompt stay separate demonstrations. The output is "
            "logged as a W&B dataset artifact."
        ),
    )
    add_config_arguments(p, ExportConfig)
    # The flag spelling users expect, besides the generic `--drop_ties true`.
    p.add_argument(
        "--drop-ties",
        dest="cfg::drop_ties",
        action="store_const",
        const=True,
        default=argparse.SUPPRESS,
        help="same as --drop_ties true",
    )
    p.set_defaults(func=lambda args: run_export(config_from_args(args, ExportConfig)) and 0)
    return p
