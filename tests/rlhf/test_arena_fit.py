"""The arena's rating fit (rlhf/arena_fit.py, docs/arena.md): Bradley–Terry–Davidson strengths
against closed forms and independent reference fits, invariances, recovery, the prompt bootstrap,
and the length-controlled win rate."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from rlhf.arena_fit import (
    ELO_OFFSET,
    ELO_SCALE,
    MIN_LENGTH_OVERLAP,
    fit_bradley_terry_davidson,
    length_controlled_win_rates,
    length_overlap,
)

MODELS = ("m0", "m1", "m2", "m3", "m4")
TRUE_THETA = np.array([0.8, 0.3, 0.0, -0.4, -0.7])  # mean 0, as the fit reports them


def counts(a: str, b: str, a_wins: int, b_wins: int, ties: int) -> list[tuple]:
    """Votes of a against b, each on a prompt of its own."""
    outcomes = ["a"] * a_wins + ["b"] * b_wins + ["tie"] * ties
    return [(a, b, o, f"{a}-{b}-{n}") for n, o in enumerate(outcomes)]


def simulate(theta, nu: float, n_votes: int, seed: int, votes_per_prompt: int = 1) -> list[tuple]:
    """Votes drawn from Davidson's model: random pairs, outcome probabilities (π_i, π_j, ν√(π_iπ_j))/D."""
    rng = np.random.default_rng(seed)
    models = [f"m{i}" for i in range(len(theta))]
    votes = []
    for n in range(n_votes):
        i, j = rng.choice(len(theta), 2, replace=False)
        w = np.array([math.exp(theta[i]), math.exp(theta[j]), nu * math.exp((theta[i] + theta[j]) / 2)])
        outcome = ["a", "b", "tie"][rng.choice(3, p=w / w.sum())]
        votes.append((models[i], models[j], outcome, f"p{n // votes_per_prompt}"))
    return votes


def centred(theta: np.ndarray) -> np.ndarray:
    return theta - theta.mean()


# ----------------------------------------------------------------------------- hand-computed


def test_two_models_closed_form_with_ties():
    """For two models Davidson's likelihood, in x = √(π_a/π_b), is
    (w_a − w_b) log x + t log ν − n log(x + 1/x + ν). Its stationary point: ∂/∂ν gives
    ν = t (x + 1/x) / (w_a + w_b), and then ∂/∂log x gives (x² − 1)/(x² + 1) = (w_a − w_b)/(w_a + w_b),
    so π_a/π_b = x² = w_a/w_b (ties do not move the ratio) and ν = t/√(w_a w_b)."""
    fit = fit_bradley_terry_davidson(counts("a", "b", 30, 10, 20), prior=0, n_boot=0)
    assert fit.log_strengths == pytest.approx([math.log(3) / 2, -math.log(3) / 2], abs=1e-9)
    assert fit.nu.value == pytest.approx(20 / math.sqrt(30 * 10), abs=1e-9)
    assert fit.rating("a").value - fit.rating("b").value == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert fit.rating("a").value + fit.rating("b").value == pytest.approx(2 * ELO_OFFSET, abs=1e-6)


def test_two_models_without_ties_is_bradley_terry_with_nu_zero():
    fit = fit_bradley_terry_davidson(counts("a", "b", 12, 4, 0), prior=0, n_boot=50)
    assert fit.log_strengths[0] - fit.log_strengths[1] == pytest.approx(math.log(3), abs=1e-9)
    assert (fit.nu.value, fit.nu.low, fit.nu.high) == (0.0, 0.0, 0.0)


def test_a_cycle_of_equal_wins_rates_everyone_equal():
    """a beats b, b beats c, c beats a, each 2 to 1, and c ties a once. At equal strengths each
    model's score, Σ over its pairs of (wins + ties/2 − votes/2), is 0: the maximum."""
    votes = counts("a", "b", 2, 1, 0) + counts("b", "c", 2, 1, 0) + counts("c", "a", 2, 1, 1)
    fit = fit_bradley_terry_davidson(votes, prior=0, n_boot=0)
    assert [r.value for r in fit.ratings] == pytest.approx([ELO_OFFSET] * 3, abs=1e-6)
    # Between equals every vote ties with probability ν/(2 + ν); 1 vote in 10 tied, so ν = 2/9.
    assert fit.nu.value == pytest.approx(2 / 9, abs=1e-9)


# ----------------------------------------------------------------------------- invariances


