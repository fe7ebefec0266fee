"""`rlhf rm train --ensemble N`: N reward models in one stage, on the same held-out prompts, gathered
into one dir that scores as an ensemble wherever a reward is read."""

from __future__ import annotations

import json

import pytest
import torch

from reward_models.groups import Group
from reward_models.model import ENSEMBLE_FILE, read_meta
from reward_models.scoring import FrozenStates, build_cache
from reward_models.train import RMTrainConfig, train_one
from rlhf.cli import main
from rlhf.config import build_config
from rlhf.contracts import candidates_finished
from rlhf.rewards import EnsembleRewardFunction, load_reward_fn, score_candidates
from tests.reward_models.rm_data import make_records, write_records

PROMPTS = ["Say something kind.", "Describe the sea."]
RESPONSES = ["What a lovely day, thank you!", "Grey, cold and endless."]
QUICK = ["--model", "tiny", "--max_steps", "3", "--normalize", "false", "--tracking.mode", "disabled"]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    data = write_records(root / "rankings.jsonl", make_records(24, seed=2))
    argv = ["rm", "train", "--rankings", str(data), "--runs_dir", str(root / "runs"), *QUICK]
    extra = ["--ensemble", "3", "--ensemble_layers", "[0, 1]", "--ensemble_reward", "mean_minus_std=0.5"]
    extra += ["--top_layers", "1"]
    assert main([*argv, *extra]) == 0
    return root / "runs" / "default" / "rm_train"


def assert_member_trains_the_same_alone(ensemble, member: int, runs_dir) -> None:
    """Train ensemble member ``member`` (all layers) on its own, on the ensemble's split, computing
    its frozen-layer states itself, and check that its weights equal the ensemble member's."""
    config = json.loads((ensemble / "model" / ENSEMBLE_FILE).read_text())["config"]
    overrides = {"ensemble": 1, "seed": member, "layers": 0, "out": "", "runs_dir": str(runs_dir)}
    alone = train_one(build_config(RMTrainConfig, base={**config, **overrides}), 0, "rm_train/alone")
    in_ensemble = load_reward_fn(str(ensemble / "model" / f"member-{member}")).model.state_dict()
    own = load_reward_fn(alone["model_dir"]).model.state_dict()
    assert in_ensemble.keys() == own.keys()
    for name in in_ensemble:
        torch.testing.assert_close(in_ensemble[name], own[name], rtol=0, atol=0, msg=name)


def test_a_member_that_reuses_frozen_states_trains_as_if_it_had_computed_them(ensemble, tmp_path):
    """Member 2 (all layers, seed 2) read the frozen-layer states member 0 computed. The same
    member trained on its own, on the same split, computes them itself: its weights come out the
    same."""
    assert_member_trains_the_same_alone(ensemble, 2, tmp_path)


def test_a_deeper_member_that_starts_from_a_shallower_ones_states_trains_as_if_alone(tmp_path, capsys):
    """Head-only members of depth 1 and 2 (all of tiny's layers): the second runs only layer 2 on
    the first's cached states, and ends with the weights it gets computing both layers itself."""
    data = write_records(tmp_path / "rankings.jsonl", make_records(24, seed=3))
    argv = ["rm", "train", "--rankings", str(data), "--runs_dir", str(tmp_path / "runs"), *QUICK]
    assert main([*argv, "--ensemble", "2", "--ensemble_layers", "[1, 0]", "--top_layers", "0"]) == 0
    assert "layers 1-1 taken from an earlier ensemble member's states" in capsys.readouterr().out
    assert_member_trains_the_same_alone(tmp_path / "runs" / "default" / "rm_train", 1, tmp_path / "alone")


class CountingLowerLayers:
    """Stands in for a reward model's ``frozen_layers`` frozen layers: each layer adds 1 to every
    state, and the states before the first are the token ids. Counts the rows each call runs."""

    caches_features = False  # per-token states, not a head over several layers' means

    def __init__(self, frozen_layers: int):
        self.frozen_layers = frozen_layers
        self.rows: list[tuple[int, int]] = []  # (rows, the layer they started from) per call

    def lower_hidden(self, ids, mask, hidden=None, from_layer=0):
        start = ids.float()[..., None].repeat(1, 1, 2) if hidden is None else hidden
        self.rows.append((ids.shape[0], from_layer if hidden is not None else 0))
        return start + (self.frozen_layers - (from_layer if hidden is not None else 0))


