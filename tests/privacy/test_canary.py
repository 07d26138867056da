"""The one-run canary audit (Steinke, Nasr, Jagielski 2023): its bound, and audits that catch broken mechanisms.

The bound is checked against independent computations (exact binomial sums, the theorem read literally,
a closed form, randomized response where the theorem is exact), not against the paper's figures: their
exact settings are not at hand here, and no figure is reproduced from memory.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

import privdiff.privacy.engine as engine_module
from privdiff.privacy.canary import (
    AUDIT_LABEL,
    CanaryAudit,
    audit_dp_sgd,
    audit_scores,
    default_guesses,
    gaussian_reference_audit,
    one_run_epsilon_bound,
    one_run_p_value,
    step_score,
)
from privdiff.privacy.clipping import GradSampleClipper
from privdiff.privacy.engine import DPConfig


def _tail(r: int, x: int, q: float) -> float:
    """P[Binomial(r, q) >= x] summed term by term with exact binomial coefficients."""
    return sum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(max(x, 0), r + 1))


def _theorem(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's approximate-DP bound read literally: f(v) + 2mδ max over i = 1..m of (f(v-i) - f(v))/i."""
    q = math.exp(eps) / (1 + math.exp(eps))
    f_v = _tail(r, v, q)
    return min(1.0, f_v + 2 * m * delta * max((_tail(r, v - i, q) - f_v) / i for i in range(1, m + 1)))


@pytest.mark.parametrize("m, r, v, eps", [(100, 40, 30, 0.5), (200, 120, 100, 1.3), (60, 60, 60, 3.0),
                                         (80, 10, 0, 1.0)])
def test_pure_dp_p_value_is_the_binomial_tail(m, r, v, eps):
    q = 1 / (1 + math.exp(-eps))
    p = one_run_p_value(num_canaries=m, num_guesses=r, correct=v, epsilon=eps, delta=0.0)
    assert p == pytest.approx(_tail(r, v, q), rel=1e-9, abs=1e-15)
    assert p == pytest.approx(binom.sf(v - 1, r, q), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("m, r, v, eps, delta", [(100, 40, 30, 0.5, 1e-3), (200, 120, 100, 1.3, 1e-4),
                                                  (150, 60, 58, 2.0, 1e-3), (300, 200, 190, 2.5, 1e-5)])
def test_approximate_dp_p_value_matches_the_theorem_read_literally(m, r, v, eps, delta):
    p = one_run_p_value(num_canaries=m, num_guesses=r, correct=v, epsilon=eps, delta=delta)
    assert p == pytest.approx(_theorem(m, r, v, eps, delta), rel=1e-8, abs=1e-14)
    assert p > one_run_p_value(num_canaries=m, num_guesses=r, correct=v, epsilon=eps, delta=0.0)


def test_all_correct_pure_dp_bound_has_a_closed_form():
    # r guesses all right: P = q^r = β gives q = β^(1/r), ε = logit(q).
    for r in (20, 100, 500):
        q = 0.01 ** (1 / r)
        expected = math.log(q / (1 - q))
        bound = one_run_epsilon_bound(num_canaries=1000, num_guesses=r, correct=r, delta=0.0, confidence=0.99)
        assert bound == pytest.approx(expected, rel=1e-5)


def test_bound_is_where_the_p_value_crosses_beta():
    args = dict(num_canaries=1000, num_guesses=300, correct=250, delta=1e-5)
    bound = one_run_epsilon_bound(**args, confidence=0.99)
    assert one_run_p_value(**args, epsilon=bound) <= 0.01 < one_run_p_value(**args, epsilon=bound * 1.0001 + 1e-6)


def test_bound_is_monotone():
    bounds = [one_run_epsilon_bound(num_canaries=1000, num_guesses=200, correct=v, delta=1e-5)
              for v in range(110, 201, 10)]
    assert bounds == sorted(bounds) and bounds[0] == 0.0 < bounds[-1]
    # Less confidence, a smaller δ, or fewer canaries behind the same guesses: a larger bound.
    base = dict(num_guesses=200, correct=180)
    b = one_run_epsilon_bound(num_canaries=1000, delta=1e-5, confidence=0.99, **base)
    assert one_run_epsilon_bound(num_canaries=1000, delta=1e-5, confidence=0.95, **base) > b
    assert one_run_epsilon_bound(num_canaries=1000, delta=1e-7, confidence=0.99, **base) > b
    assert one_run_epsilon_bound(num_canaries=200, delta=1e-5, confidence=0.99, **base) > b
    for eps in np.linspace(0, 6, 25):  # the p-value grows with ε (2mδ <= 1), as bisection assumes
        p = [one_run_p_value(num_canaries=1000, num_guesses=200, correct=180, epsilon=e, delta=4e-4)
             for e in (eps, eps + 0.25)]
        assert p[0] <= p[1]


def test_best_guess_pair_pays_a_union_bound():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = included + 1.5 * rng.standard_normal(1000)
    audit = audit_scores(scores=scores, included=included, delta=1e-5)
    guesses = default_guesses(1000)
    assert guesses == ((500, 500), (250, 250), (125, 125), (62, 62), (31, 31))
    order = np.argsort(-scores, kind="stable")
    each = []
    for plus, minus in guesses:
        v = int(included[order[:plus]].sum() + (~included[order[-minus:]]).sum())
        each.append(one_run_epsilon_bound(num_canaries=1000, num_guesses=plus + minus, correct=v, delta=1e-5,
                                          confidence=1 - 0.01 / len(guesses)))
    assert audit.epsilon_lower_bound == max(each) > 0
    single = audit_scores(scores=scores, included=included, delta=1e-5, guesses=[(audit.guesses_included,) * 2])
    assert single.epsilon_lower_bound > audit.epsilon_lower_bound  # one pair, fixed in advance: all of β


def test_randomized_response_is_audited_close_to_its_epsilon_and_never_above():
    # For ε-randomized response every guess is right with probability e^ε/(1+e^ε), independently: the
    # theorem is exact there, so the bound comes close to ε (up to the 99% confidence) without passing it.
    bounds = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        included = rng.random(2000) < 0.5
        released = np.where(rng.random(2000) < 1 / (1 + math.exp(-1.0)), included, ~included)
        bounds.append(audit_scores(scores=released.astype(float), included=included, delta=0.0).epsilon_lower_bound)
    assert max(bounds) <= 1.0 and np.median(bounds) > 0.75


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 4.0])
def test_exact_gaussian_mechanism_stays_below_its_epsilon(epsilon):
    audit = gaussian_reference_audit(epsilon=epsilon, delta=1e-5, num_canaries=1000, seed=0)
    assert 0 <= audit.epsilon_lower_bound <= epsilon == audit.recorded_epsilon
    assert not audit.exceeds_recorded