def test_which_side_a_model_was_shown_on_changes_nothing():
    votes = simulate(TRUE_THETA, 0.5, 400, seed=1, votes_per_prompt=2)
    swapped = [(b, a, {"a": "b", "b": "a", "tie": "tie"}[o], p) for a, b, o, p in votes]
    fit, fit_swapped = (fit_bradley_terry_davidson(v, n_boot=100, seed=3) for v in (votes, swapped))
    np.testing.assert_allclose(fit.log_strengths, fit_swapped.log_strengths, atol=1e-10)
    np.testing.assert_allclose(fit.bootstrap, fit_swapped.bootstrap, atol=1e-8)
    assert fit.nu.value == pytest.approx(fit_swapped.nu.value, abs=1e-10)


def test_relabelling_models_permutes_the_ratings():
    votes = simulate(TRUE_THETA, 0.5, 400, seed=2)
    rename = {"m0": "zeta", "m1": "alpha", "m2": "mu", "m3": "beta", "m4": "omega"}
    renamed = [(rename[a], rename[b], o, p) for a, b, o, p in votes]
    fit = fit_bradley_terry_davidson(votes, n_boot=0)
    fit_renamed = fit_bradley_terry_davidson(renamed, n_boot=0)
    for old, new in rename.items():
        assert fit_renamed.rating(new).value == pytest.approx(fit.rating(old).value, abs=1e-8)
    reordered = fit_bradley_terry_davidson(votes, models=MODELS[::-1], n_boot=0)
    np.testing.assert_allclose(reordered.log_strengths, fit.log_strengths[::-1], atol=1e-9)


def test_an_anchor_moves_the_zero_only():
    votes = simulate(TRUE_THETA, 0.5, 300, seed=4)
    free = fit_bradley_terry_davidson(votes, n_boot=100)
    anchored = fit_bradley_terry_davidson(votes, anchor="m2", n_boot=100)
    assert anchored.rating("m2").value == ELO_OFFSET
    assert (anchored.rating("m2").low, anchored.rating("m2").high) == (ELO_OFFSET, ELO_OFFSET)
    gaps = [r.value - free.rating("m2").value for r in free.ratings]
    assert [r.value - ELO_OFFSET for r in anchored.ratings] == pytest.approx(gaps, abs=1e-8)


def test_arena_spellings_and_mappings_are_read():
    votes = [
        {"model_a": "x", "model_b": "y", "outcome": "model_a"},
        {"model_a": "x", "model_b": "y", "outcome": "model_b"},
        {"model_a": "y", "model_b": "x", "outcome": "tie (bothbad)"},
        ("x", "y", "a"),
    ]
    fit = fit_bradley_terry_davidson(votes, prior=0, n_boot=0)
    assert fit.log_strengths[0] - fit.log_strengths[1] == pytest.approx(math.log(2), abs=1e-9)
    assert fit.nu.value == pytest.approx(1 / math.sqrt(2), abs=1e-9)


