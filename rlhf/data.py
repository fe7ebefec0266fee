"""The lab's data contracts (docs/architecture.md): loaders with validation, atomic writers, derived pairs.

Loaders (``load_prompts``, ``load_demonstrations``, ``load_candidates``, ``load_rankings``,
``load_pairs``) take a *source*: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder written by
``datasets.save_to_disk``, a Hub dataset id (online only), ``lab:prompts`` / ``lab:demonstrations``
(the starter data shipped in ``rlhf/lab_data/``), or an in-memory list of dicts. They return
``list[dict]`` checked against the contract and normalised (ids as strings, canonical ranking
strings). Every bad row is collected and reported at once in one :class:`DataError` whose
``.errors`` holds a :class:`RowError` per problem (1-based line number for JSON Lines).

JSON Lines is read here, not by ``datasets``, so each problem has its line number: invalid
JSON, NaN/Infinity (not JSON, though Python writes them), duplicate keys, non-UTF-8 bytes, a
byte-order mark, lines over 1 MB. Writers are atomic (temp file + rename): a failed write never
leaves a partial file behind.

Also here: ``rankings_to_pairs`` (docs/rankings.md "Derived pairs"), ``rankings_to_trl`` (TRL's
preference format), ``ranking_for_export`` (one schema for exported rankings) and the
``rlhf export`` command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, add_config_arguments, config_from_args, option
from rlhf.errors import UserError
from rlhf.fsio import replace_dir_atomically, temp_sibling
from rlhf.rankings import ALL_LABELS, MAX_K, MIN_K, Ranking, RankingError, parse_ranking
from rlhf.tracking import TrackingConfig

MAX_LINE_BYTES = 1 << 20  # a JSONL line over 1 MB is almost surely not one record (a lost newline)
MAX_LISTED = 50  # rows listed in one DataError message; the rest are counted
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
LAB_SOURCES = ("prompts", "demonstrations")


# ----------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class RowError:
    """One problem in one row: ``row`` is 1-based (a line number for JSON Lines; None = whole file)."""

    row: int | None
    field: str | None
    message: str
    unit: str = "line"

    def where(self) -> str:
        return f"{self.unit} {self.row}" if self.row is not None else "file"

    def __str__(self) -> str:
        return f"{self.where()}: {self.field + ': ' if self.field else ''}{self.message}"


class DataError(UserError):
    """A data source that is missing, unreadable or breaks its contract.

    ``errors`` lists every problem found (a :class:`RowError` each). The message's first line is
    a summary (``3 bad rows in FILE``), then one line per bad row, at most :data:`MAX_LISTED`.
    """

    code = "data"

    def __init__(
        self,
        message: str,
        errors: Sequence[RowError] = (),
        code: str | None = None,
        source: str | None = None,
    ):
        super().__init__(message, code=code)
        self.errors = list(errors)
        self.source = source

    @classmethod
    def from_rows(cls, source: str, errors: Sequence[RowError], what: str = "rows") -> DataError:
        # One line per bad row; several problems of one row are joined on that row's line.
        lines: dict[tuple[str, int | None], list[str]] = {}
        for e in errors:
            lines.setdefault((e.unit, e.row), []).append(f"{e.field + ': ' if e.field else ''}{e.message}")
        rows = [
            f"{RowError(row, None, '; '.join(msgs), unit).where()}: {'; '.join(msgs)}"
            for (unit, row), msgs in lines.items()
        ]
        n = len(rows)
        if n == 1:
            message = f"bad row in {source}: {rows[0]}"
        else:
            shown = rows[:MAX_LISTED]
            more = f"\n  … and {n - len(shown)} more bad rows" if n > len(shown) else ""
            message = f"{n} bad rows in {source} ({what}):\n  " + "\n  ".join(shown) + more
        return cls(message, errors, code="bad_rows", source=source)


# ----------------------------------------------------------------------------- JSON reading


class _JSONProblem(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _JSONProblem(f"{name} is not valid JSON (write null or a finite number)")


def _object_no_dup_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _JSONProblem(f"duplicate key {k!r} in one object")
        out[k] = v
    return out


def _parse_json(text: str) -> Any:
    """``json.loads`` that rejects NaN/Infinity and duplicate keys (raises ``_JSONProblem``)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_object_no_dup_keys)
    except json.JSONDecodeError as err:
        raise _JSONProblem(f"not valid JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise _JSONProblem("not valid JSON: nested too deeply") from None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@dataclass
class _Rows:
    """Records read from a source, each with where it came from, plus reading problems."""

    name: str
    rows: list[tuple[str, int, Any]] = field(default_factory=list)  # (unit, 1-based number, record)
    errors: list[RowError] = field(default_factory=list)


def _read_jsonl_rows(path: Path, name: str | None = None, max_line_bytes: int = MAX_LINE_BYTES) -> _Rows:
    """Stream a JSON Lines file: one record per non-blank line, every bad line collected."""
    out = _Rows(name or str(path))
    with open(path, "rb") as fh:
        head = fh.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise DataError(
                f"{out.name} is UTF-16 (it starts with a UTF-16 byte-order mark); "
                "save it as UTF-8 without a BOM",
                code="encoding",
                source=out.name,
            )
        fh.seek(0)
        lineno = 0
        while True:
            raw = fh.readline(max_line_bytes + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                out.errors.append(
                    RowError(
                        lineno,
                        None,
                        f"line is longer than {max_line_bytes:,} bytes: "
                        "one record per line (is a newline missing?)",
                    )
                )
                while raw and not raw.endswith(b"\n"):  # skip the rest of this line, keep counting
                    raw = fh.readline(max_line_bytes)
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                out.errors.append(
                    RowError(
                        1,
                        None,
                        "the file starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without a BOM",
                    )
                )
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                out.errors.append(
                    RowError(
                        lineno,
                        None,
                        f"not valid UTF-8: byte 0x{raw[err.start]:02x} at byte "
                        f"{err.start + 1} of the line; save the file as UTF-8",
                    )
                )
                continue
            if not text.strip():
                continue  # blank lines (e.g. a trailing newline) carry no record
            try:
                rec = _parse_json(text)
            except _JSONProblem as err:
                if not out.rows and text.strip() in ("[", "{"):
                    # A pretty-printed JSON document: every line would fail; say so once.
                    raise DataError(
                        f"{out.name} is a multi-line JSON document, not JSON Lines (one record per "
                        "line): write one object per line, or use a .json file holding an array",
                        code="bad_json",
                        source=out.name,
                    ) from None
                out.errors.append(RowError(lineno, None, str(err)))
                continue
            out.rows.append(("line", lineno, rec))
    return out


def _read_json_file(path: Path, name: str) -> _Rows:
    """A ``.json`` file: a JSON array of records, or JSON Lines under a ``.json`` name."""
    with open(path, "rb") as fh:
        start = fh.read(64).lstrip()
    if start.startswith(b"\xef\xbb\xbf"):
        start = start[3:].lstrip()
    if not start.startswith(b"["):
        return _read_jsonl_rows(path, name)
    out = _Rows(name)
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DataError(
            f"{name} starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without a BOM",
            code="encoding",
            source=name,
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{name}: not valid UTF-8 on line {line} (byte 0x{raw[err.start]:02x}); save it as UTF-8",
            code="encoding",
            source=name,
        ) from None
    try:
        data = _parse_json(text)
    except _JSONProblem as err:
        raise DataError(f"{name}: {err}", code="bad_json", source=name) from None
    out.rows = [("record", i + 1, rec) for i, rec in enumerate(data)]
    return out


def _dataset_rows(ds: Any, name: str) -> _Rows:
    """Rows of a ``datasets.Dataset`` or ``DatasetDict`` (a split's name fills a missing ``split``)."""
    import datasets

    out = _Rows(name)
    if isinstance(ds, (datasets.DatasetDict, dict)):
        for split_name, part in ds.items():
            for i, rec in enumerate(part.to_list()):
                if isinstance(rec, dict) and rec.get("split") is None:
                    rec["split"] = split_name
                out.rows.append((f"{split_name} row", i + 1, rec))
    else:
        out.rows = [("row", i + 1, rec) for i, rec in enumerate(ds.to_list())]
    return out


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


def _read_hub(repo_id: str) -> _Rows:
    import datasets
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        # datasets would only say it "couldn't reach" the Hub; say what to do instead.
        raise DataError(
            f"{repo_id!r} is not a local file or folder, and the Hugging Face Hub is offline here "
            "(HF_HUB_OFFLINE=1): download the dataset where the Hub is reachable and pass its "
            "local path (a .jsonl/.parquet file or a save_to_disk folder)",
            code="offline",
            source=repo_id,
        )
    try:
        ds = datasets.load_dataset(repo_id)
    except Exception as err:  # datasets raises many kinds (network, missing repo, bad config)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"could not load the Hub dataset {repo_id!r}: {first}", code="hub", source=repo_id
        ) from None
    return _dataset_rows(ds, repo_id)


def _read_source(source: str | os.PathLike | Sequence[dict]) -> _Rows:
    if isinstance(source, (list, tuple)):
        return _Rows("records", [("record", i + 1, rec) for i, rec in enumerate(source)])
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(
            f"a data source is a path, a Hub id or a list of records, got {_type_name(source)}", code="source"
        )
    text = os.fspath(source)
    if text.startswith("lab:"):
        which = text[4:]
        if which not in LAB_SOURCES:
            raise DataError(
                f"unknown shipped data {text!r}; choose lab:{' or lab:'.join(LAB_SOURCES)}",
                code="source",
                source=text,
            )
        ref = resources.files("rlhf.lab_data").joinpath(f"{which}.jsonl")
        if not ref.is_file():
            raise DataError(
                f"the shipped data file rlhf/lab_data/{which}.jsonl is missing: the lab is not "
                "installed completely (reinstall it)",
                code="not_found",
                source=text,
            )
        with resources.as_file(ref) as path:
            return _read_jsonl_rows(path, text)
    if not text.strip():
        raise DataError("no data source given (empty path)", code="not_found")
    path = Path(text).expanduser()
    if path.is_dir():
        markers = ("state.json", "dataset_dict.json", "dataset_info.json")
        if not any((path / m).is_file() for m in markers):
            raise DataError(
                f"{path} is a folder but not a saved dataset (no state.json or dataset_dict.json "
                "from datasets' save_to_disk)",
                code="source",
                source=text,
            )
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:  # a damaged folder: arrow errors, missing files
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(
                f"could not read the dataset folder {path}: {first}", code="source", source=text
            ) from None
        return _dataset_rows(ds, text)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl_rows(path, text)
        if suffix == ".json":
            return _read_json_file(path, text)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                records = pq.read_table(path).to_pylist()
            except Exception as err:  # pyarrow's errors for a corrupt or non-parquet file
                raise DataError(
                    f"{path} is not a readable parquet file: {err}", code="source", source=text
                ) from None
            return _Rows(text, [("row", i + 1, rec) for i, rec in enumerate(records)])
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; use .jsonl, .json, .parquet or "
            "a dataset folder",
            code="source",
            source=text,
        )
    if _HUB_ID.fullmatch(text) and not text.lower().endswith(_FILE_SUFFIXES):
        return _read_hub(text)
    raise DataError(
        f"file not found: {text} (a source is a .jsonl/.json/.parquet file, a dataset folder, "
        "a Hub id, or lab:prompts / lab:demonstrations)",
        code="not_found",
        source=text,
    )


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSON Lines file; a :class:`DataError` lists every unreadable line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}", code="not_found", source=str(p))
    rows = _read_jsonl_rows(p)
    errors = list(rows.errors)
    errors += [
        RowError(n, None, f"expected a JSON object, got {_type_name(rec)}", unit)
        for unit, n, rec in rows.rows
        if not isinstance(rec, dict)
    ]
    if errors:
        raise DataError.from_rows(rows.name, sorted(errors, key=lambda e: e.row or 0), "JSON Lines")
    return [rec for _, _, rec in rows.rows]


