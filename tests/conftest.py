"""Shared test set-up: no network, W&B offline, a private lab home per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from rlhf.offline import set_offline_defaults

set_offline_defaults()
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
# offline runs stage by-value artifacts under WANDB_DATA_DIR (default ~/.local/share/wandb)
os.environ.setdefault("WANDB_DATA_DIR", tempfile.mkdtemp(prefix="rlhf-tests-wandb-"))

# The user's real cache (where `make test` put SmolLM2) is remembered before tests switch
# RLHF_LAB_HOME to a private directory, so slow tests can reuse the downloaded model.
REAL_LAB_HOME = Path(os.environ.get("RLHF_LAB_HOME") or Path.home() / ".cache" / "rlhf-lab")


@pytest.fixture(scope="session", autouse=True)
def lab_home(tmp_path_factory) -> Path:
    """A fresh RLHF_LAB_HOME for the whole test session (the tiny model is built there)."""
    home = tmp_path_factory.mktemp("rlhf_home")
    old = os.environ.get("RLHF_LAB_HOME")
    os.environ["RLHF_LAB_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("RLHF_LAB_HOME", None)
    else:
        os.environ["RLHF_LAB_HOME"] = old


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test with the working directory in a fresh temporary folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
