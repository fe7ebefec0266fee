"""The error every part of the annotation app raises when it refuses a request.

Its ``code`` is what the named API returns as ``{"ok": false, "code": ...}``, so scripts can
tell an expired lease from a bad ranking without reading the message.
"""

from __future__ import annotations

from rlhf.errors import UserError


class StoreError(UserError):
    """A request the store refuses (unknown prompt, expired lease, bad ranking, ...)."""

    code = "store"
