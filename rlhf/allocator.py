"""Keep the memory a process frees for its next allocation instead of handing it back to the system.

PyTorch allocates a CPU tensor with the C library's ``malloc``. glibc serves every block above its
mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it on ``free``, so each training
step's large tensors (the logits of 8 rows × 300 tokens × 49,152 words alone are 470 MB) arrive in
new pages that the kernel must fault in and zero, every step. Measured on the quickstart's LoRA SFT
of SmolLM2 (20 steps, 2-core AMX Xeon): 17.7 million page faults and 27 s of system time in a 60 s
run, and 50 s of training; with glibc told to serve large blocks from its heap and keep what is
freed, 1.0 million faults, 1.9 s of system time and 38 s of training, the adapter the same byte
for byte (docs/environment.md, "The allocator"). The cost grows when the kernel has just written a
lot of files, as a fresh install does: the same SFT then trained in 71–76 s.

:func:`keep_freed_memory` sets that once per process, through glibc's ``mallopt`` (``M_MMAP_MAX``
0, ``M_TRIM_THRESHOLD`` 2 GB; the glibc manual, "Malloc Tunable Parameters"). The process's memory
then stays near its peak until it exits instead of shrinking between steps. It does nothing on
another C library or system, or with ``RLHF_LAB_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

ENV = "RLHF_LAB_KEEP_FREED_MEMORY"

# glibc's malloc.h: the parameters mallopt sets
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# A free block at the top of the heap goes back to the system only above this size (mallopt takes
# an int): a step's tensors are freed and allocated again at about the same sizes, below it.
TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap (no mmap) and keep freed memory for
    reuse (module docstring). Returns whether it was set; safe to call more than once."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_MAX, 0))