def test_gaussian_mechanism_with_a_quarter_of_the_noise_is_caught():
    audit = gaussian_reference_audit(epsilon=2.0, delta=1e-5, num_canaries=1000, noise_scale=0.25, seed=0)
    assert audit.exceeds_recorded and audit.epsilon_lower_bound > 2.0 + 0.4
    assert audit == gaussian_reference_audit(epsilon=2.0, delta=1e-5, num_canaries=1000, noise_scale=0.25, seed=0)


@pytest.mark.parametrize("q, sigma", [(0.3, 1.5), (1.0, 2.0), (0.05, 0.7)])
def test_step_score_is_the_log_likelihood_ratio_of_one_step(q, sigma):
    x = np.linspace(-4, 6, 21)
    expected = np.log((1 - q) * norm.pdf(x, 0, sigma) + q * norm.pdf(x, 1, sigma)) - norm.logpdf(x, 0, sigma)
    got = step_score(projection=torch.from_numpy(x), noise_multiplier=sigma, sample_rate=q)
    assert np.allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(step_score(projection=torch.from_numpy(x), noise_multiplier=sigma, sample_rate=q, score="sum"),
                       torch.from_numpy(x))


def _config(*, sample_rate: float, steps: int) -> DPConfig:
    return DPConfig(delta=1e-5, max_grad_norm=1.0, sample_rate=sample_rate, steps=steps, target_epsilon=2.0,
                    accountant="pld", physical_batch_size=1024)


@pytest.mark.parametrize("sample_rate, steps", [(0.5, 4), (1.0, 2)])
def test_dp_sgd_engine_audit_stays_below_the_recorded_epsilon(sample_rate, steps):
    audit = audit_dp_sgd(config=_config(sample_rate=sample_rate, steps=steps), num_canaries=1000, seed=0)
    assert audit.mechanism == "dp-sgd" and audit.num_canaries == 1000 and audit.delta == 1e-5
    assert 1.9 < audit.recorded_epsilon <= 2.0
    assert audit.epsilon_lower_bound <= audit.recorded_epsilon
    assert not audit.exceeds_recorded
    assert 0 < audit.epsilon_estimate_gaussian_fit <= audit.recorded_epsilon  # the fit of the summed projections


def test_dp_sgd_engine_with_a_quarter_of_the_noise_is_caught(monkeypatch):
    real = engine_module.noisy_average

    def quarter_noise(**kwargs):
        return real(**{**kwargs, "noise_multiplier": kwargs["noise_multiplier"] / 4})

    monkeypatch.setattr(engine_module, "noisy_average", quarter_noise)
    # Full batches: with Poisson rate 1/2 half the canaries go unseen each step and 1,000 canaries no
    # longer catch this break (the bound stays about 1.8 against ε = 2).
    audit = audit_dp_sgd(config=_config(sample_rate=1.0, steps=2), num_canaries=1000, seed=0)
    assert audit.exceeds_recorded and audit.epsilon_lower_bound > audit.recorded_epsilon + 0.4
    assert audit.fit_exceeds_recorded


