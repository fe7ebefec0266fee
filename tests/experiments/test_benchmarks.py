"""The reward-model benchmarks run end to end on the tiny model (their figures come from SmolLM2 runs
written up in experiments/README.md; here: the scripts work and report what they claim)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from experiments import bench_rm_learning, bench_rm_vs_trl

TINY_RM = Path(bench_rm_learning.__file__).resolve().parent / "configs" / "rm_tiny.yaml"
DATA = ["--model", "tiny", "--prompts", "10", "--max_new_tokens", "10", "--scorer", "length:target=4"]


def test_learning_check_reports_model_and_annotators_against_gold(in_tmp, capsys):
    rc = bench_rm_learning.main([*DATA, "--config", str(TINY_RM), "--epochs", "2", "--out", "learn"])
    assert rc == 0
    res = json.loads((in_tmp / "learn" / "results.json").read_text())
    assert res["rankings_train"] > 0 and res["rankings_held"] > 0
    # the annotators follow the gold scorer with noise: well above chance on the pairs it separates
    assert res["annotators_accuracy_vs_gold_same_pairs"] > 0.6
    assert 0.0 <= res["rm_pair_accuracy_vs_gold"] <= 1.0
    out = capsys.readouterr().out
    assert "reward model vs gold" in out and "gap to the annotators" in out


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