def test_the_frozen_layers_see_each_sequence_once():
    twice = Group("p0", "hi", ["a", "b", "a"], ["A", "B", "C"], ids=[[1, 2], [1, 3, 4], [1, 2]])
    other = Group("p1", "yo", ["c", "d"], ["A", "B"], ids=[[5], [1, 3, 4]])
    model, store = CountingLowerLayers(3), FrozenStates()
    cache = build_cache(model, [twice, other], pad_id=0, batch_size=2, progress=False, store=store)
    assert sum(n for n, _ in model.rows) == 3 and set(store.by_ids) == {(1, 2), (1, 3, 4), (5,)}
    for group in (twice, other):
        for ids, states in zip(group.ids, cache[id(group)], strict=True):
            assert states.tolist() == [[t + 3.0] * 2 for t in ids]  # three layers on the token ids
    again = build_cache(model, [other], pad_id=0, batch_size=2, progress=False, store=store)
    assert sum(n for n, _ in model.rows) == 3 and again[id(other)][1] is store.by_ids[(1, 3, 4)]


def test_a_deeper_model_starts_from_a_shallower_ones_states():
    group = Group("p0", "hi", ["a", "b"], ["A", "B"], ids=[[1, 2], [7]])
    shallow, deep = CountingLowerLayers(2), CountingLowerLayers(5)
    below = FrozenStates()
    build_cache(shallow, [group], pad_id=0, batch_size=8, progress=False, store=below)
    cache = build_cache(deep, [group], pad_id=0, batch_size=8, progress=False, below=below)
    assert deep.rows == [(2, 2)]  # one call, from layer 2: only layers 3-5 ran
    assert [s.tolist() for s in cache[id(group)]] == [[[6.0, 6.0], [7.0, 7.0]], [[12.0, 12.0]]]
    # states of as many layers or more are not a start: computed from the token ids
    same = CountingLowerLayers(2)
    build_cache(same, [group], pad_id=0, batch_size=8, progress=False, below=below)
    assert same.rows == [(2, 0)]
    with pytest.raises(ValueError, match="states of 2 frozen layers given to a model with 5"):
        build_cache(deep, [group], pad_id=0, batch_size=8, progress=False, store=below)


def test_members_share_the_held_out_prompts_and_differ_in_seed_and_depth(ensemble):
    model_dir = ensemble / "model"
    manifest = json.loads((model_dir / ENSEMBLE_FILE).read_text())
    assert manifest["members"] == ["member-0", "member-1", "member-2"]
    assert manifest["seeds"] == [0, 1, 2] and manifest["combine"] == "mean_minus_std=0.5"
    metas = [read_meta(model_dir / m) for m in manifest["members"]]
    assert [m["layers"] for m in metas] == [2, 1, 2]  # ensemble_layers cycled; 0 = all of tiny's 2
    held = [(ensemble / f"member-{i}" / "eval_rankings.jsonl").read_text() for i in range(3)]
    assert held[0] and held[0] == held[1] == held[2]  # the split follows the stage's seed
    scores = [load_reward_fn(str(model_dir / m))(PROMPTS, RESPONSES) for m in manifest["members"]]
    assert not torch.allclose(scores[0], scores[2])  # same depth, different seed


def test_the_ensemble_dir_is_a_reward_with_its_rule_and_can_be_overridden(ensemble):
    model_dir = str(ensemble / "model")
    members = [load_reward_fn(f"{model_dir}/member-{i}")(PROMPTS, RESPONSES) for i in range(3)]
    stacked = torch.stack(members)
    alone = load_reward_fn(model_dir)
    assert isinstance(alone, EnsembleRewardFunction) and alone.name == "ensemble(mean_minus_std=0.5) of 3"
    expected = stacked.mean(0) - 0.5 * stacked.std(0)
    torch.testing.assert_close(alone(PROMPTS, RESPONSES), expected, atol=1e-5, rtol=1e-5)
    worst = load_reward_fn(f"ensemble:min:{model_dir}")
    torch.testing.assert_close(worst(PROMPTS, RESPONSES), stacked.min(0).values, atol=1e-5, rtol=1e-5)


