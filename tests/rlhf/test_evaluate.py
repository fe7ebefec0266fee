"""Evaluation helpers: win rate, stop tokens, and evaluate_policy on the tiny model."""

from __future__ import annotations

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.evaluate import evaluate_policy, resolve_stop_token, win_rate


def test_win_rate_counts_ties_half():
    assert win_rate(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, 0.0])) == pytest.approx(
        0.5
    )
    assert win_rate(torch.tensor([5.0]), torch.tensor([1.0])) == 1.0


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

    def reward(p, r):
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
