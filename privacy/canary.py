"""Canary audits: an empirical lower bound on ε from one training run (Steinke, Nasr, Jagielski 2023).

m canaries are each put into the private data independently with probability 1/2 (the seeded vector
S). After one run the auditor scores every canary from what the run released, guesses "included"
for the r+ highest scores and "excluded" for the r- lowest, abstains on the rest, and counts the
correct guesses v out of r = r+ + r-. The paper ("Privacy Auditing with One (1) Training Run",
arXiv 2305.08846) proves, for a mechanism that is (ε, δ)-DP in each canary's inclusion:

    P[v correct or more] <= f(v) + 2 m δ · max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(x) = P[Binomial(r, e^ε / (1 + e^ε)) >= x]

(the approximate-DP form of its main theorem; δ = 0 leaves f(v), the pure-DP statement; computed as
the paper's p-value routine does, e.g. jax_privacy's `auditing._one_run_p_value`). Any score computed
from the whole release is allowed, so per-step scores of DP-SGD may be combined freely. The bound is
the largest ε this p-value rejects at level β = 1 - confidence. Every candidate (r+, r-) is fixed
before the scores are seen and gets β / (number of candidates) (Bonferroni), so taking the best
candidate keeps the overall confidence.

The result is an audit, not a guarantee: a correct mechanism gives a bound at or below its recorded
ε (with probability >= confidence); a bound above it means the implementation or its accounting is
wrong. It is loose: on an exactly (ε, 1e-5)-DP Gaussian mechanism with 1,000 canaries it shows about
a third of ε, and the δ term caps it near 4.8 however good the attack (bench/canary_tightness.py).
It catches gross breaks (noise cut 4x, clipping off), not small ones.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class CanaryAudit:
    """One audit: the ε lower bound, the guesses behind it, and the ε the run recorded."""

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

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence={self.confidence} must lie in (0, 1), e.g. 0.99.")
        if not 0 <= self.correct <= self.num_guesses <= self.num_canaries:
            raise ValueError(f"need 0 <= correct ({self.correct}) <= num_guesses ({self.num_guesses}) <= "
                             f"num_canaries ({self.num_canaries}).")
        if not 0 <= self.guesses_included <= self.num_guesses:
            raise ValueError(f"guesses_included={self.guesses_included} must lie in [0, num_guesses].")

    @property
    def exceeds_recorded(self) -> bool:
        """True when the audit refutes the recorded ε: the mechanism leaks more than it claims."""
        return self.recorded_epsilon is not None and self.epsilon_lower_bound > self.recorded_epsilon

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


def audit_scores(*, scores, included, delta: float, confidence: float = 0.99,
                 guesses: Sequence[tuple[int, int]] | None = None, recorded_epsilon: float | None = None,
                 mechanism: str = "") -> CanaryAudit:
    """Audit from one score per canary (higher: more likely included) and the true inclusion vector.

    `guesses`: candidate (r+, r-) pairs fixed in advance (default `default_guesses`); each is tested
    at level (1 - confidence) / len(guesses) and the best bound is reported.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    m = len(scores)
    if len(included) != m:
        raise ValueError(f"{m} scores but {len(included)} inclusion flags: give one of each per canary.")
    if np.isnan(scores).any():
        raise ValueError("the scores contain NaN; a score must be a number for every canary.")
    candidates = tuple(guesses) if guesses is not None else default_guesses(m)
    for plus, minus in candidates:
        if plus < 0 or minus < 0 or plus + minus < 1 or plus + minus > m:
            raise ValueError(f"guess pair ({plus}, {minus}) must be non-negative with 1 <= r+ + r- <= {m} canaries.")
    # Per-candidate confidence under the union bound over all candidates.
    each = 1.0 - (1.0 - confidence) / len(candidates)
    order = np.argsort(-scores, kind="stable")  # ties broken by canary index: a function of the release
    best = None
    for plus, minus in candidates:
        correct = int(included[order[:plus]].sum()) + int((~included[order[m - minus:]]).sum() if minus else 0)
        bound = one_run_epsilon_bound(num_canaries=m, num_guesses=plus + minus, correct=correct, delta=delta,
                                      confidence=each)
        if best is None or bound > best[0]:
            best = (bound, plus, minus, correct)
    bound, plus, minus, correct = best
    return CanaryAudit(epsilon_lower_bound=bound, confidence=confidence, delta=delta, num_canaries=m,
                       num_guesses=plus + minus, guesses_included=plus, correct=correct,
                       recorded_epsilon=recorded_epsilon, mechanism=mechanism)


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
                             confidence: float = 0.99, seed: int = 0) -> CanaryAudit:
    """Audit m independent Gaussian mechanisms, each (ε, δ)-DP exactly (Balle & Wang σ), one per canary.

    Canary i releases S_i + σ · noise_scale · N(0, 1) and is scored by that value, the optimal test.
    `noise_scale` < 1 simulates a broken mechanism whose noise falls short of the recorded ε.
    """
    from .accounting import analytic_gaussian_sigma

    if not noise_scale > 0:
        raise ValueError(f"noise_scale={noise_scale} must be positive (1: the mechanism as accounted).")
    sigma = analytic_gaussian_sigma(epsilon=epsilon, delta=delta)
    inclusion_stream, noise_stream = audit_streams(seed=seed, count=2)
    included = canary_inclusion(num_canaries=num_canaries, stream=inclusion_stream)
    noise = np.random.default_rng(noise_stream).standard_normal(num_canaries)
    release = included + sigma * noise_scale * noise
    return audit_scores(scores=release, included=included, delta=delta, confidence=confidence,
                        recorded_epsilon=float(epsilon), mechanism="gaussian")


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
                 confidence: float = 0.99, seed: int = 0) -> CanaryAudit:
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
    scores = torch.zeros(m, dtype=torch.float64)
    to_sum_in_c = engine.sampler.expected_batch_units / config.max_grad_norm

    def read_release() -> None:
        grad = model.weight.grad.reshape(-1)[:dim].double()
        scores.add_(step_score(projection=directions @ grad * to_sum_in_c, noise_multiplier=engine.noise_multiplier,
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
                        mechanism="dp-sgd")


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
