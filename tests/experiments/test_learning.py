"""The loop learns: the tiny preset, given a gold its byte-level model can express, must produce a
reward model above chance against that gold and a PPO policy that beats SFT on it (held out).

The tiny model's "text" is random bytes, so the gold here is the fraction of printable ASCII
characters: dense and learnable in a minute. The figures are read from the evidence the pipeline
writes into ``experiment_summary.json`` (the same claims ``rlhf quickstart`` prints)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from experiments import runner
from tests.conftest import REAL_LAB_HOME

HELPERS = Path(__file__).resolve().parents[1] / "rlhf" / "ppo_helpers.py"
QUICKSTART = Path(runner.__file__).resolve().parent / "quickstart.yaml"


def test_tiny_loop_learns_a_learnable_gold(tmp_path):
    # Sized so that the verdicts do not hang on which candidates a machine's float rounding samples:
    # with 64 prompts (11 held out) and the preset's head-only reward model the same test gave gold
    # accuracy 0.52-0.75 across seeds and failed on an AMD host that passed on an Intel one. With 160
    # prompts, both tiny layers trained, every step kept (a validation slice of a dozen prompts picks
    # noise) and 64 evaluation prompts, seeds 0-5 all gave gold accuracy ≥ 0.62 with the interval's
    # low end ≥ 0.54, and a gold win rate whose low end was ≥ 0.58 (learning rate annealed; with the
    # quickstart's constant rate, seeds 0-2 gave low ends of 0.883, 0.719 and 0.836).
    overrides = [
        f"gold=python:{HELPERS}:ascii_fraction",
        "generate.limit=160",
        "rm_train.top_layers=2",
        "rm_train.val_fraction=0",
        "ppo.total_episodes=256",
        "ppo.batch_size=32",
        "ppo.minibatch_size=16",
        "ppo.ppo_epochs=4",
        "ppo.learning_rate=0.003",
        "ppo.kl_coef=0.01",
        "eval.num_prompts=64",
        f"runs_dir={tmp_path / 'runs'}",
        "tracking.mode=disabled",
    ]
    summary = runner.run_experiment(str(QUICKSTART), overrides, preset="tiny")
    saved = json.loads((Path(summary["dir"]) / "experiment_summary.json").read_text())
    claims = {c["key"]: c for c in saved["evidence"]}
    rm, ev = saved["stages"]["rm_eval"], saved["stages"]["eval"]
    # the reward model recovered the preference the simulated annotators followed, above chance by
    # more than its interval (a reward model that learns nothing scores 0.5 with a low end near 0.42)
    assert rm["eval/gold_pair_accuracy_ci_low"] > 0.5, rm
    assert (
        rm["eval/gold_pair_accuracy_ci_low"]
        <= rm["eval/gold_pair_accuracy"]
        <= rm["eval/gold_pair_accuracy_ci_high"]
    )
    # PPO on that reward model beat SFT on the gold it never saw, with an interval above chance
    assert claims["eval/gold_win_rate"]["verdict"] == "yes", claims["eval/gold_win_rate"]
    assert ev["eval/gold_win_rate_ci_low"] > 0.5 and ev["eval/gold_score_diff"] > 0
    assert claims["eval/score_diff"]["verdict"] == "yes"


# The SmolLM2 default run (about 10 minutes on 2 cores): `pytest -m slow tests/experiments/test_learning.py`.
# It holds the default quickstart to the figures the lab promises, on its own 160 held-out prompts.


@pytest.fixture(scope="module")
def smollm2_quickstart(tmp_path_factory):
    runs = tmp_path_factory.mktemp("smollm2") / "runs"
    private_home = os.environ.get("RLHF_LAB_HOME")
    os.environ["RLHF_LAB_HOME"] = str(REAL_LAB_HOME)  # the SmolLM2 `make test` downloaded
    try:
        summary = runner.run_experiment(str(QUICKSTART), [f"runs_dir={runs}", "tracking.mode=disabled"])
    finally:
        os.environ["RLHF_LAB_HOME"] = private_home
    return json.loads((Path(summary["dir"]) / "experiment_summary.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 10 minutes alone on 2 cores; the suite's 900 s is for one test
def test_smollm2_quickstart_ppo_beats_sft_on_the_gold(smollm2_quickstart):
    rm, ppo, ev = (smollm2_quickstart["stages"][s] for s in ("rm_eval", "ppo", "eval"))
    assert rm["eval/gold_pair_accuracy_ci_low"] > 0.5 and rm["eval/kendall_tau_ci_low"] > 0
    assert ppo["ppo/score_gain_ci_low"] > 0  # the training score rose by more than its noise
    assert ev["eval/score_diff_ci_low"] > 0  # held out, PPO beats SFT on its own reward ...
    assert ev["eval/prompts"] >= 128
    assert ev["eval/gold_win_rate"] >= 0.65 and ev["eval/gold_win_rate_ci_low"] > 0.5  # ... and on the gold


@pytest.mark.slow
def test_smollm2_reward_model_reaches_0_72_against_the_gold(smollm2_quickstart):
    # Measured 0.739 [0.712, 0.765] on the default run at stop 41 (AMX Xeon); another draw of
    # everything (seed=1) gave 0.685, and five splits of the same answers average 0.713-0.719: a run
    # on another CPU samples other answers and can land under (docs/reward-models.md, Limits).
    assert smollm2_quickstart["stages"]["rm_eval"]["eval/gold_pair_accuracy"] >= 0.72


@pytest.mark.slow
def test_smollm2_reward_leans_on_length_no_more_than_the_gold(smollm2_quickstart):
    # Measured 0.088 against the gold's 0.124 on the default run at stop 41, with the length discount
    # (0.210 without it at stop 40), and 0.029 against 0.122 on another draw (seed=1); the gold's
    # interval is wide (0.055-0.193 on the default run), so another CPU's draw can land either side
    # (docs/reward-models.md, "The length discount").
    rm = smollm2_quickstart["stages"]["rm_eval"]
    assert rm["eval/length_corr"] <= rm["eval/gold_length_corr"]
