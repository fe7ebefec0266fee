"""What the terminal shows: `rlhf` alone is a usage error, every --help is complete plain text, a
flag takes dashes or underscores, long steps draw the lab's bars (without changing a number) and
the libraries' own bars and Trainer's raw log dicts stay out of sight."""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.cli import COMMANDS, LIBRARY_BARS_ENV, build_parser, main, plain_text, progress_bar
from tests.rlhf import ppo_helpers

RLHF = str(Path(sys.executable).with_name("rlhf"))


def test_no_command_prints_usage_on_stderr_and_exits_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: rlhf")
    assert "quickstart" in err  # the commands are listed


# ----------------------------------------------------------------------------- --help


def _subcommand_parsers(name: str):
    """(words, parser) of command ``name`` and of every subcommand under it (``rm eval``, ...)."""

    def walk(parser, words):
        yield words, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, [*words, sub_name])

    root = build_parser(name)
    commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    yield from walk(commands.choices[name], [name])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_is_plain_text_and_ends_with_a_sentence(name, capsys):
    for words, parser in _subcommand_parsers(name):
        with pytest.raises(SystemExit) as exc:
            main([*words, "--help"])
        assert exc.value.code == 0, words
        shown = capsys.readouterr().out
        assert "``" not in shown and not re.search(r":[a-z]+:`", shown), words
        description = plain_text(parser.description or "").rstrip()
        assert description, f"rlhf {' '.join(words)} has no description"
        assert description[-1] in ".)", f"rlhf {' '.join(words)}: description stops at {description[-60:]!r}"


def test_plain_text_shows_rest_as_a_terminal_should():
    rst = (
        "Use ``rlhf eval`` and :func:`rlhf.evaluate.evaluate_policy` (:class:`~rlhf.errors.UserError`,\n"
        ":ref:`the guide <guide>`). **Caching.** For example::"
    )
    assert plain_text(rst) == (
        "Use `rlhf eval` and rlhf.evaluate.evaluate_policy (UserError,\nthe guide). Caching. For example:"
    )


# ----------------------------------------------------------------------------- flag spellings


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser(argv[0]).parse_args(list(argv))


def test_a_config_flag_takes_dashes_or_underscores():
    from rlhf.config import config_from_args
    from rlhf.evaluate import EvalConfig

    underscores = _parse("eval", "--runs_dir", "r", "--max_new_tokens", "5", "--tracking.mode", "disabled")
    dashes = _parse("eval", "--runs-dir", "r", "--max-new-tokens=5", "--tracking.mode", "disabled")
    assert config_from_args(dashes, EvalConfig) == config_from_args(underscores, EvalConfig)
    assert config_from_args(dashes, EvalConfig).max_new_tokens == 5


def test_hand_written_flags_take_both_spellings():
    for spelling in ("--runs-dir", "--runs_dir"):
        assert _parse("quickstart", spelling, "r").runs_dir == "r"
    for spelling in ("--dry-run", "--dry_run"):
        assert _parse("experiment", "run", "f.yaml", spelling).dry_run is True
    for spelling in ("--project-config", "--project_config"):
        assert _parse("annotate", "import", "c.jsonl", spelling, "p.yaml").project_config == "p.yaml"
    for spelling in ("--trl-style", "--trl_style"):
        args = _parse("annotate", "export", "--out", "o.jsonl", spelling, "standard")
        assert args.trl_style == "standard"


def test_help_shows_the_underscore_spelling(capsys):
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    shown = capsys.readouterr().out
    assert "--runs_dir" in shown and "--runs-dir" not in shown


def test_a_parser_declaring_both_spellings_keeps_both():
    """`rlhf export` has a --drop-ties switch beside its --drop_ties field: neither swallows the other."""
    assert getattr(_parse("export", "--drop-ties"), "cfg::drop_ties") is True
    assert getattr(_parse("export", "--drop_ties", "false"), "cfg::drop_ties") == "false"


# ----------------------------------------------------------------------------- progress bars