@pytest.mark.parametrize("score", ["likelihood-ratio", "sum"])
def test_dp_sgd_engine_without_clipping_is_caught(monkeypatch, score):
    # Noise still scaled to C, but the canaries' gradients (10 C) go through whole.
    monkeypatch.setattr(engine_module, "GradSampleClipper",
                        lambda **kwargs: GradSampleClipper(**{**kwargs, "max_grad_norm": 1e12}))
    audit = audit_dp_sgd(config=_config(sample_rate=0.5, steps=4), num_canaries=1000, score=score, seed=0)
    assert audit.exceeds_recorded and audit.epsilon_lower_bound > audit.recorded_epsilon + 0.4


def test_audit_result_is_labelled_and_checked():
    audit = gaussian_reference_audit(epsilon=1.0, delta=1e-5, num_canaries=1000, seed=3)
    assert audit.label == AUDIT_LABEL and "not a privacy guarantee" in audit.label
    assert audit.to_dict()["epsilon_lower_bound"] == audit.epsilon_lower_bound
    with pytest.raises(AttributeError):
        audit.epsilon_lower_bound = 5.0
    with pytest.raises(ValueError, match="num_guesses"):
        CanaryAudit(epsilon_lower_bound=0.0, confidence=0.99, delta=0.0, num_canaries=10, num_guesses=20,
                    guesses_included=10, correct=5)


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="use fewer"):
        one_run_p_value(num_canaries=100_000, num_guesses=100, correct=90, epsilon=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="at least 32"):
        audit_scores(scores=[1.0, 0.0], included=[True, False], delta=0.0)
    with pytest.raises(ValueError, match="one of each"):
        audit_scores(scores=np.zeros(100), included=np.zeros(99, bool), delta=0.0)
    with pytest.raises(ValueError, match=r"r\+ \+ r-"):
        audit_scores(scores=np.zeros(100), included=np.zeros(100, bool), delta=0.0, guesses=[(80, 80)])
    subject = DPConfig(delta=1e-5, max_grad_norm=1.0, sample_rate=0.5, steps=1, noise_multiplier=1.0,
                       privacy_unit="subject")
    with pytest.raises(ValueError, match="privacy_unit='example'"):
        audit_dp_sgd(config=subject)
    with pytest.raises(ValueError, match="clipping matters"):
        audit_dp_sgd(config=_config(sample_rate=0.5, steps=1), canary_norm=0.5)


# ------------------------------------------------ the many-run variant and planned guesses


def test_pooled_runs_are_one_audit_of_all_their_canaries():
    from privdiff.privacy.canary import pool_runs, run_seeds

    scores, included = pool_runs([([0.5, 2.0], [True, False]), ([1.0], [True])])
    assert scores.tolist() == [0.5, 2.0, 1.0] and included.tolist() == [True, False, True]
    assert run_seeds(seed=7, runs=1) == [7]  # one run is the one-run audit as it always was
    seeds = run_seeds(seed=7, runs=10)
    assert len(set(seeds)) == 10 and seeds == run_seeds(seed=7, runs=10)
    audit = gaussian_reference_audit(epsilon=2.0, delta=1e-5, num_canaries=1000, runs=3, seed=0)
    assert audit.runs == 3 and audit.num_canaries == 3000 and audit.to_dict()["runs"] == 3


def test_planned_guesses_depend_only_on_public_facts_and_are_one_pair():
    from privdiff.privacy.canary import planned_guesses

    first = planned_guesses(num_canaries=1000, epsilon=2.0, delta=1e-5)
    assert len(first) == 1 and first == planned_guesses(num_canaries=1000, epsilon=2.0, delta=1e-5)
    plus, minus = first[0]
    assert 16 <= plus <= 500 and minus in (0, plus)
    rng = np.random.default_rng(0)
    scores, included = rng.standard_normal(1000), rng.random(1000) < 0.5
    audit = audit_scores(scores=scores, included=included, delta=1e-5, guesses="planned", recorded_epsilon=2.0,
                         bound="fdp")
    assert (audit.guesses_included, audit.num_guesses) == (plus, plus + minus)
    with pytest.raises(ValueError, match="planned"):
        audit_scores(scores=scores, included=included, delta=1e-5, guesses="planned")  # no recorded ε to plan from


@pytest.mark.parametrize("epsilon", [2.0, 4.0])
def test_ten_pooled_runs_with_planned_guesses_stay_below_epsilon_and_catch_a_quarter_of_the_noise(epsilon):
    for seed in (0, 1):
        correct = gaussian_reference_audit(epsilon=epsilon, delta=1e-5, num_canaries=1000, runs=10, seed=seed,
                                           guesses="planned")
        assert 0 < correct.epsilon_lower_bound <= epsilon, (seed, correct)
    broken = gaussian_reference_audit(epsilon=epsilon, delta=1e-5, num_canaries=1000, runs=10, seed=0,
                                      guesses="planned", noise_scale=0.25)
    assert broken.exceeds_recorded, broken
