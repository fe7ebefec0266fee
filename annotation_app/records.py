"""The records the store hands out: a leased item, and the result of a submit, skip or revision."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from annotation_app.database import AnyRow


@dataclass
class Item:
    """One leased prompt as an annotator sees it."""

    prompt_id: str
    project: str
    prompt: str
    candidates: list[dict]  # [{"label": "A", "text": ...}, ...] in display order
    lease_expires_at: float
    guidelines: str = ""
    draft: dict | None = None  # {"ranking", "flags", "comment"} of the caller's saved draft, + "edit" if any
    conversation: list[dict] | None = None  # a multi-turn prompt's messages ({role, content}); None: plain
    # A model's proposed ranking, set only for an annotator who opted in to see it (no anchoring
    # otherwise): never filled from the prompt alone.
    proposal: str | None = None

    @property
    def labels(self) -> list[str]:
        return [c["label"] for c in self.candidates]

    def to_dict(self) -> dict:
        return {
            "prompt_id": self.prompt_id,
            "project": self.project,
            "prompt": self.prompt,
            "conversation": self.conversation,
            "responses": {c["label"]: c["text"] for c in self.candidates},
            "labels": self.labels,
            "lease_expires_at": self.lease_expires_at,
            "draft": self.draft,
            # absent, not null, for an annotator who has not opted in: their answers name no proposal
            **({"proposal": self.proposal} if self.proposal is not None else {}),
        }


@dataclass
class SubmitResult:
    prompt_id: str
    status: str  # submitted | skipped
    ranking: str
    flags: list[str] = field(default_factory=list)
    duplicate: bool = False  # True when this client token had already been stored
    revision: int = 0

    def to_dict(self) -> dict:
        return {
            "ok": True,
            "prompt_id": self.prompt_id,
            "status": self.status,
            "ranking": self.ranking,
            "flags": list(self.flags),
            "duplicate": self.duplicate,
            "revision": self.revision,
        }


def result_from_row(row: AnyRow, duplicate: bool = False) -> SubmitResult:
    """The :class:`SubmitResult` of a stored ``rankings`` row."""
    return SubmitResult(
        prompt_id=row["prompt_id"],
        status=row["status"],
        ranking=row["ranking"],
        flags=json.loads(row["flags_json"]),
        duplicate=duplicate,
        revision=row["revision"],
    )
