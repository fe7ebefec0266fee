"""PPO checkpoints: :mod:`rlhf.checkpoint`'s directories, ``checkpoints/update_000012/``.

``state.pt`` (main process) holds the trainable weights (the LoRA adapter or the full policy, the
value head, the critic), optimiser, learning-rate scheduler, KL controller, the update counter (the
data position follows from it) and the config hash; ``rng_rank{r}.pt`` (every process) the torch /
python / numpy RNG states and the sampling and shuffling generators of that process, for an exact
resume. The functions below are PPO's names for :class:`rlhf.checkpoint.Checkpoints`, kept for
:mod:`rlhf.ppo.loop` and user code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.checkpoint import Checkpoints, load_rng, load_state, rng_state, set_rng_state  # noqa: F401  (kept importable from here for user code)

PREFIX = "update_"


def _checkpoints(ckpt_root: Path) -> Checkpoints:
    return Checkpoints(Path(ckpt_root), PREFIX, "PPO")


def checkpoint_name(update: int) -> str:
    return _checkpoints(Path()).path(update).name


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    return _checkpoints(ckpt_root).complete()


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
    """Write checkpoint ``update``; keep the newest ``keep`` ones. Every process calls this;
    ``state`` is only needed on the main process (:meth:`rlhf.checkpoint.Checkpoints.save`)."""
    return _checkpoints(ckpt_root).save(
        update, state, rng=rng, rank=rank, is_main=is_main, keep=keep, barrier=barrier
    )


def resolve_resume(resume: str, ckpt_root: Path) -> Path | None:
    """``""`` → None; ``auto`` → the newest checkpoint of this run (None if there is none); else a path."""
    return _checkpoints(ckpt_root).resolve_resume(resume)


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's state and process ``rank``'s RNG states."""
    return load_state(path), load_rng(path, rank)
