"""PPO checkpoints: everything needed for an exact resume, written atomically.

A checkpoint is a directory ``checkpoints/update_000012/`` holding

- ``state.pt`` (main process): trainable weights (the LoRA adapter or the full policy, the value
  head, the critic), optimiser, learning-rate scheduler, KL controller, the update counter (the
  data position follows from it) and the config hash;
- ``rng_rank{r}.pt`` (every process): torch / python / numpy RNG states and the sampling and
  shuffling generators of that process;
- ``done`` — written last, so a directory without it (a crash mid-save) is never resumed from.

The directory is filled under a temporary name and swapped into place with
:func:`rlhf.fsio.replace_dir_atomically`, so the last good checkpoint stays intact whatever
happens during the next save (also when a resume saves the same update again). Old checkpoints
lose ``done`` before the rest of them is deleted, so a half-deleted one is never resumed from.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.errors import UserError
from rlhf.fsio import recover_dir, recover_dirs_in, replace_dir_atomically

PREFIX = "update_"


def checkpoint_name(update: int) -> str:
    return f"{PREFIX}{update:06d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    recover_dirs_in(ckpt_root)  # a save killed mid-swap left only the backup of a checkpoint
    found = [
        p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "done").exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_root: Path,
    update: int,
    state: dict[str, Any] | None,
    rng: dict[str, Any],
    rank: int,
    is_main: bool,
    keep: int,
    barrier=lambda: None,
) -> Path:
    """Write checkpoint ``update`` (see the module docstring); keep the newest ``keep`` ones.

    Every process calls this; ``state`` is only needed on the main process. ``barrier`` is the
    accelerator's ``wait_for_everyone`` so all ranks' RNG files exist before ``done`` is written.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(update)
    tmp = ckpt_root / f".{final.name}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    if is_main:
        torch.save(state, tmp / "state.pt")
    barrier()
    if is_main:
        (tmp / "done").write_text(str(update))
        replace_dir_atomically(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            (old / "done").unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def resolve_resume(resume: str, ckpt_root: Path) -> Path | None:
    """``""`` → None; ``auto`` → the newest checkpoint of this run (None if there is none); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    p = recover_dir(Path(resume))
    if not (p / "done").exists() or not (p / "state.pt").exists():
        raise UserError(
            f"resume: {resume!r} is not a complete PPO checkpoint directory "
            f"(expected {PREFIX}NNNNNN/ with state.pt and done); use resume=auto for the newest",
            code="bad_checkpoint",
        )
    return p


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    rng_file = path / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        raise UserError(
            f"{path} has no RNG state for process {rank}: resume with the same number of "
            "processes it was saved with",
            code="bad_checkpoint",
        )
    rng = torch.load(rng_file, map_location="cpu", weights_only=False)
    return state, rng