def test_rlhf_eval_draws_a_progress_bar_on_stderr(tmp_path, capsys):
    rc = main(
        [
            "eval",
            "--policy",
            "tiny",
            "--reference",
            "tiny",
            "--reward",
            "length:target=5",
            "--num_prompts",
            "3",
            "--max_new_tokens",
            "4",
            "--runs_dir",
            str(tmp_path / "runs"),
            "--tracking.mode",
            "disabled",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    # the bars are transient: a fast run may clear them before tqdm redraws the last count
    assert "eval: reference:" in err and "eval: policy:" in err and "/3 [" in err


def test_evaluation_bar_changes_no_sample():
    """evaluate_policy's bar follows sample_rollout batch by batch: every prompt counted, the same
    Rollout as without a bar."""
    from rlhf.evaluate import eval_row_seeds
    from rlhf.models import load_policy
    from rlhf.ppo.rollout import encode_queries, left_pad, sample_rollout

    model, tok = load_policy("tiny")
    prompts = ["Say hi.", "Name a fruit.", "Describe rain in a few words.", "Count to three.", "Why?"]
    q, qm = left_pad(encode_queries(tok, prompts, 64), tok.pad_token_id)
    sampling = dict(
        max_new_tokens=8,
        temperature=1.0,
        stop_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        batch_size=2,
        row_seeds=eval_row_seeds(3, len(prompts)),
    )
    whole = sample_rollout(model, q, qm, generator=None, **sampling)
    bar = progress_bar(len(prompts), "test", "prompt", file=io.StringIO())
    batched = sample_rollout(model, q, qm, generator=None, on_batch=bar.update, **sampling)
    for name in ("tokens", "mask", "logprobs", "has_stop"):
        assert torch.equal(getattr(batched, name), getattr(whole, name)), name
    assert bar.n == len(prompts)


def test_rm_eval_bar_changes_no_reward():
    """rm eval's bar follows score_ids batch by batch: every sequence counted, the same rewards."""
    from reward_models.model import build_reward_model, encode_conversations, score_ids

    model, tok = build_reward_model("tiny", "top", top_layers=1, seed=0)
    prompts = ["What is soup?", "Hi", "Tell me a long story about a cat.", "Why?", "Name a colour."]
    responses = ["Soup is a warm dish.", "Hello!", "Once upon a time.", "Because.", "Blue, I think."]
    enc = encode_conversations(tok, prompts, responses, 256)
    whole = score_ids(model.eval(), enc.ids, tok.pad_token_id, 2, starts=enc.starts)
    bar = progress_bar(len(enc.ids), "test", "seq", file=io.StringIO())
    batched = score_ids(model, enc.ids, tok.pad_token_id, 2, starts=enc.starts, on_batch=bar.update)
    assert torch.equal(batched, whole)
    assert bar.n == len(enc.ids)


def test_pip_progress_lines_drive_the_download_bar():
    from rlhf.model_cache import _follow_pip_progress

    lines = ["Collecting x\n", "Progress 0 of 2048\n", "Progress 1024 of 2048\n", "Progress 2048 of 2048\n"]
    bar = progress_bar(None, "x", "B", file=io.StringIO())
    other = _follow_pip_progress([*lines, "\n", "ERROR: no such version\n"], bar)
    assert (bar.n, bar.total) == (2048, 2048)
    assert other == ["Collecting x", "ERROR: no such version"]  # the last line explains a failure


# ----------------------------------------------------------------------------- library output


def test_library_bars_come_back_with_the_environment_variable(monkeypatch):
    from rlhf import cli

    monkeypatch.setenv(LIBRARY_BARS_ENV, "1")
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    cli._hide_library_progress_bars()
    assert "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ


def test_sft_prints_the_lab_bar_not_trainer_dicts_or_library_bars(tmp_path):
    demos = ppo_helpers.write_demonstrations(tmp_path / "demos.jsonl", n=8)
    library_switches = (LIBRARY_BARS_ENV, "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
    env = {k: v for k, v in os.environ.items() if k not in library_switches}
    out = subprocess.run(
        [RLHF, "sft", "--model", "tiny", "--demonstrations", str(demos), "--max_steps", "2"]
        + ["--batch_size", "2", "--logging_steps", "1", "--runs_dir", str(tmp_path / "runs")]
        + ["--tracking.mode", "disabled"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    shown = out.stdout + out.stderr
    assert "{'loss':" not in shown and "'train_runtime'" not in shown
    assert "Tokenizing train dataset" not in shown and "Loading weights" not in shown
    assert "sft: 100%" in out.stderr and "loss=" in out.stderr  # the lab's bar, the loss a number
    assert "sft: wrote policy" in out.stdout
