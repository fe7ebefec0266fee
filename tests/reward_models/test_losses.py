"""Ranking losses against hand-computed numbers, brute force and each other."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from reward_models import losses as L


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def nls(x: float) -> float:
    """-log σ(x) by hand."""
    return math.log1p(math.exp(-x))


def test_pair_masks_for_c_gt_b_eq_d_gt_a():
    # labels A B C D, ranking C > B = D > A → tiers A=2, B=1, C=0, D=1
    beats, ties = L.pair_masks(torch.tensor([[2, 1, 0, 1]]))
    strict = {(i, j) for i in range(4) for j in range(4) if beats[0, i, j]}
    assert strict == {(2, 1), (2, 3), (2, 0), (1, 0), (3, 0)}  # (C,B) (C,D) (C,A) (B,A) (D,A)
    assert {(i, j) for i in range(4) for j in range(4) if ties[0, i, j]} == {(1, 3)}


def test_padding_makes_no_pairs():
    beats, ties = L.pair_masks(torch.tensor([[0, 1, -1, -1]]))
    assert int(beats.sum()) == 1 and int(ties.sum()) == 0


def test_bradley_terry_hand_values():
    assert L.bradley_terry_pair_loss(t([1.0]), t([0.0])).item() == pytest.approx(0.31326168751822286)
    assert L.bradley_terry_pair_loss(t([1.0]), t([0.0]), 0.5).item() == pytest.approx(0.47407698418010663)


def test_grouped_bt_hand_value():
    rewards = t([[0.0, 1.0, 2.0, 1.5]])  # A B C D
    tiers = torch.tensor([[2, 1, 0, 1]])
    loss, valid = L.grouped_bradley_terry_loss(rewards, tiers)
    expected = (nls(1.0) + nls(0.5) + nls(2.0) + nls(1.0) + nls(1.5)) / 5
    assert valid.tolist() == [True]
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # with a margin of 0.25 every difference shrinks by it
    loss_m, _ = L.grouped_bradley_terry_loss(rewards, tiers, margin=0.25)
    expected_m = sum(nls(d - 0.25) for d in (1.0, 0.5, 2.0, 1.0, 1.5)) / 5
    assert loss_m.item() == pytest.approx(expected_m, rel=1e-12)


def test_grouped_bt_equals_pairwise_bt_with_documented_weighting():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 4, generator=g, dtype=torch.float64)
    # groups with different numbers of strict pairs: 6, 5, 3, 4 (K=3 padded), 1
    tiers = torch.tensor([[0, 1, 2, 3], [2, 1, 0, 1], [0, 0, 1, 1], [0, 1, 2, -1], [0, 1, 1, 1]])
    # the same strict pairs, listed one by one (what a pairs-only trainer sees)
    w, lo = [], []
    for b in range(5):
        for i in range(4):
            for j in range(4):
                if tiers[b, i] >= 0 and tiers[b, j] >= 0 and tiers[b, i] < tiers[b, j]:
                    w.append(rewards[b, i])
                    lo.append(rewards[b, j])
    pairwise = L.bradley_terry_pair_loss(torch.stack(w), torch.stack(lo)).mean()
    weighted, valid = L.grouped_bradley_terry_loss(rewards, tiers, weight_by_pairs=True)
    assert L.reduce_groups(weighted, valid).item() == pytest.approx(pairwise.item(), rel=1e-12)
    # the "bt" dispatch (pairwise mean) is the same number
    assert L.ranking_loss("bt", rewards, tiers)[0].item() == pytest.approx(pairwise.item(), rel=1e-12)
    # unweighted grouped BT differs here (groups have different pair counts) ...
    plain, _ = L.grouped_bradley_terry_loss(rewards, tiers)
    assert L.reduce_groups(plain, valid).item() != pytest.approx(pairwise.item(), rel=1e-6)
    # ... and equals it when every group has the same pairs count (all strict K=4)
    full = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]])
    r3 = rewards[:3]
    assert L.ranking_loss("grouped_bt", r3, full)[0].item() == pytest.approx(
        L.ranking_loss("bt", r3, full)[0].item(), rel=1e-12
    )


def test_all_tied_group_gives_no_bt_evidence():
    loss, valid = L.grouped_bradley_terry_loss(t([[0.3, 0.1, 0.2]]), torch.tensor([[0, 0, 0]]))
    assert valid.tolist() == [False]
    assert L.reduce_groups(loss, valid).item() == 0.0


def test_rao_kupper_hand_values():
    log_theta = t(math.log(2.0))
    lw, ll, lt = L.rao_kupper_log_probs(t(0.0), t(0.0), log_theta)
    assert [x.exp().item() for x in (lw, ll, lt)] == pytest.approx([1 / 3, 1 / 3, 1 / 3], rel=1e-12)
    lw, ll, lt = L.rao_kupper_log_probs(t(math.log(2.0)), t(0.0), log_theta)  # π = 2, 1
    assert [x.exp().item() for x in (lw, ll, lt)] == pytest.approx([1 / 2, 1 / 5, 3 / 10], rel=1e-12)


def test_davidson_hand_values():
    lw, ll, lt = L.davidson_log_probs(t(0.0), t(0.0), t(0.0))  # ν = 1
    assert [x.exp().item() for x in (lw, ll, lt)] == pytest.approx([1 / 3] * 3, rel=1e-12)
    lw, ll, lt = L.davidson_log_probs(t(math.log(4.0)), t(0.0), t(0.0))  # π = 4, 1, √ = 2
    assert [x.exp().item() for x in (lw, ll, lt)] == pytest.approx([4 / 7, 1 / 7, 2 / 7], rel=1e-12)


@pytest.mark.parametrize("fn", [L.rao_kupper_log_probs, L.davidson_log_probs])
def test_tie_models_probabilities_sum_to_one(fn):
    g = torch.Generator().manual_seed(1)
    r_i = torch.randn(50, generator=g, dtype=torch.float64) * 5
    r_j = torch.randn(50, generator=g, dtype=torch.float64) * 5
    for param in (0.01, 0.5, 2.0):
        lw, ll, lt = fn(r_i, r_j, t(param))
        total = lw.exp() + ll.exp() + lt.exp()
        assert torch.allclose(total, torch.ones_like(total), atol=1e-12)
        # symmetric: swapping i and j swaps win and loss
        lw2, ll2, lt2 = fn(r_j, r_i, t(param))
        assert torch.allclose(lw, ll2) and torch.allclose(lt, lt2)


def test_rao_kupper_tie_stays_finite_for_large_gaps():
    _, _, lt = L.rao_kupper_log_probs(t(80.0), t(-80.0), t(0.7))
    assert torch.isfinite(lt) and lt.item() < -100


def test_tie_aware_group_losses_hand_value():
    # A = B > C with rewards ln2, ln2, 0 ; pairs: tie(A,B), A≻C, B≻C
    rewards = t([[math.log(2.0), math.log(2.0), 0.0]])
    tiers = torch.tensor([[0, 0, 1]])
    theta = 2.0
    # RK: tie(π=2,2) = 3·4/((2+4)(4+2)) = 1/3 ; win(π=2 vs 1) = 2/(2+2) = 1/2
    rk, valid = L.rao_kupper_loss(rewards, tiers, t(math.log(theta)))
    assert valid.tolist() == [True]
    assert rk.item() == pytest.approx(-(math.log(1 / 3) + 2 * math.log(1 / 2)) / 3, rel=1e-12)
    # Davidson ν=1: tie(2,2) = 2/(2+2+2) = 1/3 ; win(2 vs 1) = 2/(2+1+√2)
    dv, _ = L.davidson_loss(rewards, tiers, t(0.0))
    win = 2 / (3 + math.sqrt(2))
    assert dv.item() == pytest.approx(-(math.log(1 / 3) + 2 * math.log(win)) / 3, rel=1e-12)


def test_plackett_luce_hand_values():
    # strict A > B > C with π = 3, 2, 1: 3/6 · 2/3 · 1 = 1/3
    loss, valid = L.plackett_luce_loss(t([[math.log(3), math.log(2), 0.0]]), torch.tensor([[0, 1, 2]]))
    assert valid.tolist() == [True] and loss.item() == pytest.approx(math.log(3), rel=1e-12)
    # A = B > C (Breslow): A from {A,B,C} 3/6, B from {A,B,C} 2/6, C 1 → 1/6
    loss, _ = L.plackett_luce_loss(t([[math.log(3), math.log(2), 0.0]]), torch.tensor([[0, 0, 1]]))
    assert loss.item() == pytest.approx(math.log(6), rel=1e-12)
    # padding is ignored: the same ranking with a padded 4th slot
    loss_p, _ = L.plackett_luce_loss(t([[math.log(3), math.log(2), 0.0, 9.0]]), torch.tensor([[0, 0, 1, -1]]))
    assert loss_p.item() == pytest.approx(math.log(6), rel=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_plackett_luce_matches_brute_force_on_strict_rankings(k):
    g = torch.Generator().manual_seed(k)
    rewards = torch.randn(k, generator=g, dtype=torch.float64) * 2

    def brute(order):  # product of softmax choices among the remaining candidates
        p, rest = 1.0, list(range(k))
        for i in order:
            p *= math.exp(rewards[i]) / sum(math.exp(rewards[j]) for j in rest)
            rest.remove(i)
        return p

    perms = list(itertools.permutations(range(k)))
    assert sum(brute(o) for o in perms) == pytest.approx(1.0, rel=1e-12)
    tiers = torch.zeros(len(perms), k, dtype=torch.long)
    for b, order in enumerate(perms):
        for pos, i in enumerate(order):
            tiers[b, i] = pos
    loss, _ = L.plackett_luce_loss(rewards.expand(len(perms), k), tiers)
    assert torch.allclose(loss, torch.tensor([-math.log(brute(o)) for o in perms], dtype=torch.float64))


def test_plackett_luce_all_tied_prefers_equal_rewards():
    tiers = torch.tensor([[0, 0, 0]])
    equal, _ = L.plackett_luce_loss(t([[1.0, 1.0, 1.0]]), tiers)
    spread, _ = L.plackett_luce_loss(t([[2.0, 1.0, 0.0]]), tiers)
    assert equal.item() == pytest.approx(3 * math.log(3)) and spread.item() > equal.item()


def test_reward_centering():
    rewards = t([[1.0, 3.0, 100.0]])
    tiers = torch.tensor([[0, 1, -1]])  # padding excluded: mean = 2
    assert L.reward_centering(rewards, tiers, 0.1).item() == pytest.approx(0.4)
    assert L.reward_centering(rewards, tiers, 0.0).item() == 0.0


@pytest.mark.parametrize("name", L.LOSSES)
def test_every_loss_has_finite_gradients_on_mixed_batches(name):
    rewards = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    tiers = torch.tensor([[0, 1, 1, 2], [0, 0, 0, -1], [1, 0, -1, -1]])
    param = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss, used = L.ranking_loss(name, rewards, tiers, tie_param=param)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rewards.grad).all()
    assert rewards.grad[0, 3].item() != 0.0 and rewards.grad[1, 3].item() == 0.0  # padding gets no gradient
    assert used == (2 if name in ("bt", "grouped_bt") else 3)
