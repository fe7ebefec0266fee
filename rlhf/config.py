"""Typed configs: nested dataclasses, YAML files, command-line overrides.

Every stage has a config dataclass. Each field carries its help text in
``field(metadata={"help": ...})`` (use :func:`option`), so ``rlhf <stage> --help`` lists every
option with its default. A config is built from, in order of precedence:

1. the dataclass defaults,
2. ``--config FILE.yaml`` (a mapping that mirrors the dataclass; nested dataclasses are nested
   mappings),
3. overrides on the command line, either ``--ppo.kl_coef 0.05`` / ``--ppo.kl_coef=0.05`` or the
   bare form ``ppo.kl_coef=0.05``. Values are parsed as YAML (``true``, ``1e-5``, ``[1, 2]``).

Unknown keys and wrong types raise :class:`~rlhf.errors.ConfigError` naming the key, the bad
value and what is valid (with a did-you-mean suggestion for a misspelt name); every bad field of
a config is listed at once (:class:`ConfigProblems`). The resolved config is saved next to the
run's outputs (:func:`save_config`) and sent to the tracker (:func:`to_dict`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from rlhf.errors import ConfigError

_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, default_factory: Any = _MISSING, choices=None):
    """A dataclass field with help text (shown by ``--help``) and optional allowed ``choices``."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigProblems(ConfigError):
    """Several config problems found at once. ``problems`` holds one line each (``key: problem``);
    the message is that line alone when there is one, else a count and every line indented."""

    def __init__(self, problems: Sequence[str], where: str = ""):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            heading = f"{len(self.problems)} config problems" + (f" in {where}" if where else "")
            message = heading + ":\n  " + "\n  ".join(self.problems)
        super().__init__(message)


def problems_of(err: Exception) -> list[str]:
    """The problem lines of an error: a :class:`ConfigProblems`' own list, else its one message."""
    return list(getattr(err, "problems", None) or [str(err)])


