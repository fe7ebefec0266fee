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


def _stage_argv(stage: str, out: Path) -> list[str]:
    """The cheapest command line of a stage that writes a model, saving to ``out``."""
    if stage == "sft":
        return ["sft", "--model", "tiny", "--max_examples", "8", "--output_dir", str(out)]
    if stage == "ppo":
        return ["ppo", "--policy", "tiny", "--reward", "length:target=4", "--output_dir", str(out)]
    return ["rm", "train", "--rankings", "rankings.jsonl", "--model", "tiny", "--out", str(out)]


@pytest.mark.parametrize("stage", ["sft", "ppo", "rm_train"])
def test_an_output_dir_the_lab_did_not_write_is_refused_before_any_work(stage, in_tmp, capsys):
    """A save replaces its whole directory: pointed at an existing folder of the user's, it would
    delete everything in it. One line, exit 2, the folder untouched and no run started."""
    folder = in_tmp / "my_project"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main([*_stage_argv(stage, folder), "--runs_dir", "runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rlhf: error[config]")
    assert "my_project" in err and "a directory that no save of its kind wrote" in err
    assert (folder / "notes.txt").read_text() == "keep me" and not (in_tmp / "runs").exists()


@pytest.mark.parametrize("stage", ["sft", "ppo", "rm_train"])
def test_an_output_dir_holding_the_run_dir_is_refused_before_any_work(stage, in_tmp, capsys):
    """`--output_dir runs/default/ppo` is the stage's own run dir (not there yet): the save at the
    end would replace the run's metrics, W&B files and checkpoints with the model."""
    run_dir = Path("runs/default") / stage
    assert main([*_stage_argv(stage, run_dir), "--runs_dir", "runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds this run's own directory" in err
    assert not (in_tmp / "runs").exists()
