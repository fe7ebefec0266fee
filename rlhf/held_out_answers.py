"""The policies' answers to held-out prompts as a file: ``rlhf eval`` writes it, ``rlhf arena`` reads it.

Both commands sample one answer per prompt with the same sampler and settings
(:class:`rlhf.evaluate.HeldOutSampling`), so an arena run right after an evaluation would sample
the same policies again. It reads the evaluation's answers instead (``responses_from``): one set of
answers, measured by ``eval`` and judged blind by the arena, and no second sampling.

Answers are reused only when nothing that decides them differs: the sampling settings (all but
``num_prompts`` and ``batch_size``), the prompts (the arena's must be the first of the evaluation's,
by id and text), and the policy's files (their names, sizes and modification times). Under bf16
weights a row's rounding depends on the batch it was sampled in, so a fresh sampling in other
batches writes other answers, from the same distribution (docs/arena.md); reusing them is what
makes the two stages judge the same text.

The file, ``responses.json``::

    {"sampling": {setting: value}, "policies": {path: fingerprint},
     "rows": [{"prompt_id", "prompt", "responses": {path: {"text", "n_tokens", "finished"}}}]}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf.fsio import atomic_file

FILE = "responses.json"


def answer_records(rollout, texts: Sequence[str]) -> list[dict[str, Any]]:
    """``[{text, n_tokens, finished}]`` of a sampled rollout (``rlhf.sampling``) and its decoded texts."""
    lengths, finished = rollout.mask.sum(-1).tolist(), rollout.has_stop.tolist()
    return [{"text": t, "n_tokens": int(n), "finished": bool(f)} for t, n, f in zip(texts, lengths, finished)]


def policy_fingerprint(path: str) -> str:
    """What identifies a policy's weights here: for a folder, the name, size and modification time
    of each file in it (a policy written again has new times); otherwise the name itself (an alias)."""
    folder = Path(path)
    if not folder.is_dir():
        return str(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = file.stat()
        digest.update(f"{file.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _key(path: str) -> str:
    return os.path.abspath(path) if Path(path).exists() else str(path)


def write_answers(
    out: Path, sampling, records: Sequence[Mapping], answers: Mapping[str, Sequence[Mapping]]
) -> Path:
    """Write ``answers`` (policy path → one answer per record) to ``out / responses.json``;
    ``sampling``: the :class:`rlhf.evaluate.HeldOutSampling` they were sampled with."""
    keys = {_key(p): p for p in answers}  # each path's key once, not once per row
    doc = {
        "sampling": sampling.answer_settings(),
        "policies": {key: policy_fingerprint(p) for key, p in keys.items()},
        "rows": [
            {
                "prompt_id": rec["prompt_id"],
                "prompt": rec["prompt"],
                "responses": {key: dict(answers[p][i]) for key, p in keys.items()},
            }
            for i, rec in enumerate(records)
        ],
    }
    target = Path(out) / FILE
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return target


def reusable_answers(
    source: str, sampling, records: Sequence[Mapping], policies: Sequence[tuple[str, str]]
) -> tuple[dict[str, list[dict]], list[str]]:
    """The answers in ``source`` (a ``responses.json`` or the run dir holding it) that can stand for
    sampling ``policies`` (``(name, path)``) on ``records`` with ``sampling``: ``({name: answers},
    reasons)``, a reason for each policy (or the whole file) that must be sampled instead.
    ``sampling``: a :class:`rlhf.evaluate.HeldOutSampling` (the arena's config)."""
    file = Path(source) / FILE if Path(source).is_dir() else Path(source)
    if not file.is_file():
        return {}, [f"no answers to reuse at {source} ({FILE} not found)"]
    doc = json.loads(file.read_text())
    ours = sampling.answer_settings()
    differ = [k for k in ours if doc["sampling"].get(k) != ours[k]]
    if differ:
        k = differ[0]
        return {}, [f"{file} was sampled with {k} {doc['sampling'].get(k)!r}, not {ours[k]!r}"]
    rows = doc["rows"]
    same_prompts = len(rows) >= len(records) and all(
        (row["prompt_id"], row["prompt"]) == (rec["prompt_id"], rec["prompt"])
        for row, rec in zip(rows, records)
    )
    if not same_prompts:
        return {}, [f"{file} does not begin with the arena's prompts (by id and text)"]
    reused, reasons = {}, []
    for name, path in policies:
        key = _key(path)
        if key not in doc["policies"]:
            reasons.append(f"{name}: not among the policies of {file}")
        elif doc["policies"][key] != policy_fingerprint(path):
            reasons.append(f"{name}: {path} changed since {file} was written")
        else:
            reused[name] = [dict(row["responses"][key]) for row in rows[: len(records)]]
    return reused, reasons
