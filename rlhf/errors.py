"""User-facing errors.

Every mistake a user can make (a bad config key, a malformed ranking, a broken data file) raises a
:class:`UserError` subclass with a stable ``code`` and a message for people. The command line
prints ``error[<code>]: <message>`` on one line and exits with status 2; it never shows a
traceback for these.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input. ``code`` is stable; ``str(err)`` is one clear line."""

    code = "invalid"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError):
    """Unknown config key, wrong type, bad value, or sizes that don't divide."""

    code = "config"
