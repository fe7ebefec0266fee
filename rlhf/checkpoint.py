"""Training checkpoints, written atomically, the newest few kept, found again on resume.

PPO (:mod:`rlhf.ppo.checkpoint`) and reward-model training (:mod:`reward_models.train`) both keep
their checkpoints here. A checkpoint is a directory ``<root>/<prefix>NNNNNN/`` (PPO:
``checkpoints/update_000012/``, reward models: ``checkpoints/step_000040/``) holding

- ``state.pt`` (main process): whatever the trainer needs for an exact resume (trainable weights,
  optimiser, learning-rate scheduler, counters);
- ``rng_rank{r}.pt`` (every process, when the trainer saves RNG states): torch / python / numpy RNG
  states and the trainer's own generators of that process;
- ``done`` — written last, so a directory without it (a crash mid-save) is never resumed from.

The directory is filled under a temporary name and swapped into place with
:func:`rlhf.fsio.replace_dir_atomically`, so the last good checkpoint stays intact whatever
happens during the next save (also when a resume saves the same number again). Old checkpoints
lose ``done`` before the rest of them is deleted, so a half-deleted one is never resumed from.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.errors import UserError
from rlhf.fsio import recover_dir, recover_dirs_in, replace_dir_atomically

STATE_FILE = "state.pt"
DONE_FILE = "done"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoints of one run: ``root/<prefix>NNNNNN/`` directories (module docstring).

    ``kind`` names them in error messages ("PPO"); ``prefix`` tells them apart from anything else
    in ``root`` and is followed by the checkpoint's number (an update or a step), six digits."""

    root: Path
    prefix: str
    kind: str

    def path(self, number: int) -> Path:
        return self.root / f"{self.prefix}{number:06d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        recover_dirs_in(self.root)  # a save killed mid-swap left only the backup of a checkpoint
        found = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and p.name.startswith(self.prefix) and (p / DONE_FILE).exists()
        ]
        return sorted(found, key=lambda p: int(p.name[len(self.prefix) :]))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(
        self,
        number: int,
        state: dict[str, Any] | None,
        *,
        rng: dict[str, Any] | None = None,
        rank: int = 0,
        is_main: bool = True,
        keep: int = 0,
        barrier: Callable[[], None] = lambda: None,
    ) -> Path:
        """Write checkpoint ``number`` (see the module docstring); keep the newest ``keep`` ones
        (0 = all).

        ``state`` is written by the main process only; ``rng`` (optional) by every process as its
        ``rng_rank{rank}.pt``. When several processes save, every one calls this with ``barrier`` =
        the accelerator's ``wait_for_everyone``, so all ranks' RNG files exist before ``done`` is
        written; a trainer that saves from the main process alone leaves it a no-op."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(number)
        tmp = self.root / f".{final.name}.tmp"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        if rng is not None:
            torch.save(rng, tmp / rng_file(rank))
        if is_main:
            torch.save(state, tmp / STATE_FILE)
        barrier()
        if is_main:
            (tmp / DONE_FILE).write_text(str(number))
            replace_dir_atomically(tmp, final)
            for old in self.complete()[:-keep] if keep > 0 else []:
                (old / DONE_FILE).unlink(missing_ok=True)
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def resolve_resume(self, resume: str) -> Path | None:
        """``""`` → None; ``auto`` → the newest checkpoint (None if there is none); else a path,
        which must be a complete checkpoint."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        p = recover_dir(Path(resume))
        if not (p / DONE_FILE).exists() or not (p / STATE_FILE).exists():
            raise UserError(
                f"resume: {resume!r} is not a complete {self.kind} checkpoint directory "
                f"(expected {self.prefix}NNNNNN/ with {STATE_FILE} and {DONE_FILE}); "
                "use resume=auto for the newest",
                code="bad_checkpoint",
            )
        return p


def load_state(path: Path) -> dict[str, Any]:
    """The main process's ``state.pt`` of checkpoint ``path``, on the CPU."""
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def load_rng(path: Path, rank: int) -> dict[str, Any]:
    """Process ``rank``'s RNG states of checkpoint ``path``."""
    file = path / rng_file(rank)
    if not file.exists():
        raise UserError(
            f"{path} has no RNG state for process {rank}: resume with the same number of "
            "processes it was saved with",
            code="bad_checkpoint",
        )
    return torch.load(file, map_location="cpu", weights_only=False)


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """This process's global RNG states and those of ``generators``, for :func:`set_rng_state`."""
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
