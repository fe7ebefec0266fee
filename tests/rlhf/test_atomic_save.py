"""Saves are atomic: a writer killed at any moment leaves the old version or the new one, never
none and never a mix (rlhf/fsio.py).

The unit tests drive :func:`rlhf.fsio.replace_dir_atomically` through each crash state by hand;
the kill tests run real savers (a reward model, a policy dir, a PPO checkpoint) in a subprocess
that re-saves an existing directory and pauses at a chosen moment of the swap, SIGKILL it there,
and load what is left.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf.errors import ConfigError
from rlhf.fsio import atomic_dir, backup_path, recover_dir, recover_dirs_in, replace_dir_atomically

REPO = Path(__file__).resolve().parents[2]


def _make_dir(path: Path, version: str) -> Path:
    path.mkdir(parents=True)
    (path / "version").write_text(version)
    (path / "weights.bin").write_bytes(version.encode() * 100)
    return path


def _version(path: Path) -> str:
    return (path / "version").read_text()


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# ----------------------------------------------------------------------------- the swap, by hand


def test_replace_creates_and_replaces_leaving_nothing_behind(tmp_path):
    final = tmp_path / "out"
    replace_dir_atomically(_make_dir(tmp_path / ".out.tmp-1", "v1"), final)
    assert _version(final) == "v1" and _siblings(final) == ["out"]
    replace_dir_atomically(_make_dir(tmp_path / ".out.tmp-2", "v2"), final)
    assert _version(final) == "v2" and _siblings(final) == ["out"]


def test_a_crash_between_the_renames_is_recovered_on_load_and_by_the_next_save(tmp_path):
    final = _make_dir(tmp_path / "out", "v1")
    os.rename(final, backup_path(final))  # the writer died right after step 1
    assert not final.exists()
    assert recover_dir(final) == final and _version(final) == "v1"  # what every loader does first
    assert not backup_path(final).exists()

    os.rename(final, backup_path(final))  # the same crash, and no loader ran before the next save
    replace_dir_atomically(_make_dir(tmp_path / ".out.tmp-2", "v2"), final)
    assert _version(final) == "v2" and _siblings(final) == ["out"]


def test_a_crash_while_deleting_the_backup_leaves_the_new_version(tmp_path):
    final = _make_dir(tmp_path / "out", "v2")
    half_deleted = _make_dir(backup_path(final), "v1")
    (half_deleted / "weights.bin").unlink()
    assert recover_dir(final) == final and _version(final) == "v2"  # final wins over a backup
    replace_dir_atomically(_make_dir(tmp_path / ".out.tmp-3", "v3"), final)
    assert _version(final) == "v3" and _siblings(final) == ["out"]


def test_a_failed_second_rename_puts_the_old_version_back(tmp_path):
    final = _make_dir(tmp_path / "out", "v1")
    with pytest.raises(FileNotFoundError):
        replace_dir_atomically(tmp_path / ".out.tmp-missing", final)
    assert _version(final) == "v1" and _siblings(final) == ["out"]


def test_atomic_dir_swaps_in_on_success_and_leaves_the_old_on_error(tmp_path):
    final = _make_dir(tmp_path / "out", "v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "version").write_text("half")
        raise RuntimeError("the save failed midway")
    assert _version(final) == "v1" and _siblings(final) == ["out"]
    with atomic_dir(final) as tmp:
        (tmp / "version").write_text("v2")
    assert _version(final) == "v2" and _siblings(final) == ["out"]


def test_a_save_replaces_only_what_its_kind_of_save_wrote(tmp_path):
    """``replaces``: a missing or empty directory, or one holding the marker, is replaced; anything
    else is refused before a byte is written, and left as it was."""
    for name, make in [
        ("missing", None),
        ("empty", lambda p: p.mkdir()),
        ("ours", lambda p: _make_dir(p, "MARK")),
    ]:
        final = tmp_path / name
        if make:
            make(final)
        with atomic_dir(final, replaces=("version",)) as tmp:
            (tmp / "version").write_text("new")
        assert _version(final) == "new"
    theirs, a_file = tmp_path / "theirs", tmp_path / "a_file"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("v1")
    a_file.write_text("mine")
    for final in (theirs, a_file):
        with pytest.raises(ConfigError, match="replace it and everything in it"):
            with atomic_dir(final, replaces=("version",)):
                raise AssertionError("the block must not run")
    assert (theirs / "notes.txt").read_text() == "v1" and a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty", "missing", "ours", "theirs"]


def test_recover_dirs_in_recovers_every_interrupted_swap(tmp_path):
    for name in ("a", "b"):
        os.rename(_make_dir(tmp_path / name, name), backup_path(tmp_path / name))
    _make_dir(tmp_path / "c", "c")
    recover_dirs_in(tmp_path)
    assert [_version(tmp_path / n) for n in ("a", "b", "c")] == ["a", "b", "c"]
    assert _siblings(tmp_path / "a") == ["a", "b", "c"]


def test_only_the_leftovers_of_dead_writers_on_this_machine_are_removed(tmp_path):
    final = tmp_path / "out"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    dead = _make_dir(tmp_path / f".out.tmp-{host}-{int(gone.stdout)}-abc", "v0")
    (tmp_path / f".out.tmp-{host}-{int(gone.stdout)}-def").write_text("half a file")
    live = _make_dir(tmp_path / f".out.tmp-{host}-{os.getpid()}-abc", "v0")  # a writer still at work
    elsewhere = _make_dir(tmp_path / f".out.tmp-other-host-{int(gone.stdout)}-abc", "v0")  # a shared folder
    unrelated = _make_dir(tmp_path / f".outer.tmp-{host}-{int(gone.stdout)}-abc", "v0")
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("v1")
    assert (final / "v").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", live.name, elsewhere.name, unrelated.name]
    )
    assert not dead.exists()


# ----------------------------------------------------------------------------- real savers, killed

# Where the writer stops for the kill: just before the swap (the new version is complete in its
# temporary dir), between the two renames (no final dir at all), after the swap (the backup is
# not deleted yet).
BEFORE_SWAP, BETWEEN_RENAMES, AFTER_SWAP = "before_swap", "between_renames", "after_swap"
SURVIVOR = {BEFORE_SWAP: 1, BETWEEN_RENAMES: 1, AFTER_SWAP: 2}


@functools.cache
def _tiny_reward_model():
    from reward_models.model import build_reward_model

    return build_reward_model("tiny", "top", top_layers=1)


@functools.cache
def _tiny_policy():
    from rlhf.model_cache import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    return build_tiny_model(tok), tok


def _save_reward_model(target: Path, version: int) -> None:
    from reward_models.model import save_reward_model

    model, tok = _tiny_reward_model()
    with torch.no_grad():
        model.seq_model.score.weight.fill_(version)
    save_reward_model(model, tok, target, {"loss": "bt", "max_length": 64, "version": version})


def _load_reward_model(target: Path) -> int:
    from reward_models.model import load_reward_model

    model, _tok, meta = load_reward_model(target)
    assert torch.all(model.seq_model.score.weight == meta["version"])  # weights and meta agree
    return meta["version"]


def _save_policy(target: Path, version: int) -> None:
    from rlhf.models import write_policy_dir

    model, tok = _tiny_policy()
    with torch.no_grad():
        model.lm_head.weight.fill_(version)
    write_policy_dir(model, tok, target, {"base": "tiny", "stage": "test", "version": version})


def _load_policy(target: Path) -> int:
    from rlhf.models import load_policy, read_policy_meta

    # rlhf.models.resolve_model_path does not call recover_dir yet: a policy dir caught between
    # the renames is recovered here (as the next write_policy_dir would).
    model, _tok = load_policy(str(recover_dir(target)))
    version = read_policy_meta(target)["version"]
    assert torch.all(model.lm_head.weight == version)
    return version


def _save_checkpoint(target: Path, version: int) -> None:
    from rlhf.ppo.checkpoint import save_checkpoint

    state = {"update": 1, "version": version, "trainable": {"w": torch.full((4,), float(version))}}
    save_checkpoint(target.parent, 1, state, {"rng": version}, rank=0, is_main=True, keep=2)


def _load_checkpoint(target: Path) -> int:
    from rlhf.ppo.checkpoint import load_checkpoint, resolve_resume

    found = resolve_resume("auto", target.parent)
    assert found == target
    state, rng = load_checkpoint(found, rank=0)
    assert torch.all(state["trainable"]["w"] == state["version"]) and rng["rng"] == state["version"]
    return state["version"]


SAVERS = {
    "reward_model": (_save_reward_model, _load_reward_model, "rm"),
    "policy": (_save_policy, _load_policy, "policy"),
    "checkpoint": (_save_checkpoint, _load_checkpoint, "checkpoints/update_000001"),
}


def run_writer(kind: str, target: str, moment: str) -> None:
    """The subprocess: save version 1, then re-save it as version 2, pausing at ``moment``."""
    save, _load, _name = SAVERS[kind]
    target_path = Path(target)
    save(target_path, 1)
    backup, real_rename = backup_path(target_path), os.rename

    def pause(at: str) -> None:
        print(f"paused {at}", flush=True)
        time.sleep(120)  # the test kills us here

    def rename_pausing(src, dst):
        if moment == BEFORE_SWAP and Path(dst) == backup:
            pause(moment)
        real_rename(src, dst)
        if (moment == BETWEEN_RENAMES and Path(dst) == backup) or (
            moment == AFTER_SWAP and Path(dst) == target_path
        ):
            pause(moment)

    os.rename = rename_pausing  # rlhf.fsio calls os.rename: the two steps of the swap
    save(target_path, 2)
    print("finished without pausing", flush=True)


# Every saver at the dangerous moment; the other moments with the quickest writer (no transformers).
CASES = [
    ("reward_model", BETWEEN_RENAMES),
    ("policy", BETWEEN_RENAMES),
    ("checkpoint", BETWEEN_RENAMES),
    ("checkpoint", BEFORE_SWAP),
    ("checkpoint", AFTER_SWAP),
]


def test_a_writer_killed_mid_save_leaves_the_old_or_the_new_version(tmp_path):
    from rlhf.models import resolve_model_path

    resolve_model_path("tiny")  # build the cached tiny model once, not in every writer
    code = "import sys; from tests.rlhf.test_atomic_save import run_writer; run_writer(*sys.argv[1:])"
    writers = []
    try:
        for kind, moment in CASES:  # all at once: most of each one's time is importing torch
            target = tmp_path / f"{kind}-{moment}" / SAVERS[kind][2]
            proc = subprocess.Popen(
                [sys.executable, "-c", code, kind, str(target), moment],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            writers.append((kind, moment, target, proc))
        for kind, moment, target, proc in writers:
            line = proc.stdout.readline().strip()  # blocks until the writer reaches its moment
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert line == f"paused {moment}", f"{kind}: {line!r}\n{proc.stderr.read()}"
            assert proc.returncode == -signal.SIGKILL
            assert target.exists() == (moment != BETWEEN_RENAMES)
            save, load, _name = SAVERS[kind]
            assert load(target) == SURVIVOR[moment], (kind, moment)
            assert backup_path(target).exists() == (moment == AFTER_SWAP)  # the next save deletes it
            save(target, 3)  # the next save also clears what the killed writer left half-written
            assert load(target) == 3
            assert [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")] == []
    finally:
        for _kind, _moment, _target, proc in writers:
            proc.kill()  # a no-op for the ones already killed
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()


def run_file_writer(target: str, moment: str) -> None:
    """The subprocess for files: write a JSON Lines file of version 1, then rewrite it as version 2
    (many lines, so a partial file would show), pausing just before or just after the one rename."""
    from rlhf.datafiles import write_jsonl

    target_path = Path(target)
    write_jsonl(target_path, [{"version": 1}])
    real_replace = os.replace

    def replace_pausing(src, dst):
        if moment == BEFORE_SWAP:
            print(f"paused {moment}", flush=True)
            time.sleep(120)  # the test kills us here
        real_replace(src, dst)
        if moment == AFTER_SWAP:
            print(f"paused {moment}", flush=True)
            time.sleep(120)

    os.replace = replace_pausing  # rlhf.fsio.atomic_file calls os.replace: its one step
    write_jsonl(target_path, [{"version": 2}] * 5000)
    print("finished without pausing", flush=True)


@pytest.mark.parametrize("moment", [BEFORE_SWAP, AFTER_SWAP])
def test_a_file_writer_killed_mid_save_leaves_the_old_or_the_new_file(tmp_path, moment):
    from rlhf.datafiles import read_jsonl, write_jsonl

    target = tmp_path / "records.jsonl"
    code = (
        "import sys; from tests.rlhf.test_atomic_save import run_file_writer; run_file_writer(*sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(target), moment], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == f"paused {moment}"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    versions = {r["version"] for r in read_jsonl(target)}
    assert versions == {SURVIVOR[moment]}  # the whole old file or the whole new one
    write_jsonl(target, [{"version": 3}])  # the next write clears what the killed writer left
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]
