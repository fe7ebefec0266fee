"""``rlhf dpo``: DPO, tie-aware and listwise DPO as the ranking losses on implicit rewards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reward_models import losses as L
from reward_models.dpo import implicit_rewards, preference_metrics, sequence_logps
from reward_models.train import DataReport, build_groups, encode_groups, make_batch, ranking_grid
from rlhf.cli import main
from tests.reward_models.rm_data import make_records, write_records


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_standard_dpo_by_hand():
    """log π = (-3, -5), log π_ref = (-4, -4), β = 0.1: rewards (0.1, -0.1), loss -log σ(0.2)."""
    rewards = implicit_rewards(torch.tensor([[-3.0, -5.0]]), torch.tensor([[-4.0, -4.0]]), 0.1)
    assert rewards[0].tolist() == pytest.approx([0.1, -0.1])
    loss, used = L.ranking_loss("bt", rewards, torch.tensor([[0, 1]]))
    assert used == 1 and float(loss) == pytest.approx(-math.log(_sigmoid(0.2)))  # 0.598139
    assert float(loss) == pytest.approx(0.598139, abs=1e-6)
    # listwise DPO over two responses is standard DPO: Plackett–Luce of 2 items is Bradley–Terry
    assert float(L.ranking_loss("plackett_luce", rewards, torch.tensor([[0, 1]]))[0]) == pytest.approx(
        float(loss)
    )


def test_tie_aware_dpo_is_standard_dpo_without_ties_as_theta_goes_to_1_and_nu_to_0():
    torch.manual_seed(0)
    rewards = implicit_rewards(torch.randn(5, 4), torch.randn(5, 4), 0.1)
    tiers = torch.stack([torch.randperm(4) for _ in range(5)])  # strict rankings: no ties
    standard, _ = L.ranking_loss("grouped_bt", rewards, tiers)
    rao_kupper, _ = L.ranking_loss("rao_kupper", rewards, tiers, tie_param=torch.tensor(0.0))  # log θ = 0
    davidson, _ = L.ranking_loss("davidson", rewards, tiers, tie_param=torch.tensor(-40.0))  # ν = e^-40
    assert float(rao_kupper) == pytest.approx(float(standard), abs=1e-6)
    assert float(davidson) == pytest.approx(float(standard), abs=1e-6)
    # and a tie is evidence for equal implicit rewards: the Rao–Kupper tie NLL is lowest at Δr = 0
    tied = torch.tensor([[0, 0]])
    at = [
        float(L.ranking_loss("rao_kupper", torch.tensor([[d, 0.0]]), tied, tie_param=torch.tensor(0.5))[0])
        for d in (-0.5, 0.0, 0.5)
    ]
    assert at[1] < at[0] and at[1] < at[2]


def test_preference_metrics_follow_trl_names_over_strict_pairs():
    rewards = torch.tensor([[0.3, -0.1, 0.2]])
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    tiers = torch.tensor([[0, 1, 1]])  # A > B = C: pairs (A, B), (A, C); B = C is no preference
    m = preference_metrics(rewards, logps, tiers)
    assert m["rewards/chosen"] == pytest.approx(0.3)
    assert m["rewards/rejected"] == pytest.approx(0.05)
    assert m["rewards/margins"] == pytest.approx(0.25)
    assert m["rewards/accuracies"] == 1.0
    assert m["logps/chosen"] == pytest.approx(-1.0) and m["logps/rejected"] == pytest.approx(-2.5)


def test_sequence_logps_sum_the_response_tokens_whatever_the_batch():
    """A batch's padded forward gives every sequence the log-probability a forward of that sequence
    alone gives: the sum of log-softmax over its response tokens only."""
    from rlhf.models import load_policy

    model, tokenizer = load_policy("tiny")
    groups = build_groups(make_records(3, seed=1), DataReport(), "bt")
    encode_groups(groups, tokenizer, 64, DataReport())
    with torch.no_grad():
        batched = sequence_logps(model, make_batch(groups, tokenizer.pad_token_id, None))
        one_by_one = []
        for g in groups:
            for ids, start in zip(g.ids, g.starts):
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
                one_by_one.append(sum(float(logits[t - 1, ids[t]]) for t in range(start, len(ids))))
    assert batched.tolist() == pytest.approx(one_by_one, abs=1e-4)
    grid = ranking_grid(batched, make_batch(groups, tokenizer.pad_token_id, None))
    assert grid.shape == (3, 4) and grid[1].tolist() == pytest.approx(one_by_one[4:8], abs=1e-4)


@pytest.mark.parametrize("loss", ["bt", "rao_kupper", "plackett_luce"])
def test_dpo_learns_a_learnable_preference_through_the_command_line(tmp_path, loss):
    """The tiny model from scratch, full fine-tuning: the held-out implicit rewards order the
    responses as the gold does, well above chance; the policy dir loads and W&B has one run."""
    rankings = write_records(tmp_path / "rankings.jsonl", make_records(60, seed=3))
    runs = tmp_path / "runs"
    rc = main(
        ["dpo", "--policy", "tiny", "--rankings", str(rankings), "--loss", loss, "--lora", "false"]
        + [
            "--lr",
            "3e-3",
            "--beta",
            "0.5",
            "--epochs",
            "4",
            "--runs_dir",
            str(runs),
            "--tracking.mode",
            "offline",
        ]
    )
    assert rc == 0
    run_dir = runs / "default" / "dpo"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval/gold_pair_accuracy"] > 0.75, summary
    assert summary["eval/gold_pair_accuracy_ci_low"] > 0.5
    assert summary["rewards/accuracies_last"] > 0.5
    assert summary["eval/best_of_k_accuracy"] > summary["eval/best_of_k_chance"] == 0.25
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/margins", "logps/rejected"} <= set(metrics[0])
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    from rlhf.models import load_policy

    model, _ = load_policy(str(run_dir / "policy"))
    assert not hasattr(model, "peft_config")
    assert json.loads((run_dir / "policy" / "rlhf_policy.json").read_text())["stage"] == "dpo"


def test_lora_dpo_trains_only_the_adapter_and_writes_a_merged_policy(tmp_path):
    rankings = write_records(tmp_path / "rankings.jsonl", make_records(12, seed=4))
    rc = main(
        ["dpo", "--policy", "tiny", "--rankings", str(rankings), "--max_steps", "2"]
        + ["--runs_dir", str(tmp_path / "runs"), "--tracking.mode", "disabled"]
    )
    assert rc == 0
    from rlhf.models import load_policy

    assert json.loads((tmp_path / "runs" / "default" / "dpo" / "summary.json").read_text())["dpo/steps"] == 2
    merged, _ = load_policy(str(tmp_path / "runs" / "default" / "dpo" / "policy"))
    base, _ = load_policy("tiny")
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # the LoRA targets, merged in; nothing else


def test_bad_input_stops_before_any_model_loads(tmp_path, capsys):
    rankings = write_records(tmp_path / "rankings.jsonl", make_records(4, seed=5))
    assert (
        main(["dpo", "--rankings", str(rankings), "--beta", "0", "--runs_dir", str(tmp_path / "runs")]) == 2
    )
    assert "beta: 0.0 must be > 0" in capsys.readouterr().err
    assert (
        main(["dpo", "--rankings", str(rankings), "--loss", "dop", "--runs_dir", str(tmp_path / "runs")]) == 2
    )
    assert "loss: 'dop' is not valid; choose one of bt, grouped_bt" in capsys.readouterr().err
    Path(tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    assert main(["dpo", "--rankings", str(tmp_path / "bad.jsonl"), "--runs_dir", str(tmp_path / "runs")]) == 2
    assert "line 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_time_budget_stops_training_after_the_step_under_way(tmp_path):
    rankings = write_records(tmp_path / "rankings.jsonl", make_records(24, seed=6))
    args = ["dpo", "--policy", "tiny", "--rankings", str(rankings), "--max_time_s", "0.001", "--epochs", "3"]
    assert main([*args, "--runs_dir", str(tmp_path / "runs"), "--tracking.mode", "disabled"]) == 0
    summary = json.loads((tmp_path / "runs" / "default" / "dpo" / "summary.json").read_text())
    assert summary["dpo/steps"] == 1 and summary["dpo/stop"] == "time budget of 0.001s reached"
