"""Getting candidates into the store and rankings out of it.

* :func:`import_candidates` validates every row with ``rlhf.data.load_candidates`` (the
  candidates contract; all bad rows reported at once with their numbers), applies the app's own
  limits (response size), and inserts idempotently: importing the same file twice adds nothing.
* :func:`export_rankings` writes the submitted rankings in any of ``rlhf export``'s formats,
  through the same functions (``rlhf.data.build_export`` / ``write_export``): ``rankings`` (the
  rankings contract), ``pairs`` (every derived pair, tie rows kept with ``tie: true``) or ``trl``
  (strict pairs for TRL's RewardTrainer/DPOTrainer, the ties in ``<out stem>.ties.jsonl``), as
  JSONL, parquet or an HF dataset directory. Rankings with an annotator's edit of the best
  response carry ``edit`` and ``edit_of`` (its label); once one does, every record has both
  (null where there is no edit), so parquet and dataset files get one set of columns.
* :func:`load_project_config` reads an annotation project YAML (name, quorum, lease, guidelines,
  gold rate).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from annotation_app.gold import gold_problems
from annotation_app.store import DEFAULT_PROJECT, Store, StoreError
from rlhf.contracts import load_candidates, prompt_text
from rlhf.errors import ConfigError, UserError
from rlhf.export import build_export, check_export_options, write_export
from rlhf.fsio import atomic_file
from rlhf.reliability import fit_reliability

MAX_RESPONSE_CHARS = 20_000
MAX_PROMPT_CHARS = 20_000
PROJECT_KEYS = {
    "project",
    "quorum",
    "lease_minutes",
    "guidelines",
    "guidelines_file",
    "description",
    "gold_rate",
}


class ImportRowsError(UserError):
    code = "bad_rows"


def load_project_config(path: str | Path) -> dict:
    """``{"project", "quorum", "lease_seconds", "guidelines", "gold_rate"}`` from a project YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"project config {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"project config {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"project config {str(path)!r} must be a mapping")
    unknown = sorted(set(data) - PROJECT_KEYS)
    if unknown:
        raise ConfigError(
            f"project config: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(PROJECT_KEYS))}"
        )
    quorum = data.get("quorum", 3)
    if isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 1:
        raise ConfigError(f"project config: quorum must be a whole number >= 1, got {quorum!r}")
    lease = data.get("lease_minutes", 30)
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or lease <= 0:
        raise ConfigError(f"project config: lease_minutes must be a number > 0, got {lease!r}")
    gold_rate = data.get("gold_rate", 0)
    if isinstance(gold_rate, bool) or not isinstance(gold_rate, (int, float)) or not 0 <= gold_rate <= 1:
        raise ConfigError(f"project config: gold_rate must be a number from 0 to 1, got {gold_rate!r}")
    guidelines = data.get("guidelines") or ""
    if data.get("guidelines_file"):
        gpath = (path.parent / data["guidelines_file"]).resolve()
        if not gpath.is_file():
            raise ConfigError(f"project config: guidelines_file {str(gpath)!r} does not exist")
        guidelines = gpath.read_text(encoding="utf-8")
    return {
        "project": str(data.get("project") or DEFAULT_PROJECT),
        "quorum": quorum,
        "lease_seconds": max(1, int(round(lease * 60))),
        "guidelines": str(guidelines),
        "gold_rate": float(gold_rate),
    }


def check_limits(records: list[dict], max_chars: int = MAX_RESPONSE_CHARS) -> list[str]:
    """Row errors (1-based rows) for responses or prompts longer than the app accepts."""
    errors = []
    for i, rec in enumerate(records, start=1):
        text = prompt_text(rec["prompt"])
        if len(text) > MAX_PROMPT_CHARS:
            errors.append(f"row {i}: prompt is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
        for cand in rec["candidates"]:
            n = len(cand["text"])
            if n > max_chars:
                errors.append(
                    f"row {i}: candidate {cand['label']} is {n} characters; the limit is {max_chars}"
                )
    return errors


def import_candidates(
    store: Store,
    source: str,
    *,
    project: str = DEFAULT_PROJECT,
    quorum: int | None = None,
    guidelines: str | None = None,
    lease_seconds: int | None = None,
    gold_rate: float | None = None,
    max_chars: int = MAX_RESPONSE_CHARS,
    correct_gold: bool = False,
) -> dict:
    """Validate and import a candidates file; returns ``{"added", "unchanged", "rows"}``.

    A record's optional ``gold`` is the prompt's known answer (:mod:`annotation_app.gold`);
    ``gold_rate`` the share of each annotator's items drawn from the project's gold items (None
    keeps the stored rate; a new project starts at 0). ``correct_gold`` lets the file change the
    answer of gold items already stored (:meth:`Store.add_items`) and adds ``"gold_corrected"``.

    Raises ``DataError`` (from ``load_candidates``) or :class:`ImportRowsError` listing every bad
    row (sizes, gold answers); nothing is written unless every row is good.
    """
    records = load_candidates(source)
    errors = check_limits(records, max_chars) + gold_problems(records)
    if errors:
        shown = "; ".join(errors[:20]) + (f"; and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise ImportRowsError(f"{source}: {len(errors)} bad row(s), nothing imported: {shown}")
    store.upsert_project(
        project, quorum=quorum, guidelines=guidelines, lease_seconds=lease_seconds, gold_rate=gold_rate
    )
    rows = [{**rec, "prompt_text": prompt_text(rec["prompt"])} for rec in records]
    result = store.add_items(rows, project_id=project, correct_gold=correct_gold)
    return {**result, "rows": len(records)}


def export_rankings(
    store: Store,
    out: str,
    fmt: str = "rankings",
    project: str | None = None,
    trl_style: str = "conversational",
    model: str | None = None,
    kind: str | None = None,
) -> dict:
    """Write the submitted rankings to ``out`` in export format ``fmt`` (``rlhf.data.EXPORT_FORMATS``),
    of ``project`` (None: all) and of projects of ``kind`` (None: ranking items and arena votes).

    Returns ``{"format", "records", "rankings", "out"}``, plus ``"ties"`` and ``"ties_out"`` for
    format ``trl``. ``trl_style`` and ``model`` as in ``rlhf export``.
    """
    check_export_options(fmt, trl_style, model)  # before the store is read
    rankings = store.submitted_rankings(project, kind=kind)
    if not rankings:
        raise StoreError("there are no submitted rankings to export yet", code="nothing_to_export")
    export = build_export(rankings, fmt, trl_style=trl_style, model=model)
    path, ties = write_export(export, out)
    result = {"format": fmt, "records": len(export.records), "rankings": len(rankings), "out": str(path)}
    if ties is not None:
        result.update(ties=len(export.ties), ties_out=str(ties))
    reliability = fit_reliability(rankings, gold=store.gold_answers(project))
    # Only rankings that overlap, or rankings of gold items, say anything about who is reliable.
    if reliability.shared_items or reliability.anchored_items:
        sidecar = annotators_path(path)
        with atomic_file(sidecar) as tmp:
            tmp.write_text(json.dumps(reliability.as_dict(), indent=2))
        result["annotators_out"] = str(sidecar)
    return result


def annotators_path(out: str | Path) -> Path:
    """Where an export writes its annotators' reliability: ``<out stem>.annotators.json`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.annotators.json")