@pytest.mark.parametrize(
    ("votes", "kwargs", "words"),
    [
        ([("a", "b", "win")], {}, "not one of 'a', 'b', 'tie'"),
        ([("a", "a", "a")], {}, "against itself"),
        ([("a", "b", "a")], {"models": ["a"]}, "not in `models`: b"),
        ([("a", "b", "a"), ("b", "a", "a")], {"models": ["a", "b", "c"]}, "no votes for c"),
        ([("a", "b", "tie")] * 3, {}, "every vote is a tie"),
        (counts("a", "b", 3, 0, 0) + counts("b", "c", 1, 1, 0), {"prior": 0}, "separation"),
        ([("a", "b", "a"), ("b", "a", "a")], {"anchor": "z"}, "anchor 'z'"),
    ],
)
def test_votes_that_cannot_be_fitted_say_why(votes, kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        fit_bradley_terry_davidson(votes, n_boot=0, **kwargs)


def test_the_prior_keeps_an_unbeaten_model_finite():
    votes = counts("a", "b", 8, 0, 0) + counts("b", "c", 5, 3, 2)
    fit = fit_bradley_terry_davidson(votes, n_boot=0)
    a, b, c = (fit.rating(m).value for m in "abc")
    assert math.isfinite(a) and a > b + 400 and abs(b - c) < 200


# ----------------------------------------------------------------------------- reference fits


def test_matches_a_textbook_bradley_terry_fit_without_ties():
    """The reference: −Σ log σ(θ_winner − θ_loser), θ_0 pinned at 0, minimised by BFGS."""
    votes = simulate(TRUE_THETA, 0.0, 400, seed=5)
    assert all(o != "tie" for _, _, o, _ in votes)
    index = {m: i for i, m in enumerate(MODELS)}
    winners = np.array([index[a if o == "a" else b] for a, b, o, _ in votes])
    losers = np.array([index[b if o == "a" else a] for a, b, o, _ in votes])

    def nll(free):
        theta = np.concatenate([[0.0], free])
        return -log_expit(theta[winners] - theta[losers]).sum()

    ref = minimize(nll, np.zeros(len(MODELS) - 1), method="BFGS", options={"gtol": 1e-10})
    fit = fit_bradley_terry_davidson(votes, MODELS, prior=0, n_boot=0)
    np.testing.assert_allclose(fit.log_strengths, centred(np.concatenate([[0.0], ref.x])), atol=1e-5)
    assert fit.nu.value == 0.0


@pytest.mark.parametrize("prior", [0.0, 0.5])
def test_matches_a_direct_davidson_likelihood_fit_with_ties(prior):
    """The reference: Davidson's log-likelihood vote by vote, in (θ, log ν), by BFGS; with a prior
    its θ are all free and the penalty prior/2 · Σθ² applies to them as they are."""
    votes = simulate(TRUE_THETA, 0.7, 500, seed=6)
    index = {m: i for i, m in enumerate(MODELS)}
    a = np.array([index[v[0]] for v in votes])
    b = np.array([index[v[1]] for v in votes])
    outcome = np.array([v[2] for v in votes])

    def nll(params):
        theta, log_nu = params[:-1], params[-1]
        if prior == 0:
            theta = np.concatenate([[0.0], theta])
        log_tie = log_nu + (theta[a] + theta[b]) / 2
        log_d = np.logaddexp(np.logaddexp(theta[a], theta[b]), log_tie)
        log_p = np.select([outcome == "a", outcome == "b"], [theta[a], theta[b]], log_tie) - log_d
        return -log_p.sum() + 0.5 * prior * (theta**2).sum()

    n_theta = len(MODELS) - (1 if prior == 0 else 0)
    ref = minimize(nll, np.zeros(n_theta + 1), method="BFGS", options={"gtol": 1e-10})
    ref_theta = ref.x[:-1] if prior else np.concatenate([[0.0], ref.x[:-1]])
    fit = fit_bradley_terry_davidson(votes, MODELS, prior=prior, n_boot=0)
    np.testing.assert_allclose(fit.log_strengths, centred(ref_theta), atol=1e-5)
    assert fit.nu.value == pytest.approx(math.exp(ref.x[-1]), abs=1e-5)


def test_recovers_the_strengths_and_nu_it_was_simulated_from():
    fit = fit_bradley_terry_davidson(simulate(TRUE_THETA, 0.5, 20_000, seed=7), MODELS, n_boot=0)
    np.testing.assert_allclose(fit.log_strengths, TRUE_THETA, atol=0.06)
    assert fit.nu.value == pytest.approx(0.5, abs=0.05)


# ----------------------------------------------------------------------------- the bootstrap over prompts


def test_votes_of_one_prompt_are_resampled_together():
    """Each vote copied 4 times under its own prompt id: the same prompts are drawn (same seed), so
    the fit and its intervals are those of the original votes. Given a prompt id each, the copies
    would pass for independent evidence and the intervals would shrink by about √4 = 2."""
    votes = simulate(TRUE_THETA, 0.5, 300, seed=8)
    copies = [v for v in votes for _ in range(4)]
    as_independent = [(a, b, o, f"{p}-{k}") for k, (a, b, o, p) in enumerate(copies)]
    # prior=0: a prior weighs the same whatever the number of votes, so copies would dilute it.
    fit, clustered, independent = (
        fit_bradley_terry_davidson(v, prior=0, n_boot=300, seed=1) for v in (votes, copies, as_independent)
    )
    for model in MODELS:
        r, rc, ri = fit.rating(model), clustered.rating(model), independent.rating(model)
        assert (rc.value, rc.low, rc.high) == pytest.approx((r.value, r.low, r.high), abs=1e-6)
        assert 0.35 < (ri.high - ri.low) / (r.high - r.low) < 0.7


def test_intervals_are_seeded_and_hold_the_estimate():
    votes = simulate(TRUE_THETA, 0.5, 300, seed=9, votes_per_prompt=3)
    one, again, other = (fit_bradley_terry_davidson(votes, n_boot=200, seed=s) for s in (5, 5, 6))
    assert one.ratings == again.ratings and one.ratings != other.ratings
    assert one.n_prompts == 100 and one.failed_boot == 0 and one.bootstrap.shape == (200, 5)
    for r in one.ratings:
        assert r.low < r.value < r.high
    assert one.nu.low < one.nu.value < one.nu.high


def test_interval_coverage_is_near_nominal():
    """Over 60 simulated arenas (5 models, 400 votes on 200 prompts), the 95 % intervals hold the
    true rating about 95 % of the time (binomial sd over 300 intervals ≈ 1.3 %; they are correlated)."""
    truth = ELO_SCALE * TRUE_THETA + ELO_OFFSET
    hits = []
    for sim in range(60):
        fit = fit_bradley_terry_davidson(
            simulate(TRUE_THETA, 0.5, 400, seed=100 + sim, votes_per_prompt=2), MODELS, n_boot=200, seed=sim
        )
        hits += [r.low <= t <= r.high for r, t in zip(fit.ratings, truth)]
    assert 0.88 <= np.mean(hits) <= 0.995


def test_a_thousand_replicates_take_seconds():
    votes = simulate(TRUE_THETA, 0.5, 500, seed=10, votes_per_prompt=2)
    start = time.perf_counter()
    fit = fit_bradley_terry_davidson(votes, n_boot=1000)
    assert time.perf_counter() - start < 10 and fit.failed_boot == 0


# ----------------------------------------------------------------------------- length-controlled win rate


def lc_votes(spec: list[tuple[str, float]], model: str = "m", baseline: str = "base") -> list[tuple]:
    """Votes of ``model`` (shown as a) against the baseline: (outcome, length difference) each."""
    return [(model, baseline, o, f"q{n}", 500 + d, 500) for n, (o, d) in enumerate(spec)]


def test_equal_lengths_give_the_raw_win_rate():
    """No length difference: no length term, and σ(θ) at the optimum is the mean outcome, (6 + ½·2)/10."""
    votes = lc_votes([("a", 0)] * 6 + [("tie", 0)] * 2 + [("b", 0)] * 2)
    result = length_controlled_win_rates(votes, "base", prior=0, n_boot=0)["m"]
    assert result.win_rate == pytest.approx(0.7) and result.lc_win_rate.value == pytest.approx(0.7, abs=1e-9)
    assert result.length_coef == 0.0


def test_length_control_hand_computed():
    """Six votes where the model was 100 longer (5 won), two where it was 100 shorter (1 won).
    x = ±c with c = tanh(100/sd), so σ(θ + φc) = 5/6 and σ(θ − φc) = 1/2: θ = ln 5 / 2,
    φ = ln 5 / (2c), and the length-controlled rate σ(θ) = √5/(1 + √5) ≈ 0.691 < the raw 0.75."""
    votes = lc_votes([("a", 100)] * 5 + [("b", 100)] + [("a", -100), ("b", -100)])
    result = length_controlled_win_rates(votes, "base", prior=0, n_boot=0)["m"]
    sd = np.std([100] * 6 + [-100] * 2, ddof=1)
    assert result.win_rate == 0.75
    assert result.lc_win_rate.value == pytest.approx(math.sqrt(5) / (1 + math.sqrt(5)), abs=1e-8)
    assert result.length_coef == pytest.approx(math.log(5) / (2 * math.tanh(100 / sd)), abs=1e-7)


@pytest.mark.parametrize("prior", [0.0, 0.01])
def test_length_control_matches_a_direct_fit(prior):
    """The reference: the fractional-outcome logistic log-likelihood written out, by BFGS. The
    model is shown on either side and the baseline's votes against others are left out."""
    rng = np.random.default_rng(11)
    votes, y, delta = [], [], []
    for n in range(300):
        length_m, length_b = rng.normal(700, 250), rng.normal(500, 200)
        outcome = rng.choice(["a", "b", "tie"], p=[0.5, 0.35, 0.15])  # from the model's side
        y.append({"a": 1.0, "b": 0.0, "tie": 0.5}[outcome])
        delta.append(length_m - length_b)
        if n % 2:  # the model shown second: the outcome and the lengths change sides
            flipped = {"a": "b", "b": "a", "tie": "tie"}[outcome]
            votes.append(("base", "m", flipped, f"q{n}", length_b, length_m))
        else:
            votes.append(("m", "base", outcome, f"q{n}", length_m, length_b))
    votes += [("m", "other", "a", "x")] * 5  # no baseline, no lengths: not used
    y, delta = np.array(y), np.array(delta)
    x = np.tanh(delta / delta.std(ddof=1))

    def nll(beta):
        eta = beta[0] + beta[1] * x
        return -(y * log_expit(eta) + (1 - y) * log_expit(-eta)).sum() + 0.5 * prior * (beta**2).sum()

    ref = minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-10})
    result = length_controlled_win_rates(votes, "base", prior=prior, n_boot=0)
    assert set(result) == {"m"}  # "other" never met the baseline
    assert result["m"].lc_win_rate.value == pytest.approx(expit(ref.x[0]), abs=1e-6)
    assert result["m"].length_coef == pytest.approx(ref.x[1], abs=1e-5)
    assert result["m"].win_rate == pytest.approx(y.mean())


