"""The lab's data contracts (docs/architecture.md, "Data contracts"): each record kind's fields,
checked and normalised, and the loaders that apply them.

Loaders (``load_prompts``, ``load_demonstrations``, ``load_candidates``, ``load_rankings``,
``load_pairs``) read any source :mod:`rlhf.datafiles` reads and return ``list[dict]`` checked
against the contract and normalised (ids as strings, canonical ranking strings). Every bad row is
reported at once, with its line number. :func:`prompt_text` is the one rule that turns a prompt
(text or chat messages) into plain text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from rlhf.datafiles import DataError, RowError, read_source, type_name
from rlhf.rankings import ALL_LABELS, MAX_K, MIN_K, Ranking, RankingError, parse_ranking

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


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
        problems.append((fld, f"must be a string id, got {type_name(value)} {value!r}"))
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
        (fld, f"must be a string (or a list of {{type: text, text}} parts), got {type_name(value)}")
    )
    return False


def _check_messages(value: Any, fld: str, problems: Problems) -> bool:
    """A chat: a non-empty list of ``{"role": ..., "content": ...}`` objects."""
    if not isinstance(value, list):
        problems.append((fld, f"must be a list of chat messages, got {type_name(value)}"))
        return False
    if not value:
        problems.append((fld, "is an empty list of chat messages"))
        return False
    ok = True
    for i, msg in enumerate(value):
        where = f"{fld}[{i}]"
        if not isinstance(msg, dict):
            problems.append((where, f"must be an object {{role, content}}, got {type_name(msg)}"))
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
        # The response is the next assistant turn, so the chat template's generation prompt
        # follows the last message (rlhf.models.format_prompt): caught here, with the row's number.
        if value[-1]["role"] == "assistant":
            problems.append(
                (fld, "ends with an assistant message: a prompt is the conversation before the response")
            )
            return None
        return value
    problems.append((fld, f"must be text or a list of chat messages, got {type_name(value)}"))
    return None


def _check_str(
    value: Any, fld: str, problems: Problems, *, required: bool = False, allow_empty: bool = True
) -> str | None:
    if value is None:
        if required:
            problems.append((fld, "missing"))
        return None
    if not isinstance(value, str):
        problems.append((fld, f"must be a string, got {type_name(value)}"))
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
        problems.append(("metadata", f"must be an object, got {type_name(meta)}"))


def prompt_text(prompt: Any) -> str:
    """The plain text of a prompt field: the text itself, or the chat messages as text.

    A single message gives its content; a longer chat gives ``role: content`` lines. The one rule
    for every place a prompt is shown or handed to a scorer as text (tables, logs, gold scorers).
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and isinstance(prompt.get("messages"), list):
        prompt = prompt["messages"]
    if isinstance(prompt, list):
        msgs = [m for m in prompt if isinstance(m, dict)]
        if len(msgs) == 1:
            return content_text(msgs[0].get("content", ""))
        return "\n".join(f"{m.get('role', '')}: {content_text(m.get('content', ''))}" for m in msgs)
    raise ValueError(f"a prompt is text or a list of chat messages, got {type_name(prompt)}")


def candidates_finished(candidates: list[dict]) -> list[bool]:
    """Whether each candidate ended with EOS: ``gen.finished`` as ``rlhf generate`` records it
    (a response cut at the length limit has no EOS), True where the record does not say. Every
    reader that formats a response as the reward model saw it (training, scoring, TRL export)
    appends EOS by this rule."""
    return [bool((c.get("gen") or {}).get("finished", True)) for c in candidates]


def _text_id(text: str, prefix: str = "p") -> str:
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


# ----------------------------------------------------------------------------- record validators


def validate_prompt(rec: Any) -> tuple[dict | None, Problems]:
    """Prompts contract: ``prompt_id``, ``prompt`` (text or chat ``messages``), optional ``split``, ``metadata``."""
    problems: Problems = []
    if not isinstance(rec, dict):
        return None, [("", f"expected a JSON object, got {type_name(rec)}")]
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
        return None, [("", f"expected a JSON object, got {type_name(rec)}")]
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
            problems.append(("completion", f"must be text or a list of chat messages, got {type_name(comp)}"))
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
        problems.append(("candidates", f"must be a list of {{label, text}} objects, got {type_name(value)}"))
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
            problems.append((where, f"must be an object {{label, text}}, got {type_name(cand)}"))
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
            problems.append((f"{where}.text", f"must be a string, got {type_name(text)}"))
        if cand.get("model") is not None and not isinstance(cand["model"], str):
            problems.append((f"{where}.model", f"must be a string, got {type_name(cand['model'])}"))
        if cand.get("gen") is not None and not isinstance(cand["gen"], dict):
            problems.append(
                (f"{where}.gen", f"must be an object of generation settings, got {type_name(cand['gen'])}")
            )
        out.append(cand)
    return out if len(problems) == n_before else None


