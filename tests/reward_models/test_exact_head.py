"""The head over several layers' means (``read_layers``) and its exact solver (``solver: lbfgs``):
the solution against a hand-computed one, its invariance to each feature's scale, the model's
features against a direct computation, and ``rlhf rm train`` end to end on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import reward_models.train_setup
import rlhf.models
from reward_models.exact_head import solve_head
from reward_models.groups import DataReport, build_groups, encode_groups, make_batch
from reward_models.model import build_reward_model
from reward_models.scoring import build_cache
from reward_models.train_config import RMTrainConfig
from rlhf.cli import main
from rlhf.reward_model import HEAD_FILE, pad_right, response_mask, score_ids
from rlhf.rewards import load_reward_fn
from tests.frozen_bf16 import CastByAutocast, recording

from .rm_data import make_records, write_records


class FeatureModel(torch.nn.Module):
    """Just a head over given features: what solve_head needs of a reward model."""

    def __init__(self, width: int, k: int, tie_param: float | None = None):
        super().__init__()
        self.head = torch.nn.Linear(width, 1)
        self.read_layers = list(range(k))
        self.tie_param = None if tie_param is None else torch.nn.Parameter(torch.tensor(tie_param))


def one_group(features: list[list[float]], tiers: list[list[str]], loss: str = "bt"):
    """A prompt group of len(features) candidates with one ranking, and a cache holding the features."""
    labels = [chr(65 + i) for i in range(len(features))]
    record = {
        "prompt_id": "p",
        "prompt": "q",
        "candidates": [{"label": lab, "text": lab} for lab in labels],
        "tiers": tiers,
        "ranking": " > ".join(" = ".join(t) for t in tiers),
    }
    (group,) = build_groups([record], DataReport(), loss)
    group.ids = [[i + 1] for i in range(len(labels))]
    group.starts = [0] * len(labels)
    return group, {id(group): [torch.tensor(f, dtype=torch.float64) for f in features]}


def test_the_solution_is_the_hand_computed_minimum():
    # One feature, A (x = 3) ranked above B (x = 1): standardised z = ±1 (mean 2, deviation 1), and
    # with Bradley–Terry and λ = 1 the objective log(1 + e^(−2w)) + w² is least where
    # w = 1 / (1 + e^(2w)), w = 0.337416 (fixed-point iteration). Folded into the head:
    # weight w / σ = w, bias −w · μ / σ = −2w.
    group, cache = one_group([[3.0], [1.0]], [["A"], ["B"]])
    model = FeatureModel(1, k=1)
    solution = solve_head(RMTrainConfig(rankings="x", loss="bt", l2=1.0), model, [group], 0, cache, None)
    assert solution.converged
    assert model.head.weight.item() == pytest.approx(0.337416, abs=1e-5)
    assert model.head.bias.item() == pytest.approx(-2 * 0.337416, abs=1e-5)
    expected = torch.nn.functional.softplus(torch.tensor(-2 * 0.337416)) + 0.337416**2
    assert solution.objective == pytest.approx(float(expected), abs=1e-6)


def test_the_penalty_is_per_layer_read():
    # The same data read as "two layers" of one feature each, the second a copy of the first: the
    # penalty is λ/k = ½ per weight, and by symmetry w1 = w2 = w. The reward difference is
    # 2·(w1 + w2) = 4w, so the objective is log(1 + e^(−4w)) + ½·2w², least where w = 2 / (1 + e^(4w)).
    group, cache = one_group([[3.0, 3.0], [1.0, 1.0]], [["A"], ["B"]])
    two = FeatureModel(2, k=2)
    solve_head(RMTrainConfig(rankings="x", loss="bt", l2=1.0), two, [group], 0, cache, None)
    w1, w2 = two.head.weight[0].tolist()
    w = 0.5
    for _ in range(500):  # damped fixed-point iteration
        w = 0.5 * w + 0.5 * 2 / (1 + math.exp(4 * w))
    assert w1 == pytest.approx(w, abs=1e-5) and w2 == pytest.approx(w, abs=1e-5)


@pytest.mark.parametrize("loss", ["grouped_bt", "plackett_luce", "rao_kupper"])
def test_rewards_do_not_depend_on_each_features_scale_or_offset(loss):
    """The features are standardised before the penalty, so rescaling or shifting any of them
    changes the head but not one reward (nor the learned tie parameter)."""
    records = make_records(12, seed=4)
    groups = build_groups(records, DataReport(), loss)
    gen = torch.Generator().manual_seed(0)
    cache, rescaled = {}, {}
    scale, shift = torch.rand(5, generator=gen, dtype=torch.float64) * 100, torch.randn(5, generator=gen) * 7
    for g in groups:
        g.ids = [[i + 1] for i in range(g.k)]
        g.starts = [0] * g.k
        cache[id(g)] = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(g.k)]
        rescaled[id(g)] = [f * scale + shift for f in cache[id(g)]]
    tie = 0.3 if loss == "rao_kupper" else None
    plain, other = FeatureModel(5, k=1, tie_param=tie), FeatureModel(5, k=1, tie_param=tie)
    cfg = RMTrainConfig(rankings="x", loss=loss, l2=0.5)
    solve_head(cfg, plain, groups, 0, cache, None)
    solve_head(cfg, other, groups, 0, rescaled, None)
    a = plain.head(make_batch(groups, 0, cache).features.float()).squeeze(-1)
    b = other.head(make_batch(groups, 0, rescaled).features.float()).squeeze(-1)
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(plain.head.weight, other.head.weight, atol=1e-3)
    if tie is not None:
        assert plain.tie_param.item() == pytest.approx(other.tie_param.item(), abs=1e-5)
        assert plain.tie_param.item() != pytest.approx(0.3)  # it was learned


def test_layer_features_are_the_response_means_of_each_layer():
    """Against transformers' own hidden states of the whole 2-layer backbone (where only the last
    entry has the final norm), one sequence at a time, no padding."""
    model, tok = build_reward_model("tiny", "top", top_layers=0, pooling="mean", layers=2, read_layers=[1, 0])
    assert model.caches_features and model.n_layers == 2
    torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(1))
    report = DataReport()
    groups = build_groups(make_records(3, seed=2), report, "grouped_bt")
    encode_groups(groups, tok, 96, report)
    seqs = [ids for g in groups for ids in g.ids]
    starts = [s for g in groups for s in g.starts]
    ids, mask = pad_right(seqs, tok.pad_token_id)
    with torch.no_grad():
        features = model.layer_features(ids, mask, response_mask(starts, mask))
        for i, (seq, start) in enumerate(zip(seqs, starts)):
            states = model.backbone(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
            assert torch.allclose(features[i, :64], states[1][0, start:].mean(0), atol=1e-5)  # layer 1 first
            assert torch.allclose(features[i, 64:], states[0][0, start:].mean(0), atol=1e-5)  # the embeddings
        # the scoring paths agree: the shared system prompt run once, and every sequence whole
        shared = score_ids(model, seqs, tok.pad_token_id, batch_size=8, starts=starts)
        whole = score_ids(model, seqs, tok.pad_token_id, batch_size=1, starts=starts, share_prefix=False)
        assert torch.allclose(shared, whole, atol=1e-4)
        assert torch.allclose(whole, model.head(features).squeeze(-1), atol=1e-4)
    # training's cache runs the shared system prompt once too, and holds the same features
    cache = build_cache(model, groups, tok.pad_token_id, 4, progress=False)
    cached = torch.stack([f for g in groups for f in cache[id(g)]])
    assert cached.shape == (len(seqs), 128)
    assert torch.allclose(cached, features, atol=1e-5)


def test_the_deepest_layer_is_read_raw_and_nothing_above_it_is_kept():
    model, _ = build_reward_model("tiny", "top", top_layers=0, pooling="mean", read_layers=[1])
    assert model.n_layers == 1  # layers 0 keeps just the layers up to the deepest one read
    whole, _ = build_reward_model("tiny", "top", top_layers=0, pooling="mean", layers=2)
    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        features = model.layer_features(ids, mask, mask)
        raw = whole.backbone(input_ids=ids, output_hidden_states=True).hidden_states[1].mean(1)
        normed = model.backbone(input_ids=ids).last_hidden_state.mean(1)
    assert torch.allclose(features, raw, atol=1e-5)  # layer 1's output before layer 2, not normed
    assert not torch.allclose(features, normed, atol=1e-3)


def test_rm_train_solves_the_head_end_to_end(tmp_path, capsys):
    data = write_records(tmp_path / "r.jsonl", make_records(80, seed=0, flip=0.1))
    argv = ["rm", "train", "--rankings", str(data), "--runs_dir", str(tmp_path / "runs"), "--model", "tiny"]
    argv += ["--top_layers", "0", "--read_layers", "[0,1,2]", "--solver", "lbfgs", "--val_fraction", "0"]
    assert main([*argv, "tracking.mode=offline"]) == 0
    out = capsys.readouterr().out
    assert "cached the means of layers 0, 1, 2 of" in out and "solved exactly by L-BFGS in" in out
    run = tmp_path / "runs" / "default" / "rm_train"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rm/final_pair_accuracy"] > 0.8 and summary["rm/val_prompts"] == 0
    model_dir = run / "model"
    meta = json.loads((model_dir / "rlhf_reward.json").read_text())
    assert meta["read_layers"] == [0, 1, 2] and meta["layers"] == 2 and meta["config"]["solver"] == "lbfgs"
    assert load_file(str(model_dir / HEAD_FILE))["weight"].shape == (1, 3 * 64)
    # scored as a reward, the training candidates have the stored normalisation's mean 0
    records = make_records(80, seed=0, flip=0.1)
    prompts = [r["prompt"] for r in records for _ in r["candidates"]]
    texts = [c["text"] for r in records for c in r["candidates"]]
    rewards = load_reward_fn(str(model_dir))(prompts, texts)
    assert abs(float(rewards.mean())) < 0.2
    (model_dir / HEAD_FILE).unlink()
    rc = main(
        ["rm", "eval", "--reward_model", str(model_dir), "--rankings", str(run / "eval_rankings.jsonl")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "error[bad_reward_model]" in err and HEAD_FILE in err


def test_the_feature_pass_under_autocast_keeps_the_frozen_layers_in_bf16_and_caches_the_same(
    tmp_path, monkeypatch
):
    """Under bf16 the frozen layers' weights are kept in bf16 while the features are cached (autocast
    would cast them at every op): the head solved over them is the one an fp32 backbone under
    autocast gives, bit for bit, and the written backbone is fp32."""
    if not rlhf.models.bf16_hardware("cpu"):
        pytest.skip("this CPU has no bf16 (AVX512-BF16/AMX)")
    data = write_records(tmp_path / "r.jsonl", make_records(40, seed=0, flip=0.1))
    argv = ["rm", "train", "--rankings", str(data), "--runs_dir", str(tmp_path / "runs"), "--model", "tiny"]
    argv += ["--top_layers", "0", "--read_layers", "[0,1,2]", "--solver", "lbfgs", "--val_fraction", "0"]
    argv += ["--mixed_precision", "bf16", "--tracking.mode", "disabled"]
    cast = []

    monkeypatch.setattr(reward_models.train_setup, "FrozenLinearsInBF16", recording(cast))
    assert main([*argv, "--experiment", "kept"]) == 0
    assert cast == [{torch.bfloat16}]

    monkeypatch.setattr(reward_models.train_setup, "FrozenLinearsInBF16", CastByAutocast)
    assert main([*argv, "--experiment", "cast"]) == 0
    kept, by_autocast = (tmp_path / "runs" / e / "rm_train" / "model" for e in ("kept", "cast"))
    for name in (HEAD_FILE, "model.safetensors"):
        a, b = load_file(str(kept / name)), load_file(str(by_autocast / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.float32 for t in load_file(str(kept / "model.safetensors")).values())


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--solver", "lbfgs"], "it needs read_layers"),
        (["--read_layers", "[0,1]", "--top_layers", "1"], "set top_layers: 0"),
        (["--read_layers", "[0,1]", "--top_layers", "0", "--pooling", "last"], "it needs pooling: mean"),
        (["--read_layers", "[0,4]", "--top_layers", "0", "--layers", "2"], "reads layer 4"),
        (
            ["--read_layers", "[0,1]", "--top_layers", "0", "--solver", "lbfgs", "--ensemble", "2"],
            "identical",
        ),
    ],
)
def test_bad_head_settings_are_one_line_before_any_work(tmp_path, capsys, flags, words):
    data = write_records(tmp_path / "r.jsonl", make_records(4))
    rc = main(["rm", "train", "--rankings", str(data), "--runs_dir", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("rlhf: error[config]") and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_l2_search_picks_the_penalty_that_predicts_held_out_folds():
    """Features that carry the gold (the first) beside noise: cross-validation over the training
    prompts prefers a light penalty to one that flattens every weight, and the model is solved
    again on all prompts with the λ chosen."""
    records = make_records(40, seed=8)
    groups = build_groups(records, DataReport(), "grouped_bt")
    gen = torch.Generator().manual_seed(2)
    cache = {}
    for g, record in zip(groups, records):
        g.ids = [[i + 1] for i in range(g.k)]
        g.starts = [0] * g.k
        gold = [record["gold"][c["label"]] for c in record["candidates"]]
        cache[id(g)] = [torch.cat([torch.tensor([s]), torch.randn(7, generator=gen)]).double() for s in gold]
    model = FeatureModel(8, k=1)
    cfg = RMTrainConfig(rankings="x", loss="grouped_bt", l2_search=[1.0, 1000.0], cv_folds=4)
    solution = solve_head(cfg, model, groups, 0, cache, None)
    assert list(solution.cv_loss) == [1.0, 1000.0] and solution.l2 == 1.0
    assert solution.cv_loss[1.0] < solution.cv_loss[1000.0] < math.log(2) + 1e-3  # λ 1000: rewards ≈ 0
    alone = FeatureModel(8, k=1)
    solve_head(RMTrainConfig(rankings="x", loss="grouped_bt", l2=1.0), alone, groups, 0, cache, None)
    assert torch.allclose(model.head.weight, alone.head.weight, atol=1e-6)