def test_length_control_removes_a_judge_length_bias():
    """A judge that prefers longer answers (φ = 1.5) and a model that writes longer ones: the raw
    win rate is inflated, the length-controlled one recovers σ(θ)."""
    rng = np.random.default_rng(12)
    theta, phi = 0.2, 1.5
    delta = rng.normal(250, 300, size=5000)
    x = np.tanh(delta / delta.std(ddof=1))
    wins = rng.random(5000) < expit(theta + phi * x)
    votes = lc_votes([("a" if w else "b", d) for w, d in zip(wins, delta)])
    result = length_controlled_win_rates(votes, "base", n_boot=0)["m"]
    assert result.lc_win_rate.value == pytest.approx(expit(theta), abs=0.03)
    assert result.win_rate > expit(theta) + 0.1
    assert result.length_coef == pytest.approx(phi, abs=0.2)


def test_length_control_intervals_and_errors():
    spec = [("a", 120), ("b", -40), ("tie", 10), ("a", 60), ("b", 80), ("a", -30)] * 10
    one = length_controlled_win_rates(lc_votes(spec), "base", n_boot=300, seed=2)["m"]
    again = length_controlled_win_rates(lc_votes(spec), "base", n_boot=300, seed=2)["m"]
    assert one == again and one.lc_win_rate.low < one.lc_win_rate.value < one.lc_win_rate.high
    assert one.win_rate_interval[0] < one.win_rate < one.win_rate_interval[1]
    assert one.lc_win_rate.n == 60 and one.n_votes == 60
    with pytest.raises(ValueError, match="won every vote"):
        length_controlled_win_rates(lc_votes([("a", 10), ("a", -5)]), "base", prior=0, n_boot=0)
    assert (
        length_controlled_win_rates(lc_votes([("a", 10), ("a", -5)]), "base", n_boot=0)["m"].lc_win_rate.value
        > 0.9
    )
    with pytest.raises(ValueError, match="no response lengths"):
        length_controlled_win_rates([("m", "base", "a", "q")], "base", n_boot=0)
    with pytest.raises(ValueError, match="no votes against the baseline"):
        length_controlled_win_rates(lc_votes(spec), "nobody", n_boot=0)


