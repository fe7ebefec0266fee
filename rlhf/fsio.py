"""Saving a directory so that a crash leaves the old version or the new one, never neither.

Every directory the lab saves — policy dirs, reward-model dirs, PPO checkpoints, the model
cache, HF dataset folders — is first written completely under a temporary name next to its final
place, then swapped in by :func:`replace_dir_atomically`. ``rename(2)`` is atomic, but it cannot
replace a non-empty directory (POSIX: "If *new* names an existing directory, it shall be required
to be an empty directory", https://pubs.opengroup.org/onlinepubs/9699919799/functions/rename.html),
so the swap takes two renames and a delete:

1. ``final`` → ``.final.old`` (the backup),
2. the temporary directory → ``final``,
3. delete the backup.

A process killed between 1 and 2 leaves no ``final`` but a complete backup. :func:`recover_dir`
renames that backup back to ``final``; the loaders of saved directories call it before looking
(and so does the next save), so a reader finds the old version. Killed during 3, ``final`` is
already the new version and the half-deleted backup is removed by the next save. Killed before
1, ``final`` was never touched; the temporary directory is left behind, a hidden name
(``.final.tmp-HOST-PID-*``) that nothing loads, and the next write of ``final`` on that machine
deletes it once no process PID is alive there (:func:`temp_sibling`; files are written the same way).

This protects against a killed process (Ctrl-C, SIGKILL, out of memory), not against a power cut:
nothing is fsync'ed. One process writes a given directory at a time; the model cache, which
several processes may build at once, settles that race itself (:mod:`rlhf.models`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from rlhf.errors import ConfigError

BACKUP_SUFFIX = ".old"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_abandoned_temps(final: str | os.PathLike) -> None:
    """Delete the temporary siblings of ``final`` that writers killed on this machine left behind
    (their process is gone). Those of live writers, or of other machines sharing the folder, stay."""
    final = Path(final)
    host = socket.gethostname()
    for leftover in final.parent.glob(glob.escape(f".{final.name}.tmp-") + "*"):
        writer_host, _, rest = leftover.name[len(f".{final.name}.tmp-") :].rpartition("-")
        writer_host, _, pid = writer_host.rpartition("-")
        if writer_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def temp_sibling(final: str | os.PathLike) -> Path:
    """A fresh hidden name next to ``final`` to write it under: ``.NAME.tmp-HOST-PID-RANDOM``. The
    host and process id let a later writer tell an abandoned one from a live one, which it does
    here first (:func:`remove_abandoned_temps`)."""
    final = Path(final)
    remove_abandoned_temps(final)
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def backup_path(final: str | os.PathLike) -> Path:
    """Where :func:`replace_dir_atomically` keeps the old ``final`` during the swap."""
    final = Path(final)
    return final.with_name(f".{final.name}{BACKUP_SUFFIX}")


def recover_dir(final: str | os.PathLike) -> Path:
    """Finish a swap interrupted between its two renames: if ``final`` is missing but its backup
    exists, rename the backup back to ``final``. Returns ``final``; a no-op otherwise."""
    final = Path(final)
    backup = backup_path(final)
    if final.exists() or not backup.is_dir():
        return final
    try:
        os.rename(backup, final)
    except OSError:
        if not final.exists():  # not another process recovering or saving it at the same moment
            raise
    return final


def recover_dirs_in(parent: str | os.PathLike) -> None:
    """:func:`recover_dir` for every interrupted swap of a directory directly inside ``parent``."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for backup in parent.glob(f".*{BACKUP_SUFFIX}"):
        recover_dir(parent / backup.name[1 : -len(BACKUP_SUFFIX)])


def replace_dir_atomically(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the complete directory ``tmp`` to ``final``, replacing an existing ``final`` by the
    three steps of the module docstring. ``tmp`` must be on the same file system (a sibling).

    If step 2 fails, the backup is moved back, so ``final`` is as it was before the call."""
    tmp, final = Path(tmp), Path(final)
    backup = backup_path(final)
    recover_dir(final)  # a crash of an earlier save left only the backup: that is the current version
    if final.exists():
        shutil.rmtree(backup, ignore_errors=True)  # the leftover of an earlier, finished swap
        os.rename(final, backup)
    try:
        os.rename(tmp, final)
    except BaseException:
        recover_dir(final)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return final


def replace_refusal(final: str | os.PathLike, markers: tuple[str, ...], option: str) -> str | None:
    """Why a save must not replace ``final`` (one line naming ``option``, the setting), or None when
    it may: ``final`` is missing, an empty directory, or a directory holding one of ``markers`` (a
    file its kind of save writes).

    A save swaps the whole directory, so without this an output option pointed at an existing
    folder (``--output_dir .``) would delete that folder and everything in it."""
    final = Path(final)
    if not final.exists():  # nothing to replace (an interrupted save's backup is the lab's own)
        return None
    if final.is_dir() and (not any(final.iterdir()) or any((final / m).exists() for m in markers)):
        return None
    written_by = f"a directory that no save of its kind wrote (no {' or '.join(markers)})"
    kind = written_by if final.is_dir() else "a file"
    return (
        f"{option} {str(final)!r} is {kind}; saving there would replace it and everything in it: "
        "give a new or empty directory, or one this kind of save wrote before"
    )


def check_output_dir(
    out: str | os.PathLike, run_dir: str | os.PathLike, markers: tuple[str, ...], option: str
) -> Path:
    """Where a stage will save (``out``), checked before any work starts: not this run's own
    directory ``run_dir`` or a folder holding it (the save would replace the run's logs and
    checkpoints), and replaceable (:func:`replace_refusal`); else error code ``config``. Returns
    ``out`` as a path."""
    out, run_dir = Path(out), Path(run_dir)
    run_path = run_dir.resolve()
    if out.resolve() in (run_path, *run_path.parents):
        raise ConfigError(
            f"{option} {str(out)!r} holds this run's own directory {str(run_dir)!r}; saving there would "
            "replace the run's logs and checkpoints: give another directory (the default is inside it)"
        )
    refusal = replace_refusal(out, markers, option)
    if refusal:
        raise ConfigError(refusal)
    return out


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, replaces: tuple[str, ...] = ()) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` fill ``tmp``; when the block ends without an error, ``tmp``
    replaces ``out`` (:func:`replace_dir_atomically`). On an error ``tmp`` is deleted and ``out``
    is left as it was. ``replaces``: the marker files of the saves that may be replaced; an
    existing ``out`` without one is refused before anything is written (:func:`replace_refusal`)."""
    final = Path(final)
    refusal = replace_refusal(final, replaces, "the output directory") if replaces else None
    if refusal:
        raise ConfigError(refusal)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir_atomically(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(out) as tmp:`` write ``tmp``; when the block ends without an error it is
    flushed to disk and renamed over ``out`` in one step, so a crash at any moment leaves the old
    file or the new one, never a partial file. On an error ``tmp`` is deleted and ``out`` is left
    as it was. The one way the lab replaces a file."""
    final = Path(final)
    tmp = temp_sibling(final)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. its folder could not be made in the first place
            pass