# ----------------------------------------------------------------------------- field checks
# Each check returns the clean value and appends (field, message) problems; None = unusable.

Problems = list[tuple[str, str]]


def _check_id(value: Any, fld: str, problems: Problems) -> str | None:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # ids stored as numbers are common; the contract keeps strings
    if value is None:
        problems.append((fld, "missing"))
    elif isinstance(value, str):
        problems.append((fld, "is empty"))
    else:
        problems.append((fld, f"must be a string id, got {_type_name(value)} {value!r}"))
    return None


def _check_content(value: Any, fld: str, problems: Problems) -> bool:
    if isinstance(value, str):
        return True
    # Multimodal-style content: [{"type": "text", "text": "..."}], as TRL and chat templates accept.
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        )
    ):
        return True
    problems.append(
        (fld, f"must be a string (or a list of {{type: text, text}} parts), got {_type_name(value)}")
    )
    return False


def _check_messages(value: Any, fld: str, problems: Problems) -> bool:
    """A chat: a non-empty list of ``{"role": ..., "content": ...}`` objects."""
    if not isinstance(value, list):
        problems.append((fld, f"must be a list of chat messages, got {_type_name(value)}"))
        return False
    if not value:
        problems.append((fld, "is an empty list of chat messages"))
        return False
    ok = True
    for i, msg in enumerate(value):
        where = f"{fld}[{i}]"
        if not isinstance(msg, dict):
            problems.append((where, f"must be an object {{role, content}}, got {_type_name(msg)}"))
            ok = False
            continue
        role = msg.get("role")
        if role not in CHAT_ROLES:
            problems.append(
                (f"{where}.role", f"{role!r} is not a chat role; use one of {', '.join(CHAT_ROLES)}")
            )
            ok = False
        if "content" not in msg or msg.get("content") is None:
            problems.append((f"{where}.content", "missing"))
            ok = False
        elif not _check_content(msg["content"], f"{where}.content", problems):
            ok = False
    return ok