def test_rm_eval_judges_the_ensemble_as_the_reward_it_gives(ensemble, tmp_path):
    """`rlhf rm eval` on the ensemble dir scores with the members combined by the dir's rule, the
    reward PPO would get: its pair accuracy is the one computed here from that reward."""
    model_dir = ensemble / "model"
    rankings = ensemble / "member-0" / "eval_rankings.jsonl"
    argv = ["rm", "eval", "--reward_model", str(model_dir), "--rankings", str(rankings)]
    assert main([*argv, "--tracking.mode", "disabled", "--runs_dir", str(tmp_path)]) == 0
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())["metrics"]

    reward = load_reward_fn(str(model_dir))
    right = pairs = 0
    every_score = []
    for rec in map(json.loads, rankings.read_text().splitlines()):
        labels = [c["label"] for c in rec["candidates"]]
        finished = candidates_finished(rec["candidates"])
        scores = reward([rec["prompt"]] * len(labels), [c["text"] for c in rec["candidates"]], finished)
        every_score += scores.tolist()
        tiers = [tier.split("=") for tier in rec["ranking"].replace(" ", "").split(">")]
        for hi, upper in enumerate(tiers):
            for lower in tiers[hi + 1 :]:
                for winner in upper:
                    for loser in lower:
                        d = float(scores[labels.index(winner)] - scores[labels.index(loser)])
                        right += (d > 0) + 0.5 * (d == 0)
                        pairs += 1
    assert metrics["eval/pairs"] == pairs > 0
    assert metrics["eval/pair_accuracy"] == pytest.approx(right / pairs)
    assert metrics["eval/reward_mean"] == pytest.approx(sum(every_score) / len(every_score), abs=1e-5)
    assert "eval/tie_theta_fitted" in metrics  # no tie model of its own: measured under the fitted θ


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--ensemble", "0"], "ensemble"),
        (["--ensemble", "2", "--ensemble_reward", "median"], "ensemble_reward"),
        (["--ensemble", "2", "--ensemble_layers", "[-1]"], "ensemble_layers"),
        (["--ensemble", "2", "--ensemble_layers", "[1]", "--top_layers", "2"], "ensemble_layers"),
    ],
)
def test_bad_ensemble_settings_are_one_line_before_any_work(tmp_path, capsys, extra, words):
    data = write_records(tmp_path / "r.jsonl", make_records(4))
    argv = ["rm", "train", "--rankings", str(data), "--runs_dir", str(tmp_path / "runs"), *QUICK, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "runs").exists()


def test_scoring_candidates_in_chunks_with_a_bar_gives_the_same_scores(ensemble, capsys):
    """`rlhf annotate propose`, `prioritize` and the arena's judges score a store's prompts in chunks
    under a progress bar; the chunks must not change a score."""
    reward = load_reward_fn(str(ensemble / "model"))
    records = [
        {
            "prompt": prompt,
            "candidates": [
                {"label": "A", "text": RESPONSES[i % 2]},
                {"label": "B", "text": RESPONSES[(i + 1) % 2] + " More.", "gen": {"finished": False}},
                {"label": "C", "text": "Yes."},
            ],
        }
        for i, prompt in enumerate(PROMPTS * 3)
    ]
    whole = score_candidates(reward, records)
    capsys.readouterr()  # the fixture's training bars
    chunked = score_candidates(reward, records, progress="scoring", chunk=2)
    assert [len(s) for s in chunked] == [3] * len(records)
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(whole), atol=1e-5, rtol=1e-5)
    bar = capsys.readouterr().err
    assert "scoring" in bar and f"{len(records)}/{len(records)}" in bar


def test_an_experiment_checks_and_evaluates_an_ensemble_dir(ensemble, tmp_path, capsys):
    """The experiment file's check takes an ensemble dir as `rm_eval.reward_model` (its members
    must be reward-model dirs) and refuses a dir that is neither, in one line before any work."""
    rankings = ensemble / "member-0" / "eval_rankings.jsonl"

    def run(reward_model) -> int:
        exp = tmp_path / "e.yaml"
        exp.write_text(
            f"name: ens_eval\nstages:\n  rm_eval: {{reward_model: {reward_model}, rankings: {rankings}}}\n"
        )
        return main(
            ["experiment", "run", str(exp), "--runs_dir", str(tmp_path / "runs"), "tracking.mode=disabled"]
        )

    assert run(ensemble / "model") == 0
    assert (tmp_path / "runs" / "ens_eval" / "rm_eval" / "metrics.json").is_file()
    capsys.readouterr()
    assert run(ensemble) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a reward-model directory" in err[0]
