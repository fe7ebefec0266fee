"""``rlhf kto``: rankings → KTO's desirable / undesirable responses → TRL's KTOTrainer."""

from __future__ import annotations

import json

import pytest

from rlhf.cli import main
from rlhf.data import kto_label, rankings_to_kto
from rlhf.rankings import parse_ranking
from tests.reward_models.rm_data import make_records, write_records


@pytest.mark.parametrize(
    "ranking, expected",
    [
        ("A > B > C > D", {"A": True, "B": True, "C": False, "D": False}),
        ("A > B > C", {"A": True, "B": None, "C": False}),  # the middle of an odd ranking: neither
        ("A > B = C > D", {"A": True, "B": None, "C": None, "D": False}),
        ("A = B > C", {"A": True, "B": True, "C": False}),
        ("A = B = C = D", {"A": None, "B": None, "C": None, "D": None}),
    ],
)
def test_kto_labels_by_hand(ranking, expected):
    parsed = parse_ranking(ranking, list(expected))
    assert {label: kto_label(parsed, label) for label in expected} == expected


def test_rankings_become_trl_conversational_kto_rows():
    rec = make_records(1, seed=0)[0]
    rec["ranking"], rec["tiers"] = "A > B = C > D", [["A"], ["B", "C"], ["D"]]
    rows = rankings_to_kto([rec])
    assert [(r["candidate_label"], r["label"]) for r in rows] == [("A", True), ("D", False)]
    assert rows[0]["prompt"] == [{"role": "user", "content": rec["prompt"]}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": rec["candidates"][0]["text"]}]


def test_kto_trains_through_trl_and_writes_a_merged_policy(tmp_path):
    rankings = write_records(tmp_path / "rankings.jsonl", make_records(12, seed=4))
    runs = tmp_path / "runs"
    rc = main(
        ["kto", "--policy", "tiny", "--rankings", str(rankings), "--max_steps", "2", "--logging_steps", "1"]
        + ["--runs_dir", str(runs), "--tracking.mode", "offline"]
    )
    assert rc == 0
    run_dir = runs / "default" / "kto"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["kto/steps"] == 2 and 0 < summary["kto/desirable"] < summary["kto/responses"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/kl", "train/rewards/chosen", "train/rewards/rejected"} <= set(metrics[0])
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    from rlhf.models import load_policy

    model, _ = load_policy(str(run_dir / "policy"))
    assert not hasattr(model, "peft_config")
    assert json.loads((run_dir / "policy" / "rlhf_policy.json").read_text())["stage"] == "kto"


def test_bad_input_stops_before_any_model_loads(tmp_path, capsys):
    rankings = write_records(tmp_path / "rankings.jsonl", make_records(4, seed=5))
    assert (
        main(["kto", "--rankings", str(rankings), "--batch_size", "1", "--runs_dir", str(tmp_path / "runs")])
        == 2
    )
    assert "batch_size: 1 must be ≥ 2" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["kto", "--rankings", str(tmp_path / "bad.jsonl"), "--runs_dir", str(tmp_path / "runs")]) == 2
    assert "line 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_export_writes_the_rows_the_kto_stage_trains_on(tmp_path):
    records = make_records(6, seed=6)
    rankings = write_records(tmp_path / "rankings.jsonl", records)
    out = tmp_path / "kto.jsonl"
    args = ["export", "--rankings", str(rankings), "--format", "kto", "--out", str(out)]
    assert main([*args, "--runs_dir", str(tmp_path / "runs"), "--tracking.mode", "disabled"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    from rlhf.data import load_rankings

    assert written == rankings_to_kto(load_rankings(str(rankings)))
    assert {row["label"] for row in written} == {True, False}


def test_a_time_budget_stops_kto_after_the_step_under_way(tmp_path):
    rankings = write_records(tmp_path / "rankings.jsonl", make_records(12, seed=7))
    args = ["kto", "--policy", "tiny", "--rankings", str(rankings), "--max_time_s", "0.001", "--epochs", "3"]
    assert main([*args, "--runs_dir", str(tmp_path / "runs"), "--tracking.mode", "disabled"]) == 0
    summary = json.loads((tmp_path / "runs" / "default" / "kto" / "summary.json").read_text())
    assert summary["kto/steps"] == 1 and summary["kto/stop"] == "time budget of 0.001s reached"
