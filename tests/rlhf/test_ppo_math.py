"""PPO math against numbers worked out by hand, plus differential checks (loop GAE == closed form)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo import math as pm


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_masked_mean_var_whiten():
    x = t([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    m = t([[1, 1, 0], [1, 1, 0]])
    assert pm.masked_mean(x, m).item() == pytest.approx(2.5)
    # values 1,2,3,4: mean 2.5, squared deviations 2.25+0.25+0.25+2.25 = 5 → biased 1.25, unbiased 5/3
    assert pm.masked_var(x, m, unbiased=False).item() == pytest.approx(1.25)
    assert pm.masked_var(x, m).item() == pytest.approx(5 / 3)
    w = pm.masked_whiten(x, m)
    assert w[0, 0].item() == pytest.approx(-1.5 / math.sqrt(5 / 3), rel=1e-5)
    assert w[:, 2].abs().sum().item() == 0.0  # padding is zero, not whitened
    assert pm.masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert pm.masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.5])
    assert pm.masked_mean(x, torch.zeros_like(m)).item() == 0.0  # empty → 0, not NaN


def test_logprobs_with_temperature():
    logits = t([[[0.0, math.log(3.0)]]])  # softmax at T=1: [1/4, 3/4]
    tokens = torch.tensor([[1]])
    assert pm.logprobs_from_logits(logits, tokens).item() == pytest.approx(math.log(0.75))
    # T=2: logits/2 = [0, log(3)/2] → probabilities ∝ [1, √3]
    expect = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert pm.logprobs_from_logits(logits, tokens, temperature=2.0).item() == pytest.approx(expect)
    logp, ent = pm.logprobs_and_entropy(logits, tokens)
    assert logp.item() == pytest.approx(math.log(0.75))
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert pm.logprobs_and_entropy(logits, tokens, entropy=False)[1] is None


def test_kl_estimators():
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    assert pm.kl_per_token(logp, ref, "k1").tolist()[0] == pytest.approx([0.5, -1.0])
    # k3 = (r - 1) - log r, r = exp(ref - logp): r = e^-0.5 → e^-0.5 - 1 + 0.5 ; r = e^1 → e - 1 - 1
    k3 = pm.kl_per_token(logp, ref, "k3").tolist()[0]
    assert k3 == pytest.approx([math.exp(-0.5) - 0.5, math.e - 2.0])
    assert min(k3) >= 0
    with pytest.raises(ValueError):
        pm.kl_per_token(logp, ref, "k9")


def test_truncate_after_stop_and_eos_penalty():
    eos, pad = 2, 0
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out, mask = pm.truncate_after_stop(tokens, eos, pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    has = (out == eos).any(-1)
    assert pm.apply_missing_eos_penalty(t([1.0, 1.0, 1.0]), has, 3.0).tolist() == [1.0, -2.0, 1.0]


def test_kl_penalized_rewards_score_at_last_real_token():
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    rewards, non_score = pm.kl_penalized_rewards(t([1.0, -1.0]), kl, mask, kl_coef=0.5)
    assert rewards.tolist()[0] == pytest.approx([-0.05, -0.1 + 1.0, 0.0])
    assert rewards.tolist()[1] == pytest.approx([-0.25, -0.25, -0.25 - 1.0])
    assert non_score.tolist()[0] == pytest.approx([-0.05, -0.1, 0.0])


def test_gae_hand_computed():
    # one sequence of 2 valid tokens, γ=1, λ=0.5: δ1 = r1 - V1 = 1 - 0.5 = 0.5 (V after the end is 0)
    # δ0 = r0 + V1 - V0 = 0 + 0.5 - 0.2 = 0.3; A1 = 0.5; A0 = 0.3 + 0.5·0.5 = 0.55
    r, v, m = t([[0.0, 1.0, 0.0]]), t([[0.2, 0.5, 9.0]]), t([[1, 1, 0]])
    adv, ret = pm.gae(r, v, m, gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.55, 0.5, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.75, 1.0, 0.0])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_loop_equals_vectorised(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.tensor([9, 1, 4, 7, 2])
    m = (torch.arange(T)[None] < lengths[:, None]).float()
    a1, r1 = pm.gae(r, v, m, gamma, lam)
    a2, r2 = pm.gae_reference(r, v, m, gamma, lam)
    torch.testing.assert_close(a1, a2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)


def test_policy_loss_clipping():
    adv = t([[1.0, 1.0, -1.0]])
    old = t([[0.0, 0.0, 0.0]])
    logp = t([[math.log(1.5), math.log(1.1), math.log(0.5)]])
    mask = t([[1, 1, 1]])
    loss, st = pm.policy_loss(logp, old, adv, mask, clip=0.2)
    # token0: ratio 1.5, A=1 → max(-1.5, -1.2) = -1.2 (clipped); token1: ratio 1.1 → -1.1;
    # token2: ratio 0.5, A=-1 → max(0.5, 0.8) = 0.8 (clipped). mean = (-1.2 - 1.1 + 0.8)/3
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 0.8) / 3)
    assert st.clipfrac.item() == pytest.approx(2 / 3)
    assert st.ratio_mean.item() == pytest.approx((1.5 + 1.1 + 0.5) / 3)
    expect_kl = 0.5 * (math.log(1.5) ** 2 + math.log(1.1) ** 2 + math.log(0.5) ** 2) / 3
    assert st.approxkl.item() == pytest.approx(expect_kl, rel=1e-5)
    # n_tokens rescales the sum (for gradient accumulation)
    loss6, _ = pm.policy_loss(logp, old, adv, mask, clip=0.2, n_tokens=6)
    assert loss6.item() == pytest.approx(loss.item() / 2)


def test_value_loss_clipping():
    vpred, old, ret, mask = t([[1.0, 0.1]]), t([[0.0, 0.0]]), t([[1.0, 1.0]]), t([[1, 1]])
    loss, cf = pm.value_loss(vpred, old, ret, mask, clip=0.2)
    # token0: unclipped (1-1)²=0, clipped (0.2-1)²=0.64 → 0.64; token1: (0.1-1)²=0.81 both → 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert cf.item() == pytest.approx(0.5)


def test_explained_variance():
    ret, m = t([[1.0, 2.0, 3.0, 0.0]]), t([[1, 1, 1, 0]])
    assert pm.explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    # values [1, 2, 2]: residual [0, 0, 1] has variance 2/9; Var[returns] = 2/3 → 1 - 1/3
    assert pm.explained_variance(t([[1.0, 2.0, 2.0, 5.0]]), ret, m).item() == pytest.approx(2 / 3, rel=1e-5)
    # values = 2 everywhere: residual = returns - 2 has variance 2/3 (= Var[returns]) → 0
    assert pm.explained_variance(torch.full_like(ret, 2.0), ret, m).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_controllers():
    fixed = pm.FixedKLController(0.05)
    fixed.update(10.0, 64)
    assert fixed.value == 0.05
    ctl = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 1000)  # error clipped to +0.2 → β · (1 + 0.2 · 0.1) = 0.102
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, 1000)  # error -0.1 → · (1 - 0.01)
    assert ctl.value == pytest.approx(0.102 * 0.99)
    other = pm.AdaptiveKLController(1.0, 1.0, 1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()


def test_is_finite():
    assert pm.is_finite(t([1.0]), 2.0)
    assert not pm.is_finite(t([1.0, float("nan")]))
    assert not pm.is_finite(float("inf"))
