"""The f-DP one-run audit (Mahloujifar, Melis, Chaudhuri 2024): its recursion, its GDP conversion, its audits.

The recursion is checked by brute force, not against the paper's figures: against every distribution of
the number of correct guesses on a grid that the f-DP constraints allow, and against small mechanisms
whose distribution of correct guesses is enumerated exactly (discretised Gaussian releases, which are
μ-GDP as post-processing, and randomized response). The GDP conversion is checked against the
accountant's analytic Gaussian mechanism (μ-GDP is the Gaussian mechanism with σ = 1/μ).
"""

import itertools
import math

import numpy as np
import pytest
from scipy.stats import norm

from privdiff.privacy.accounting import analytic_gaussian_delta, analytic_gaussian_epsilon
from privdiff.privacy.canary import (
    BOUNDS,
    audit_scores,
    default_guesses,
    gaussian_reference_audit,
    gdp_delta,
    gdp_epsilon,
    one_run_epsilon_bound,
    one_run_fdp_epsilon_bound,
    one_run_fdp_rejects,
    one_run_gdp_bound,
    one_run_gdp_mu_bound,
)


def _gdp_inverse(mu):
    return lambda y: norm.cdf(norm.ppf(y) - mu)


def _eps_delta_inverse(eps, delta):
    return lambda y: max(0.0, (y - delta) * math.exp(-eps), 1 - delta - math.exp(eps) * (1 - y))


def _smallest_rejected_tau(*, m, k, c, inverse):
    """Bisection over τ: rejecting is monotone in τ (a larger τ asks for more mass); 1 if none."""
    lo, hi = 0.0, 1.0 - 1e-12
    if not one_run_fdp_rejects(num_canaries=m, num_guesses=k, correct=c, confidence=1 - hi, blow_up_inverse=inverse):
        return 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if one_run_fdp_rejects(num_canaries=m, num_guesses=k, correct=c, confidence=1 - mid, blow_up_inverse=inverse):
            hi = mid
        else:
            lo = mid
    return hi


# --------------------------------------------------------------------------- GDP <-> (ε, δ)


@pytest.mark.parametrize("mu", [0.05, 0.27, 0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
def test_gdp_conversion_is_the_gaussian_mechanism_with_sigma_one_over_mu(mu, delta):
    eps = gdp_epsilon(mu=mu, delta=delta)
    reference = analytic_gaussian_epsilon(noise_multiplier=1 / mu, delta=delta)
    assert eps == pytest.approx(reference, rel=1e-8, abs=1e-10)
    assert eps <= reference  # rounded down, the accountant's rounded up
    for e in (0.0, 0.5 * reference, reference, 2 * reference + 1):
        assert gdp_delta(mu=mu, epsilon=e) == pytest.approx(analytic_gaussian_delta(noise_multiplier=1 / mu, epsilon=e),
                                                            rel=1e-9, abs=1e-300)


def test_gdp_conversion_edges():
    assert gdp_epsilon(mu=0.0, delta=1e-5) == 0.0 and gdp_delta(mu=0.0, epsilon=0.0) == 0.0
    assert gdp_delta(mu=1.0, epsilon=0.0) == pytest.approx(2 * norm.cdf(0.5) - 1)  # total variation of G_1
    with pytest.raises(ValueError, match="delta"):
        gdp_epsilon(mu=1.0, delta=0.0)
    with pytest.raises(ValueError, match="mu"):
        gdp_delta(mu=-1.0, epsilon=1.0)


# -------------------------------------------------------------------- the recursion, brute force


def _simplex_grid(k, n):
    """Every distribution on {0..k} with probabilities in multiples of 1/n."""
    points = [c for c in itertools.combinations(range(n + k), k)]
    bars = np.array(points)
    counts = np.diff(np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), n + k)], axis=1),
                     axis=1) - 1
    return counts / n


def _feasible(p, *, m, k, blow_up):
    """The f-DP constraints on the law p of the number of correct guesses: for j = 1..k,
    P[random canary right, T >= j] <= B(P[random canary wrong, T - its own >= j - 1])."""
    t = np.arange(k + 1)
    ok = np.ones(len(p), dtype=bool)
    for j in range(1, k + 1):
        right = (p[:, t >= j] * t[t >= j]).sum(axis=1) / m
        wrong = (p[:, t >= j - 1] * (k - t[t >= j - 1])).sum(axis=1) / m
        ok &= right <= blow_up(wrong) + 1e-12
    return ok


@pytest.mark.parametrize("m, name, strength", [(4, "gdp", 0.5), (6, "gdp", 0.5), (4, "gdp", 0.25),
                                               (5, "eps-delta", 0.3), (4, "eps-delta", 0.2)])