def content_text(content: Any) -> str:
    """Plain text of a message's content (a string or a list of text parts)."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def _check_prompt(value: Any, fld: str, problems: Problems) -> Any:
    """A prompt: non-empty text, or chat messages with at least one non-empty user turn."""
    if value is None:
        problems.append((fld, "missing"))
        return None
    if isinstance(value, str):
        if not value.strip():
            problems.append((fld, "is empty"))
            return None
        return value
    if isinstance(value, list):
        if not _check_messages(value, fld, problems):
            return None
        if not any(m["role"] == "user" and content_text(m["content"]).strip() for m in value):
            problems.append((fld, "has no non-empty user message"))
            return None
        return value
    problems.append((fld, f"must be text or a list of chat messages, got {_type_name(value)}"))
    return None


def _check_str(
    value: Any, fld: str, problems: Problems, *, required: bool = False, allow_empty: bool = True
) -> str | None:
    if value is None:
        if required:
            problems.append((fld, "missing"))
        return None
    if not isinstance(value, str):
        problems.append((fld, f"must be a string, got {_type_name(value)}"))
        return None
    if not allow_empty and not value.strip():
        problems.append((fld, "is empty"))
        return None
    return value


def _check_optional_common(rec: dict, clean: dict, problems: Problems) -> None:
    """``split`` (a name) and ``metadata`` (an object), both optional."""
    if rec.get("split") is not None:
        clean["split"] = _check_str(rec["split"], "split", problems, allow_empty=False)
    meta = rec.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        problems.append(("metadata", f"must be an object, got {_type_name(meta)}"))


def prompt_text(prompt: Any) -> str:
    """The plain text of a prompt field: the text itself, or the chat messages as text.

    A single message gives its content; a longer chat gives ``role: content`` lines.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        msgs = [m for m in prompt if isinstance(m, dict)]
        if len(msgs) == 1:
            return content_text(msgs[0].get("content", ""))
        return "\n".join(f"{m.get('role', '')}: {content_text(m.get('content', ''))}" for m in msgs)
    raise ValueError(f"a prompt is text or a list of chat messages, got {_type_name(prompt)}")


