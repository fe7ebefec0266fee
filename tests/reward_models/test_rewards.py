"""``rlhf.rewards.load_reward_fn`` on every kind of spec."""

from __future__ import annotations

import pytest
import torch

from reward_models.model import build_reward_model, save_reward_model, score_texts
from rlhf.errors import UserError
from rlhf.rewards import load_reward_fn

PROMPTS = ["Say something nice.", "Say something.", [{"role": "user", "content": "Chat prompt"}]]
RESPONSES = ["What a great day!", "It is a day.", "This is awful."]


def count_words(prompts, responses):
    """A module:function scorer for the tests."""
    return [float(len(r.split())) for r in responses]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    model, tok = build_reward_model("tiny", "top", top_layers=1, seed=3)
    raw, _ = score_texts(model, tok, PROMPTS, RESPONSES, 128)
    norm = {"offset": float(raw.mean()), "scale": float(raw.std()), "n": 3, "source": "test"}
    out = tmp_path_factory.mktemp("rm") / "model"
    save_reward_model(model, tok, out, {"loss": "grouped_bt", "max_length": 128, "normalization": norm})
    return out, raw


def test_reward_model_dir_applies_normalisation(rm_dir):
    path, raw = rm_dir
    fn = load_reward_fn(str(path))
    out = fn(PROMPTS, RESPONSES)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert torch.allclose(out, (raw - raw.mean()) / raw.std(), atol=1e-4)
    assert abs(out.mean().item()) < 1e-4 and abs(out.std().item() - 1) < 1e-3  # the reference samples
    assert fn.name.startswith("rm:")
    # scoring twice gives the same (deterministic, no dropout, no grad)
    assert torch.equal(out, fn(PROMPTS, RESPONSES))


def test_gold_scorer_spec():
    fn = load_reward_fn("keywords:good=great,bad=awful")
    assert fn(PROMPTS, RESPONSES).tolist() == [1.0, 0.0, -1.0]
    assert load_reward_fn("vader")(PROMPTS, RESPONSES)[0] > 0.3


def test_module_function_spec():
    fn = load_reward_fn("tests.reward_models.test_rewards:count_words")
    assert fn(PROMPTS, RESPONSES).tolist() == [4.0, 4.0, 3.0]


def test_weighted_sum_of_specs(rm_dir):
    path, _ = rm_dir
    rm = load_reward_fn(str(path))(PROMPTS, RESPONSES)
    fn = load_reward_fn(
        [
            {"spec": str(path), "weight": 0.5},
            {"spec": "tests.reward_models.test_rewards:count_words", "weight": -2},
        ]
    )
    assert torch.allclose(fn(PROMPTS, RESPONSES), 0.5 * rm - 2 * torch.tensor([4.0, 4.0, 3.0]), atol=1e-5)


@pytest.mark.parametrize(
    "spec, code",
    [
        ("./no/such/dir", "not_found"),
        ("nonsense-scorer", "scorer"),
        ([], "bad_reward"),
        ([{"spec": "vader", "weight": "x"}], "bad_reward"),
        ([{"spec": "vader", "wieght": 1}], "bad_reward"),
    ],
)
def test_bad_specs_raise_user_errors(spec, code):
    with pytest.raises(UserError) as err:
        load_reward_fn(spec)
    assert err.value.code == code


def test_directory_without_metadata_is_rejected(tmp_path):
    with pytest.raises(UserError, match="rlhf_reward.json"):
        load_reward_fn(str(tmp_path))


def test_length_mismatch_is_an_error():
    with pytest.raises(UserError):
        load_reward_fn("vader")(["a", "b"], ["x"])


@pytest.fixture(scope="module")
def two_rm_dirs(tmp_path_factory):
    """Two reward models that differ in their initialisation (seed), as an ensemble's members."""
    dirs = []
    for seed in (3, 4):
        model, tok = build_reward_model("tiny", "top", top_layers=1, seed=seed)
        out = tmp_path_factory.mktemp(f"rm{seed}") / "model"
        save_reward_model(model, tok, out, {"loss": "grouped_bt", "max_length": 128})
        dirs.append(str(out))
    return dirs


def test_ensemble_combines_its_members_and_keeps_their_spread(two_rm_dirs):
    a, b = (load_reward_fn(d)(PROMPTS, RESPONSES) for d in two_rm_dirs)
    both = torch.stack([a, b])
    spread = both.std(0)  # two members: |a - b| / √2
    assert torch.allclose(spread, (a - b).abs() / 2**0.5, atol=1e-6)
    joined = ",".join(two_rm_dirs)
    mean = load_reward_fn(f"ensemble:mean:{joined}")
    assert torch.allclose(mean(PROMPTS, RESPONSES), both.mean(0), atol=1e-6)
    assert torch.allclose(mean.last_disagreement, spread, atol=1e-6)
    worst = load_reward_fn(f"ensemble:min:{joined}")
    assert torch.allclose(worst(PROMPTS, RESPONSES), torch.minimum(a, b), atol=1e-6)
    penalised = load_reward_fn(f"ensemble:mean_minus_std=0.5:{joined}")
    assert torch.allclose(penalised(PROMPTS, RESPONSES), both.mean(0) - 0.5 * spread, atol=1e-6)
    assert penalised.name == "ensemble(mean_minus_std=0.5) of 2"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ensemble:median:a,b", "COMBINE one of mean, min, mean_minus_std"),
        ("ensemble:min=2:{a},{b}", "only mean_minus_std takes =k"),
        ("ensemble:mean_minus_std=x:{a},{b}", "must be a number"),
        ("ensemble:mean:{a}", "at least two reward-model dirs"),
        ("ensemble:mean:{a},./no/such/rm", "does not exist"),
        ("ensemble:mean:{a},vader", "is not a reward-model dir"),
    ],
)
def test_bad_ensemble_specs_name_the_problem(two_rm_dirs, spec, message):
    from rlhf.rewards import check_reward_spec

    spec = spec.format(a=two_rm_dirs[0], b=two_rm_dirs[1])
    with pytest.raises(UserError, match=message):
        check_reward_spec(spec)  # what every stage runs before loading a model
