"""Canary audits: an empirical lower bound on ε from one training run.

m canaries are each put into the private data independently with probability 1/2 (the seeded vector
S). After one run the auditor scores every canary from what the run released, guesses "included"
for the r+ highest scores and "excluded" for the r- lowest, abstains on the rest, and counts the
correct guesses v out of r = r+ + r-. Any score computed from the whole release is allowed, so
per-step scores of DP-SGD may be combined freely. Every candidate (r+, r-) is fixed before the scores
are seen and gets β / (number of candidates) (Bonferroni, β = 1 - confidence), so taking the best
candidate keeps the overall confidence. Three tests turn (r, v) into a bound (`audit_scores(bound=...)`):

- "eps-delta" (Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", arXiv
  2305.08846): for a mechanism that is (ε, δ)-DP in each canary's inclusion,

      P[v correct or more] <= f(v) + 2 m δ · max_{i = 1..v} (f(v - i) - f(v)) / i,
      f(x) = P[Binomial(r, e^ε / (1 + e^ε)) >= x]

  (the approximate-DP form of its main theorem; computed as the paper's p-value routine does, e.g.
  jax_privacy's `auditing._one_run_p_value`). The bound is the largest ε this rejects at level β.
  Sound for every (ε, δ)-DP mechanism, but loose: the 2mδ term caps it near 4.8 at m = 1,000.
- "fdp" (Mahloujifar, Melis, Chaudhuri, "Auditing f-Differential Privacy in One Run", arXiv
  2410.22235): the claim tested is "the run is μ-GDP" (trade-off function at least G_μ, the Gaussian
  mechanism with σ = 1/μ) by a recursion over the number of correct guesses (`one_run_fdp_rejects`);
  the largest μ rejected is reported as the ε at δ of the μ-GDP curve (`gdp_epsilon`). Comparing that
  ε with a recorded (ε, δ) is legitimate only when the mechanism is μ_rec-GDP for the μ_rec whose
  curve passes through the recorded (ε, δ): true for Gaussian mechanisms and their compositions
  (full-batch DP-SGD), NOT guaranteed for Poisson-subsampled ones, whose δ(ε) (PLD) falls below that
  Gaussian curve for ε < ε_rec but above it for ε > ε_rec (heavier tails), so a correct subsampled
  run could in principle be "refuted": the recursion looks at events down to probability about
  τ·v/m (τ the level, v the correct guesses), which with few guesses reaches the tail where the
  subsampled run is the less private. No margin is claimed there; use "fdp-eps-delta" for such runs.
  About 1.3 to 1.8 times the "eps-delta" bound on the Gaussian; all guesses right give 8.2 at m = 1,000.
- "fdp-eps-delta": the same recursion with the trade-off function of (ε, δ)-DP itself,
  max(0, 1 - δ - e^ε α, e^-ε (1 - δ - α)). It tests the recorded claim "(ε, δ)-DP" directly, so it is
  sound for every mechanism, like "eps-delta", and was at least as tight as it in every case measured
  (1.0 to 1.2 times at m = 1,000, 1.4 to 1.6 times at m = 10,000 on the Gaussian); not proved to be.

Beside the three tests, `audit_scores` fits a Gaussian to the canaries' values (`gaussian_fit_mu_bound`,
after Agrawal et al., "Let's Ask Gauss", arXiv 2606.12733): the included and excluded canaries' summed
signals as two normals of one spread, μ their separation, an exact noncentral-t confidence bound on μ
given that model, reported as the ε at δ of μ-GDP (`epsilon_estimate_gaussian_fit`). It uses the values
rather than thresholded guesses and shows about 0.7·ε at ε = 2 from one run of 1,000 canaries on the
exact Gaussian, but it is an estimate under a model, not a test sound for every mechanism: it never
becomes `epsilon_lower_bound`, and a fit above the recorded ε is a warning to confirm with a sound test.

`audit_scores` computes all three tests and reports them (`CanaryAudit.epsilon_lower_bound_*`); the one
named by `bound`, chosen before the scores are seen, is `epsilon_lower_bound` and decides
`exceeds_recorded`. Its default stays "eps-delta"; `gaussian_reference_audit` uses "fdp" (an exact
Gaussian), `audit_dp_sgd` "fdp" with full batches (Gaussian composition) and "fdp-eps-delta" with
Poisson sampling.

The result is an audit, not a guarantee: a correct mechanism gives a bound at or below its recorded
ε (with probability >= confidence, under the bound's claim above); a bound above it means the
implementation or its accounting is wrong. Even the "fdp" bound shows only about 0.3 to 0.5 of ε at
ε = 2 to 8 (0.16 at ε = 1) on an exactly (ε, 1e-5)-DP Gaussian mechanism with 1,000 canaries, and
about half of ε with 10,000 (bench/canary_tightness.py): it catches gross breaks (noise cut 4x,
clipping off), not small ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .engine import DPConfig

AUDIT_LABEL = "empirical lower bound on epsilon from a one-run canary audit; an audit, not a privacy guarantee"
SCORES = ("likelihood-ratio", "sum")
BOUNDS = ("eps-delta", "fdp", "fdp-eps-delta")


@dataclass(frozen=True)
class CanaryAudit:
    """One audit: the ε lower bound, the guesses behind it, and the ε the run recorded.

    `epsilon_lower_bound` is the bound named by `bound` (chosen before the scores were seen), and the
    guess fields are its best candidate's. The `epsilon_lower_bound_*` fields are the three tests of
    the same guesses, each valid at `confidence` on its own (taking the largest of them after the fact
    is not): "eps-delta" and "fdp-eps-delta" test the recorded (ε, δ); "fdp" tests μ-GDP
    (`gdp_mu_lower_bound` is the μ it rejects) and compares with the recorded ε only for mechanisms
    that are as private as the Gaussian with that (ε, δ) (see the module docstring).
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    num_canaries: int
    num_guesses: int  # r = r+ + r-
    guesses_included: int  # r+: the highest scores, guessed "included"
    correct: int  # v
    recorded_epsilon: float | None = None  # the accountant's ε for the audited run, if any
    mechanism: str = ""
    label: str = AUDIT_LABEL
    bound: str = "eps-delta"  # which test gave epsilon_lower_bound: one of BOUNDS
    epsilon_lower_bound_eps_delta: float | None = None  # Steinke, Nasr, Jagielski
    epsilon_lower_bound_fdp: float | None = None  # f-DP recursion against μ-GDP, as ε at delta
    epsilon_lower_bound_fdp_eps_delta: float | None = None  # f-DP recursion against (ε, δ)-DP
    gdp_mu_lower_bound: float | None = None  # the largest μ the "fdp" test rejects
    runs: int = 1  # independent runs whose canaries were pooled (`pool_runs`); num_canaries counts them all
    # The Gaussian fit (`gaussian_fit_mu_bound`): μ's lower confidence bound and its ε at delta. An estimate
    # under a model of the scores, not a bound for every mechanism: reported beside, never `epsilon_lower_bound`.
    gaussian_fit_mu_lower_bound: float | None = None
    epsilon_estimate_gaussian_fit: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence={self.confidence} must lie in (0, 1), e.g. 0.99.")
        if self.bound not in BOUNDS:
            raise ValueError(f"bound={self.bound!r} must be one of {', '.join(BOUNDS)}.")
        if not 0 <= self.correct <= self.num_guesses <= self.num_canaries:
            raise ValueError(f"need 0 <= correct ({self.correct}) <= num_guesses ({self.num_guesses}) <= "
                             f"num_canaries ({self.num_canaries}).")
        if not 0 <= self.guesses_included <= self.num_guesses:
            raise ValueError(f"guesses_included={self.guesses_included} must lie in [0, num_guesses].")
        if self.runs < 1:
            raise ValueError(f"runs={self.runs} must be at least 1.")

    @property
    def exceeds_recorded(self) -> bool:
        """True when the audit refutes the recorded ε: the mechanism leaks more than it claims."""
        return self.recorded_epsilon is not None and self.epsilon_lower_bound > self.recorded_epsilon

    @property
    def fit_exceeds_recorded(self) -> bool:
        """True when the Gaussian fit's estimate is above the recorded ε: a warning to confirm with a
        sound test (more runs or canaries), not a refutation on its own."""
        return (self.recorded_epsilon is not None and self.epsilon_estimate_gaussian_fit is not None
                and self.epsilon_estimate_gaussian_fit > self.recorded_epsilon)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


