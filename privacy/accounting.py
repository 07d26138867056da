"""Privacy accounting for the (Poisson-)subsampled Gaussian mechanism, composed over steps.

Every DP method in privdiff releases the output of one Gaussian mechanism per step, each applied to
a Poisson sample of the data (rate ``q``) with noise ``noise_multiplier`` times the L2 sensitivity
(the clipping bound C). A run is therefore described by its *history*: a list of
``Segment(noise_multiplier, sample_rate, steps)``. A resumed run that changes settings simply adds a
segment, and every accountant here composes heterogeneous histories.

Accountants (all return an upper bound on ε, so the budget guard errs on the safe side):

==========  ===========================================================================================
``"prv"``   opacus' PRVAccountant (Gopi et al. 2021). The default: it reports ε and the budget guard
            uses it. Its error target is 0.01 absolute, tightened to 1% of ε when ε < 1.
``"pld"``   dp-accounting's PLDAccountant (pessimistic privacy-loss distributions, add/remove
            neighbours). Discretization interval 1e-3, tightened to ε/1000 when ε < 1: the rounding
            error grows with the number of compositions, so small ε need a finer grid.
``"rdp"``   opacus' RDPAccountant (Rényi DP, Mironov et al.): a looser upper bound, kept as an
            independent cross-check.
==========  ===========================================================================================

Without subsampling (``sample_rate=1``) one step is the plain Gaussian mechanism, whose ε is known in
closed form up to a 1-D root (Balle & Wang 2018): see ``analytic_gaussian_epsilon``.

Adjacency (which datasets count as neighbours) is part of every guarantee: ``"add-remove"`` (one
unit added or removed; opacus' and dp-accounting's default, and what every accountant here computes)
or ``"replace-one"`` (one unit replaced by another, so the clipped sum may move by 2C). Replace-one
is accounted by dp-accounting's PLD only (``NeighboringRelation.REPLACE_ONE``, exact for the Poisson
subsampled Gaussian); without subsampling it is the analytic Gaussian at half the noise multiplier.

opacus and dp_accounting are imported inside the functions that need them, so importing this module
(and ``privdiff.privacy``) stays cheap.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import warnings
from typing import Iterable, NamedTuple, Sequence

__all__ = [
    "ACCOUNTANTS",
    "ADJACENCIES",
    "Accountant",
    "Segment",
    "analytic_gaussian_delta",
    "analytic_gaussian_epsilon",
    "analytic_gaussian_sigma",
    "calibrate_noise_multiplier",
    "check_adjacency",
    "check_delta",
    "check_epsilon",
    "default_accountant",
    "delta_for",
    "epsilon",
    "gaussian_aggregate_epsilon",
    "history_epsilon",
]

ACCOUNTANTS = ("prv", "rdp", "pld")
ADJACENCIES = ("add-remove", "replace-one")

# PLD grid: 1e-3 is accurate to ~0.01 for ε >= 1 and cheap; small ε get ε/1000 (floored).
PLD_DISCRETIZATION = 1e-3
PLD_MIN_DISCRETIZATION = 1e-5
# PRV error target: opacus' default 0.01, tightened to 1% of ε below ε = 1 (floored).
PRV_EPS_ERROR = 1e-2
PRV_MIN_EPS_ERROR = 1e-4
# Calibration gives up above this σ (opacus uses the same ceiling).
MAX_NOISE_MULTIPLIER = 1e6

_JSON_FORMAT = "privdiff-accountant"
_JSON_VERSION = 2  # 2 added the adjacency; version 1 states were all add-remove


class Segment(NamedTuple):
    """``steps`` consecutive steps with the same noise multiplier and sample rate.

    A plain tuple underneath, in the same order as opacus' accountant history.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int


# --------------------------------------------------------------------------------------------- checks



