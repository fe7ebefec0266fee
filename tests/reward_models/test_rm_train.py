"""``rlhf rm train`` / ``rlhf rm eval`` end to end on the tiny model, bad input, resume, every loss."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from reward_models import losses as L
from reward_models.train import (
    DataReport,
    RMTrainConfig,
    batch_loss,
    build_groups,
    initial_tie_value,
    make_batch,
    tie_rate,
)
from rlhf.cli import main

from .rm_data import make_records, write_records

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
# the shipped tiny preset (top layer only, lower layer cached, lr 0.003, 5 epochs)
TRAIN_ARGS = ["--config", str(CONFIGS / "rm_tiny.yaml"), "tracking.mode=offline"]


def bad_records() -> list[dict]:
    """One of each kind of awkward input: the first two break the rankings contract (bad rows), the
    others are valid but need care (all tied, an empty response, mixed K, a long prompt)."""
    good = make_records(6, seed=99)
    one = copy.deepcopy(good[0])
    one["candidates"] = one["candidates"][:1]
    one["prompt_id"] = "bad-one"
    mismatch = copy.deepcopy(good[1])
    mismatch["tiers"] = [["A"], ["B"], ["E"]]
    mismatch["prompt_id"] = "bad-labels"
    tied = copy.deepcopy(good[2])
    tied["tiers"], tied["ranking"], tied["prompt_id"] = [["A", "B", "C", "D"]], "A = B = C = D", "all-tied"
    empty = copy.deepcopy(good[3])
    empty["candidates"][0]["text"] = ""
    empty["prompt_id"] = "empty-resp"
    k3 = make_records(2, k=3, seed=7)
    for r in k3:
        r["prompt_id"] = "k3-" + r["prompt_id"]
    long = copy.deepcopy(good[4])
    long["prompt"] = "soup " * 200
    long["prompt_id"] = "long-prompt"
    return [one, mismatch, tied, empty, *k3, long]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run through the real command line (shared by the tests below)."""
    d = tmp_path_factory.mktemp("rm_e2e")
    data = write_records(d / "rankings.jsonl", make_records(100, seed=0) + bad_records())
    runs = d / "runs"
    rc = main(
        [
            "rm",
            "train",
            "--rankings",
            str(data),
            "--runs_dir",
            str(runs),
            "--experiment",
            "t",
            "--save_every",
            "20",
            "--skip_bad_rows",
            "true",
            *TRAIN_ARGS,
        ]
    )
    assert rc == 0
    return d, runs / "t" / "rm_train"


@pytest.mark.parametrize("preset", ["rm_tiny.yaml", "rm_smollm2.yaml"])
def test_presets_are_valid_configs(preset):
    from rlhf.config import build_config

    cfg = build_config(RMTrainConfig, CONFIGS / preset, {"rankings": "r.jsonl"})
    assert cfg.trainable == "top" and cfg.normalize


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_beats_chance_on_held_out_prompts(trained):
    _, run_dir = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rm/final_pair_accuracy"] > 0.65, summary
    evals = [m["val/pair_accuracy"] for m in _metrics(run_dir) if "val/pair_accuracy" in m]
    assert len(evals) >= 3  # validation during training; the held-out prompts are scored once, at the end
    assert summary["rm/val_prompts"] > 0 and summary["rm/eval_prompts"] > 0
    losses = [m["train/loss"] for m in _metrics(run_dir) if "train/loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learned


def test_reward_model_dir_and_metadata(trained):
    _, run_dir = trained
    model_dir = run_dir / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "rlhf_reward.json"):
        assert (model_dir / name).is_file(), name
    meta = json.loads((model_dir / "rlhf_reward.json").read_text())
    assert meta["loss"] == "grouped_bt" and meta["base_model"] == "tiny" and meta["chat_template"] is True
    assert meta["normalization"]["scale"] > 0 and meta["normalization"]["n"] > 100
    assert len(meta["training_data"]["hash"]) == 16
    assert (run_dir / "eval_rankings.jsonl").is_file() and (run_dir / "config.yaml").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*"))  # logged to W&B offline