def test_recursion_is_the_largest_tail_the_f_dp_constraints_allow(m, name, strength):
    # Brute force over a grid of distributions of T (k = 4 guesses): none that the constraints allow
    # has P[T >= c] above the recursion's threshold (soundness), and some come within the grid's
    # resolution of it (the greedy recursion is the optimum, not just a bound).
    k, n = 4, 40
    if name == "gdp":  # μ-GDP, μ = strength
        blow_up = lambda x: norm.cdf(norm.ppf(np.clip(x, 0, 1)) + strength)  # noqa: E731
        inverse = _gdp_inverse(strength)
    else:  # (ε, δ)-DP, ε = strength, δ = 0.01
        grow = math.exp(strength)
        blow_up = lambda x: np.minimum(1.0, np.minimum(0.01 + grow * x, 1 - (1 - 0.01 - x) / grow))  # noqa: E731
        inverse = _eps_delta_inverse(strength, 0.01)
    p = _simplex_grid(k, n)
    allowed = p[_feasible(p, m=m, k=k, blow_up=blow_up)]
    informative = 0
    for c in range(1, k + 1):
        tail = allowed[:, c:].sum(axis=1)
        threshold = _smallest_rejected_tau(m=m, k=k, c=c, inverse=inverse)
        assert threshold - 2.0 / n <= tail.max() <= threshold + 1e-9
        informative += threshold < 1
        for tau in np.unique(tail)[::5]:  # the recursion at allowed tails: no rejection
            if 0 < tau < 1:
                assert not one_run_fdp_rejects(num_canaries=m, num_guesses=k, correct=c, confidence=1 - tau,
                                               blow_up_inverse=inverse)
    assert informative == 2  # c = 3 and 4; at most two right is always possible here


def _exact_tails(*, m, plus, minus, release_law):
    """P[T >= c] for c = 0..k, enumerated exactly: canaries in w.p. 1/2; release_law(s) gives the
    probabilities of the discrete scores 0..L-1 given inclusion s; top `plus` guessed in, bottom `minus`
    out, ties broken by canary index (stable sort), as `audit_scores` does."""
    law = np.array([release_law(0), release_law(1)])  # [2, L]
    s = np.array(list(itertools.product((0, 1), repeat=m)))  # [2^m, m]
    y = np.array(list(itertools.product(range(law.shape[1]), repeat=m)))  # [L^m, m]
    prob = 0.5**m * law[s[:, None, :], y[None, :, :]].prod(axis=2)  # [2^m, L^m]
    order = np.argsort(-y, axis=1, kind="stable")  # the guesses depend on the scores only
    top, bottom = order[:, :plus], order[:, m - minus:]
    right = (np.take_along_axis(s[:, None, :].repeat(len(y), 1), top[None].repeat(len(s), 0), axis=2).sum(axis=2)
             + (1 - np.take_along_axis(s[:, None, :].repeat(len(y), 1), bottom[None].repeat(len(s), 0),
                                       axis=2)).sum(axis=2))
    dist = np.bincount(right.ravel(), weights=prob.ravel(), minlength=plus + minus + 1)
    assert dist.sum() == pytest.approx(1.0)
    return np.cumsum(dist[::-1])[::-1]


@pytest.mark.parametrize("mu", [0.5, 1.5, 3.0])
@pytest.mark.parametrize("plus, minus", [(2, 2), (1, 1), (3, 0), (3, 2)])
def test_discretised_gaussian_mechanism_is_never_refuted_exactly(mu, plus, minus):
    # Canary i releases which of three bins S_i + N(0, 1/μ²) falls in: a post-processing of the
    # Gaussian mechanism, hence μ-GDP. With every outcome enumerated, the recursion for μ-GDP never
    # rejects at τ = P[T >= c], for every threshold c.
    cuts = np.array([0.5 - 1.0 / mu, 0.5 + 1.0 / mu])

    def law(s):
        a, b = norm.cdf((cuts - s) * mu)
        return (a, b - a, 1 - b)

    m, k = 5, plus + minus
    tails = _exact_tails(m=m, plus=plus, minus=minus, release_law=law)
    refuted = []
    for c in range(1, k + 1):
        if 0 < tails[c] < 1:
            rejects = lambda x: one_run_fdp_rejects(num_canaries=m, num_guesses=k, correct=c,  # noqa: E731
                                                    confidence=1 - tails[c], blow_up_inverse=_gdp_inverse(x))
            assert not rejects(mu)
            refuted.append(max([x for x in np.linspace(0, mu, 101) if rejects(x)], default=0.0))
    # Not vacuous: at its exact tail probability the best threshold refutes over a quarter of the μ.
    assert 0.25 * mu < max(refuted) < mu


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("plus, minus", [(3, 3), (2, 1), (4, 0)])
def test_randomized_response_is_never_refuted_exactly(eps, plus, minus):
    # ε-randomized response per canary is (ε, 0)-DP: the recursion for (ε, 0) never rejects at the exact tail.
    q = 1 / (1 + math.exp(-eps))
    m = 6
    tails = _exact_tails(m=m, plus=plus, minus=minus, release_law=lambda s: (q, 1 - q) if s == 0 else (1 - q, q))
    for c in range(1, plus + minus + 1):
        if 0 < tails[c] < 1:
            assert not one_run_fdp_rejects(num_canaries=m, num_guesses=plus + minus, correct=c,
                                           confidence=1 - tails[c], blow_up_inverse=_eps_delta_inverse(eps, 0.0))