def opacus_without_root_handler() -> None:
    """Import opacus once, taking back the handler it puts on the root logger: opacus.utils.module_utils
    calls logging.basicConfig on import, so every later log line of every library in the process
    (Flower's, diffusers') would print twice, once with a timestamp."""
    import logging
    import sys

    if "opacus" in sys.modules:
        return
    before = list(logging.root.handlers)
    import opacus  # noqa: F401

    for handler in logging.root.handlers[:]:
        if handler not in before:
            logging.root.removeHandler(handler)

def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is not known; use one of {', '.join(map(repr, ACCOUNTANTS))}")
    return accountant


def check_adjacency(adjacency: str, *, accountant: str | None = None) -> str:
    """Check a neighbouring relation (and that ``accountant`` can account for it); return it."""
    if adjacency not in ADJACENCIES:
        raise ValueError(f"adjacency={adjacency!r} is not known; use 'add-remove' (one unit added or removed) or "
                         "'replace-one' (one unit replaced by another)")
    if adjacency == "replace-one" and accountant is not None and accountant != "pld":
        raise ValueError(f"adjacency='replace-one' is accounted by dp-accounting's PLD only; use accountant='pld', "
                         f"not {accountant!r}")
    return adjacency


def default_accountant(adjacency: str) -> str:
    """The accountant privdiff uses for a relation: opacus' PRV for add-remove, PLD for replace-one."""
    return "pld" if check_adjacency(adjacency) == "replace-one" else "prv"


def _is_real(value) -> bool:
    # numbers.Real covers numpy scalars; bool is an int but never a sensible rate or noise level.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_delta_range(delta) -> float:
    if not _is_real(delta) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta={delta!r} must be a number strictly between 0 and 1, e.g. 1e-5 (below 1/N for N examples)")
    return float(delta)


def _check_noise_multiplier(noise_multiplier) -> float:
    if not _is_real(noise_multiplier) or not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(
            f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0 "
            "(the noise standard deviation divided by the clipping bound)"
        )
    return float(noise_multiplier)


def _check_sample_rate(sample_rate) -> float:
    if not _is_real(sample_rate) or not 0.0 < float(sample_rate) <= 1.0:
        raise ValueError(
            f"sample_rate={sample_rate!r} must be in (0, 1]: the Poisson sampling rate, batch size / number of "
            "examples (1 for no subsampling)"
        )
    return float(sample_rate)


def _check_steps(steps, name: str = "steps") -> int:
    # Floats are refused (no __index__) to catch epochs or 1e3 passed where a step count belongs.
    if isinstance(steps, bool) or not hasattr(steps, "__index__") or int(steps) < 1:
        raise ValueError(f"{name}={steps!r} must be an integer >= 1 (the number of noisy steps)")
    return int(steps)


def _as_segment(item) -> Segment:
    try:
        noise_multiplier, sample_rate, steps = item
    except (TypeError, ValueError):
        raise ValueError(
            f"history entry {item!r} must be a (noise_multiplier, sample_rate, steps) triple"
        ) from None
    return Segment(_check_noise_multiplier(noise_multiplier), _check_sample_rate(sample_rate), _check_steps(steps))


def _as_history(history: Iterable) -> list[Segment]:
    if isinstance(history, Accountant):
        return list(history.history)
    if isinstance(history, (str, bytes)) or not isinstance(history, Iterable):
        raise ValueError(f"history={history!r} must be a list of (noise_multiplier, sample_rate, steps) triples")
    return [_as_segment(item) for item in history]


def check_delta(*, delta: float, num_examples: int) -> float:
    """Check the usual rule δ < 1/N and return ``delta`` as a float.

    δ >= 1/N allows a mechanism that publishes one random example outright, so such a δ means nothing.
    """
    if isinstance(num_examples, bool) or not hasattr(num_examples, "__index__") or int(num_examples) < 1:
        raise ValueError(f"num_examples={num_examples!r} must be an integer >= 1 (the size of the private set)")
    n = int(num_examples)
    delta = _check_delta_range(delta)
    if delta >= 1.0 / n:
        raise ValueError(
            f"delta={delta!r} is not below 1/num_examples = 1/{n} = {1.0 / n:.3g}: pick delta below 1/N, "
            f"e.g. 1/(10N) = {0.1 / n:.3g}"
        )
    return delta


