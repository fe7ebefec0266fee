"""The lab under a multi-process launch (``accelerate launch``, ``torchrun``).

A launcher starts the same ``rlhf`` command in N processes and tells each which it is through
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Three stages train across those
processes: ``sft``, ``ppo`` and ``rm train`` (their parsers set ``across_processes``). In them
every process trains and the main one alone tracks, writes and prints: one W&B run, one writer.

Every other command (generate, simulate, export, rm eval, eval, baseline, experiment, ...) has no
multi-process path, so :func:`rlhf.cli.main` runs it in process 0 alone, as the single-process
program it is, and the other processes exit at once. Without that, N copies would sample the same
candidates and race to write the same files and N W&B runs.

What a launch shows of a user error: each process that hits it exits 2, process 0 alone prints the
lab's one line, and the line is also handed to the launcher (torchrun's error file), whose failure
report would otherwise say only "To enable traceback see ...".
"""

from __future__ import annotations

import json
import os
import time

from rlhf.errors import ConfigError

# What torchrun sets in each process it starts (docs.pytorch.org/docs/stable/elastic/run.html).
_LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
)


def launch_rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes of its launch: ``(0, 1)`` when run directly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_launch_process() -> bool:
    return launch_rank_and_size()[0] == 0


def leave_launch() -> None:
    """Make this process a single-process program: accelerate, TRL and transformers read the launch
    variables when they start and would otherwise wait for processes that have exited."""
    for name in _LAUNCH_VARIABLES:
        os.environ.pop(name, None)


def report_to_launcher(line: str) -> None:
    """Hand the error line to torchrun, which prints it as the cause in its failure report.

    The error file's format is the one torch.distributed.elastic's own ``@record`` writes: a
    ``message`` whose ``extraInfo.py_callstack`` is what the report shows."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {
        "message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
    }
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # the report then says less; the line itself was printed already


def require_data_parallel(accelerator, stage: str) -> None:
    """Stop a custom training loop (ppo, rm train) under a sharded launch before any model loads.

    Their loops accumulate micro-batches themselves and sample through the unwrapped module, which
    is right for DDP (every process holds the whole model) and wrong under FSDP or DeepSpeed: those
    shard the parameters or step the optimiser inside ``backward``. ``sft`` runs on TRL's Trainer,
    which supports both (README, "Several processes and GPUs")."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (
        DistributedType.FSDP,
        DistributedType.DEEPSPEED,
        DistributedType.MEGATRON_LM,
    ):
        raise ConfigError(
            f"{stage} trains data-parallel (DDP) only, not under {accelerator.distributed_type.value}: launch it with "
            "experiments/accelerate/multi_gpu_ddp.yaml (or cpu_2proc.yaml); FSDP and DeepSpeed configs are for sft"
        )
