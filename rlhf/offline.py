"""The environment the lab runs in unless told otherwise: no model hub, no telemetry.

No hub is reachable by default; TRL and transformers otherwise start telemetry threads and hub
look-ups that hang until they time out (docs/environment.md). The Hugging Face libraries read these
variables when they are first imported, so the command line, the benchmarks and the tests call
:func:`set_offline_defaults` before importing them; this module imports nothing heavy for that
reason. A variable the user set is kept.
"""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def set_offline_defaults() -> None:
    """Set each of :data:`OFFLINE_DEFAULTS` that the environment does not already set."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