# ------------------------------------------------------------------------------------- the bound


def _check_counts(num_canaries: int, num_guesses: int, correct: int, delta: float) -> None:
    if not 0 <= correct <= num_guesses <= num_canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= num_guesses ({num_guesses}) <= num_canaries "
                         f"({num_canaries}).")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta={delta} must lie in [0, 1).")
    if 2 * num_canaries * delta > 1.0:
        # Then the δ term can fall as ε grows, and the largest rejected ε is no longer one bisection away;
        # the paper needs δ well below 1/m anyway.
        raise ValueError(f"2·m·δ = {2 * num_canaries * delta:.3g} > 1 with {num_canaries} canaries and "
                         f"delta={delta}: the audit needs at most 1/(2δ) = {int(0.5 / delta)} canaries; use fewer.")


def one_run_p_value(*, num_canaries: int, num_guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The paper's bound on P[at least `correct` right out of `num_guesses`] under (ε, δ)-DP."""
    from scipy.stats import binom

    _check_counts(num_canaries, num_guesses, correct, delta)
    if correct == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomized response
    tail = float(binom.sf(correct - 1, num_guesses, q))  # f(v)
    if delta == 0.0:
        return tail
    # f(v - i) - f(v) = P[v - i <= Binomial < v]: cumulative sums of the pmf downwards from v - 1.
    between = np.cumsum(binom.pmf(np.arange(correct - 1, -1, -1), num_guesses, q))
    worst = float(np.max(between / np.arange(1, correct + 1)))
    return min(1.0, tail + 2.0 * num_canaries * delta * worst)


def one_run_epsilon_bound(*, num_canaries: int, num_guesses: int, correct: int, delta: float,
                          confidence: float = 0.99) -> float:
    """The largest ε whose p-value is at most 1 - confidence (0 if even ε = 0 is plausible).

    With c = 2mδ <= 1 the p-value is the largest over i of (1 - c/i) f(v) + (c/i) f(v - i), mixtures
    of binomial tails with non-negative weights, so it grows with ε and bisection finds the boundary;
    the lower end of the final bracket is returned, so the ε reported is itself rejected.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must lie in (0, 1), e.g. 0.99.")
    beta = 1.0 - confidence

    def p(eps: float) -> float:
        return one_run_p_value(num_canaries=num_canaries, num_guesses=num_guesses, correct=correct,
                               epsilon=eps, delta=delta)

    if p(0.0) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p(hi) <= beta:  # ends: p -> 1 as ε grows, since correct <= num_guesses
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-6 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p(mid) <= beta else (lo, mid)
    return lo


# ------------------------------------------------------------------------------- the f-DP bound

_FDP_SLACK = 1e-9  # relative margin against round-off before the recursion rejects
_MAX_MU = 50.0  # μ-GDP with μ = 50 is (ε, 1e-5)-DP only for ε above 1,000: no audit reaches it
_MAX_EPSILON = 200.0


def _check_fdp_counts(num_canaries: int, num_guesses: int, correct: int) -> None:
    if not 0 <= correct <= num_guesses <= num_canaries or num_canaries < 1:
        raise ValueError(f"need 0 <= correct ({correct}) <= num_guesses ({num_guesses}) <= num_canaries "
                         f"({num_canaries}) and at least one canary.")


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must lie in (0, 1), e.g. 0.99.")
    return 1.0 - confidence


def gdp_delta(*, mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP (Dong, Roth, Su 2019, Corollary 2.13): Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2).

    μ-GDP is the Gaussian mechanism with σ = 1/μ (sensitivity 1), so this is also its exact δ(ε).
    """
    from .accounting import analytic_gaussian_delta

    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu={mu} must be a finite number >= 0.")
    if not epsilon >= 0:
        raise ValueError(f"epsilon={epsilon} must be >= 0.")
    if mu == 0.0 or math.isinf(epsilon):
        return 0.0
    return analytic_gaussian_delta(noise_multiplier=1.0 / mu, epsilon=epsilon)


def gdp_epsilon(*, mu: float, delta: float) -> float:
    """The ε at which μ-GDP is (ε, δ)-DP, rounded down (bisection on `gdp_delta`, lower end).

    Rounded down so that an ε reported from a rejected μ never overstates what the rejection shows.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta} must lie in (0, 1) for an ε at δ.")
    if gdp_delta(mu=mu, epsilon=0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu=mu, epsilon=hi) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gdp_delta(mu=mu, epsilon=mid) > delta else (lo, mid)
    return lo


def gaussian_fit_mu_bound(*, scores, included, confidence: float = 0.99) -> tuple[float, float]:
    """(μ̂, μ_low): the canaries' separation and its lower confidence bound, under a Gaussian model.

    The model: given the inclusion vector, the scores are independent, N(a, s²) for excluded canaries
    and N(a + μ·s, s²) for included ones, a and s unknown. That is what the canary scores of DP-SGD
    with full batches are exactly (Gaussian noise, each included canary adding C every step), and what
    they tend to with Poisson batches over many steps (the normalized sum is asymptotically Gaussian:
    Agrawal et al., "Let's Ask Gauss", arXiv 2606.12733). Under it the two-sample t statistic has a
    noncentral t distribution with n1 + n0 - 2 degrees of freedom and noncentrality μ / sqrt(1/n1 + 1/n0),
    so μ_low, the smallest μ not rejected at level 1 - confidence, is exact. The scores' values are
    used, not thresholded guesses, which is why it is far tighter than the counting tests; the price is
    the model: it is an estimate under an assumption, not a bound for every mechanism.
    """
    from scipy.optimize import brentq
    from scipy.stats import nct

    beta = _check_confidence(confidence)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    x1, x0 = scores[included], scores[~included]
    n1, n0 = len(x1), len(x0)
    if n1 < 2 or n0 < 2:
        raise ValueError(f"{n1} included and {n0} excluded canaries: the Gaussian fit needs at least 2 of each.")
    df = n1 + n0 - 2
    spread = math.sqrt(((n1 - 1) * x1.var(ddof=1) + (n0 - 1) * x0.var(ddof=1)) / df)
    if not spread > 0:
        raise ValueError("all canary scores are equal: the run released nothing about them to fit.")
    scale = math.sqrt(1.0 / n1 + 1.0 / n0)
    t = (x1.mean() - x0.mean()) / (spread * scale)
    # P_nc[T >= t] grows with the noncentrality nc; nc_low solves P = β. T's spread at noncentrality nc
    # is about sqrt(1 + nc²/(2 df)): the bracket starts at ten of those and widens until it holds the root.
    def excess(nc: float) -> float:
        return float(nct.sf(t, df, nc)) - beta

    width = 10.0 * math.sqrt(1.0 + t * t / (2.0 * df))
    while not (excess(t - width) < 0 < excess(t + width)):
        if width > 1e6 * (1.0 + abs(t)):
            raise ValueError(f"the Gaussian fit found no confidence bound for t = {t:.6g} with {df} degrees of "
                             "freedom; the scores do not fit its model.")
        width *= 2.0
    nc_low = brentq(excess, t - width, t + width, xtol=1e-10)
    return float(t * scale), float(nc_low * scale)


def gaussian_fit_epsilon(*, scores, included, delta: float, confidence: float = 0.99) -> tuple[float, float]:
    """(μ_low, ε at δ of μ_low-GDP): `gaussian_fit_mu_bound` turned into an ε (0 when μ_low <= 0).

    Comparable with a recorded ε where the scores fit the model: exactly for Gaussian mechanisms and
    full-batch DP-SGD (the same condition as the "fdp" test's). With Poisson batches an included canary's
    summed signal also carries its binomial count of steps; the fit's shift over spread, about q·√T/σ, is
    below the CLT's μ = q·√(T(e^(1/σ²) - 1)) (Dong, Roth, Su), and stayed below the accountant's ε in
    every run measured (tests, bench/RESULTS.md), but no theorem here says it must.
    """
    _, mu_low = gaussian_fit_mu_bound(scores=scores, included=included, confidence=confidence)
    return mu_low, (gdp_epsilon(mu=mu_low, delta=delta) if mu_low > 0 else 0.0)


def one_run_fdp_rejects(*, num_canaries: int, num_guesses: int, correct: int, confidence: float,
                        blow_up_inverse: Callable[[float], float]) -> bool:
    """True when `correct` right guesses refute f-DP at level 1 - confidence (Mahloujifar et al. 2024).

    `blow_up_inverse` is B^-1 for the blow-up B(x) = 1 - f(x) of a symmetric trade-off function f:
    an event of probability y in one world has probability at least B^-1(y) in the neighbouring one
    (Φ(Φ^-1(y) - μ) for μ-GDP). It must be non-decreasing.

    The statement relied on (the paper's recursion, `audit_rh_with_cap`; proved here as follows).
    Let T be the number of correct guesses among k = num_guesses, p_t = P[T = t], and J a canary drawn
    uniformly. Given J and the other canaries' inclusion, "J guessed included (or: excluded) and at
    least j - 1 of the other guesses right" is an event on the release, so f-DP in J's inclusion, J's
    inclusion being a fair coin, and concavity of B = 1 - f give, for j = 1..k,

        b_j >= B^-1(a_j),   a_j = P[J right, T >= j]         = sum_{t >= j} t p_t / m,
                            b_j = P[J wrong, T_-J >= j - 1]  = sum_{t >= j-1} (k - t) p_t / m.

    If P[T >= c] >= τ, moving mass down to c (and any excess at c to c - 1) keeps every constraint
    j <= c, so the least total mass they allow is built greedily from c down: r = τc/m, h = τ(k-c)/m;
    for i = c-1, ..., 0: h' = max(h, B^-1(r)), r += i/(k-i) (h' - h), h = h' (an induction with Abel
    summation, the weights i/(k-i) growing with i, shows every feasible p has at least r and h at each
    step). The total is r + h <= k/m for every feasible p, so r + h > k/m shows P[T >= c] < τ.
    Rejecting the observed count v when this holds for c = v, τ = 1 - confidence, is then a level-τ
    test: if c0 is the least count it rejects, P[rejection] <= P[T >= c0] < τ.
    """
    _check_fdp_counts(num_canaries, num_guesses, correct)
    tau = _check_confidence(confidence)
    m, k, c = num_canaries, num_guesses, correct
    total = (k / m) * (1.0 + _FDP_SLACK)
    r, h = tau * c / m, tau * (k - c) / m
    for i in range(c - 1, -1, -1):
        need = blow_up_inverse(min(r, 1.0))
        if need <= h:
            break  # r and h stay put from here down
        r, h = r + i / (k - i) * (need - h), need
        if r + h > total:
            return True
    return r + h > total


def _gdp_blow_up_inverse(mu: float) -> Callable[[float], float]:
    from scipy.special import ndtr, ndtri

    return lambda y: float(ndtr(ndtri(y) - mu))


def _eps_delta_blow_up_inverse(epsilon: float, delta: float) -> Callable[[float], float]:
    # Inverse of B(x) = min(1, δ + e^ε x, 1 - e^-ε (1 - δ - x)), the blow-up of (ε, δ)-DP.
    grow = math.exp(epsilon)
    return lambda y: max(0.0, (y - delta) / grow, 1.0 - delta - grow * (1.0 - y))


def _largest_rejected(rejects: Callable[[float], bool], *, limit: float) -> float:
    """The largest parameter rejected, by bisection (rejection is monotone: a larger μ or ε is a
    weaker claim); the lower end of the last bracket, itself rejected, is returned."""
    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(hi):
        if hi >= limit:
            return hi
        lo, hi = hi, min(2.0 * hi, limit)
    while hi - lo > 1e-6 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
    return lo


def one_run_gdp_mu_bound(*, num_canaries: int, num_guesses: int, correct: int, confidence: float = 0.99) -> float:
    """The largest μ for which `correct` right out of `num_guesses` refutes μ-GDP (0 if none)."""
    return _largest_rejected(
        lambda mu: one_run_fdp_rejects(num_canaries=num_canaries, num_guesses=num_guesses, correct=correct,
                                       confidence=confidence, blow_up_inverse=_gdp_blow_up_inverse(mu)),
        limit=_MAX_MU)


def one_run_gdp_bound(*, num_canaries: int, num_guesses: int, correct: int, delta: float,
                      confidence: float = 0.99) -> float:
    """The f-DP audit's ε lower bound at δ: the ε at δ of the largest μ-GDP claim it refutes.

    What is refuted is "the run is μ-GDP". Reading the result as "the run is not (ε, δ)-DP" needs
    the mechanism to be at least as private as the Gaussian mechanism that is exactly (ε, δ)-DP
    (true for Gaussian mechanisms and compositions of them; not guaranteed for subsampled ones).
    """
    mu = one_run_gdp_mu_bound(num_canaries=num_canaries, num_guesses=num_guesses, correct=correct,
                              confidence=confidence)
    return gdp_epsilon(mu=mu, delta=delta) if mu > 0 else 0.0


def one_run_fdp_epsilon_bound(*, num_canaries: int, num_guesses: int, correct: int, delta: float,
                              confidence: float = 0.99) -> float:
    """The largest ε for which the f-DP recursion refutes (ε, δ)-DP itself (no Gaussian assumption)."""
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta={delta} must lie in [0, 1).")
    return _largest_rejected(
        lambda eps: one_run_fdp_rejects(num_canaries=num_canaries, num_guesses=num_guesses, correct=correct,
                                        confidence=confidence, blow_up_inverse=_eps_delta_blow_up_inverse(eps, delta)),
        limit=_MAX_EPSILON)


def default_guesses(num_canaries: int) -> tuple[tuple[int, int], ...]:
    """The candidate (r+, r-) pairs: (k, k) for k = m/2, m/4, ... down to 16.

    Fixed by m alone, before any score is seen, as the union bound requires. On the Gaussian
    mechanism two-sided guesses beat one-sided ones (k, 0), and a finer grid loses more to the union
    bound than it gains; audits where an included canary may go unseen (subsampling) add (k, 0).
    """
    ks, k = [], num_canaries // 2
    while k >= 16:
        ks.append(k)
        k //= 2
    if not ks:
        raise ValueError(f"num_canaries={num_canaries} is too few for an audit; use at least 32 (1,000 or more "
                         "for a useful bound).")
    return tuple((k, k) for k in ks)


_PLAN_SIMULATIONS = 8
_PLAN_KS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@functools.lru_cache(maxsize=64)
def planned_guesses(*, num_canaries: int, epsilon: float, delta: float, confidence: float = 0.99,
                    bound: str = "fdp") -> tuple[tuple[int, int], ...]:
    """One guess pair chosen in advance from public facts only (the number of canaries and the ε the
    run records): the pair that does best, on average over simulations drawn here, in the audit of the
    Gaussian mechanism that is exactly (ε, δ)-DP. It is tested alone, at the full confidence, so no
    union bound is paid; that is sound because nothing of the audited run is looked at to choose it.
    On the Gaussian mechanism it adds about a fifth to the grid's median bound (`bench/canary_tightness.py`).
    """
    from .accounting import analytic_gaussian_sigma

    sigma = analytic_gaussian_sigma(epsilon=epsilon, delta=delta)
    m = num_canaries
    pairs = sorted({(k, k) for k in _PLAN_KS if 2 * k <= m} | {(k, 0) for k in _PLAN_KS if k <= m // 4})
    if not pairs:
        return default_guesses(m)
    totals = dict.fromkeys(pairs, 0.0)
    if bound == "fdp":  # its ε at δ grows with the μ it rejects: compare the μ
        def test(**counts):
            return one_run_gdp_mu_bound(num_canaries=counts["num_canaries"], num_guesses=counts["num_guesses"],
                                        correct=counts["correct"], confidence=counts["confidence"])
    else:
        test = {"eps-delta": one_run_epsilon_bound, "fdp-eps-delta": one_run_fdp_epsilon_bound}[bound]
    # Simulation draws from a stream of their own, never an audit's (seeded by the words, not a number).
    for stream in np.random.SeedSequence(int.from_bytes(b"privdiff planned guesses", "big")).spawn(_PLAN_SIMULATIONS):
        rng = np.random.default_rng(stream)
        included = rng.random(m) < 0.5
        ranked = included[np.argsort(-(included + sigma * rng.standard_normal(m)), kind="stable")]
        for plus, minus in pairs:
            correct = int(ranked[:plus].sum()) + int((~ranked[m - minus:]).sum() if minus else 0)
            totals[(plus, minus)] += test(num_canaries=m, num_guesses=plus + minus, correct=correct, delta=delta,
                                          confidence=confidence)
    return (max(pairs, key=lambda pair: (totals[pair], pair)),)


def pool_runs(runs: Sequence[tuple[Sequence[float], Sequence[bool]]]) -> tuple[np.ndarray, np.ndarray]:
    """The canaries of several independent runs as one audit's (scores, included): the many-run variant.

    Sound because the runs together are one mechanism in the one-run theorems' sense: each canary's
    inclusion is a fair coin drawn independently of every other, and it touches only its own run, the
    other runs being independent of it, so the joint release is as private in each canary as its own
    run is (same (ε, δ), same trade-off function). R runs of m canaries are thus audited as R·m
    canaries, at R times the training cost, which is how the audit gets tighter when more canaries
    in one run would crowd the run (or cost more memory) than a few more runs do.
    """
    if not runs:
        raise ValueError("pool_runs needs at least one run's (scores, included).")
    scores = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s, _ in runs])
    included = np.concatenate([np.asarray(i, dtype=bool).reshape(-1) for _, i in runs])
    return scores, included


def audit_scores(*, scores, included, delta: float, confidence: float = 0.99,
                 guesses: Sequence[tuple[int, int]] | str | None = None, recorded_epsilon: float | None = None,
                 mechanism: str = "", bound: str = "eps-delta", runs: int = 1, values=None) -> CanaryAudit:
    """Audit from one score per canary (higher: more likely included) and the true inclusion vector.
    `runs`: how many independent runs the canaries come from (`pool_runs`), for the record.
    `values`: each canary's summed canary-aligned signal, for the Gaussian fit (default: the scores);
    the fit is reported beside the bounds (`epsilon_estimate_gaussian_fit`), at δ > 0 only.

    `guesses`: candidate (r+, r-) pairs fixed in advance (default `default_guesses`); each is tested
    at level (1 - confidence) / len(guesses) and the best bound is reported. "planned": the one pair
    `planned_guesses` chooses from `recorded_epsilon` and the number of canaries. All three tests of
    `BOUNDS` are run on the same guesses and reported; `bound` names the one that becomes
    `epsilon_lower_bound` (and so `exceeds_recorded`). The default "eps-delta" is sound for any
    (ε, δ)-DP mechanism; so is "fdp-eps-delta", usually tighter; "fdp" is the tightest on Gaussian-like
    runs but compares with the recorded ε only for mechanisms at least as private as the Gaussian
    with that (ε, δ).
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound={bound!r} must be one of {', '.join(BOUNDS)} (see privdiff.privacy.canary).")
    if bound == "fdp" and delta == 0:
        raise ValueError("bound='fdp' needs delta > 0: μ-GDP gives an ε only at some δ > 0 (no Gaussian "
                         "mechanism is pure DP); use bound='fdp-eps-delta' for δ = 0.")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    m = len(scores)
    if len(included) != m:
        raise ValueError(f"{m} scores but {len(included)} inclusion flags: give one of each per canary.")
    if np.isnan(scores).any():
        raise ValueError("the scores contain NaN; a score must be a number for every canary.")
    if values is not None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(values) != m or not np.isfinite(values).all():
            raise ValueError(f"values: give one finite number per canary ({m}), as the scores.")
    if isinstance(guesses, str):
        if guesses != "planned" or recorded_epsilon is None or delta == 0:
            raise ValueError(f"guesses={guesses!r}: the only named choice is 'planned', which needs the "
                             "recorded epsilon and delta > 0.")
        guesses = planned_guesses(num_canaries=m, epsilon=float(recorded_epsilon), delta=delta,
                                  confidence=confidence, bound="fdp" if bound == "fdp" else bound)
    candidates = tuple(guesses) if guesses is not None else default_guesses(m)
    for plus, minus in candidates:
        if plus < 0 or minus < 0 or plus + minus < 1 or plus + minus > m:
            raise ValueError(f"guess pair ({plus}, {minus}) must be non-negative with 1 <= r+ + r- <= {m} canaries.")
    # Per-candidate confidence under the union bound over all candidates.
    each = 1.0 - (1.0 - confidence) / len(candidates)
    order = np.argsort(-scores, kind="stable")  # ties broken by canary index: a function of the release

    def gdp_mu(*, delta: float, **counts) -> float:  # the μ; its ε at δ comes after the best μ is known
        return one_run_gdp_mu_bound(**counts)

    tests = {"eps-delta": one_run_epsilon_bound, "fdp": gdp_mu, "fdp-eps-delta": one_run_fdp_epsilon_bound}
    best: dict[str, tuple[float, int, int, int]] = {}
    for plus, minus in candidates:
        correct = int(included[order[:plus]].sum()) + int((~included[order[m - minus:]]).sum() if minus else 0)
        for name, test in tests.items():
            value = test(num_canaries=m, num_guesses=plus + minus, correct=correct, delta=delta, confidence=each)
            if name not in best or value > best[name][0]:
                best[name] = (value, plus, minus, correct)
    mu = best["fdp"][0]
    # The ε at δ grows with μ, so the best μ gives the best "fdp" ε. At δ = 0 there is none: no μ-GDP
    # mechanism with μ > 0 is (ε, 0)-DP.
    fdp_epsilon = None if delta == 0 else gdp_epsilon(mu=mu, delta=delta) if mu > 0 else 0.0
    epsilons = {"eps-delta": best["eps-delta"][0], "fdp": fdp_epsilon, "fdp-eps-delta": best["fdp-eps-delta"][0]}
    _, plus, minus, correct = best[bound]
    fit_mu, fit_epsilon = None, None
    if delta > 0:
        fit_mu, fit_epsilon = gaussian_fit_epsilon(scores=scores if values is None else values, included=included,
                                                   delta=delta, confidence=confidence)
    return CanaryAudit(epsilon_lower_bound=epsilons[bound], confidence=confidence, delta=delta, num_canaries=m,
                       num_guesses=plus + minus, guesses_included=plus, correct=correct,
                       recorded_epsilon=recorded_epsilon, mechanism=mechanism, bound=bound,
                       epsilon_lower_bound_eps_delta=epsilons["eps-delta"], epsilon_lower_bound_fdp=epsilons["fdp"],
                       epsilon_lower_bound_fdp_eps_delta=epsilons["fdp-eps-delta"], gdp_mu_lower_bound=mu,
                       runs=runs, gaussian_fit_mu_lower_bound=fit_mu, epsilon_estimate_gaussian_fit=fit_epsilon)


# ---------------------------------------------------------------------------------- shared draws


def audit_streams(*, seed: int, count: int) -> list[np.random.SeedSequence]:
    """Independent seed streams (inclusion, directions, data, noise, ...) derived from one seed."""
    return np.random.SeedSequence(seed).spawn(count)


def torch_generator(*, stream: np.random.SeedSequence) -> torch.Generator:
    """A CPU torch.Generator seeded from one stream."""
    return torch.Generator().manual_seed(int(stream.generate_state(1, dtype=np.uint64)[0] >> 1))


def canary_inclusion(*, num_canaries: int, stream: np.random.SeedSequence) -> np.ndarray:
    """Each canary in with probability 1/2, independently (the paper's S)."""
    return np.random.default_rng(stream).random(num_canaries) < 0.5


def canary_directions(*, num_canaries: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Unit canary directions [m, dim] (float64): orthonormal when dim >= m, so canaries do not
    blur each other's scores; random unit vectors otherwise (each score then carries the others'
    signal as extra noise, about sqrt(m / dim) of one canary's)."""
    if dim < 1:
        raise ValueError(f"dim={dim} must be at least 1.")
    raw = torch.randn(dim, num_canaries, generator=generator, dtype=torch.float64)
    if dim >= num_canaries:
        return torch.linalg.qr(raw).Q.T.contiguous()
    return (raw / raw.norm(dim=0, keepdim=True)).T.contiguous()


# ------------------------------------------------------------------------- the Gaussian reference


def gaussian_reference_audit(*, epsilon: float, delta: float, num_canaries: int = 1000, noise_scale: float = 1.0,
                             confidence: float = 0.99, seed: int = 0, bound: str = "fdp", runs: int = 1,
                             guesses: Sequence[tuple[int, int]] | str | None = None) -> CanaryAudit:
    """Audit m independent Gaussian mechanisms, each (ε, δ)-DP exactly (Balle & Wang σ), one per canary.

    Canary i releases S_i + σ · noise_scale · N(0, 1) and is scored by that value, the optimal test.
    `noise_scale` < 1 simulates a broken mechanism whose noise falls short of the recorded ε. Each
    mechanism is (1/σ)-GDP, σ rounded up, so the "fdp" bound (the default) compares with ε soundly.
    `runs` > 1: that many independent runs of m canaries each, pooled (`pool_runs`). `guesses`: as
    for `audit_scores` ("planned": one pair chosen from ε and m·runs).
    """
    from .accounting import analytic_gaussian_sigma

    if not noise_scale > 0:
        raise ValueError(f"noise_scale={noise_scale} must be positive (1: the mechanism as accounted).")
    sigma = analytic_gaussian_sigma(epsilon=epsilon, delta=delta)
    each = []
    for run_seed in run_seeds(seed=seed, runs=runs):
        inclusion_stream, noise_stream = audit_streams(seed=run_seed, count=2)
        included = canary_inclusion(num_canaries=num_canaries, stream=inclusion_stream)
        noise = np.random.default_rng(noise_stream).standard_normal(num_canaries)
        each.append((included + sigma * noise_scale * noise, included))
    release, included = pool_runs(each)
    return audit_scores(scores=release, included=included, delta=delta, confidence=confidence, guesses=guesses,
                        recorded_epsilon=float(epsilon), mechanism="gaussian", bound=bound, runs=runs)


def run_seeds(*, seed: int, runs: int) -> list[int]:
    """The seeds of the many-run variant's runs: `seed` itself for one run (so that a one-run audit is
    what it always was), else independent seeds derived from it."""
    if runs < 1:
        raise ValueError(f"runs={runs} must be at least 1.")
    if runs == 1:
        return [seed]
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(runs)]


def step_score(*, projection: torch.Tensor, noise_multiplier: float, sample_rate: float,
               score: str = "likelihood-ratio") -> torch.Tensor:
    """One step's score per canary from the noisy sum's projection on its direction, in units of C.

    An included canary adds 1 with probability q, on top of N(0, σ²) noise: `likelihood-ratio` is the
    log-likelihood ratio of that mixture against N(0, σ²), the most powerful per-step test
    (Neyman-Pearson); `sum` is the projection itself.
    """
    if score == "sum" or noise_multiplier == 0:
        return projection
    log_ratio = (projection - 0.5) / noise_multiplier**2
    if sample_rate == 1.0:
        return log_ratio
    return torch.logaddexp(torch.full_like(log_ratio, math.log1p(-sample_rate)), log_ratio + math.log(sample_rate))


# ----------------------------------------------------------------------------- DP-SGD, white-box

_REAL_DIM = 16  # inputs of the audited run's own regression task


def audit_dp_sgd(*, config: DPConfig, num_canaries: int = 1000, num_examples: int = 256, canary_dim: int | None = None,
                 canary_norm: float = 10.0, learning_rate: float = 1e-2, score: str = "likelihood-ratio",
                 confidence: float = 0.99, seed: int = 0, bound: str | None = None) -> CanaryAudit:
    """Run privdiff's DP-SGD engine (`config`: a DPConfig) with gradient canaries and audit it.

    The model is one linear layer trained with Adam on `num_examples` regression examples plus m
    canary units, all Poisson-sampled alike. Canary i's loss is linear in the weights, so its
    gradient is always `canary_norm`·C along its own direction u_i (orthonormal when `canary_dim` >= m,
    default m): clipping must cut it to C. The regression inputs live in 16 further weights, orthogonal
    to every u_i, so the run's own gradients share the clipping, noise and optimizer with the canaries
    without blurring their scores (or swamping them when clipping is off). An excluded canary stays a
    unit with zero gradient, which adds nothing to any sum, so the noisy average's denominator q·N is
    the same public number in both worlds. Each step the engine's noisy clipped average is read
    between the noise and the optimizer (`after_noise`; Adam's update is not the gradient), turned
    back into the noisy sum, projected on every u_i and scored (`step_score`); the scores add up over
    the run. The bound is compared with the engine accountant's ε for the run's σ, q, steps and δ.

    `bound` (see `audit_scores`) defaults to the tightest sound one: "fdp" with full batches
    (sample_rate 1: T Gaussian steps compose to exactly (√T/σ)-GDP, and the accountant's ε is at
    least that Gaussian's), "fdp-eps-delta" with Poisson sampling (not GDP).
    """
    from torch import nn

    from .engine import DPSGDEngine

    if config.privacy_unit != "example":
        raise ValueError(f"privacy_unit={config.privacy_unit!r}: each canary is one example; audit with "
                         "privacy_unit='example' (the clipping and noise are the same).")
    if not canary_norm > 1:
        raise ValueError(f"canary_norm={canary_norm} must exceed 1 (a multiple of C) so that clipping matters; "
                         "e.g. 10.")
    if score not in SCORES:
        raise ValueError(f"score={score!r} must be one of {', '.join(SCORES)}.")
    if bound is None:
        bound = "fdp" if config.sample_rate == 1.0 else "fdp-eps-delta"
    if bound not in BOUNDS:
        raise ValueError(f"bound={bound!r} must be one of {', '.join(BOUNDS)}, or None for the tightest sound one.")
    if num_examples < 1:
        raise ValueError(f"num_examples={num_examples} must be at least 1 (the run's own training examples).")
    m, dim = num_canaries, canary_dim or num_canaries
    inclusion_stream, direction_stream, data_stream, noise_stream = audit_streams(seed=seed, count=4)
    included = canary_inclusion(num_canaries=m, stream=inclusion_stream)
    directions = canary_directions(num_canaries=m, dim=dim, generator=torch_generator(stream=direction_stream))
    model = nn.Linear(dim + _REAL_DIM, 1, bias=False)
    nn.init.zeros_(model.weight)
    per_sample_loss = _canary_task(model=model, directions=directions, included=included, num_examples=num_examples,
                                   canary_grad_norm=canary_norm * config.max_grad_norm,
                                   generator=torch_generator(stream=data_stream))
    engine = DPSGDEngine(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=learning_rate), config=config,
                         num_examples=num_examples + m, generator=torch_generator(stream=noise_stream))
    scores, sums = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    to_sum_in_c = engine.sampler.expected_batch_units / config.max_grad_norm

    def read_release() -> None:
        projection = directions @ model.weight.grad.reshape(-1)[:dim].double() * to_sum_in_c
        sums.add_(projection)
        scores.add_(step_score(projection=projection, noise_multiplier=engine.noise_multiplier,
                               sample_rate=config.sample_rate, score=score))

    for _ in range(config.steps):
        engine.step(per_sample_loss, after_noise=read_release)
    guesses = default_guesses(m)
    if config.sample_rate < 1:
        # An included canary the sampler skipped looks excluded, so "included" guesses alone can be far
        # more precise: one-sided candidates too (fixed by q alone, before any score is seen).
        guesses += tuple((plus, 0) for plus, _ in guesses)
    return audit_scores(scores=scores.numpy(), included=included, delta=config.delta, confidence=confidence,
                        guesses=guesses, recorded_epsilon=engine.accountant.epsilon(delta=config.delta),
                        mechanism="dp-sgd", bound=bound, values=sums.numpy())


def _canary_task(*, model, directions: torch.Tensor, included: np.ndarray, num_examples: int,
                 canary_grad_norm: float, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample losses over units 0..n-1 (the run's own noisy linear regression, on the last 16
    inputs) and n..n+m-1 (canary i: input u_i on the first inputs, loss linear in the output, so its
    gradient is canary_grad_norm · u_i when included and zero when not)."""
    m, n = len(directions), num_examples
    real = torch.randn(n, _REAL_DIM, generator=generator)
    targets = real @ torch.randn(_REAL_DIM, generator=generator) + 0.1 * torch.randn(n, generator=generator)
    inputs = torch.block_diag(directions.float(), real)[torch.cat([torch.arange(m, m + n), torch.arange(m)])]
    targets = torch.cat([targets, torch.zeros(m)])
    canary_weight = torch.cat([torch.zeros(n), canary_grad_norm * torch.from_numpy(included).float()])
    is_real = torch.arange(n + m) < n

    def per_sample_loss(indices: torch.Tensor) -> torch.Tensor:
        y = model(inputs[indices]).squeeze(1)
        return torch.where(is_real[indices], 0.5 * (y - targets[indices]).pow(2), canary_weight[indices] * y)

    return per_sample_loss