def test_length_overlap_by_hand_and_where_the_rate_is_an_extrapolation():
    """Overlap: the share of votes on the rarer side of zero length difference, a zero on both."""
    assert length_overlap(np.array([5.0, 3.0, -2.0, 0.0])) == pytest.approx(0.25 + 0.25)
    assert length_overlap(np.array([-9.0] * 99 + [4.0])) == pytest.approx(0.01)
    # a model that answered shorter in 99 of 100 pairs and won most of them for being short: the
    # rate at equal length lies beyond every vote, and the result says so
    shorter = lc_votes([("a", -30)] * 85 + [("b", -25)] * 14 + [("b", 5)])
    result = length_controlled_win_rates(shorter, "base", n_boot=0)["m"]
    assert result.length_overlap == pytest.approx(0.01) and result.extrapolated
    assert result.win_rate == pytest.approx(0.85)
    balanced = lc_votes([("a", 20), ("b", -20), ("a", -10), ("a", 15)] * 5)
    assert not length_controlled_win_rates(balanced, "base", n_boot=0)["m"].extrapolated
    edge = [-1.0] * 9 + [1.0]  # exactly MIN_LENGTH_OVERLAP on the rarer side is enough
    assert length_overlap(np.array(edge)) == pytest.approx(MIN_LENGTH_OVERLAP)