def did_you_mean(word: object, options: Iterable[object], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the option closest to a misspelt ``word``, or ``""`` when none is
    close (difflib's similarity ratio ≥ 0.6, the default of :func:`difflib.get_close_matches`) and
    none starts with it (``smollm2`` for ``smollm2-135m-instruct``). ``prefix`` is shown before the
    suggestion but not compared (``inner.`` of ``inner.lr``)."""
    word, names = str(word), [str(o) for o in options]
    close = difflib.get_close_matches(word, names, n=1)
    if not close and len(word) >= 3:
        close = [n for n in names if n.startswith(word)][:1]
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def exact_div(a: int, b: int, what: str) -> int:
    """``a // b``, raising :class:`ConfigError` when ``b`` does not divide ``a`` (names ``what``)."""
    if b <= 0 or a % b != 0:
        raise ConfigError(f"{what}: {a} is not divisible by {b}")
    return a // b


# ----------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        options = typing.get_args(tp)
        raise ConfigError(
            f"{key}: {value!r} is not one of {', '.join(map(repr, options))}{did_you_mean(value, options)}"
        )
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `6e-4` (no dot before the exponent) as a string; it is a number to anyone
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric seed-like id written without quotes
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted no/off (yes/on) as a boolean: give the word back
            return "no" if value is False else "yes"
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys and wrong types (all of
    them at once, in one :class:`ConfigProblems`), then run the config's own ``validate()``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # Every bad field is collected, so one run of the command shows them all (not one per attempt).
    problems: list[str] = []
    kwargs = {}
    for name, value in _renamed(cls, data, prefix, problems).items():
        key = prefix + name
        if name not in fields:
            problems.append(
                f"{key}: unknown config key{did_you_mean(name, fields, prefix)}; "
                f"valid keys here: {', '.join(prefix + k for k in fields)}"
            )
            continue
        try:
            val = _coerce(value, hints[name], key)
        except ConfigError as err:
            problems.extend(problems_of(err))
            continue
        choices = fields[name].metadata.get("choices")
        if choices is not None and val not in choices:
            problems.append(
                f"{key}: {val!r} is not valid{did_you_mean(val, choices)}; "
                f"choose one of {', '.join(map(str, choices))}"
            )
            continue
        kwargs[name] = val
    if problems:
        raise ConfigProblems(problems)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate) and not prefix:
        validate()
    return obj


def _renamed(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> dict[str, Any]:
    """``data`` with the old names of renamed fields replaced by the new ones.

    A config lists its renamed fields in a class attribute ``RENAMED_KEYS`` (``{old: new}``), so
    experiment files and command lines written for an earlier version keep working. Giving both
    names at once is a problem (which one would win is not obvious).
    """
    renamed = getattr(cls, "RENAMED_KEYS", {})
    out = {}
    for name, value in data.items():
        new = renamed.get(name)
        if new is None:
            out[name] = value
        elif new in data:
            problems.append(
                f"{prefix}{name}: renamed to {prefix}{new}, which is also given; keep only {prefix}{new}"
            )
        else:
            out[new] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (for YAML, JSON and W&B)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(cfg: Any, n: int = 12) -> str:
    """A short stable hash of the resolved config (key order does not matter)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def save_config(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{p}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "--c", "x", "--d=2"]`` → ``{"a.b": 1, "c": "x", "d": 2}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            body = item[2:]
            if "=" in body:
                key, val = body.split("=", 1)
            else:
                if i + 1 >= len(items) or (items[i + 1].startswith("--") and len(items[i + 1]) > 2):
                    raise ConfigError(f"option --{body} needs a value")
                key, val = body, items[i + 1]
                i += 1
        elif "=" in item:
            key, val = item.split("=", 1)
        else:
            raise ConfigError(f"unexpected argument {item!r}; overrides look like key=value or --key value")
        out[key.replace("-", "_")] = _parse_value(val)
        i += 1
    return out


def build_config(
    cls: type[T],
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """Defaults ← ``base`` ← YAML file ← overrides; validated, with one clear error on any problem."""
    data: dict[str, Any] = {}
    if base:
        data = json.loads(json.dumps(base))
    if config_file:
        _deep_update(data, read_yaml(config_file))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


# ----------------------------------------------------------------------------- argparse glue


def _iter_fields(cls: type, prefix: str = ""):
    """Every (nested) field of ``cls``; a config's own fields come before the shared blocks it
    inherits (run fields, adapter fields), so ``--help`` starts with what is particular to it."""
    hints = _hints(cls)
    own = set(vars(cls).get("__annotations__", {}))
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _iter_fields(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, tp


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not _MISSING:
        return repr(f.default)
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config FILE`` and one ``--field.name`` option per (nested) field of ``cls``.

    Values given on the command line are collected unparsed and validated by :func:`config_from_args`,
    so the error for a wrong type is the same whichever way the value arrived.
    """
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML config; command-line options override it")
    group = parser.add_argument_group(
        "config fields",
        "any field can also be given as key=value after the options, e.g. seed=3; "
        "dashes may stand for underscores (--runs-dir for --runs_dir)",
    )
    for name, f, tp in _iter_fields(cls):
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        extra = f" (choices: {', '.join(map(str, choices))})" if choices else ""
        group.add_argument(
            f"--{name}",
            dest=f"cfg::{name}",
            metavar=_type_name(tp).upper().replace(" ", "_"),
            default=argparse.SUPPRESS,
            help=f"{help_text}{extra} [default: {_default_repr(f)}]".replace("%", "%%"),
        )
    # Bare key=value overrides (and misspelt --options) are not declared here: the `rlhf` entry point
    # collects whatever argparse does not recognise, in order, into ``overrides``, so a typo is reported
    # by the config resolver with the valid keys instead of argparse's bare usage line.
    parser.set_defaults(overrides=[])


def config_from_args(args: argparse.Namespace, cls: type[T], base: dict[str, Any] | None = None) -> T:
    """Resolve the config of a stage from parsed arguments (see :func:`add_config_arguments`)."""
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg::"):
            overrides[key[5:]] = _parse_value(value) if isinstance(value, str) else value
    overrides.update(parse_overrides(list(getattr(args, "overrides", []) or [])))
    return build_config(cls, getattr(args, "config", None), overrides, base=base)
