"""Stopping a training run at the first NaN or infinity, before it reaches the weights.

PPO (:mod:`rlhf.ppo.loop`) and reward-model training (:mod:`reward_models.train`) check two
numbers around every optimiser step with :func:`stop_if_non_finite`:

- the **loss**, before ``backward`` — a non-finite loss can only give non-finite gradients;
- the **gradient norm**, once the step's gradients are complete — a finite loss can still give
  an infinite gradient (an overflow inside the backward pass), and gradient clipping cannot save
  it: it scales every gradient by ``max_norm / norm``, i.e. to 0 or NaN.

Either stops the run with :class:`NonFiniteError` *before* ``optimizer.step()``, so nothing
non-finite reaches the weights, and the last checkpoint written stays the last good one. The command line prints the error as one
``error[non_finite]`` line and exits with status 2 (:mod:`rlhf.errors`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch

from rlhf.errors import UserError


class NonFiniteError(UserError):
    code = "non_finite"


def gradient_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (the norm ``clip_grad_norm_`` clips), without
    changing them."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def stop_if_non_finite(
    value: torch.Tensor | float,
    what: str,
    *,
    at: str,
    last_good: str | os.PathLike | None,
    hint: str = "",
    progress=None,
) -> None:
    """Raise :class:`NonFiniteError` when ``value`` (a loss or a gradient norm) is NaN or ±inf.

    ``what`` names the value, ``at`` where the run was ("update 3, epoch 1"), ``last_good`` the
    checkpoint a resume would start from, ``hint`` what to try. ``progress``: a tqdm bar to close
    first, so the error line the command line prints starts on a line of its own.
    """
    number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if math.isfinite(number):
        return
    if progress is not None:
        progress.close()
    raise NonFiniteError(
        f"non-finite {what} ({number}) at {at}; stopped before the optimiser step "
        f"(last good checkpoint: {last_good or 'none'}). {hint}".rstrip()
    )