def _text_id(text: str, prefix: str = "p") -> str:
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


# ----------------------------------------------------------------------------- record validators


def validate_prompt(rec: Any) -> tuple[dict | None, Problems]:
    """Prompts contract: ``prompt_id``, ``prompt`` (text or chat ``messages``), optional ``split``, ``metadata``."""
    problems: Problems = []
    if not isinstance(rec, dict):
        return None, [("", f"expected a JSON object, got {_type_name(rec)}")]
    clean = dict(rec)
    clean["prompt_id"] = _check_id(rec.get("prompt_id"), "prompt_id", problems)
    if rec.get("prompt") is None and rec.get("messages") is not None:
        clean["prompt"] = _check_prompt(
            rec["messages"], "messages", problems
        )  # a chat prompt stored as `messages`
        clean.pop("messages", None)
    else:
        clean["prompt"] = _check_prompt(rec.get("prompt"), "prompt", problems)
    _check_optional_common(rec, clean, problems)
    return (None if problems else clean), problems


def validate_demonstration(rec: Any) -> tuple[dict | None, Problems]:
    """Demonstrations contract, TRL's formats: ``prompt`` + ``completion`` (both text or both chat
    messages), or a chat in ``messages`` ending with the assistant's answer."""
    problems: Problems = []
    if not isinstance(rec, dict):
        return None, [("", f"expected a JSON object, got {_type_name(rec)}")]
    clean = dict(rec)
    has_msgs = rec.get("messages") is not None
    has_pc = rec.get("prompt") is not None or rec.get("completion") is not None
    if has_msgs and has_pc:
        problems.append(
            ("messages", "a demonstration has either `messages` or `prompt` + `completion`, not both")
        )
    elif has_msgs:
        msgs = rec["messages"]
        if _check_messages(msgs, "messages", problems):
            if not any(m["role"] == "user" for m in msgs):
                problems.append(("messages", "has no user message"))
            if msgs[-1]["role"] != "assistant":
                problems.append(
                    ("messages", f"must end with the assistant's answer, ends with {msgs[-1]['role']!r}")
                )
            elif not content_text(msgs[-1]["content"]).strip():
                problems.append(("messages", "the assistant's answer is empty"))
    elif has_pc:
        prompt = _check_prompt(rec.get("prompt"), "prompt", problems)
        comp = rec.get("completion")
        if comp is None:
            problems.append(("completion", "missing"))
        elif isinstance(comp, str):
            if not comp.strip():
                problems.append(("completion", "is empty"))
            elif isinstance(prompt, list):
                problems.append(
                    ("completion", "is text but the prompt is chat messages; use the same format for both")
                )
        elif isinstance(comp, list):
            if _check_messages(comp, "completion", problems):
                roles = {m["role"] for m in comp}
                if roles != {"assistant"}:
                    problems.append(
                        ("completion", "chat messages of a completion must all be the assistant's")
                    )
                elif not any(content_text(m["content"]).strip() for m in comp):
                    problems.append(("completion", "is empty"))
                elif isinstance(prompt, str):
                    problems.append(
                        (
                            "completion",
                            "is chat messages but the prompt is text; use the same format for both",
                        )
                    )
        else:
            problems.append(
                ("completion", f"must be text or a list of chat messages, got {_type_name(comp)}")
            )
    else:
        problems.append(("", "needs `prompt` + `completion` or chat `messages` (TRL's formats)"))
    if rec.get("prompt_id") is not None:
        clean["prompt_id"] = _check_id(rec["prompt_id"], "prompt_id", problems)
    _check_optional_common(rec, clean, problems)
    return (None if problems else clean), problems