def test_bad_input_is_counted_and_reported(trained):
    _, run_dir = trained
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["records"] == 107
    assert report["bad_rows"] == 2  # one candidate, labels that do not match: skipped (skip_bad_rows)
    assert report["all_tied_dropped"] >= 1  # grouped BT has no strict pair to learn from
    assert report["empty_responses"] == 1
    assert report["truncated"] >= 4  # the long prompt's 4 candidates
    assert set(report["k_counts"]) == {"3", "4"} or set(report["k_counts"]) == {3, 4}
    first = _metrics(run_dir)[0]
    assert first["data/bad_rows"] == 2 and first["data/mixed_k"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["data/bad_rows"] == 2


def test_eval_writes_metrics_plot_and_table(trained):
    d, run_dir = trained
    runs = d / "runs"
    rc = main(
        [
            "rm",
            "eval",
            "--reward_model",
            str(run_dir / "model"),
            "--rankings",
            str(run_dir / "eval_rankings.jsonl"),
            "--runs_dir",
            str(runs),
            "--experiment",
            "t",
            "tracking.mode=offline",
        ]
    )
    assert rc == 0
    ev = runs / "t" / "rm_eval"
    metrics = json.loads((ev / "metrics.json").read_text())["metrics"]
    for key in (
        "eval/pair_accuracy",
        "eval/tie_loglik",
        "eval/tie_accuracy",
        "eval/kendall_tau",
        "eval/ece",
        "eval/length_corr",
        "eval/gold_pair_accuracy",
        "eval/annotator_gold_accuracy",
        "eval/longer_preferred",
        "eval/gold_length_corr",
        "eval/gold_longer_preferred",
        "eval/longer_preferred_excess",
        "eval/longer_preferred_excess_ci_high",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["eval/pair_accuracy"] > 0.65
    # grouped BT has no tie model: its own figures already use the fitted θ, so the common-θ ones agree
    assert metrics["eval/tie_loglik_fitted"] == pytest.approx(metrics["eval/tie_loglik"])
    assert metrics["eval/pair_loglik_fitted"] == pytest.approx(metrics["eval/pair_loglik"])
    assert metrics["eval/annotator_gold_accuracy"] == 1.0  # noiseless synthetic annotators
    assert "eval/tie_theta_fitted" in metrics  # grouped BT has no tie model of its own
    png = ev / "reliability.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (ev / "table_eval_worst_rankings.jsonl").read_text().splitlines()
    assert 1 <= len(rows) <= 10
    taus = [json.loads(r)["kendall_tau"] for r in rows]
    assert taus == sorted(taus)


def test_resume_continues_from_the_latest_checkpoint(tmp_path, capsys):
    data = write_records(tmp_path / "r.jsonl", make_records(40, seed=3))
    common = [
        "rm",
        "train",
        "--rankings",
        str(data),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--save_every",
        "2",
        "--batch_size",
        "4",
        "--model",
        "tiny",
        "--top_layers",
        "1",
        "--eval_every",
        "2",
        "tracking.mode=disabled",
        "--normalize",
        "false",
    ]
    assert main([*common, "--max_steps", "4"]) == 0
    ckpt_root = tmp_path / "runs" / "default" / "rm_train" / "checkpoints"
    ckpts = sorted(p for p in ckpt_root.iterdir() if (p / "done").exists())
    assert [p.name for p in ckpts] == ["step_000002", "step_000004"]  # every 2 steps, the latest two
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["step_000002", "step_000004"]  # no leftovers
    capsys.readouterr()
    assert main([*common, "--max_steps", "6", "--resume", "true"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_000004" in out
    summary = json.loads((tmp_path / "runs" / "default" / "rm_train" / "summary.json").read_text())
    assert summary["rm/steps"] == 6


@pytest.mark.parametrize(
    "argv, code, words",
    [
        (["--loss", "hinge"], "config", "choose one of"),
        (["--rankings", "nope.jsonl"], "not_found", "nope.jsonl"),
        (["--theta", "1.0", "--loss", "rao_kupper"], "config", "theta"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, argv, code, words):
    data = write_records(tmp_path / "r.jsonl", make_records(4))
    rc = main(["rm", "train", "--rankings", str(data), "--runs_dir", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"rlhf: error[{code}]") and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # rejected before anything is written


def _with_bad_rows(path: Path) -> Path:
    """12 good rankings with three bad rows among them: lines 3 and 6 break the contract, line 9 is
    not JSON."""
    lines = [json.dumps(r) for r in make_records(12, seed=4)]
    one_candidate, mismatch = bad_records()[:2]
    lines.insert(2, json.dumps(one_candidate))
    lines.insert(5, json.dumps(mismatch))
    lines.insert(8, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return path


QUICK_ARGS = ["--max_steps", "2", "--normalize", "false", "--model", "tiny", "tracking.mode=disabled"]


def test_bad_rows_stop_the_run_listing_every_one(tmp_path, capsys):
    """Like every other stage: exit 2 with every bad row and its line number, before anything is written."""
    data = _with_bad_rows(tmp_path / "r.jsonl")
    rc = main(["rm", "train", "--rankings", str(data), "--runs_dir", str(tmp_path / "runs"), *QUICK_ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "error[bad_rows]: 3 bad rows in" in err
    assert "line 3: candidates" in err and "line 6: tiers" in err and "line 9: not valid JSON" in err
    assert not (tmp_path / "runs").exists()


def test_skip_bad_rows_trains_and_reports_how_many(tmp_path, capsys):
    data = _with_bad_rows(tmp_path / "r.jsonl")
    runs = tmp_path / "runs"
    argv = ["rm", "train", "--rankings", str(data), "--runs_dir", str(runs), "--skip_bad_rows", "true"]
    assert main([*argv, *QUICK_ARGS]) == 0
    out = capsys.readouterr().out
    assert "data: 15 ranking records → 12 used" in out and "3 bad rows" in out
    summary = json.loads((runs / "default" / "rm_train" / "summary.json").read_text())
    assert summary["data/bad_rows"] == 3


def test_no_usable_rankings_fails_cleanly(tmp_path, capsys):
    data = write_records(tmp_path / "r.jsonl", bad_records()[:2])
    argv = [
        "rm",
        "train",
        "--rankings",
        str(data),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--skip_bad_rows",
        "true",
    ]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "error[no_data]" in err and not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def tiny_model():
    from reward_models.model import build_reward_model

    return build_reward_model("tiny", "top", top_layers=1, tie_param=0.5)


@pytest.mark.parametrize("loss", L.LOSSES)
def test_every_loss_trains_through_the_model(tiny_model, loss):
    """Mixed K and ties in one batch; one step lowers the loss on that batch."""
    from reward_models.train import encode_groups

    model, tok = tiny_model
    model = copy.deepcopy(model)
    report = DataReport()
    groups = build_groups(make_records(6, seed=5) + make_records(2, k=3, seed=6), report, loss)
    encode_groups(groups, tok, 96, report)
    cfg = RMTrainConfig(rankings="x", loss=loss)
    batch = make_batch(groups, tok.pad_token_id, None)
    assert batch.tiers.shape[1] == 4 and (batch.tiers == -1).any()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before, _, used = batch_loss(cfg, model, model.tie_param, batch)
    assert used > 0 and torch.isfinite(before)
    for _ in range(5):
        opt.zero_grad()
        loss_v, _, _ = batch_loss(cfg, model, model.tie_param, batch)
        loss_v.backward()
        opt.step()
    after, _, _ = batch_loss(cfg, model, model.tie_param, batch)
    assert after.item() < before.item()


def test_normalisation_on_fresh_policy_samples(tmp_path):
    """norm_policy: offset/scale come from new samples of the reference policy, which then score mean 0, std 1."""

    data = write_records(tmp_path / "r.jsonl", make_records(12, seed=4))
    rc = main(
        [
            "rm",
            "train",
            "--rankings",
            str(data),
            "--runs_dir",
            str(tmp_path / "runs"),
            "--model",
            "tiny",
            "--top_layers",
            "1",
            "--max_steps",
            "1",
            "--norm_policy",
            "tiny",
            "--norm_prompts",
            "6",
            "--norm_max_new_tokens",
            "6",
            "tracking.mode=disabled",
        ]
    )
    assert rc == 0
    model_dir = tmp_path / "runs" / "default" / "rm_train" / "model"
    norm = json.loads((model_dir / "rlhf_reward.json").read_text())["normalization"]
    assert norm["n"] == 6 and "samples of tiny" in norm["source"]
    assert norm["scale"] > 0


def test_each_response_is_encoded_once_per_prompt_whatever_the_annotators():
    """Three annotators' rankings of one prompt share one encoding of its K responses."""
    recs = make_records(2, seed=8)
    three = []
    for r in recs:
        for a in range(3):
            three.append({**copy.deepcopy(r), "annotator": f"sim-{a}"})
    three[1]["tiers"] = [["A", "B", "C", "D"]]  # annotators may disagree (and tie everything)
    groups = build_groups(three, DataReport(), "plackett_luce")
    assert len(groups) == 2 and [len(g.rankings) for g in groups] == [3, 3]
    for g in groups:
        g.ids, g.starts = [[1, 2, 3]] * g.k, [1] * g.k
    batch = make_batch(groups, 0, None)
    assert batch.input_ids.shape[0] == 8  # 2 prompts × K=4, not × 3 annotators or × 6 pairs
    assert batch.tiers.shape == (6, 4) and batch.row_of_ranking.tolist() == [0, 0, 0, 1, 1, 1]


def test_tie_parameter_starts_at_the_data_tie_rate():
    """1 tied pair out of 12: Rao–Kupper (θ-1)/(θ+1) = 1/12 → θ = 13/11; Davidson ν/(2+ν) = 1/12 → ν = 2/11."""
    recs = make_records(2, seed=3)
    recs[0]["tiers"], recs[0]["ranking"] = [["A", "B"], ["C"], ["D"]], "A = B > C > D"
    recs[1]["tiers"], recs[1]["ranking"] = [["D"], ["C"], ["B"], ["A"]], "D > C > B > A"
    groups = build_groups(recs, DataReport(), "rao_kupper")
    assert tie_rate(groups) == pytest.approx(1 / 12)
    assert initial_tie_value("rao_kupper", None, None, 1 / 12) == pytest.approx(13 / 11)
    assert initial_tie_value("davidson", None, None, 1 / 12) == pytest.approx(2 / 11)
    assert initial_tie_value("rao_kupper", 3.0, None, 1 / 12) == 3.0  # a configured value wins
    assert initial_tie_value("davidson", None, 0.5, 1 / 12) == 0.5
    assert initial_tie_value("grouped_bt", None, None, 1 / 12) is None
    assert initial_tie_value("rao_kupper", None, None, 0.0) > 1  # no ties in the data: still valid


@pytest.mark.parametrize("loss, key", [("rao_kupper", "theta"), ("davidson", "nu")])
def test_tie_parameter_learns_at_its_own_rate(tmp_path, loss, key):
    """At tie_lr the learned θ / ν moves within 20 steps; at a negligible tie_lr it stays where it started
    (at the model's lr, 3e-4 in the SmolLM2 benches, it would barely move: what tie_lr fixes)."""
    data = write_records(tmp_path / "r.jsonl", make_records(40, seed=2))
    moved = {}
    for tie_lr in ("0.05", "1e-9"):
        runs = tmp_path / f"runs{tie_lr}"
        rc = main(
            ["rm", "train", "--rankings", str(data), "--runs_dir", str(runs), *TRAIN_ARGS[:2]]
            + ["--loss", loss, "--max_steps", "20", "--tie_lr", tie_lr, "--eval_every", "0"]
            + ["tracking.mode=disabled"]
        )
        assert rc == 0
        meta = json.loads((runs / "default" / "rm_train" / "model" / "rlhf_reward.json").read_text())
        moved[tie_lr] = abs(math.log(meta[key]) - math.log(meta["tie_initial"]))
    assert moved["1e-9"] < 1e-6
    assert moved["0.05"] > 0.1
