"""The `rlhf` command: every subcommand answers --help, and user mistakes give one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import COMMANDS, main

RLHF = str(Path(sys.executable).with_name("rlhf"))


def test_top_level_help_lists_every_stage():
    out = subprocess.run([RLHF, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_unknown_option_is_one_line_exit_2(in_tmp, capsys):
    assert main(["simulate", "--candidates", "c.jsonl", "--temprature", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "temprature: unknown config key" in err[0]


def test_wrong_type_is_one_line_exit_2(in_tmp, capsys):
    assert main(["simulate", "--candidates", "c.jsonl", "--n_annotators", "three"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rlhf: error[config]: n_annotators: expected an integer, got 'three'"