def _check_candidates(value: Any, problems: Problems) -> list[dict] | None:
    """``candidates``: 2 ≤ K ≤ 26 objects ``{label, text, model, gen}``, labelled A, B, C, ... in order."""
    if value is None:
        problems.append(("candidates", "missing"))
        return None
    if not isinstance(value, list):
        problems.append(("candidates", f"must be a list of {{label, text}} objects, got {_type_name(value)}"))
        return None
    k = len(value)
    if not MIN_K <= k <= MAX_K:
        problems.append(("candidates", f"has K = {k} candidates; each prompt needs {MIN_K} to {MAX_K}"))
        return None
    n_before = len(problems)
    out = []
    for i, cand in enumerate(value):
        where = f"candidates[{i}]"
        if not isinstance(cand, dict):
            problems.append((where, f"must be an object {{label, text}}, got {_type_name(cand)}"))
            continue
        label = cand.get("label")
        if label is None:
            problems.append((f"{where}.label", "missing"))
        elif label != ALL_LABELS[i]:
            problems.append(
                (
                    f"{where}.label",
                    f"is {label!r}, expected {ALL_LABELS[i]!r}: candidates are labelled "
                    "A, B, C, ... in the order shown",
                )
            )
        text = cand.get("text")
        if text is None:
            problems.append((f"{where}.text", "missing"))
        elif not isinstance(text, str):
            problems.append((f"{where}.text", f"must be a string, got {_type_name(text)}"))
        if cand.get("model") is not None and not isinstance(cand["model"], str):
            problems.append((f"{where}.model", f"must be a string, got {_type_name(cand['model'])}"))
        if cand.get("gen") is not None and not isinstance(cand["gen"], dict):
            problems.append(
                (f"{where}.gen", f"must be an object of generation settings, got {_type_name(cand['gen'])}")
            )
        out.append(cand)
    return out if len(problems) == n_before else None


def validate_candidates(rec: Any) -> tuple[dict | None, Problems]:
    """Candidates contract: ``prompt_id``, ``prompt``, ``candidates`` (K = 2..26, labels A, B, ...)."""
    problems: Problems = []
    if not isinstance(rec, dict):
        return None, [("", f"expected a JSON object, got {_type_name(rec)}")]
    clean = dict(rec)
    clean["prompt_id"] = _check_id(rec.get("prompt_id"), "prompt_id", problems)
    clean["prompt"] = _check_prompt(rec.get("prompt"), "prompt", problems)
    clean["candidates"] = _check_candidates(rec.get("candidates"), problems)
    _check_optional_common(rec, clean, problems)
    return (None if problems else clean), problems


def validate_ranking(rec: Any) -> tuple[dict | None, Problems]:
    """Rankings contract: a candidates record plus ``ranking`` (parsed by the grammar, must be
    complete), ``tiers`` (must agree with it; derived when absent), ``annotator``, ``flags``,
    ``created_at``, optional ``gold`` (see :func:`_check_gold`). Other extra fields are kept."""
    clean, problems = validate_candidates(rec)
    if not isinstance(rec, dict):
        return None, problems
    clean = dict(rec) if clean is None else clean
    cands = rec.get("candidates")
    labels = None
    if isinstance(cands, list) and not any(f.startswith("candidates") for f, _ in problems):
        labels = [c["label"] for c in cands]
    text, tiers = rec.get("ranking"), rec.get("tiers")
    parsed = from_tiers = None
    if text is None and tiers is None:
        problems.append(("ranking", "missing: give the ranking as text (e.g. 'C > B = D > A') or as `tiers`"))
    if text is not None and not isinstance(text, str):
        problems.append(("ranking", f"must be a string like 'C > B = D > A', got {_type_name(text)}"))
    elif text is not None and labels is not None:
        try:
            parsed = parse_ranking(text, labels, complete=True)
        except RankingError as err:
            problems.append(("ranking", f"[{err.code}] {err}"))
    if tiers is not None and labels is not None:
        try:
            from_tiers = Ranking.from_tiers(tiers, labels, complete=True)
        except RankingError as err:
            problems.append(("tiers", f"[{err.code}] {err}"))
    if parsed is not None and from_tiers is not None and parsed != from_tiers:
        problems.append(
            (
                "tiers",
                f"{[list(t) for t in from_tiers.tiers]} say {str(from_tiers)!r} but the ranking "
                f"says {str(parsed)!r}",
            )
        )
    ranking = parsed or from_tiers
    annotator = rec.get("annotator")
    if annotator is None:
        clean["annotator"] = "unknown"
    elif isinstance(annotator, int) and not isinstance(annotator, bool):
        clean["annotator"] = str(annotator)
    elif not isinstance(annotator, str) or not annotator.strip():
        problems.append(("annotator", f"must be a non-empty string, got {annotator!r}"))
    flags = rec.get("flags")
    if flags is None:
        flags = []
    elif not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        problems.append(("flags", f"must be a list of strings, got {flags!r}"))
        flags = []
    if rec.get("created_at") is not None and not isinstance(rec["created_at"], str):
        problems.append(("created_at", f"must be a string timestamp, got {_type_name(rec['created_at'])}"))
    if rec.get("gold") is not None and labels is not None:
        clean["gold"] = _check_gold(rec["gold"], labels, problems)
    if problems or ranking is None:
        return None, problems
    clean["ranking"] = str(ranking)
    clean["tiers"] = [list(t) for t in ranking.tiers]
    # An all-tied ranking carries no strict preference: flag it so consumers can see why (docs/rankings.md).
    clean["flags"] = list(flags) + (["all_tied"] if ranking.all_tied and "all_tied" not in flags else [])
    return clean, problems


