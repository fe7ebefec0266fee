"""``length_discount: attenuation``: the agreement corrected for the labels' noise, the discount, and
the exact solver that applies it (reward_models/length_discount.py)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from reward_models.length_discount import (
    LENGTH_RIDGE,
    attenuation_corrected_agreement,
    discount_for_correlation,
    length_direction,
    pair_labels,
)
from rlhf.cli import main

from .rm_data import make_records, write_records


def corr(a, b):
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_pair_labels_by_hand():
    # tiers (best 0) of candidates A, B, C; −1: not in this ranking
    assert pair_labels([[1, 0, 1], [2, 0, 1]]) == {(0, 1): [-1, -1], (0, 2): [0, -1], (1, 2): [1, 1]}
    assert pair_labels([[0, -1, 1]]) == {(0, 2): [1]}


def test_agreement_corrected_for_attenuation_by_hand():
    # the two rankings' labels on (A, B), (A, C), (B, C) are (−1, 0, 1) and (−1, −1, 1): they
    # correlate at √3/2, the reliability. Scores 1, 2, 0 give the differences −1, 1, 2, each once a
    # ranking, against the labels −1, −1, 0, −1, 1, 1: correlation 0.84370 (the agreement)
    rho, reliability, agreement, shared = attenuation_corrected_agreement(
        [[[1, 0, 1], [2, 0, 1]]], [torch.tensor([1.0, 2.0, 0.0])]
    )
    assert reliability == pytest.approx(math.sqrt(3) / 2)
    assert agreement == pytest.approx(0.8436958338752908)
    assert rho == pytest.approx(min(1.0, 0.8436958338752908 / math.sqrt(math.sqrt(3) / 2)))
    assert shared == 3
    with pytest.raises(ValueError, match="ranked twice"):
        attenuation_corrected_agreement([[[1, 0, 1]]], [torch.tensor([1.0, 2.0, 0.0])])


def test_noisy_labels_do_not_lower_rho_but_a_noisy_reward_does():
    """Simulated: annotators follow a gold by Bradley–Terry; the corrected agreement of the gold
    itself stays near its ceiling however noisy they are, while the raw agreement falls with their
    noise; a reward with noise of its own is read lower."""
    g = torch.Generator().manual_seed(0)
    gold = torch.randn(400, 4, generator=g, dtype=torch.float64)

    def rankings(temperature):
        noisy = gold + temperature * torch.randn(2, *gold.shape, generator=g, dtype=torch.float64)
        return [[torch.argsort(torch.argsort(-n[p])).tolist() for n in noisy] for p in range(len(gold))]

    calm, loud = rankings(0.3), rankings(1.5)
    rho_calm, _, raw_calm, _ = attenuation_corrected_agreement(calm, list(gold))
    rho_loud, _, raw_loud, _ = attenuation_corrected_agreement(loud, list(gold))
    assert raw_loud < raw_calm - 0.1  # the labels' noise lowers the raw agreement
    assert abs(rho_loud - rho_calm) < 0.08  # the correction takes it out
    noisy_reward = list(gold + 1.5 * torch.randn(gold.shape, generator=g, dtype=torch.float64))
    assert attenuation_corrected_agreement(loud, noisy_reward)[0] < rho_loud - 0.15


def test_discount_scales_the_length_correlation_by_the_factor():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 50, (60,), generator=g).double()
    scores = 0.05 * lengths + torch.randn(60, generator=g, dtype=torch.float64)
    centred = lengths - lengths.mean()
    beta, before, after = discount_for_correlation(scores, lengths, centred, 0.4)
    assert before == pytest.approx(corr(scores, lengths))
    assert after == pytest.approx(0.4 * before, abs=1e-9)
    assert corr(scores - beta * centred, lengths) == pytest.approx(after)
    assert discount_for_correlation(-scores, lengths, centred, 0.4)[0] == 0.0  # no length reward to cut
    assert discount_for_correlation(scores, lengths, centred, 1.0)[0] == 0.0


def test_length_direction_is_the_length_the_features_carry():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 6, generator=g, dtype=torch.float64)
    lengths = 30 + 4 * z[:, 1] - 2 * z[:, 4]
    v = length_direction(z, lengths)
    assert corr(z @ v, lengths) > 0.999  # the direction is the length's ...
    # ... shrunk by the ridge as each unit-variance feature's coefficient is: by 1 / (1 + ridge)
    shrink = 1 / (1 + LENGTH_RIDGE)
    assert v.tolist() == pytest.approx([0, 4 * shrink, 0, 0, -2 * shrink, 0], abs=0.1)


def twice_ranked(n_prompts: int, seed: int, flip: float) -> list[dict]:
    """make_records' prompts, each ranked by two annotators who swap two adjacent tiers with
    probability ``flip`` each, on their own."""
    rng = random.Random(seed)
    out = []
    for record in make_records(n_prompts, seed=seed):
        for annotator in ("sim-0", "sim-1"):
            tiers = [list(t) for t in record["tiers"]]
            if len(tiers) > 1 and rng.random() < flip:
                i = rng.randrange(len(tiers) - 1)
                tiers[i], tiers[i + 1] = tiers[i + 1], tiers[i]
            ranking = " > ".join(" = ".join(t) for t in tiers)
            out.append({**record, "tiers": tiers, "ranking": ranking, "annotator": annotator})
    return out


def test_rm_train_discounts_length_end_to_end(tmp_path, capsys):
    """Through the command line on the tiny model: the head is solved, ρ is read off the prompts
    ranked twice, and the training answers' length correlation falls by that factor; without
    prompts ranked twice the run stops with one line before any model loads."""
    data = write_records(tmp_path / "r.jsonl", twice_ranked(60, seed=0, flip=0.3))
    argv = ["rm", "train", "--rankings", str(data), "--runs_dir", str(tmp_path / "runs"), "--model", "tiny"]
    argv += ["--top_layers", "0", "--read_layers", "[0,1,2]", "--solver", "lbfgs", "--val_fraction", "0"]
    argv += ["--l2_search", "[1,10]", "--length_discount", "attenuation", "--tracking.mode", "offline"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "length discounted: ρ" in out
    logs = [json.loads(line) for line in (tmp_path / "runs/default/rm_train/metrics.jsonl").open()]
    found = {k: v for row in logs for k, v in row.items() if k.startswith("train/length_discount_")}
    assert 0 < found["train/length_discount_rho"] <= 1 and found["train/length_discount_shared_pairs"] > 0
    assert 0 < found["train/length_discount_reliability"] < 1  # the second annotator disagrees sometimes
    if found["train/length_discount_corr_before"] > 0:
        expected = found["train/length_discount_rho"] * found["train/length_discount_corr_before"]
        assert found["train/length_discount_corr_after"] == pytest.approx(expected, abs=1e-6)
    once = write_records(tmp_path / "once.jsonl", make_records(20))
    rc = main([*argv[:3], str(once), *argv[4:], "--experiment", "once"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "error[no_data]" in err and "ranked twice" in err and len(err.splitlines()) == 1
