"""`rlhf quickstart --preset tiny` end to end through the real console script: every stage of the
loop runs, each stage is an offline W&B run in the experiment's group (read back with
`wandb leet inspect --json`), the summary prints before/after numbers, and a second run with
nothing changed reuses every stage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

STAGES = {"generate", "simulate", "export", "rm_train", "rm_eval", "sft", "ppo", "eval", "arena"}


def _bin(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else shutil.which(name)


def _quickstart(cwd: Path, *extra: str) -> str:
    out = subprocess.run(
        [_bin("rlhf"), "quickstart", "--preset", "tiny", *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _statuses(cwd: Path) -> dict[str, str]:
    summary = json.loads((cwd / "runs" / "quickstart_tiny" / "experiment_summary.json").read_text())
    return {name: st["status"] for name, st in summary["stages"].items()}


def test_quickstart_tiny_runs_the_whole_loop_then_reuses_it(tmp_path):
    stdout = _quickstart(tmp_path)
    assert _statuses(tmp_path) == {s: "ran" for s in STAGES}
    # every figure with its interval and reference, then the verdicts
    assert "accuracy vs gold" in stdout and "chance 0.5" in stdout
    assert "gold win rate vs SFT" in stdout and "SFT" in stdout and "PPO" in stdout
    assert "verdicts" in stdout and "PPO beat SFT on the gold scorer (held-out win rate):" in stdout
    assert (
        "blind arena" in stdout
        and "ppo beat sft in the blind arena, judged by simulated annotators" in stdout
    )
    evidence = json.loads((tmp_path / "runs" / "quickstart_tiny" / "experiment_summary.json").read_text())[
        "evidence"
    ]
    assert {c["verdict"] for c in evidence} <= {"yes", "no", "unclear"} and len(evidence) >= 5
    root = tmp_path / "runs" / "quickstart_tiny"
    assert (root / "arena" / "leaderboard.png").stat().st_size > 1000
    assert (root / "ppo" / "learning_curves.png").stat().st_size > 1000

    # One offline W&B run per stage, all in the experiment's group, job_type = the stage kind.
    jobs = set()
    for stage in STAGES:
        runs = sorted((root / stage / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, stage
        lines = subprocess.run(
            [_bin("wandb"), "leet", "inspect", "--json", str(runs[0])],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.splitlines()
        run = next(r["run"] for r in map(json.loads, filter(str.strip, lines)) if r["type"] == "run")
        assert run["run_group"] == "quickstart_tiny"
        jobs.add(run["job_type"])
    assert {"generate", "ppo", "sft", "eval"} <= jobs

    stdout = _quickstart(tmp_path)
    assert _statuses(tmp_path) == {s: "cached" for s in STAGES}
    assert "reused 9 from cache" in stdout


def test_the_summary_says_why_an_arena_has_no_win_rates(capsys):
    from experiments.quickstart import print_summary

    reason = "vader: the votes cannot rate the models: every vote is a tie: nothing tells the models apart"
    arena = {"status": "ran", "seconds": 3.0, "arena/unrated": {"vader": reason}}
    print_summary({"dir": "runs/quickstart", "stages": {"arena": arena}})
    assert f"blind arena: {reason}" in capsys.readouterr().out


def test_an_arena_judge_is_named_for_what_it_is(tmp_path):
    """A Python gold's file path holds a '/': it is still a scorer, not a reward-model dir."""
    from experiments.evidence import voter_words

    gold = "python:/tmp/golds/plain.py:reading_ease"
    assert voter_words(gold) == gold
    assert voter_words(gold, short=True) == "reading_ease"
    assert voter_words("keywords:good=you|your") == "keywords:good=you|your"
    assert voter_words("simulated:" + gold, short=True) == "simulated people"
    rm_dir = str(tmp_path / "rm_train" / "model")
    assert voter_words(rm_dir) == f"the reward model ({rm_dir})"
    assert voter_words("runs/quickstart/rm_train/model", short=True) == "reward model"


def test_the_summary_prints_the_reward_models_length_lean_beside_the_golds(capsys):
    from experiments.quickstart import print_summary

    rm = {"status": "ran", "seconds": 1.0, "eval/prompts": 10, "eval/gold_pairs": 40}
    for key, value in (
        ("eval/length_corr", 0.266),
        ("eval/gold_length_corr", 0.093),
        ("eval/longer_preferred", 0.606),
        ("eval/gold_longer_preferred", 0.544),
        ("eval/length_corr_beyond", 0.111),
    ):
        rm.update({key: value, key + "_ci_low": value - 0.05, key + "_ci_high": value + 0.05})
    print_summary({"dir": "runs/quickstart", "stages": {"rm_eval": rm}})
    out = capsys.readouterr().out
    assert "reward-length corr.         0.266 [0.216, 0.316]     the gold's own 0.093 [0.043, 0.143]" in out
    assert "longer answer preferred     0.606 [0.556, 0.656]     the gold's own 0.544 [0.494, 0.594]" in out
    assert "beyond its accuracy" not in out  # no agreement with the gold: nothing to say it against
    rm["eval/length_corr_explained"] = 0.155
    print_summary({"dir": "runs/quickstart", "stages": {"rm_eval": rm}})
    out = capsys.readouterr().out
    assert (
        "  beyond its accuracy       0.111 [0.061, 0.161]     0 = the 0.155 its agreement with the gold explains"
        in out
    )


def test_an_extrapolated_length_controlled_rate_is_no_verdict(capsys):
    """A policy that answered shorter in nearly every pair: length control cannot hold length equal,
    so its rate (here far below the raw one) decides nothing; the raw win rate's does, saying so."""
    from experiments.evidence import arena_claims
    from experiments.quickstart import print_summary

    key = "arena/length:target=10/ppo"
    arena = {
        "arena/baseline": "sft",
        f"{key}/win_rate": 0.865,
        f"{key}/win_rate_ci_low": 0.790,
        f"{key}/win_rate_ci_high": 0.930,
        f"{key}/lc_win_rate": 0.006,
        f"{key}/lc_win_rate_ci_low": 0.000,
        f"{key}/lc_win_rate_ci_high": 0.096,
        f"{key}/lc_extrapolated": 1.0,
        "png": "runs/quickstart/arena/leaderboard.png",
    }
    (claim,) = arena_claims(arena)
    assert claim["claim"].endswith("(raw win rate)") and claim["verdict"] == "yes"
    assert claim["value"] == 0.865 and claim["ci"] == [0.790, 0.930]
    assert "lengths barely overlap" in claim["note"]
    arena[f"{key}/lc_extrapolated"] = 0.0
    (claim,) = arena_claims(arena)  # the same figures within the votes: the length-controlled "no"
    assert claim["claim"].endswith("(length-controlled win rate)") and claim["verdict"] == "no"
    arena[f"{key}/lc_extrapolated"] = 1.0
    print_summary({"dir": "runs/quickstart", "stages": {"arena": arena}})
    out = capsys.readouterr().out
    assert "0.865 [0.790, 0.930]     raw win rate vs SFT (lengths barely overlap); chance 0.5" in out
