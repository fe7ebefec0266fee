"""A non-finite loss or gradient norm stops PPO and reward-model training: exit 2, the error on a
line of its own after the progress bar, the last good checkpoint intact (rlhf/nonfinite.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlhf.cli import main
from rlhf.nonfinite import NonFiniteError, gradient_norm, stop_if_non_finite
from rlhf.ppo.checkpoint import load_checkpoint, resolve_resume
from tests.reward_models.rm_data import make_records, write_records
from tests.rlhf import ppo_helpers

BAD_CALL = 3  # the loss of the 3rd optimiser step goes wrong: steps 1 and 2 are good and saved


def _spoil_on_call(fn, what: str, calls: list[int]):
    """``fn`` (a function returning a loss first), whose BAD_CALL-th training call returns a NaN
    loss (``what="loss"``) or a finite loss whose gradient is infinite (``what="gradient norm"``)."""

    def spoiled(*args, **kwargs):
        out = fn(*args, **kwargs)
        loss, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        if not loss.requires_grad:  # an evaluation pass, not a training step
            return out
        calls.append(1)
        if len(calls) == BAD_CALL:
            if what == "loss":
                loss = loss + float("nan")
            else:  # an overflow inside the backward pass: the loss stays finite
                loss.register_hook(lambda grad: grad * float("inf"))
        return loss if rest is None else (loss, *rest)

    return spoiled


def _error_line(err: str) -> str:
    """The CLI's error line, asserting that it starts a line of its own (not glued to the bar)."""
    lines = [line for line in err.split("\n") if "error[non_finite]" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("rlhf: error[non_finite]: "), repr(lines[0])
    return lines[0]


def test_stop_if_non_finite_passes_finite_values_and_names_the_bad_one():
    stop_if_non_finite(torch.tensor(1.5), "loss", at="step 1", last_good=None)
    for bad in (float("nan"), float("inf"), torch.tensor(-math.inf)):
        with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(.*\) at step 4;.*ckpt/step-3"):
            stop_if_non_finite(bad, "gradient norm", at="step 4", last_good="ckpt/step-3")


def test_gradient_norm_is_the_clipped_norm_and_leaves_gradients_alone():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), None
    assert float(gradient_norm([a, b])) == pytest.approx(5.0)
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0, 4.0]))
    a.grad[0] = float("inf")
    assert not math.isfinite(float(gradient_norm([a])))
    assert float(gradient_norm([b])) == 0.0  # no gradients at all: nothing to stop for


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_ppo_stops_with_exit_2_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch, what):
    from rlhf.ppo import math as pm

    monkeypatch.setattr(pm, "policy_loss", _spoil_on_call(pm.policy_loss, what, []))
    prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
    runs = tmp_path / "runs"
    args = [
        "--policy",
        "tiny",
        "--reward",
        "tests.rlhf.ppo_helpers:ascii_fraction",
        "--prompts",
        str(prompts),
    ]
    sizes = [
        "--total_episodes",
        "32",
        "--batch_size",
        "8",
        "--minibatch_size",
        "8",
        "--micro_batch_size",
        "8",
    ]
    rest = ["--ppo_epochs", "1", "--response_length", "6", "--num_eval_prompts", "0", "--sample_every", "0"]
    saving = [
        "--save_every",
        "1",
        "--keep_checkpoints",
        "2",
        "--runs_dir",
        str(runs),
        "--tracking.mode",
        "disabled",
    ]

    rc = main(["ppo", *args, *sizes, *rest, *saving])

    err = capsys.readouterr().err
    assert rc == 2
    assert "ppo:" in err  # the progress bar was drawn, so "on a line of its own" means something
    line = _error_line(err)
    assert f"non-finite {what}" in line and f"update {BAD_CALL}, epoch 1" in line
    ckpt_root = runs / "default" / "ppo" / "checkpoints"
    last_good = ckpt_root / f"update_{BAD_CALL - 1:06d}"
    assert str(last_good) in line
    assert resolve_resume("auto", ckpt_root) == last_good
    state, _rng = load_checkpoint(last_good, rank=0)
    assert state["update"] == BAD_CALL - 1
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert not (runs / "default" / "ppo" / "policy").exists()


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_reward_model_training_stops_with_exit_2_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch, what
):
    from reward_models import train

    monkeypatch.setattr(train, "batch_loss", _spoil_on_call(train.batch_loss, what, []))
    data = write_records(tmp_path / "r.jsonl", make_records(24, seed=3))
    runs = tmp_path / "runs"
    args = ["rm", "train", "--rankings", str(data), "--runs_dir", str(runs), "--model", "tiny"]
    sizes = ["--top_layers", "1", "--batch_size", "4", "--max_steps", "5", "--eval_every", "0"]
    rest = ["--save_every", "1", "--normalize", "false", "tracking.mode=disabled"]

    rc = main([*args, *sizes, *rest])

    err = capsys.readouterr().err
    assert rc == 2
    assert "rm train" in err  # the progress bar was drawn
    line = _error_line(err)
    assert f"non-finite {what}" in line and f"step {BAD_CALL};" in line
    last_good = runs / "default" / "rm_train" / "checkpoints" / f"step_{BAD_CALL - 1:06d}"
    assert str(last_good) in line
    blob = torch.load(last_good / "state.pt", weights_only=False)
    assert blob["step"] == BAD_CALL - 1
    assert all(torch.isfinite(t).all() for t in blob["model"].values())
    assert not Path(runs / "default" / "rm_train" / "model").exists()