def validate_candidates(rec: Any) -> tuple[dict | None, Problems]:
    """Candidates contract: ``prompt_id``, ``prompt``, ``candidates`` (K = 2..26, labels A, B, ...)."""
    problems: Problems = []
    if not isinstance(rec, dict):
        return None, [("", f"expected a JSON object, got {type_name(rec)}")]
    clean = dict(rec)
    clean["prompt_id"] = _check_id(rec.get("prompt_id"), "prompt_id", problems)
    clean["prompt"] = _check_prompt(rec.get("prompt"), "prompt", problems)
    clean["candidates"] = _check_candidates(rec.get("candidates"), problems)
    _check_optional_common(rec, clean, problems)
    return (None if problems else clean), problems


def validate_ranking(rec: Any) -> tuple[dict | None, Problems]:
    """Rankings contract: a candidates record plus ``ranking`` (parsed by the grammar, must be
    complete), ``tiers`` (must agree with it; derived when absent), ``annotator``, ``flags``,
    ``created_at``, optional ``gold`` (see :func:`_check_gold`) and ``edit`` / ``edit_of`` (see
    :func:`_check_edit`). Other extra fields are kept."""
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
        problems.append(("ranking", f"must be a string like 'C > B = D > A', got {type_name(text)}"))
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
        problems.append(("created_at", f"must be a string timestamp, got {type_name(rec['created_at'])}"))
    if rec.get("gold") is not None and labels is not None:
        clean["gold"] = _check_gold(rec["gold"], labels, problems)
    _check_edit(rec, labels, ranking, problems)
    if problems or ranking is None:
        return None, problems
    clean["ranking"] = str(ranking)
    clean["tiers"] = [list(t) for t in ranking.tiers]
    # An all-tied ranking carries no strict preference: flag it so consumers can see why (docs/rankings.md).
    clean["flags"] = list(flags) + (["all_tied"] if ranking.all_tied and "all_tied" not in flags else [])
    return clean, problems


def _check_edit(rec: dict, labels: list[str] | None, ranking: Ranking | None, problems: Problems) -> None:
    """``edit`` and ``edit_of``: the annotator's corrected version of the best response, both or neither.

    ``edit`` is non-empty text; ``edit_of`` is the label of the candidate it corrects, which must be
    the one label of the ranking's top tier: the edit improves on the response the annotator ranked
    best, so it is a demonstration (``rlhf export --format demonstrations``). A tied top tier names
    no single best response to correct. Null counts as absent, as everywhere in the contracts.
    """
    edit, edit_of = rec.get("edit"), rec.get("edit_of")
    if edit is None and edit_of is None:
        return
    if edit is None:
        problems.append(("edit", "missing: `edit_of` names the edited candidate, so give its corrected text"))
    else:
        _check_str(edit, "edit", problems, allow_empty=False)
    if edit_of is None:
        problems.append(("edit_of", "missing: give the label of the candidate that `edit` corrects"))
        return
    if not isinstance(edit_of, str):
        problems.append(("edit_of", f"must be a candidate label like 'A', got {type_name(edit_of)}"))
        return
    if labels is None:
        return  # the candidates are broken and reported already
    if edit_of not in labels:
        problems.append(("edit_of", f"{edit_of!r} is not a candidate label ({', '.join(labels)})"))
        return
    if ranking is None:
        return  # the ranking is broken and reported already
    top = ranking.tiers[0]
    if len(top) > 1:
        problems.append(
            (
                "edit_of",
                f"the ranking's top tier ties {' = '.join(top)}: an edit corrects the single best "
                "response, so rank one candidate first",
            )
        )
    elif edit_of != top[0]:
        problems.append(
            ("edit_of", f"is {edit_of!r}, but the top-ranked candidate is {top[0]!r}: edit the best response")
        )


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
            ("gold", f"must be a list of scores aligned with the candidates, got {type_name(value)}")
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
        return None, [("", f"expected a JSON object, got {type_name(rec)}")]
    clean = dict(rec)
    prompt = _check_prompt(rec.get("prompt"), "prompt", problems)
    for key in ("chosen", "rejected"):
        val = rec.get(key)
        if val is None:
            problems.append((key, "missing"))
        elif isinstance(val, list):
            _check_messages(val, key, problems)
        elif not isinstance(val, str):
            problems.append((key, f"must be text or a list of chat messages, got {type_name(val)}"))
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
        problems.append(("annotator", f"must be a string, got {type_name(annotator)}"))
    for key in ("chosen_label", "rejected_label"):
        _check_str(rec.get(key), key, problems)
    return (None if problems else clean), problems


# ----------------------------------------------------------------------------- loaders


def _load(
    source: Any, validate: Callable[[Any], tuple[dict | None, Problems]], what: str, unique_id: bool = False
) -> list[dict]:
    rows = read_source(source)
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