def test_all_guesses_of_a_gaussian_without_abstaining_are_never_refuted():
    # Guessing "in" iff the release exceeds 1/2: each guess right w.p. Φ(μ/2), independently, so T is
    # binomial and P[T >= c] is exact; m = k up to 400.
    for m, mu in [(50, 0.5), (200, 1.0), (400, 0.3), (100, 3.0)]:
        tails = np.concatenate([[1.0], np.cumsum(
            [math.comb(m, t) * norm.cdf(mu / 2) ** t * norm.cdf(-mu / 2) ** (m - t) for t in range(m, 0, -1)])[::-1]])
        for c in range(1, m + 1, max(1, m // 40)):
            if 1e-12 < tails[c] < 1:
                assert not one_run_fdp_rejects(num_canaries=m, num_guesses=m, correct=c, confidence=1 - tails[c],
                                               blow_up_inverse=_gdp_inverse(mu))


# --------------------------------------------------------------------------------- the bounds


def test_rejection_is_monotone_and_the_bound_is_where_it_stops():
    args = dict(num_canaries=1000, num_guesses=250, correct=190)
    mu = one_run_gdp_mu_bound(**args, confidence=0.99)
    assert mu > 0
    rejected = [one_run_fdp_rejects(**args, confidence=0.99, blow_up_inverse=_gdp_inverse(x))
                for x in np.linspace(0, 2 * mu, 81)]
    assert rejected == sorted(rejected, reverse=True)  # True up to the bound, False after
    assert one_run_fdp_rejects(**args, confidence=0.99, blow_up_inverse=_gdp_inverse(mu))
    assert not one_run_fdp_rejects(**args, confidence=0.99, blow_up_inverse=_gdp_inverse(mu * 1.0001 + 1e-6))
    assert one_run_gdp_bound(**args, delta=1e-5) == gdp_epsilon(mu=mu, delta=1e-5)
    eps = one_run_fdp_epsilon_bound(**args, delta=1e-5)
    assert one_run_fdp_rejects(**args, confidence=0.99, blow_up_inverse=_eps_delta_inverse(eps, 1e-5))
    assert not one_run_fdp_rejects(**args, confidence=0.99, blow_up_inverse=_eps_delta_inverse(eps * 1.0001, 1e-5))
    # More right guesses or less confidence: a larger bound.
    bounds = [one_run_gdp_bound(num_canaries=1000, num_guesses=250, correct=v, delta=1e-5) for v in range(130, 251, 10)]
    assert bounds == sorted(bounds) and bounds[0] == 0.0 < bounds[-1]
    assert one_run_gdp_bound(**args, delta=1e-5, confidence=0.95) > one_run_gdp_bound(**args, delta=1e-5)


def test_fdp_eps_delta_bound_is_at_least_the_eps_delta_bound_on_these_counts():
    for m, k, v in [(1000, 250, 190), (1000, 1000, 640), (10000, 1250, 950), (10000, 156, 140), (2000, 62, 62)]:
        each = dict(num_canaries=m, num_guesses=k, correct=v, delta=1e-5, confidence=0.998)
        assert one_run_fdp_epsilon_bound(**each) >= one_run_epsilon_bound(**each)
        assert one_run_gdp_bound(**each) >= one_run_fdp_epsilon_bound(**each)


# ----------------------------------------------------------------------- the Gaussian reference


@pytest.mark.parametrize("m", [1000, 10000])
@pytest.mark.parametrize("epsilon", [1.0, 2.0, 4.0, 8.0])
def test_exact_gaussian_mechanism_stays_below_its_epsilon_on_ten_seeds(m, epsilon):
    audits = [gaussian_reference_audit(epsilon=epsilon, delta=1e-5, num_canaries=m, seed=s) for s in range(10)]
    for audit in audits:
        assert audit.bound == "fdp" and audit.epsilon_lower_bound == audit.epsilon_lower_bound_fdp
        assert 0 <= audit.epsilon_lower_bound_eps_delta <= audit.epsilon_lower_bound_fdp_eps_delta
        assert audit.epsilon_lower_bound_fdp_eps_delta <= audit.epsilon_lower_bound_fdp <= epsilon
        assert not audit.exceeds_recorded
    # Tighter than the (ε, δ) theorem: about 1.3x at m = 1,000 and 1.7x at 10,000 (bench/canary_tightness.py).
    fdp = np.median([a.epsilon_lower_bound_fdp for a in audits])
    assert fdp >= 1.25 * np.median([a.epsilon_lower_bound_eps_delta for a in audits]) > 0


@pytest.mark.parametrize("m, epsilon", [(1000, 1.0), (1000, 2.0), (1000, 4.0), (10000, 8.0)])
def test_gaussian_mechanism_with_a_quarter_of_the_noise_exceeds_epsilon(m, epsilon):
    # At ε = 8 a thousand canaries do not show it (the bound is about 6.7); 10,000 give about 9.3.
    audit = gaussian_reference_audit(epsilon=epsilon, delta=1e-5, num_canaries=m, noise_scale=0.25, seed=0)
    assert audit.exceeds_recorded and audit.epsilon_lower_bound_fdp > epsilon * 1.15
    assert audit == gaussian_reference_audit(epsilon=epsilon, delta=1e-5, num_canaries=m, noise_scale=0.25, seed=0)


# ------------------------------------------------------------------------------ audit_scores


def _scores(seed=0, m=1000, sigma=1.5):
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    return included + sigma * rng.standard_normal(m), included


def test_audit_scores_reports_every_bound_and_uses_the_one_asked_for():
    scores, included = _scores()
    audits = {b: audit_scores(scores=scores, included=included, delta=1e-5, bound=b) for b in BOUNDS}
    default = audit_scores(scores=scores, included=included, delta=1e-5)
    assert default == audits["eps-delta"] and default.bound == "eps-delta"
    assert default.epsilon_lower_bound == default.epsilon_lower_bound_eps_delta
    for b, audit in audits.items():
        assert audit.bound == b
        assert audit.epsilon_lower_bound == {"eps-delta": audit.epsilon_lower_bound_eps_delta,
                                             "fdp": audit.epsilon_lower_bound_fdp,
                                             "fdp-eps-delta": audit.epsilon_lower_bound_fdp_eps_delta}[b]
        assert audit.to_dict()["epsilon_lower_bound_fdp"] == audit.epsilon_lower_bound_fdp
    # Each bound takes its own best candidate, at the Bonferroni level for all of them.
    guesses = default_guesses(1000)
    order = np.argsort(-scores, kind="stable")
    each = 1 - 0.01 / len(guesses)
    mus, feds = [], []
    for plus, minus in guesses:
        v = int(included[order[:plus]].sum() + (~included[order[-minus:]]).sum())
        mus.append(one_run_gdp_mu_bound(num_canaries=1000, num_guesses=plus + minus, correct=v, confidence=each))
        feds.append(one_run_fdp_epsilon_bound(num_canaries=1000, num_guesses=plus + minus, correct=v, delta=1e-5,
                                              confidence=each))
    fdp = audits["fdp"]
    assert fdp.gdp_mu_lower_bound == max(mus) > 0
    assert fdp.epsilon_lower_bound == gdp_epsilon(mu=max(mus), delta=1e-5)
    assert fdp.guesses_included == guesses[int(np.argmax(mus))][0]
    assert audits["fdp-eps-delta"].epsilon_lower_bound == max(feds)


def test_audit_scores_errors_say_what_to_do():
    scores, included = _scores()
    with pytest.raises(ValueError, match="must be one of eps-delta, fdp, fdp-eps-delta"):
        audit_scores(scores=scores, included=included, delta=1e-5, bound="gdp")
    with pytest.raises(ValueError, match="fdp-eps-delta"):
        audit_scores(scores=scores, included=included, delta=0.0, bound="fdp")
    pure = audit_scores(scores=scores, included=included, delta=0.0, bound="fdp-eps-delta")
    assert pure.epsilon_lower_bound_fdp is None and pure.epsilon_lower_bound > 0
    with pytest.raises(ValueError, match="confidence"):
        one_run_gdp_bound(num_canaries=100, num_guesses=10, correct=10, delta=1e-5, confidence=1.0)
    with pytest.raises(ValueError, match="num_guesses"):
        one_run_gdp_mu_bound(num_canaries=10, num_guesses=20, correct=5)
    with pytest.raises(ValueError, match="bound="):
        gaussian_reference_audit(epsilon=1.0, delta=1e-5, bound="nope")
