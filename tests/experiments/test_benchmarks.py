"""The reward-model benchmarks run end to end on the tiny model (their figures come from SmolLM2 runs
written up in experiments/README.md; here: the scripts work and report what they claim)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

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


def test_heads_benchmark_pairs_by_hand():
    from experiments.benchmarks import bench_rm_heads as bh

    cands = [{"prompt_id": "p", "candidates": [{"label": c} for c in "ABCD"]}]
    rows = bh.pair_index(cands)
    assert rows == {("p", "A"): 0, ("p", "B"): 1, ("p", "C"): 2, ("p", "D"): 3}
    ranking = {"prompt_id": "p", "tiers": [["A"], ["B", "C"], ["D"]]}
    # the tied B = C gives no pair; every pair across tiers does
    assert sorted(bh.strict_pairs([ranking], rows)) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    gold = {"prompt_id": "p", "gold": {"A": 0.9, "B": 0.5, "C": 0.52, "D": 0.1}}
    # B and C are within the tie threshold: not a gold pair; a second ranking of p adds nothing
    assert sorted(bh.gold_pairs([gold, gold], rows, 0.05)) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert bh.accuracy(torch.tensor([3.0, 1.0, 1.0, 0.0]), [(0, 1), (1, 2), (2, 3)]) == pytest.approx(2 / 3)
    x = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 40.0]])
    # column means (3, 20), deviations (2, √300) over the three training rows
    z = bh.standardise(x, [0, 1, 2])
    assert z[:, 0].tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert z[:, 1].tolist() == pytest.approx(
        [-10 / math.sqrt(300), -10 / math.sqrt(300), 20 / math.sqrt(300)]
    )


def test_heads_benchmark_learning_curve_shares_are_nested():
    from experiments.benchmarks import bench_rm_heads as bh

    records = [{"prompt_id": f"p{i}", "n": n} for i in range(8) for n in range(2)]  # two rankings each
    prompts = {f: {r["prompt_id"] for r in bh.first_prompts(records, f, seed=3)} for f in (0.25, 0.5, 1.0)}
    assert [len(prompts[f]) for f in (0.25, 0.5, 1.0)] == [2, 4, 8]
    assert prompts[0.25] < prompts[0.5] < prompts[1.0]  # a larger share only adds prompts
    assert len(bh.first_prompts(records, 0.5, seed=3)) == 8  # with every ranking of its prompts
    assert bh.first_prompts(records, 0.01, seed=3)  # never empty


def test_heads_benchmark_ridge_fit_finds_the_preference_and_shrinks_with_l2():
    from experiments.benchmarks import bench_rm_heads as bh

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    true = x[:, 2] - 0.5 * x[:, 4]  # the preference reads two of the five features
    pairs = [(i, j) if true[i] > true[j] else (j, i) for i in range(0, 40, 2) for j in range(1, 40, 2)]
    held = [(i, j) if true[i] > true[j] else (j, i) for i in range(40, 60) for j in range(i + 1, 60)]
    train_rows = list(range(40))
    w = bh.fit_ridge_bt(x, train_rows, pairs, l2=1e-3)
    assert bh.accuracy(bh.standardise(x, train_rows) @ w, held) > 0.9
    assert w[2] > 0 > w[4] and abs(w[2]) > max(abs(w[0]), abs(w[1]), abs(w[3]))
    strong = bh.fit_ridge_bt(x, train_rows, pairs, l2=100.0)
    assert strong.norm() < 0.1 * w.norm()  # the penalty shrinks the weights towards 0


def test_heads_benchmark_parses_blocks_and_pools_by_hand():
    from experiments.benchmarks import bench_rm_heads as bh

    B = bh.Block
    assert bh.parse_variant("0,2") == [B("mean", 0), B("mean", 2)]
    assert bh.parse_variant("2+max:1,2+words+length") == [
        B("mean", 2),
        B("max", 1),
        B("max", 2),
        B("words"),
        B("length"),
    ]
    for bad in ("median:2", "2+2", "length+length"):
        with pytest.raises(ValueError):
            bh.parse_variant(bad)
    assert bh._name(bh.parse_variant("0,2"), 10) == "layers 0,2, λ 10"  # the plain lists keep their names
    assert bh._name(bh.parse_variant("0,2+max:8,4+length"), 1) == "layers 0,2 + max 8,4 + length, λ 1"
    # two rows, three positions, one feature; row 0's response is positions 1-2, row 1's position 0
    states = torch.tensor([[[9.0], [1.0], [3.0]], [[4.0], [7.0], [8.0]]])
    response = torch.tensor([[False, True, True], [True, False, False]])
    assert bh.pool_states(states, response, "mean").flatten().tolist() == [2.0, 4.0]
    assert bh.pool_states(states, response, "max").flatten().tolist() == [3.0, 4.0]
    assert bh.pool_states(states, response, "std").flatten().tolist() == [1.0, 0.0]
    assert bh.pool_states(states, response, "last").flatten().tolist() == [3.0, 4.0]
    # tokens 5 and 6 are in at least two answers, 7 in one: columns 5, 6
    words = bh.bag_of_words([[5, 5, 6, 7], [6], [5]], min_answers=2)
    assert words.tolist() == [[0.5, 0.25], [0.0, 1.0], [1.0, 0.0]]
    # reward 1, 2, 3; gold 1, 3, 2; length 2, 4, 7: corr(r, L) 0.99340, corr(g, L) 0.39736, corr(r, g) 0.5
    excess, beyond = bh.length_leans(
        torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0]), torch.tensor([2.0, 4.0, 7.0])
    )
    assert excess == pytest.approx(0.9933992677987828 - 0.3973597071195132)
    assert beyond == pytest.approx(0.9933992677987828 - 0.3973597071195132 / 0.5)
    feats = {B("mean", 0): torch.ones(4, 2), B("length"): torch.arange(4.0)[:, None]}
    x, free_from = bh.variant_matrix(feats, [B("length"), B("mean", 0)])
    assert x.shape == (4, 3) and free_from == 2 and x[:, 2].tolist() == [0.0, 1.0, 2.0, 3.0]  # length last


def test_heads_benchmark_leaves_the_free_column_unpenalised():
    from experiments.benchmarks import bench_rm_heads as bh

    x = torch.arange(8.0)[:, None].repeat(1, 2)  # two copies of one feature, the second left free
    pairs = [(i, j) for i in range(8) for j in range(8) if i > j and i % 2 == 0]  # larger wins, noisily
    pairs += [(1, 6)]
    shrunk = bh.fit_ridge_bt(x[:, :1], list(range(8)), pairs, l2=10.0)
    free = bh.fit_ridge_bt(x, list(range(8)), pairs, l2=10.0, free_from=1)
    # the penalty holds the penalised copy near 0 while the free one takes the whole slope
    assert abs(float(free[0])) < 0.1 * float(free[1]) and float(free[1]) > 5 * float(shrunk[0])


def test_heads_benchmark_reads_rho_off_the_rankings_by_hand():
    from experiments.benchmarks import bench_rm_heads as bh

    cands = [{"prompt_id": "p", "candidates": [{"label": c} for c in "ABC"]}]
    rows = bh.pair_index(cands)
    first = {"prompt_id": "p", "tiers": [["B"], ["A", "C"]]}
    second = {"prompt_id": "p", "tiers": [["B"], ["C"], ["A"]]}
    # pairs (A, B), (A, C), (B, C), +1 the first above, −1 below, 0 tied: (−1, −1), (0, −1), (1, 1)
    # the two rankings' labels (−1, 0, 1) and (−1, −1, 1) correlate at √3/2, the reliability; the
    # score differences A−B, A−C, B−C = −1, 1, 2, each once a ranking, against the labels −1, −1, 0,
    # −1, 1, 1 correlate at 0.84370, so ρ = 0.84370 / √(√3/2)
    rho = bh.rho_from_records(torch.tensor([1.0, 2.0, 0.0]), [first, second], rows)
    assert rho == pytest.approx(0.8436958338752908 / math.sqrt(math.sqrt(3) / 2))
    with pytest.raises(ValueError, match="ranked twice"):  # one ranking a prompt: no overlap
        bh.rho_from_records(torch.tensor([1.0, 2.0, 0.0]), [first], rows)


def test_heads_benchmark_length_discount_scales_the_training_correlation_by_rho():
    from experiments.benchmarks import bench_rm_heads as bh

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 50, (40,), generator=g).double()
    scores = 0.05 * lengths + torch.randn(40, generator=g, dtype=torch.float64)
    train = list(range(30))

    def corr(s, rows):
        return float(torch.corrcoef(torch.stack([s[rows], lengths[rows]]))[0, 1])

    discounted = bh.length_discounted(scores, lengths, train, rho=0.5)
    assert corr(discounted, train) == pytest.approx(0.5 * corr(scores, train), abs=1e-6)
    # a straight line in the length is all it takes away: the held-out rows move by the same line
    line = scores - discounted
    assert torch.allclose(
        line, line[0] + (lengths - lengths[0]) * (line[1] - line[0]) / (lengths[1] - lengths[0])
    )
    assert torch.equal(bh.length_discounted(-scores, lengths, train, rho=0.5), -scores)  # no length reward
    assert torch.allclose(bh.length_discounted(scores, lengths, train, rho=1.0), scores)


def test_heads_benchmark_kernel_head_learns_what_a_straight_line_cannot():
    from experiments.benchmarks import bench_rm_heads as bh

    g = torch.Generator().manual_seed(1)
    z = torch.randn(80, 2, generator=g, dtype=torch.float64)
    true = -(z[:, 0] ** 2)  # answers near the middle are better: no linear head can say so
    pairs = [(i, j) if true[i] > true[j] else (j, i) for i in range(60) for j in range(i + 1, 60)]
    held = [(i, j) if true[i] > true[j] else (j, i) for i in range(60, 80) for j in range(i + 1, 80)]
    kernel = bh.fit_rbf_bt(z, list(range(60)), pairs, gamma=1.0, lam=1e-4)
    linear = bh.standardise(z, list(range(60))) @ bh.fit_ridge_bt(z, list(range(60)), pairs, l2=1e-3)
    assert bh.accuracy(kernel, held) > 0.9 > 0.7 > bh.accuracy(linear, held)


def test_heads_benchmark_runs_variants_and_the_preset_over_splits(in_tmp, capsys):
    from experiments.benchmarks import bench_rm_heads

    rc = bench_rm_heads.main(
        [*DATA, "--per_prompt", "3", "--variants", "2;0,1,2", "--l2", "1", "--splits", "2"]
        + ["--preset", str(TINY_RM), "--preset_overrides", "loss=rao_kupper", "--out", "heads"]
    )
    assert rc == 0
    acc = json.loads((in_tmp / "heads" / "results.json").read_text())["accuracy"]
    assert list(acc) == ["preset", "preset, loss=rao_kupper", "layers 2, λ 1", "layers 0,1,2, λ 1"]
    assert acc["preset"] != acc["preset, loss=rao_kupper"]  # another loss trained another model
    rc = bench_rm_heads.main(
        [*DATA, "--variants", "2", "--l2", "1", "--splits", "2", "--train_fractions", "0.5,1"]
    )
    assert rc == 0
    curve = json.loads((Path("runs/bench_rm_heads") / "results.json").read_text())["accuracy"]
    assert list(curve) == [
        "layers 2, λ 1, 0.5 of the training prompts",
        "layers 2, λ 1, 1 of the training prompts",
    ]
    assert all(len(v) == 2 and all(0.0 <= a <= 1.0 for a in v) for v in acc.values())
    out = capsys.readouterr().out
    assert (
        "| head (gold `length:target=4`, 2 splits) | vs gold [95 % t] | − preset [95 % t] "
        "| length corr − gold's [95 % t] | − explained by accuracy [95 % t] |" in out
    )
    rc = bench_rm_heads.main([*DATA, "--variants", "2;2+max:1+words+length", "--l2", "1", "--splits", "2"])
    assert rc == 0
    res = json.loads((Path("runs/bench_rm_heads") / "results.json").read_text())
    assert list(res["accuracy"]) == list(res["length_corr_excess"]) == list(res["length_corr_beyond"])
    assert list(res["accuracy"]) == ["layers 2, λ 1", "layers 2 + max 1 + words + length, λ 1"]
    assert all(-2.0 <= e <= 2.0 for v in res["length_corr_excess"].values() for e in v)
    rc = bench_rm_heads.main(
        [*DATA, "--per_prompt", "2", "--variants", "2", "--l2", "1", "--splits", "2"]
        + ["--rbf", "2:1e-3", "--length_discount"]
    )
    assert rc == 0
    res = json.loads((Path("runs/bench_rm_heads") / "results.json").read_text())
    assert list(res["accuracy"]) == [
        "layers 2, λ 1",
        "layers 2, λ 1, length discounted",
        "RBF kernel on layers 2, γ 2, λ 0.001",
    ]
    assert all(len(v) == 2 and all(0.0 <= a <= 1.0 for a in v) for v in res["accuracy"].values())


def test_heads_benchmark_more_answers_label_on_and_refuse_other_prompts():
    from experiments.benchmarks import bench_rm_heads as bh

    cands = [{"prompt_id": "p", "prompt": "q", "candidates": [{"label": c, "text": c} for c in "AB"]}]
    more = [{"prompt_id": "p", "prompt": "q", "candidates": [{"label": c, "text": c + "2"} for c in "AB"]}]
    both = bh.with_more_answers(cands, more, "more.jsonl")
    assert [(c["label"], c["text"]) for c in both[0]["candidates"]] == [
        ("A", "A"),
        ("B", "B"),
        ("C", "A2"),
        ("D", "B2"),
    ]
    assert cands[0]["candidates"][1]["label"] == "B"  # the inputs are not relabelled in place
    with pytest.raises(SystemExit, match="more.jsonl: its prompts are not the same"):
        bh.with_more_answers(cands, [{**more[0], "prompt_id": "other"}], "more.jsonl")


def test_heads_benchmark_more_answers_fits_each_head_twice(in_tmp):
    from experiments.benchmarks import bench_rm_heads

    args = [*DATA, "--variants", "0,2", "--l2", "1", "--splits", "2"]
    assert bench_rm_heads.main([*args, "--seed", "1", "--out", "second"]) == 0
    first = ["--candidates", str(in_tmp / "second" / "candidates.jsonl")]  # any two files of the same prompts
    assert bench_rm_heads.main([*args, "--seed", "2", "--out", "third"]) == 0
    rc = bench_rm_heads.main(
        [*args, *first, "--more_answers", str(in_tmp / "third" / "candidates.jsonl"), "--out", "both"]
    )
    assert rc == 0
    acc = json.loads((in_tmp / "both" / "results.json").read_text())["accuracy"]
    assert list(acc) == ["layers 0,2, λ 1", "layers 0,2, λ 1, 8 answers a prompt"]
    assert all(len(v) == 2 and all(0.0 <= a <= 1.0 for a in v) for v in acc.values())


def test_lora_autocast_bench_prints_a_row_per_scale(capsys):
    from experiments.benchmarks import bench_lora_autocast

    assert bench_lora_autocast.main(["--model", "tiny", "--scales", "1e-3,1e-1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [float(r[0]) for r in rows] == [1e-3, 1e-1]
    fp32_change = [float(r[1]) for r in rows]
    assert 0 < fp32_change[0] < fp32_change[1]  # a larger adapter changes the log-probs more
    assert all(-1 <= float(r[3]) <= 1 for r in rows)


def test_decode_attention_bench_times_both_attentions_on_the_same_answers(capsys):
    from experiments.benchmarks import bench_decode_attention
    from rlhf import sampling

    args = ["--model", "tiny", "--prompts", "4", "--k", "2", "--max_new_tokens", "6", "--batch_size", "4"]
    assert bench_decode_attention.main([*args, "--repeats", "1", "--precision", "no"]) == 0
    out = capsys.readouterr().out
    rows = [
        line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "seconds" not in line
    ]
    assert [r[0].strip() for r in rows] == ["transformers' SDPA", "the sampler's own"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    # fp32: the two attentions agree to rounding, so the same random numbers write the same answers
    assert "same answers 8 of 8" in out
    assert sampling._OWN_DECODING.get()  # the baseline's switch is undone


def test_logits_to_keep_bench_times_both_calls_and_finds_the_same_logits(capsys):
    from experiments.benchmarks import bench_logits_to_keep

    assert bench_logits_to_keep.main(["--model", "tiny", "--prompts", "3", "--response_tokens", "4"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [r for r in rows if r[0].strip() != "call"]
    assert {r[0].strip() for r in rows} == {"prefill, last position", "log-probs, last 5"}
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert all(float(r[5]) < 1e-3 for r in rows)  # the same logits either way


def test_frozen_bf16_bench_times_three_sides_and_finds_the_same_numbers(capsys):
    from experiments.benchmarks import bench_frozen_bf16
    from rlhf.models import bf16_hardware

    args = ["--policy", "tiny", "--prompts", "3", "--micro_batch", "2", "--tokens", "4", "--repeats", "1"]
    assert bench_frozen_bf16.main(args) == 0
    out = capsys.readouterr().out
    if not bf16_hardware("cpu"):
        assert "nothing to compare" in out
        return
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    rows = [r for r in rows if r[0].strip() != "call"]
    assert [r[0].strip() for r in rows] == ["rollout, 3 × 4 tokens", "training micro-step, 2 rows"]
    assert all(float(t) > 0 for r in rows for t in r[1:4])
    assert all(r[5].strip() == "yes" for r in rows)  # the same tokens, logits and gradients


def test_training_attention_bench_times_both_attentions_on_close_numbers(capsys):
    from experiments.benchmarks import bench_training_attention
    from rlhf.models import bf16_hardware

    assert (
        bench_training_attention.main(
            ["--policy", "tiny", "--micro_batch", "2", "--tokens", "4", "--repeats", "1"]
        )
        == 0
    )
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [[c.strip() for c in r] for r in rows if r[0].strip() != "call"]
    precisions = (["bf16 autocast"] if bf16_hardware("cpu") else []) + ["fp32"]
    assert [(r[0], r[1]) for r in rows] == [
        (c, p) for p in precisions for c in ("training micro-step", "forward")
    ]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    fp32 = {r[0]: r for r in rows if r[1] == "fp32"}
    assert all(float(r[5]) < 1e-4 for r in fp32.values())  # the same function, rounded otherwise
    assert float(fp32["training micro-step"][6]) < 1e-4 and fp32["forward"][6] == "—"


def test_batch_shrink_bench_times_both_shares_and_finds_the_same_answers(capsys):
    from experiments.benchmarks import bench_batch_shrink
    from rlhf import sampling

    before = sampling.SHRINK_AT
    args = ["--policy", "tiny", "--prompts", "4", "--k", "2", "--tokens", "6", "--repeats", "1"]
    assert bench_batch_shrink.main(args) == 0
    out = capsys.readouterr().out
    assert "shrink at 0 (baseline)" in out and f"shrink at {before:g} (lab)" in out
    assert "the same answers: yes" in out
    assert sampling.SHRINK_AT == before  # the bench puts the lab's share back


def test_allocator_bench_runs_both_sides_in_children_on_the_same_numbers(capsys):
    from experiments.benchmarks import bench_allocator

    args = ["--policy", "tiny", "--micro_batch", "2", "--tokens", "4", "--steps", "3", "--repeats", "1"]
    assert bench_allocator.main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    rows = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows if r[0].strip() in bench_allocator.SIDES}
    assert set(rows) == set(bench_allocator.SIDES)
    assert all(float(r[0]) > 0 and int(r[1]) > 0 for r in rows.values())
    assert rows["kept"][3] == rows["handed back"][3]  # the same log-probs and gradients either way
    assert "kept vs handed back:" in out