def _check_gold(value: Any, labels: list[str], problems: Problems) -> dict[str, float] | None:
    """``gold``, the simulated annotators' gold score per candidate, as a ``{label: score}`` object.

    Two forms are read: the list aligned with ``candidates`` that exported rankings hold (one
    schema for any K, docs/architecture.md "Data contracts"), and the ``{label: score}`` object
    that ``rlhf simulate`` writes. Every reader in the lab uses the object, so both become one;
    a null score (no gold for that candidate) is left out of it.
    """
    if isinstance(value, list):
        if len(value) != len(labels):
            problems.append(
                ("gold", f"has {len(value)} scores for {len(labels)} candidates; give one per candidate")
            )
            return None
        scores = dict(zip(labels, value))
    elif isinstance(value, dict):
        unknown = [lab for lab in value if lab not in labels]
        if unknown:
            problems.append(
                ("gold", f"scores {unknown[0]!r}, which is not a candidate label ({', '.join(labels)})")
            )
            return None
        scores = dict(value)
    else:
        problems.append(
            ("gold", f"must be a list of scores aligned with the candidates, got {_type_name(value)}")
        )
        return None
    for label, score in scores.items():
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            problems.append(("gold", f"the score of {label} must be a number or null, got {score!r}"))
            return None
    return {label: float(score) for label, score in scores.items() if score is not None}


def validate_pair(rec: Any) -> tuple[dict | None, Problems]:
    """Pairs contract: ``prompt``, ``chosen``, ``rejected`` (TRL's preference columns), ``tie``
    (default false), ``prompt_id`` (a hash of the prompt when absent), ``annotator``."""
    problems: Problems = []
    if not isinstance(rec, dict):
        return None, [("", f"expected a JSON object, got {_type_name(rec)}")]
    clean = dict(rec)
    prompt = _check_prompt(rec.get("prompt"), "prompt", problems)
    for key in ("chosen", "rejected"):
        val = rec.get(key)
        if val is None:
            problems.append((key, "missing"))
        elif isinstance(val, list):
            _check_messages(val, key, problems)
        elif not isinstance(val, str):
            problems.append((key, f"must be text or a list of chat messages, got {_type_name(val)}"))
    tie = rec.get("tie")
    if tie is None:
        clean["tie"] = False
    elif not isinstance(tie, bool):
        problems.append(("tie", f"must be true or false, got {tie!r}"))
    if rec.get("prompt_id") is not None:
        clean["prompt_id"] = _check_id(rec["prompt_id"], "prompt_id", problems)
    elif prompt is not None:
        clean["prompt_id"] = _text_id(prompt_text(prompt))
    annotator = rec.get("annotator")
    if annotator is None:
        clean["annotator"] = "unknown"
    elif not isinstance(annotator, str):
        problems.append(("annotator", f"must be a string, got {_type_name(annotator)}"))
    for key in ("chosen_label", "rejected_label"):
        _check_str(rec.get(key), key, problems)
    return (None if problems else clean), problems


# ----------------------------------------------------------------------------- loaders


def _load(
    source: Any, validate: Callable[[Any], tuple[dict | None, Problems]], what: str, unique_id: bool = False
) -> list[dict]:
    rows = _read_source(source)
    errors = list(rows.errors)
    out: list[dict] = []
    first_seen: dict[str, str] = {}
    for unit, n, rec in rows.rows:
        clean, problems = validate(rec)
        errors += [RowError(n, fld or None, msg, unit) for fld, msg in problems]
        if clean is None:
            continue
        if unique_id:
            pid = clean["prompt_id"]
            if pid in first_seen:
                errors.append(
                    RowError(n, "prompt_id", f"duplicate id {pid!r} (first on {first_seen[pid]})", unit)
                )
                continue
            first_seen[pid] = f"{unit} {n}"
        out.append(clean)
    if errors:
        # Reading problems and contract problems together, in file order.
        order = {(u, n): i for i, (u, n, _) in enumerate(rows.rows)}
        errors.sort(key=lambda e: (e.row if e.unit == "line" else order.get((e.unit, e.row), 0)) or 0)
        raise DataError.from_rows(rows.name, errors, what)
    if not out:
        raise DataError(f"no {what} in {rows.name} (it is empty)", code="empty", source=rows.name)
    return out