def check_epsilon(*, epsilon: float) -> float:
    """Check that a target ε is a finite number > 0 and return it as a float."""
    if not _is_real(epsilon) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon={epsilon!r} must be a finite number > 0, e.g. 1 or 10")
    return float(epsilon)


# ------------------------------------------------------------------------------ analytic Gaussian


def analytic_gaussian_delta(*, noise_multiplier: float, epsilon: float) -> float:
    """δ(ε) of one Gaussian mechanism with noise σ = ``noise_multiplier`` × sensitivity (exact).

    Balle & Wang 2018, Theorem 8: δ = Φ(1/(2σ) - εσ) - e^ε Φ(-1/(2σ) - εσ).
    """
    from scipy.stats import norm

    sigma = _check_noise_multiplier(noise_multiplier)
    if not _is_real(epsilon) or math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon={epsilon!r} must be a number >= 0")
    if sigma == 0:
        return 1.0
    if math.isinf(epsilon):
        return 0.0
    # e^ε Φ(b) in log space: e^ε overflows long before the product underflows.
    a = norm.cdf(0.5 / sigma - epsilon * sigma)
    b = math.exp(epsilon + norm.logcdf(-0.5 / sigma - epsilon * sigma))
    return float(max(a - b, 0.0))


def analytic_gaussian_epsilon(*, noise_multiplier: float, delta: float) -> float:
    """The smallest ε for which one Gaussian mechanism with this noise is (ε, δ)-DP.

    Bisection on the exact δ(ε) of ``analytic_gaussian_delta``; returns the upper end of the final
    bracket, so the result never understates ε. ``noise_multiplier=0`` gives ``inf``.
    Several Gaussian steps without subsampling compose to one with σ_eff = (Σ 1/σ_i²)^(-1/2).
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    delta = _check_delta_range(delta)
    if sigma == 0:
        return math.inf
    if analytic_gaussian_delta(noise_multiplier=sigma, epsilon=0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while analytic_gaussian_delta(noise_multiplier=sigma, epsilon=hi) > delta:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if analytic_gaussian_delta(noise_multiplier=sigma, epsilon=mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(hi, 1.0):
            break
    return hi


def analytic_gaussian_sigma(*, epsilon: float, delta: float) -> float:
    """The smallest noise multiplier for which one Gaussian mechanism is (ε, δ)-DP (Balle & Wang 2018).

    Returns the upper end of the bisection bracket, so the σ returned always meets (ε, δ).
    """
    epsilon = check_epsilon(epsilon=epsilon)
    delta = _check_delta_range(delta)
    lo, hi = 0.0, 1.0
    while analytic_gaussian_delta(noise_multiplier=hi, epsilon=epsilon) > delta:
        lo, hi = hi, 2.0 * hi
        if hi > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier below {MAX_NOISE_MULTIPLIER:g} reaches epsilon={epsilon}, delta={delta}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if analytic_gaussian_delta(noise_multiplier=mid, epsilon=epsilon) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


# --------------------------------------------------------------------------------- accountants


def _prv_epsilon(history: list[Segment], delta: float) -> float:
    import numpy as np
    opacus_without_root_handler()
    from opacus.accountants import PRVAccountant

    def run(eps_error: float) -> float:
        acc = PRVAccountant()
        acc.history = [tuple(s) for s in history]
        # q = 1 makes log(1 - q) = -inf inside opacus' PRV, which is the intended limit; and its
        # domain search warns about RDP orders, which says nothing about the PRV result.
        with np.errstate(divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(acc.get_epsilon(delta=delta, eps_error=eps_error))

    eps = run(PRV_EPS_ERROR)
    if eps < 1.0:
        # 0.01 absolute is a large relative error for small ε; 1% of ε costs little there.
        eps = run(max(PRV_MIN_EPS_ERROR, PRV_EPS_ERROR * eps))
    return eps


def _rdp_epsilon(history: list[Segment], delta: float) -> float:
    opacus_without_root_handler()
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [tuple(s) for s in history]
    with warnings.catch_warnings():
        # "optimal order is the largest alpha": the bound is still valid, only looser.
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def _pld_accountant(history: list[Segment], discretization: float, adjacency: str = "add-remove"):
    import dp_accounting
    from dp_accounting import pld

    events = []
    for s in history:
        event = dp_accounting.GaussianDpEvent(s.noise_multiplier)
        if s.sample_rate < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(s.sample_rate, event)
        events.append(dp_accounting.SelfComposedDpEvent(event, s.steps))
    relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if adjacency == "replace-one"
                else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc = pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=discretization)
    acc.compose(events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events))
    return acc


def _pld_epsilon(history: list[Segment], delta: float, adjacency: str = "add-remove") -> float:
    eps = float(_pld_accountant(history, PLD_DISCRETIZATION, adjacency).get_epsilon(delta))
    if eps < 1.0:
        # Rounding error accumulates over compositions; a grid of ε/1000 keeps it near 1% for small ε.
        eps = float(_pld_accountant(history, max(PLD_MIN_DISCRETIZATION, PLD_DISCRETIZATION * eps),
                                    adjacency).get_epsilon(delta))
    return eps


_EPSILON_FNS = {"prv": _prv_epsilon, "rdp": _rdp_epsilon, "pld": _pld_epsilon}


def history_epsilon(*, history: Sequence, delta: float, accountant: str = "prv",
                    adjacency: str = "add-remove") -> float:
    """ε spent by a (possibly heterogeneous) history of ``(noise_multiplier, sample_rate, steps)`` segments.

    ``history`` may also be an ``Accountant``. An empty history gives 0; any segment with
    ``noise_multiplier=0`` gives ``inf`` (it publishes unnoised sums). ``adjacency='replace-one'``
    needs ``accountant='pld'``.
    """
    accountant = _check_accountant(accountant)
    check_adjacency(adjacency, accountant=accountant)
    delta = _check_delta_range(delta)
    segments = _as_history(history)
    if not segments:
        return 0.0
    if any(s.noise_multiplier == 0 for s in segments):
        return math.inf
    if adjacency == "replace-one":
        return _pld_epsilon(segments, delta, adjacency)
    return _EPSILON_FNS[accountant](segments, delta)


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv",
            adjacency: str = "add-remove") -> float:
    """ε after ``steps`` steps of the Poisson-subsampled Gaussian mechanism (an upper bound)."""
    segment = _as_segment((noise_multiplier, sample_rate, steps))
    return history_epsilon(history=[segment], delta=delta, accountant=accountant, adjacency=adjacency)


def delta_for(*, epsilon: float, noise_multiplier: float, sample_rate: float, steps: int, accountant: str = "pld",
              adjacency: str = "add-remove") -> float:
    """δ at a given ε after ``steps`` subsampled Gaussian steps (PLD only: the one accountant with an exact, cheap δ(ε))."""
    if accountant != "pld":
        raise ValueError(f"delta_for supports accountant='pld' only, not {accountant!r}; use epsilon() to compare accountants")
    if not _is_real(epsilon) or math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon={epsilon!r} must be a number >= 0")
    check_adjacency(adjacency)
    segment = _as_segment((noise_multiplier, sample_rate, steps))
    if segment.noise_multiplier == 0:
        return 1.0
    return float(_pld_accountant([segment], PLD_DISCRETIZATION, adjacency).get_delta(float(epsilon)))


def gaussian_aggregate_epsilon(*, noise_multiplier: float, sample_rate: float, delta: float, accountant: str = "pld",
                               adjacency: str = "add-remove") -> float:
    """ε of one noisy (optionally Poisson-subsampled) sum or average, as released by DPAgg-TI.

    ``noise_multiplier`` is the noise standard deviation divided by each unit's bound C (the clip
    norm). With ``sample_rate=1`` the release is the plain Gaussian mechanism and ε comes from the
    analytic formula (exact; replace-one moves the sum by up to 2C, so it halves the multiplier);
    otherwise from dp-accounting's PLD under ``adjacency`` (exact up to its grid).
    """
    check_adjacency(adjacency)
    segment = _as_segment((noise_multiplier, sample_rate, 1))
    if segment.sample_rate == 1.0:
        factor = 2.0 if adjacency == "replace-one" else 1.0
        return analytic_gaussian_epsilon(noise_multiplier=segment.noise_multiplier / factor, delta=delta)
    return history_epsilon(history=[segment], delta=delta, accountant="pld" if adjacency == "replace-one" else accountant,
                           adjacency=adjacency)


# --------------------------------------------------------------------------------- calibration


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    tolerance: float = 0.01,
    adjacency: str = "add-remove",
) -> float:
    """The smallest noise multiplier σ (within ``tolerance``) whose ε after ``steps`` steps is <= ``target_epsilon``.

    Bisection on σ. The σ returned was checked with the same accountant, so its ε never exceeds the
    target; ``tolerance`` is relative: the search stops once ε(σ) >= target × (1 - tolerance).
    """
    target = check_epsilon(epsilon=target_epsilon)
    delta = _check_delta_range(delta)
    q = _check_sample_rate(sample_rate)
    steps = _check_steps(steps)
    _check_accountant(accountant)
    check_adjacency(adjacency, accountant=accountant)
    if not _is_real(tolerance) or not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance={tolerance!r} must be in (0, 1), e.g. 0.01 (1% below the target epsilon)")
    # A pure function of its arguments that can take seconds (a resumed run, each federated round and
    # each test calibrate the same plan again): computed once per process.
    return _calibrated(target, delta, q, steps, accountant, float(tolerance), adjacency)


@functools.lru_cache(maxsize=256)
def _calibrated(target: float, delta: float, q: float, steps: int, accountant: str, tolerance: float,
                adjacency: str) -> float:

    def eps_fn(name: str):
        return lambda sigma: history_epsilon(history=[Segment(sigma, q, steps)], delta=delta, accountant=name,
                                             adjacency=adjacency)

    start, factor = 1.0, 2.0
    if accountant != "rdp" and adjacency == "add-remove":
        # Start where the cheap RDP bound (an upper bound, within ~10% of PRV/PLD for ε >= 1) meets the
        # target: the slow accountants are then never evaluated far below the answer, where ε is huge
        # and PRV's grid can take gigabytes.
        try:
            start, factor = _calibrate(eps_fn("rdp"), target, 0.1, start=1.0, factor=2.0), 1.25
        except _Unreachable:
            pass  # RDP's floor (about log(1/δ)/62) is above the target; the tight accountants may still meet it
    try:
        return _calibrate(eps_fn(accountant), target, tolerance, start=start, factor=factor)
    except _Unreachable:
        hint = "; the 'rdp' bound cannot go below about log(1/delta)/62, so try accountant='prv' or 'pld'" if accountant == "rdp" else ""
        raise ValueError(
            f"target_epsilon={target!r} cannot be met with delta={delta!r}, sample_rate={q!r}, steps={steps!r}: "
            f"even noise_multiplier={MAX_NOISE_MULTIPLIER:g} exceeds it; raise target_epsilon or delta, "
            f"or lower sample_rate or steps{hint}"
        ) from None


class _Unreachable(ValueError):
    """No σ up to MAX_NOISE_MULTIPLIER meets the target (kept apart from accountants' own ValueErrors)."""


def _calibrate(eps_at, target: float, tolerance: float, *, start: float, factor: float) -> float:
    """Smallest σ with eps_at(σ) <= target, to relative ``tolerance`` in ε; ValueError if none below the ceiling."""
    # Bracket [lo, hi] with eps(lo) > target >= eps(hi), moving by ``factor`` from ``start``. Going
    # down stops at the first failure, so no evaluation runs far below the answer.
    hi, e_hi = start, eps_at(start)
    lo = None
    while e_hi > target:
        lo = hi
        hi *= factor
        if hi > MAX_NOISE_MULTIPLIER:
            raise _Unreachable("target cannot be met")
        e_hi = eps_at(hi)
    if lo is None:
        lo = hi
        while True:
            lo /= factor
            if lo < 1e-6:
                return hi  # unreachable in practice: ε grows without bound as σ -> 0
            e_lo = eps_at(lo)
            if e_lo > target:
                break
            hi, e_hi = lo, e_lo
    while e_hi < target * (1.0 - tolerance) and hi / lo > 1.0 + tolerance / 10.0:
        mid = math.sqrt(lo * hi)  # geometric: σ spans orders of magnitude across settings
        e_mid = eps_at(mid)
        if e_mid > target:
            lo = mid
        else:
            hi, e_hi = mid, e_mid
    return hi


# ---------------------------------------------------------------------------------- Accountant


class Accountant:
    """Bookkeeping of a run's steps, with ε on demand and JSON state for resumed runs.

    ``history`` is a list of ``Segment``s; consecutive steps with the same settings share a segment.
    The state is plain JSON (never pickle), so a resume checkpoint can carry it safely.
    """

    def __init__(self, *, accountant: str = "prv", history: Sequence = (), adjacency: str = "add-remove"):
        self.accountant = _check_accountant(accountant)
        self.adjacency = check_adjacency(adjacency, accountant=accountant)
        self.history: list[Segment] = []
        for segment in _as_history(history):
            self._append(segment)

    def _append(self, segment: Segment) -> None:
        if self.history and self.history[-1][:2] == segment[:2]:
            last = self.history[-1]
            self.history[-1] = Segment(last.noise_multiplier, last.sample_rate, last.steps + segment.steps)
        else:
            self.history.append(segment)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps with this noise multiplier and sample rate."""
        self._append(_as_segment((noise_multiplier, sample_rate, _check_steps(num_steps, "num_steps"))))

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.history)

    def epsilon(self, *, delta: float, accountant: str | None = None) -> float:
        """ε spent so far (with this accountant's method unless ``accountant`` names another)."""
        return history_epsilon(history=self.history, delta=delta, accountant=accountant or self.accountant,
                               adjacency=self.adjacency)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _JSON_FORMAT,
                "version": _JSON_VERSION,
                "accountant": self.accountant,
                "adjacency": self.adjacency,
                "history": [[s.noise_multiplier, s.sample_rate, s.steps] for s in self.history],
            },
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "Accountant":
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"accountant state is not valid JSON ({exc}); pass the string from Accountant.to_json()") from None
        if not isinstance(data, dict) or data.get("format") != _JSON_FORMAT:
            raise ValueError(f"accountant state has format {data.get('format') if isinstance(data, dict) else None!r}, "
                             f"expected {_JSON_FORMAT!r}; pass the string from Accountant.to_json()")
        if data.get("version") not in (1, _JSON_VERSION):
            raise ValueError(f"accountant state version {data.get('version')!r} is not supported (this privdiff reads "
                             f"versions 1 to {_JSON_VERSION}); upgrade privdiff")
        return cls(accountant=data.get("accountant"), history=data.get("history", []),
                   adjacency=data.get("adjacency", "add-remove"))

    def __eq__(self, other) -> bool:
        return isinstance(other, Accountant) and ((self.accountant, self.adjacency, self.history)
                                                  == (other.accountant, other.adjacency, other.history))

    def __repr__(self) -> str:
        return (f"Accountant(accountant={self.accountant!r}, adjacency={self.adjacency!r}, "
                f"history={[tuple(s) for s in self.history]!r})")
