"""Rankings weighted by their annotator's reliability: the weighted losses by hand, the batches that
carry the weights, and ``rlhf rm train --annotator_weights reliability`` end to end on the tiny model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from reward_models import losses as L
from reward_models.groups import DataReport, build_groups, make_batch
from reward_models.simulate import gold_pair_agreement, simulate_rankings
from rlhf.cli import main

from .rm_data import make_records, write_records


def nls(x: float) -> float:
    """-log σ(x) by hand."""
    return math.log1p(math.exp(-x))


REWARDS = torch.tensor(
    [[0.0, 1.0, 2.0, 1.5], [0.5, -1.0, 0.0, 0.0], [1.0, 0.0, -1.0, 0.0]], dtype=torch.float64
)
# C > B = D > A (5 strict pairs, 1 tie); A > B > C (K = 3, padded); all tied (no strict pair)
TIERS = torch.tensor([[2, 1, 0, 1], [0, 1, 2, -1], [0, 0, 0, 0]])


@pytest.mark.parametrize("name", L.LOSSES)
def test_weight_one_everywhere_is_the_unweighted_loss_exactly(name):
    tie = torch.tensor(0.3, dtype=torch.float64) if name in L.PAIRWISE_TIE_MODELS else None
    plain, used = L.ranking_loss(name, REWARDS, TIERS, tie_param=tie)
    ones, used_ones = L.ranking_loss(name, REWARDS, TIERS, tie_param=tie, weights=torch.ones(3))
    assert torch.equal(plain, ones) and used == used_ones


def test_grouped_bt_weighted_by_hand():
    """Weights 0.5, 2 and 7: the all-tied ranking has no strict pair, so its 7 counts for nothing."""
    first = (nls(1.0) + nls(0.5) + nls(2.0) + nls(1.0) + nls(1.5)) / 5  # C>B C>D C>A B>A D>A
    second = (nls(1.5) + nls(0.5) + nls(-1.0)) / 3  # A>B A>C B>C
    loss, used = L.ranking_loss("grouped_bt", REWARDS, TIERS, weights=torch.tensor([0.5, 2.0, 7.0]))
    assert loss.item() == pytest.approx((0.5 * first + 2.0 * second) / 2.5, rel=1e-12)
    assert used == 2


def test_pairwise_bt_weighs_every_pair_by_its_ranking():
    first = nls(1.0) + nls(0.5) + nls(2.0) + nls(1.0) + nls(1.5)
    second = nls(1.5) + nls(0.5) + nls(-1.0)
    loss, _ = L.ranking_loss("bt", REWARDS, TIERS, weights=torch.tensor([0.5, 2.0, 7.0]))
    assert loss.item() == pytest.approx((0.5 * first + 2.0 * second) / (0.5 * 5 + 2.0 * 3), rel=1e-12)


def test_weight_zero_removes_a_ranking_and_all_zero_gives_zero():
    weighted, used = L.ranking_loss("plackett_luce", REWARDS, TIERS, weights=torch.tensor([0.0, 1.0, 1.0]))
    alone, _ = L.ranking_loss("plackett_luce", REWARDS[1:], TIERS[1:])
    assert weighted.item() == pytest.approx(alone.item(), rel=1e-12) and used == 2
    rewards = REWARDS.clone().requires_grad_(True)
    zero, used = L.ranking_loss("grouped_bt", rewards, TIERS, weights=torch.zeros(3))
    zero.backward()
    assert zero.item() == 0.0 and used == 0 and torch.isfinite(rewards.grad).all()


def test_batches_carry_the_weights_of_their_rankings():
    records = make_records(3, seed=1)
    groups = build_groups(records, DataReport(), "grouped_bt")
    for g in groups:
        g.ids, g.starts = [[1, 2, 3]] * g.k, [1] * g.k
    assert make_batch(groups, 0, None).weights is None  # unweighted: as before
    groups[0].weights = [0.25]
    groups[2].weights = [0.0]
    assert make_batch(groups, 0, None).weights.tolist() == [0.25, 1.0, 0.0]


# ----------------------------------------------------------------------------- rlhf rm train, end to end


def pool_records(n_prompts: int, seed: int) -> list[dict]:
    """Every prompt ranked by 3 of 5 annotators: good-0..3 report the gold ranking, ``reversed`` its
    reverse."""
    annotators = ["good-0", "good-1", "good-2", "good-3", "reversed"]
    out = []
    for i, rec in enumerate(make_records(n_prompts, seed=seed)):
        for j in range(3):
            name = annotators[(i + j) % len(annotators)]
            r = copy.deepcopy(rec)
            r["annotator"] = name
            if name == "reversed":
                r["tiers"] = r["tiers"][::-1]
                r["ranking"] = " > ".join(" = ".join(t) for t in r["tiers"])
            out.append(r)
    return out


QUICK = ["--max_steps", "2", "--normalize", "false", "--model", "tiny", "--top_layers", "1"]


def train(tmp_path, *argv: str) -> tuple[int, object]:
    data = write_records(tmp_path / "r.jsonl", pool_records(40, seed=2))
    runs = tmp_path / "runs"
    rc = main(["rm", "train", "--rankings", str(data), "--runs_dir", str(runs), *QUICK, *argv])
    return rc, runs / "default" / "rm_train"


def test_reliability_weights_are_fitted_logged_and_used(tmp_path, capsys):
    rc, run_dir = train(tmp_path, "--annotator_weights", "reliability", "tracking.mode=offline")
    assert rc == 0
    out = capsys.readouterr().out
    assert "annotators: reliability of 5 fitted on" in out and "reversed: weight 0.00" in out
    table = json.loads((run_dir / "annotators.json").read_text())
    weights = {a["annotator"]: a["weight"] for a in table["annotators"]}
    assert weights["reversed"] == 0.0 and all(weights[f"good-{i}"] > 0.8 for i in range(4))
    # fitted on the training and validation prompts only: the held-out ones never enter
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rm/eval_prompts"] > 0
    assert table["items"] == (summary["rm/train_prompts"] + summary["rm/val_prompts"]) * 6
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("annotators/zero_weight") == 1 for m in logged)
    rows = [json.loads(line) for line in (run_dir / "table_annotators.jsonl").read_text().splitlines()]
    assert rows[0]["annotator"] == "reversed" and len(rows) == 5
    assert summary["annotators/count"] == 5


def test_min_reliability_drops_the_unreliable_annotators_rankings(tmp_path, capsys):
    rc, run_dir = train(tmp_path, "--min_reliability", "0.5", "tracking.mode=disabled")
    assert rc == 0
    out = capsys.readouterr().out
    table = json.loads((run_dir / "annotators.json").read_text())
    assert table["dropped_annotators"] == ["reversed"] and table["weighted"] is False
    dropped = table["dropped_rankings"]
    assert dropped > 0 and f"{dropped} rankings of 1 annotators with expected accuracy below" in out


def test_default_fits_nothing(tmp_path):
    rc, run_dir = train(tmp_path, "tracking.mode=disabled")
    assert rc == 0 and not (run_dir / "annotators.json").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--annotator_weights", "trust"], "choose one of none, reliability"),
        (["--min_reliability", "1.5"], "min_reliability must be in [0, 1)"),
    ],
)
def test_bad_reliability_options_are_one_line_before_any_work(tmp_path, capsys, argv, words):
    data = write_records(tmp_path / "r.jsonl", make_records(4))
    rc = main(["rm", "train", "--rankings", str(data), "--runs_dir", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("rlhf: error[config]") and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_min_reliability_above_everyone_is_one_clear_error(tmp_path, capsys):
    rc, run_dir = train(tmp_path, "--min_reliability", "0.999", "tracking.mode=disabled")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "error[no_data]" in err and "min_reliability=0.999 leaves no training rankings" in err


# ----------------------------------------------------------------------------- simulated kinds of annotator


def test_simulated_careless_and_adversarial_annotators():
    cands = [
        {
            "prompt_id": f"p{i}",
            "prompt": "hi",
            "candidates": [{"label": lab, "text": "x" * (i % 7 + j)} for j, lab in enumerate("ABCD")],
        }
        for i in range(200)
    ]
    scorer = lambda prompts, texts: [float(len(t)) for t in texts]  # noqa: E731
    common = dict(n_annotators=3, temperature=0.0, tie_threshold=0.0, per_prompt=3, seed=1)

    def without_time(records):
        return [{k: v for k, v in r.items() if k != "created_at"} for r in records]

    plain = simulate_rankings(cands, scorer, **common)
    assert without_time(simulate_rankings(cands, scorer, **common, kinds=["good"] * 3)) == without_time(plain)
    mixed = simulate_rankings(cands, scorer, **common, kinds=["good", "careless", "adversarial"])
    by = {(r["prompt_id"], r["annotator"]): r for r in mixed}
    for r in plain:
        if r["annotator"] == "sim-0":
            assert by[(r["prompt_id"], "sim-0")]["tiers"] == r["tiers"]
            assert by[(r["prompt_id"], "sim-2")]["tiers"] == r["tiers"][::-1]
            careless = by[(r["prompt_id"], "sim-1")]["tiers"]
            assert [len(t) for t in careless] == [len(t) for t in r["tiers"]]  # ties at the same rate
    assert gold_pair_agreement([r for r in mixed if r["annotator"] == "sim-2"], 0.0) == 0.0
    assert 0.4 < gold_pair_agreement([r for r in mixed if r["annotator"] == "sim-1"], 0.0) < 0.6
    with pytest.raises(ValueError, match="kinds"):
        simulate_rankings(cands, scorer, **common, kinds=["good", "sloppy", "good"])