def _by_split(records: list[dict], split: str | None, what: str, name: str) -> list[dict]:
    # Records without a `split` field belong to every split: a plain file of prompts is usable as is.
    if split is None or not any(r.get("split") is not None for r in records):
        return records
    picked = [r for r in records if r.get("split") in (None, split)]
    if not picked:
        present = sorted({str(r.get("split")) for r in records})
        raise DataError(
            f"no {what} with split {split!r} in {name}; splits present: {', '.join(present)}",
            code="split",
            source=name,
        )
    return picked


def _source_name(source: Any) -> str:
    return "records" if isinstance(source, (list, tuple)) else os.fspath(source)


def load_prompts(source: Any, split: str | None = None) -> list[dict]:
    """Prompts (``prompt_id``, ``prompt``, ``split``, ``metadata``); ids must be unique.

    ``split`` keeps the records of that split (records without a ``split`` field are kept too).
    """
    return _by_split(
        _load(source, validate_prompt, "prompts", unique_id=True), split, "prompts", _source_name(source)
    )


def load_demonstrations(source: Any, split: str | None = None) -> list[dict]:
    """SFT demonstrations in TRL's formats: ``prompt`` + ``completion`` or ``messages``."""
    return _by_split(
        _load(source, validate_demonstration, "demonstrations"), split, "demonstrations", _source_name(source)
    )


def load_candidates(source: Any) -> list[dict]:
    """Candidates (``prompt_id``, ``prompt``, ``candidates``: K = 2..26 labelled A, B, ...); ids unique."""
    return _load(source, validate_candidates, "candidates", unique_id=True)


def load_rankings(source: Any) -> list[dict]:
    """Rankings with ties; ``ranking`` canonicalised and ``tiers`` filled in (see :func:`validate_ranking`)."""
    return _load(source, validate_ranking, "rankings")


def load_pairs(source: Any) -> list[dict]:
    """Preference pairs (``prompt``, ``chosen``, ``rejected``, ``tie``, ...), e.g. from ``rlhf export``."""
    return _load(source, validate_pair, "pairs")


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
    from rlhf.models import format_conversation, format_prompt

    # `rlhf generate` records whether a response ended with EOS; a response cut at the length
    # limit is formatted without it, as the lab's reward model reads it (docs/reward-models.md).
    ended = {c["label"]: bool((c.get("gen") or {}).get("finished", True)) for c in rec["candidates"]}
    prompt = format_prompt(tokenizer, rec["prompt"])
    completions = {
        label: format_conversation(tokenizer, rec["prompt"], text, eos=ended[label])[len(prompt) :]
        for label, text in texts.items()
    }
    return prompt, completions


# ----------------------------------------------------------------------------- exported rankings


def ranking_for_export(rec: dict) -> dict:
    """A validated ranking as exported: the same columns, of the same types, for any ranking.

    ``gold`` becomes a list aligned with ``candidates`` (an object keyed A, B, C, ... loads in
    ``datasets`` as a struct whose fields change with K) and is null when the ranking has no gold
    scores, as is ``gold_scorer``: human and simulated rankings share one schema. The lab's
    loaders read the list back into the ``{label: score}`` object (:func:`_check_gold`).
    """
    labels = [c["label"] for c in rec["candidates"]]
    gold = rec.get("gold")
    out = {k: v for k, v in rec.items() if k not in ("gold", "gold_scorer")}
    out["gold"] = [gold.get(label) for label in labels] if gold else None
    out["gold_scorer"] = rec.get("gold_scorer")
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
    }


