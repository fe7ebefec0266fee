"""The reward-model benchmarks run end to end on the tiny model (their figures come from SmolLM2 runs
written up in experiments/README.md; here: the scripts work and report what they claim)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from experiments.benchmarks import bench_rm_ensemble_cache, bench_rm_learning, bench_rm_vs_trl
from tests.reward_models.rm_data import make_records, write_records

TINY_RM = Path(bench_rm_learning.__file__).resolve().parents[1] / "configs" / "rm_tiny.yaml"
DATA = ["--model", "tiny", "--prompts", "10", "--max_new_tokens", "10", "--scorer", "length:target=4"]


def test_learning_check_compares_choices_against_gold_with_intervals(in_tmp, capsys):
    rc = bench_rm_learning.main(
        [
            *DATA,
            "--per_prompt",
            "3",
            "--config",
            str(TINY_RM),
            "--choices",
            "default,last-top2",
            "--out",
            "learn",
        ]
        + ["layers=0", "top_layers=1", "epochs=2"]  # the tiny model has 2 layers
    )
    assert rc == 0
    res = json.loads((in_tmp / "learn" / "results.json").read_text())
    assert res["rankings_train"] > 0 and res["rankings_held"] > 0
    assert [r["choice"] for r in res["rows"]] == ["default", "last-top2"]
    for row in res["rows"]:
        # the annotators follow the gold scorer with noise: well above chance on the pairs it separates
        assert row["annotator_gold_accuracy"] > 0.6 and row["seconds"] > 0
        assert (
            row["gold_pair_accuracy_ci_low"] <= row["gold_pair_accuracy"] <= row["gold_pair_accuracy_ci_high"]
        )
    out = capsys.readouterr().out
    assert "| choice (gold `length:target=4`)" in out and "[95 % CI]" in out


def test_ensemble_cache_benchmark_trains_both_ways_to_the_same_members(in_tmp, capsys):
    rankings = write_records(in_tmp / "rankings.jsonl", make_records(24, seed=1))
    argv = ["--rankings", str(rankings), "--config", str(TINY_RM), "--members", "2"]
    assert bench_rm_ensemble_cache.main(argv) == 0
    out = capsys.readouterr().out
    assert "reused" in out and "every member's weights identical both ways: yes" in out
    assert "members share the frozen states" in out and "each computing its own" in out


def test_rm_vs_trl_table_has_every_trainer(in_tmp, capsys):
    rc = bench_rm_vs_trl.main(
        [*DATA, "--budget_s", "2", "--losses", "grouped_bt,davidson", "--max_length", "96", "--out", "cmp"]
    )
    assert rc == 0
    rows = json.loads((in_tmp / "cmp" / "results.json").read_text())
    assert [r["trainer"] for r in rows] == ["TRL RewardTrainer (pairs)", "ours:grouped_bt", "ours:davidson"]
    for r in rows:
        assert r["rankings_per_s"] > 0 and r["steps"] > 0
        assert 0.0 <= r["pair_acc"] <= 1.0 and 0.0 <= r["gold_acc"] <= 1.0
        assert r["pair_loglik"] < 0 and (math.isnan(r["tie_loglik"]) or r["tie_loglik"] < 0)
    out = capsys.readouterr().out
    assert "× TRL" in out and "3-way LL" in out
    # without a tie model of their own, a model's own-θ and common-θ figures coincide
    trl = rows[0]
    assert trl["tie_loglik_fitted"] == trl["tie_loglik"] or math.isnan(trl["tie_loglik"])
    # --reeval: the saved models evaluated again give the same figures, throughput untouched
    (in_tmp / "cmp" / "results.json").write_text(json.dumps([{**r, "pair_acc": -1.0} for r in rows]))
    assert bench_rm_vs_trl.main(["--out", "cmp", "--reeval"]) == 0
    again = json.loads((in_tmp / "cmp" / "results.json").read_text())
    for a, b in zip(rows, again):
        assert b["pair_acc"] == pytest.approx(a["pair_acc"]) and b["rankings_per_s"] == a["rankings_per_s"]


def test_active_selection_compares_both_orders_over_seeds(in_tmp, capsys):
    from experiments.benchmarks import bench_active_selection

    rc = bench_active_selection.main(
        [*DATA[:2], "--prompts", "16", *DATA[4:], "--config", str(TINY_RM), "--batch", "4", "--rounds", "2"]
        + ["--seeds", "2", "--out", "active"]
    )
    assert rc == 0
    runs = json.loads((in_tmp / "active" / "results.json").read_text())["runs"]
    # per seed: the shared first batch (reported for both arms), then one model per arm at 8 prompts
    assert sorted((r["seed"], r["arm"], r["prompts"]) for r in runs) == sorted(
        (seed, arm, n) for seed in (0, 1) for arm in ("random", "active") for n in (4, 8)
    )
    for seed in (0, 1):
        first = [r for r in runs if r["seed"] == seed and r["prompts"] == 4]
        assert first[0]["gold_pair_accuracy"] == first[1]["gold_pair_accuracy"]  # one model, both arms
    out = capsys.readouterr().out
    assert "| 8 | 2 |" in out and "active − random" in out
    assert (in_tmp / "active" / "active_selection.png").stat().st_size > 1000
