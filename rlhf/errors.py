"""User-facing errors.

Every mistake a user can make (a bad config key, a malformed ranking, a broken data file) raises a
:class:`UserError` subclass with a stable ``code`` and a message for people. The command line
prints ``error[<code>]: <message>`` on one line and exits with status 2; it never shows a
traceback for these.
"""

from __future__ import annotations

import importlib
from types import ModuleType


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


class MissingExtraError(UserError):
    """An optional part of the lab is used without its packages installed."""

    code = "missing-extra"


def require_extra(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` for ``what``, or say which extra of ``rlhf-lab`` installs it (pyproject.toml)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{what} needs the {module.split('.')[0]} package, which is not installed: "
            f"pip install 'rlhf-lab[{extra}]' (or 'rlhf-lab[all]')"
        ) from err
