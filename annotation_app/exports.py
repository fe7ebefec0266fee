"""Export files for admins to download: private, for the admin who made them only, short-lived.

An admin's export (:func:`annotation_app.handlers.admin_export`) is written into a folder of its
own inside the server's private export folder (mode 0700, made with :func:`tempfile.mkdtemp`),
under a random, unguessable token (``secrets.token_urlsafe``: 256 bits) recorded with the
admin's user name and an expiry (:data:`EXPORT_LIFETIME_S`). The server's route
(:class:`annotation_app.server.ExportDownloads`) serves it at ``/export/<token>/<file name>``
only to a logged-in admin who is the one who made it, as an attachment, and deletes the file
once it is sent. A sweep deletes what was
never downloaded once it expires, and the whole folder goes when the server stops (or the
process exits).

Gradio's own ``gr.File`` would copy the file into its cache and serve it at ``/gradio_api/file=``
to any logged-in user who has the link, with no expiry; hence this route (OWASP File Upload /
Access Control Cheat Sheets: check authorization on every request for the object, keep exported
data out of shared folders).

The registry is per process, like Gradio's login sessions: a link works on the server process
that made it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EXPORT_LIFETIME_S = 600.0
ROUTE_PREFIX = "/export/"


@dataclass(frozen=True)
class Export:
    """One export: its token, the admin who made it, its folder, when it expires (``time.time``)."""

    token: str
    owner: str
    folder: Path
    expires_at: float

    def url(self, name: str) -> str:
        """The download link of file ``name``, relative to the page (so it works under a proxy prefix)."""
        return f"{ROUTE_PREFIX.lstrip('/')}{self.token}/{name}"


class ExportRegistry:
    """The exports waiting to be downloaded, in a private folder made on first use."""

    def __init__(self, lifetime_s: float = EXPORT_LIFETIME_S, clock=time.time):
        self.lifetime_s, self.clock = lifetime_s, clock
        self._folder: Path | None = None
        self._exports: dict[str, Export] = {}
        self._lock = threading.Lock()
        atexit.register(self.close)  # a server stopped without its shutdown hook still cleans up

    @contextlib.contextmanager
    def new(self, owner: str) -> Iterator[Export]:
        """A fresh export for ``owner`` to write files into; dropped if the block fails."""
        self.sweep()
        with self._lock:
            token = secrets.token_urlsafe(32)
            folder = self._root() / token
            folder.mkdir(mode=0o700)
            export = Export(token, owner, folder, self.clock() + self.lifetime_s)
            self._exports[token] = export
        try:
            yield export
        except BaseException:
            self.discard(token)
            raise

    def links(self, export: Export, files: list[tuple[str, str]]) -> str:
        """Markdown for the page: a link to each file of ``export`` (its name, what it holds) and
        what the links allow."""
        listed = "\n".join(f"* [{name}]({export.url(name)}) ({what})" for name, what in files)
        return f"{listed}\n\nEach link works once, for you only, for {round(self.lifetime_s / 60)} minutes."

    def find(self, token: str, owner: str, name: str) -> Path | None:
        """The file ``name`` of export ``token`` if ``owner`` made it and it has not expired."""
        with self._lock:
            export = self._exports.get(token)
        if export is None or export.owner != owner or self.clock() >= export.expires_at:
            return None
        # Only a plain name listed in the export's own folder: no path can lead out of it (and
        # no hidden file: a download being sent, below).
        if name.startswith(".") or "/" in name or name not in _listing(export.folder):
            return None
        return export.folder / name

    def claim(self, token: str, owner: str, name: str) -> Path | None:
        """Like :meth:`find`, and take the file away from every later request: it is renamed to
        a hidden name for the one download that sends it (one rename wins; a download is once
        only even when two requests arrive together). Delete it with :meth:`delete_file`."""
        path = self.find(token, owner, name)
        if path is None:
            return None
        claimed = path.with_name(f".sending-{secrets.token_hex(8)}-{name}")
        try:
            path.rename(claimed)
        except FileNotFoundError:  # another request claimed it first
            return None
        return claimed

    def delete_file(self, token: str, name: str) -> None:
        """Delete a downloaded file; the export goes with its last file."""
        with self._lock:
            export = self._exports.get(token)
        if export is None:
            return
        (export.folder / name).unlink(missing_ok=True)
        if not _listing(export.folder):
            self.discard(token)

    def discard(self, token: str) -> None:
        with self._lock:
            export = self._exports.pop(token, None)
        if export is not None:
            shutil.rmtree(export.folder, ignore_errors=True)

    def sweep(self) -> int:
        """Delete every expired export; returns how many."""
        now = self.clock()
        with self._lock:
            expired = [t for t, e in self._exports.items() if now >= e.expires_at]
        for token in expired:
            self.discard(token)
        return len(expired)

    def close(self) -> None:
        """Delete every export and the folder (at server shutdown); a later export makes a new one."""
        with self._lock:
            folder, self._folder = self._folder, None
            self._exports.clear()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    @property
    def folder(self) -> Path | None:
        return self._folder

    def _root(self) -> Path:
        # Under the lock. mkdtemp makes the folder readable by this user only (mode 0700).
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="rlhf_exports_"))
        return self._folder


def _listing(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:  # swept or discarded meanwhile
        return []


# The process's registry: handlers.admin_export writes into it, the server's route reads it.
REGISTRY = ExportRegistry()