# ----------------------------------------------------------------------------- writers


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _find_bad_value(obj: Any, path: str = "") -> str:
    """Where in a record a value JSON cannot hold (NaN/Infinity) sits, e.g. ``gold.B``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{path or 'value'} = {obj}"
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _find_bad_value(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _find_bad_value(v, f"{path}[{i}]")
            if found:
                return found
    return ""


def _dumps(rec: Any, index: int) -> str:
    try:
        return json.dumps(rec, ensure_ascii=False, allow_nan=False, default=_json_default)
    except ValueError:
        where = _find_bad_value(rec) or "a value"
        raise DataError(
            f"record {index + 1}: {where} cannot be written as JSON (NaN/Infinity are not JSON)",
            code="bad_value",
        ) from None
    except TypeError as err:
        raise DataError(f"record {index + 1}: {err}", code="bad_value") from None


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:  # e.g. its folder could not be made in the first place
        pass


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records as JSON Lines (UTF-8, no NaN), atomically: a temp file renamed into place."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a file name ending in .jsonl", code="output")
    tmp = temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "x", encoding="utf-8", newline="\n") as fh:
            for i, rec in enumerate(records):
                fh.write(_dumps(rec, i) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:  # no such folder, permission denied, disk full: the user's to fix
        _discard(tmp)
        raise DataError(f"cannot write {path}: {err.strerror or err}", code="output") from None
    except BaseException:
        _discard(tmp)
        raise
    return path


def output_kind(out: str | os.PathLike) -> str:
    """``jsonl``, ``parquet`` or ``dataset`` (a ``save_to_disk`` folder) for an output path."""
    p = Path(out)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        kind = "jsonl"
    elif suffix == ".parquet":
        kind = "parquet"
    elif suffix in ("", ".hf", ".arrow", ".dataset") or p.is_dir():
        kind = "dataset"
    else:
        raise DataError(
            f"output {p}: use a .jsonl or .parquet file, or a folder name for an HF dataset (not {suffix!r})",
            code="output",
        )
    if kind != "dataset" and p.is_dir():
        raise DataError(f"output {p} is an existing folder; give a file name", code="output")
    if kind == "dataset" and p.is_file():
        raise DataError(f"output {p} is an existing file; give a folder name for the dataset", code="output")
    return kind


def save_records(
    records: Sequence[dict], out: str | os.PathLike, column_types: Mapping[str, Any] | None = None
) -> Path:
    """Save records as ``.jsonl``, ``.parquet``, or (any other path) an HF dataset folder
    (``datasets.load_from_disk`` reads it). Atomic: nothing is left at ``out`` on failure.

    ``column_types`` (column name → pyarrow type) fixes those columns' types in parquet and
    dataset folders, where they would be inferred from the values (``null`` for a column that is
    null in every row); JSON Lines has no types to fix.
    """
    out = Path(out)
    kind = output_kind(out)
    if kind == "jsonl":
        return write_jsonl(out, records)
    records = [json.loads(_dumps(r, i)) for i, r in enumerate(records)]  # numpy → plain, NaN → error
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == "parquet":
            _save_parquet(records, out, column_types or {})
        else:
            _save_dataset(records, out, column_types or {})
    except OSError as err:
        raise DataError(f"cannot write {out}: {err.strerror or err}", code="output") from None
    return out


def _save_parquet(records: list[dict], out: Path, column_types: Mapping[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(records)
        for name, type_ in column_types.items():
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, table[name].cast(type_))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise DataError(
            f"cannot store these records as parquet ({err}); write .jsonl instead", code="output"
        ) from None
    tmp = temp_sibling(out)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    except BaseException:
        _discard(tmp)
        raise


def _save_dataset(records: list[dict], out: Path, column_types: Mapping[str, Any]) -> None:
    import datasets

    quiet = datasets.is_progress_bar_enabled()
    if quiet:  # bars for steps that take milliseconds are noise
        datasets.disable_progress_bars()
    try:
        ds = _typed_dataset(records, column_types)
        tmp = temp_sibling(out)
        try:
            ds.save_to_disk(str(tmp))
            replace_dir_atomically(tmp, out)  # a crash leaves the old folder or the new one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _typed_dataset(records: list[dict], column_types: Mapping[str, Any]) -> Any:
    """``datasets.Dataset.from_list(records)`` with the ``column_types`` it has set, the rest inferred."""
    import datasets
    import pyarrow as pa

    try:
        ds = datasets.Dataset.from_list(records)
        typed = {name: type_ for name, type_ in column_types.items() if name in ds.column_names}
        if typed:
            ds = ds.cast(
                datasets.Features(
                    {**ds.features, **datasets.Features.from_arrow_schema(pa.schema(list(typed.items())))}
                )
            )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as err:
        first = (str(err).splitlines() or [""])[0]
        raise DataError(
            f"cannot store these records as an HF dataset ({first}); write .jsonl instead", code="output"
        ) from None
    return ds


# ----------------------------------------------------------------------------- rlhf export

# What each format is for (docs/architecture.md, "Data contracts"):
#   rankings: the validated rankings, ties included, for the lab's losses over whole rankings;
#   pairs:    every derived pair with its `tie` flag, for pair losses that model ties;
#   trl:      strict pairs only, for TRL's RewardTrainer and DPOTrainer; ties in a file beside it.
EXPORT_FORMATS = ("pairs", "rankings", "trl", "kto")


@dataclass
class ExportConfig:
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
        "for TRL's KTOTrainer",
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
    experiment: str = option("default", help="experiment name (W&B group; runs/<experiment>/)")
    runs_dir: str = option("runs", help="root folder of run directories")
    seed: int = option(0, help="random seed (export is deterministic; kept so every stage config has one)")
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

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
    tokenizer = None
    if trl_style == "standard":
        from rlhf.models import load_tokenizer

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
    from rlhf.tracking import stage_run_dir, start_stage

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
        help="turn rankings into a preference dataset (rankings, derived pairs, or TRL's format)",
        description=(
            "Validate rankings (every bad row is reported with its line number) and write them, or the "
            "pairs derived from them, as JSONL, parquet or an HF dataset folder. From C > B = D > A the "
            "pairs are (C,B) (C,D) (C,A) (B,A) (D,A) plus the tie {B,D}. --format pairs keeps the tie "
            "as a row with tie=true (for pair losses that model ties); --format trl writes the strict pairs "
            "in TRL's preference format for RewardTrainer/DPOTrainer and the ties to <out "
            "stem>.ties.jsonl beside it. The output is logged as a W&B dataset artifact."
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
