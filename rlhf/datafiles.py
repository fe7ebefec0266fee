"""Reading and writing record files: the one home of JSON Lines in the lab.

Readers take a *source*: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder written by
``datasets.save_to_disk``, a Hub dataset id (online only), ``lab:prompts`` / ``lab:demonstrations``
(the starter data shipped in ``rlhf/lab_data/``), or an in-memory list of dicts. JSON Lines is read
here, not by ``datasets``, so each problem has its line number: invalid JSON, NaN/Infinity (not
JSON, though Python writes them), duplicate keys, non-UTF-8 bytes, a byte-order mark, lines over
1 MB. Every bad row is collected and reported at once in one :class:`DataError` whose ``.errors``
holds a :class:`RowError` per problem (1-based line number for JSON Lines).

Writers are atomic (temp file + rename, :mod:`rlhf.fsio`): a failed write never leaves a partial
file behind. What the records must contain is :mod:`rlhf.contracts`' job.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.fsio import atomic_dir, atomic_file, replace_refusal

MAX_LINE_BYTES = 1 << 20  # a JSONL line over 1 MB is almost surely not one record (a lost newline)
MAX_LISTED = 50  # rows listed in one DataError message; the rest are counted
LAB_SOURCES = ("prompts", "demonstrations")
# what `datasets.save_to_disk` writes into a dataset folder (a Dataset; a DatasetDict)
DATASET_MARKERS = ("state.json", "dataset_dict.json")


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


def type_name(value: Any) -> str:
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


def read_source(source: str | os.PathLike | Sequence[dict]) -> _Rows:
    if isinstance(source, (list, tuple)):
        return _Rows("records", [("record", i + 1, rec) for i, rec in enumerate(source)])
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(
            f"a data source is a path, a Hub id or a list of records, got {type_name(source)}", code="source"
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
        RowError(n, None, f"expected a JSON object, got {type_name(rec)}", unit)
        for unit, n, rec in rows.rows
        if not isinstance(rec, dict)
    ]
    if errors:
        raise DataError.from_rows(rows.name, sorted(errors, key=lambda e: e.row or 0), "JSON Lines")
    return [rec for _, _, rec in rows.rows]


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


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records as JSON Lines (UTF-8, no NaN), atomically: a temp file renamed into place."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a file name ending in .jsonl", code="output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp, open(tmp, "x", encoding="utf-8", newline="\n") as fh:
            for i, rec in enumerate(records):
                fh.write(_dumps(rec, i) + "\n")
    except OSError as err:  # no such folder, permission denied, disk full: the user's to fix
        raise DataError(f"cannot write {path}: {err.strerror or err}", code="output") from None
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
    refusal = replace_refusal(p, DATASET_MARKERS, "output") if kind == "dataset" else None
    if refusal:  # a dataset is saved by swapping the whole folder: never over a folder of other things
        raise DataError(refusal, code="output")
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


def _columns(records: list[dict]) -> dict[str, list]:
    """Column-wise records over every key any record has (a key missing from a record is None).

    Arrow's and datasets' ``from_list`` take the columns from the first record only, which would
    silently drop a field that only later records carry (an optional field such as ``edit``).
    """
    names = dict.fromkeys(key for rec in records for key in rec)
    return {name: [rec.get(name) for rec in records] for name in names}


def _save_parquet(records: list[dict], out: Path, column_types: Mapping[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pydict(_columns([_without_empty_objects(rec) for rec in records]))
        for name, type_ in column_types.items():
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, table[name].cast(type_))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise DataError(
            f"cannot store these records as parquet ({err}); write .jsonl instead", code="output"
        ) from None
    with atomic_file(out) as tmp:
        pq.write_table(table, tmp)


def _without_empty_objects(value: Any) -> Any:
    """``value`` with every empty object (``{}``) replaced by ``None``, at any depth.

    Parquet cannot store a struct with no fields (pyarrow refuses to write one), and a column of
    empty objects, such as candidates' ``gen: {}`` from a source that recorded no generation
    settings, would stop the whole export. Every reader of the lab treats a missing object like an
    empty one.
    """
    if isinstance(value, dict):
        return {k: _without_empty_objects(v) for k, v in value.items()} or None
    if isinstance(value, list):
        return [_without_empty_objects(v) for v in value]
    return value


def _save_dataset(records: list[dict], out: Path, column_types: Mapping[str, Any]) -> None:
    import datasets

    quiet = datasets.is_progress_bar_enabled()
    if quiet:  # bars for steps that take milliseconds are noise
        datasets.disable_progress_bars()
    try:
        ds = _typed_dataset(records, column_types)
        with atomic_dir(out, replaces=DATASET_MARKERS) as tmp:  # a crash leaves the old folder or the new one
            ds.save_to_disk(str(tmp))
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _typed_dataset(records: list[dict], column_types: Mapping[str, Any]) -> Any:
    """The records as a ``datasets.Dataset`` with the ``column_types`` it has set, the rest inferred."""
    import datasets
    import pyarrow as pa

    try:
        ds = datasets.Dataset.from_dict(_columns(records))
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
