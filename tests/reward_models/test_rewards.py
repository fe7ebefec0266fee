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
