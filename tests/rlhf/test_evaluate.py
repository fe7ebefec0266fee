"""Evaluation helpers: win rate, stop tokens, and evaluate_policy on the tiny model."""

from __future__ import annotations

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.evaluate import comparison_metrics, evaluate_policy, resolve_stop_token
from rlhf.stats import win_rate_ci


def test_win_rate_counts_ties_half():
    assert win_rate_ci([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, 0.0]).value == pytest.approx(0.5)
    assert win_rate_ci([5.0], [1.0]).value == 1.0


def test_comparison_metrics_pair_prompts_and_bracket_their_values():
    rows = [["p", "r", s, 0.0, g] for s, g in ((1.0, 0.9), (2.0, 0.1), (0.5, 0.5), (3.0, 0.8))]
    ref = [["p", "r", s, 0.0, g] for s, g in ((0.0, 0.1), (2.0, 0.2), (1.0, 0.5), (1.0, 0.0))]
    m = comparison_metrics(rows, ref)
    assert m["eval/win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert m["eval/gold_win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert m["eval/score_diff"] == pytest.approx((1 + 0 - 0.5 + 2) / 4)
    assert m["eval/gold_score_diff"] == pytest.approx((0.8 - 0.1 + 0 + 0.8) / 4)
    for key in ("eval/win_rate", "eval/gold_win_rate", "eval/score_diff", "eval/gold_score_diff"):
        assert m[key + "_ci_low"] <= m[key] <= m[key + "_ci_high"]


def test_resolve_stop_token():
    from rlhf.models import load_tokenizer

    tok = load_tokenizer("tiny")
    assert resolve_stop_token(tok, "eos") == tok.eos_token_id
    assert resolve_stop_token(tok, "\n") == tok("\n", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ConfigError, match="exactly one token"):
        resolve_stop_token(tok, "two tokens")


def test_evaluate_policy_self_reference_has_zero_kl():
    from rlhf.models import load_policy
    from rlhf.ppo.rollout import encode_queries, left_pad
    from rlhf.ppo.value import response_logprobs

    model, tok = load_policy("tiny")
    prompts = ["Say hi.", "Name a fruit.", "Describe rain in a few words."]
    q, qm = left_pad(encode_queries(tok, prompts, 64), tok.pad_token_id)

    def reward(p, r, finished=None):
        return torch.tensor([float(len(x)) for x in r])

    common = dict(max_new_tokens=6, temperature=0.7, stop_token_id=tok.eos_token_id, batch_size=2, seed=1)
    m1, rows = evaluate_policy(model, tok, q, qm, prompts, reward, **common)
    base = torch.tensor([r[2] for r in rows])
    m2, rows2 = evaluate_policy(
        model,
        tok,
        q,
        qm,
        prompts,
        reward,
        baseline_scores=base,
        ref_logprobs_fn=lambda a, b, c, d: response_logprobs(model, a, b, c, d, 0.7),
        gold_fn=lambda p, r: [1.0] * len(r),
        **common,
    )
    assert [r[1] for r in rows2] == [r[1] for r in rows]  # same seed, same policy → same samples
    assert m2["eval/win_rate"] == 0.5  # all ties against itself
    assert abs(m2["eval/kl"]) < 1e-4  # KL of a policy to itself (sampler vs. scoring pass agree)
    assert m2["eval/gold_score"] == 1.0 and 1 <= m2["eval/length"] <= 6


def test_evaluation_does_not_depend_on_the_batch_size():
    """Each prompt samples from its own random stream: any batch size gives the same responses."""
    from rlhf.models import load_policy
    from rlhf.ppo.rollout import encode_queries, left_pad

    model, tok = load_policy("tiny")
    prompts = ["Say hi.", "Name a fruit.", "Describe rain in a few words.", "Count to three.", "Why?"]
    q, qm = left_pad(encode_queries(tok, prompts, 64), tok.pad_token_id)

    def reward(p, r, finished=None):
        return torch.tensor([float(len(x)) for x in r])

    common = dict(max_new_tokens=8, temperature=1.0, stop_token_id=tok.eos_token_id, seed=3)
    runs = [evaluate_policy(model, tok, q, qm, prompts, reward, batch_size=b, **common) for b in (1, 2, 5)]
    responses = [[row[1] for row in rows] for _, rows in runs]
    assert responses[0] == responses[1] == responses[2]
    assert runs[0][0] == runs[1][0] == runs[2][0]
    # and the first prompts' responses do not depend on how many prompts follow
    _, fewer = evaluate_policy(model, tok, q[:2], qm[:2], prompts[:2], reward, batch_size=2, **common)
    assert [row[1] for row in fewer] == responses[0][:2]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_eval_of_a_policy_against_itself_has_zero_kl_in_either_precision(tmp_path, monkeypatch, precision):
    """With bf16 weights the sampler's cached steps round otherwise than a full forward, so eval takes
    both sides of the KL from full forwards: a policy against itself must still give exactly 0."""
    import rlhf.models
    from rlhf.evaluate import EvalConfig, run_eval
    from rlhf.tracking import TrackingConfig

    monkeypatch.setattr(rlhf.models, "bf16_hardware", lambda device: True)  # emulated where absent: tiny
    cfg = EvalConfig(
        policy="tiny",
        reference="tiny",
        reward="length:target=4",
        num_prompts=4,
        max_new_tokens=6,
        batch_size=3,
        mixed_precision=precision,
        runs_dir=str(tmp_path),
        tracking=TrackingConfig(mode="disabled"),
    )
    metrics = run_eval(cfg)
    assert metrics["eval/bf16"] == (precision == "bf16")
    # fp32 keeps the sampler's own log-probs: they agree with a full forward up to rounding
    assert metrics["eval/kl"] == (0.0 if precision == "bf16" else pytest.approx(0.0, abs=1e-4))
    assert metrics["eval/win_rate"] == 0.5 and metrics["eval/prompts"] == 4


def test_the_output_layer_reads_a_contiguous_slice_wherever_the_lab_keeps_the_last_logits():
    """transformers slices an int ``logits_to_keep`` into a strided view, which PyTorch's matmul
    without autograd multiplies by copying the output matrix per row (rlhf.sampling.last_positions).
    The sampler's prefill and the scoring forwards must hand the output layer a contiguous slice."""
    from rlhf.models import load_policy
    from rlhf.ppo.rollout import encode_queries, left_pad
    from rlhf.ppo.value import response_logprobs
    from rlhf.sampling import last_positions, sample_responses

    model, tok = load_policy("tiny")
    q, qm = left_pad(
        encode_queries(tok, ["Say hi.", "Name a fruit.", "Describe rain, briefly."], 64), tok.pad_token_id
    )
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    s = sample_responses(
        model, q, qm, max_new_tokens=4, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    response_logprobs(model, q, qm, s.tokens, s.mask.long(), temperature=1.0)
    assert seen and all(seen)
    # and the index tensor keeps the same positions as the int
    full = torch.cat([q, s.tokens], dim=1)
    with torch.no_grad():
        by_int = model(input_ids=full, logits_to_keep=3).logits
        by_index = model(input_ids=full, logits_to_keep=last_positions(3)).logits
    torch.testing.assert_close(by_index, by_int)
