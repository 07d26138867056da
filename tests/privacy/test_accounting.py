"""Accountants agree with each other and with closed forms; calibration is safe and tight; state round-trips."""

import json
import math

import pytest

from privdiff.privacy.accounting import (
    Accountant,
    Segment,
    analytic_gaussian_delta,
    analytic_gaussian_epsilon,
    analytic_gaussian_sigma,
    calibrate_noise_multiplier,
    check_delta,
    check_epsilon,
    delta_for,
    epsilon,
    gaussian_aggregate_epsilon,
    history_epsilon,
)

DELTA = 1e-5
# (σ, q, steps): every σ meets every q once, steps alternate (a Latin square over the full grid
# σ in {0.6, 1, 2}, q in {0.001, 0.01, 0.1}, steps in {100, 1000}, kept small for a loaded CPU).
# ε spans about 0.05 to 25, which covers both refinement regimes (ε < 1 and ε >= 1).
GRID = [
    (0.6, 0.001, 1000), (0.6, 0.01, 100), (0.6, 0.1, 100),
    (1.0, 0.001, 100), (1.0, 0.01, 1000), (1.0, 0.1, 1000),
    (2.0, 0.001, 1000), (2.0, 0.01, 100), (2.0, 0.1, 1000),
]


@pytest.fixture(scope="module")
def grid_eps():
    return {
        (s, q, t): {
            acc: epsilon(noise_multiplier=s, sample_rate=q, steps=t, delta=DELTA, accountant=acc)
            for acc in ("prv", "pld", "rdp")
        }
        for s, q, t in GRID
    }


@pytest.mark.parametrize("setting", GRID, ids=lambda s: f"sigma{s[0]}-q{s[1]}-T{s[2]}")
def test_accountants_agree(grid_eps, setting):
    e = grid_eps[setting]
    # PRV and PLD are both near-exact numerical accountants: independent checks of each other.
    assert e["prv"] == pytest.approx(e["pld"], rel=0.05)
    # RDP is a looser upper bound: never (materially) below the tight value.
    assert e["rdp"] >= 0.95 * e["pld"]
    assert all(0 < v < math.inf for v in e.values())


def test_epsilon_known_values(grid_eps):
    # Spot values (PLD) guard against a silent change of relation or units in either library.
    assert grid_eps[(1.0, 0.01, 1000)]["pld"] == pytest.approx(1.83, abs=0.02)
    assert grid_eps[(2.0, 0.1, 1000)]["pld"] == pytest.approx(8.28, abs=0.05)
    # More noise, fewer steps or a lower rate always spend less.
    assert grid_eps[(2.0, 0.1, 1000)]["prv"] < grid_eps[(1.0, 0.1, 1000)]["prv"]
    assert grid_eps[(0.6, 0.01, 100)]["prv"] < grid_eps[(0.6, 0.1, 100)]["prv"]
    assert grid_eps[(2.0, 0.01, 100)]["pld"] < grid_eps[(2.0, 0.1, 1000)]["pld"]


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
def test_single_unsubsampled_step_matches_analytic_gaussian(sigma):
    exact = analytic_gaussian_epsilon(noise_multiplier=sigma, delta=DELTA)
    for acc in ("prv", "pld"):
        assert epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=DELTA, accountant=acc) == pytest.approx(exact, rel=0.05)
    assert epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=DELTA, accountant="rdp") >= exact
    assert gaussian_aggregate_epsilon(noise_multiplier=sigma, sample_rate=1.0, delta=DELTA) == exact


def test_analytic_gaussian_closed_form():
    # δ(ε) at the returned ε hits the target; σ and ε inverses of each other.
    eps = analytic_gaussian_epsilon(noise_multiplier=1.0, delta=DELTA)
    assert eps == pytest.approx(4.3772, abs=1e-3)
    assert analytic_gaussian_delta(noise_multiplier=1.0, epsilon=eps) == pytest.approx(DELTA, rel=1e-6)
    assert analytic_gaussian_delta(noise_multiplier=1.0, epsilon=eps) <= DELTA
    sigma = analytic_gaussian_sigma(epsilon=eps, delta=DELTA)
    assert sigma == pytest.approx(1.0, rel=1e-6)
    # Several unsubsampled steps compose to one Gaussian with σ/sqrt(T).
    composed = epsilon(noise_multiplier=3.0, sample_rate=1.0, steps=100, delta=DELTA, accountant="pld")
    assert composed == pytest.approx(analytic_gaussian_epsilon(noise_multiplier=0.3, delta=DELTA), rel=0.01)
    assert analytic_gaussian_epsilon(noise_multiplier=0.0, delta=DELTA) == math.inf
    # Huge noise: δ(0) already below the target.
    assert analytic_gaussian_epsilon(noise_multiplier=1e6, delta=0.1) == 0.0


def test_subsampled_aggregate_uses_accountant():
    e = gaussian_aggregate_epsilon(noise_multiplier=1.0, sample_rate=0.1, delta=DELTA)
    assert 0 < e < analytic_gaussian_epsilon(noise_multiplier=1.0, delta=DELTA)  # subsampling amplifies
    assert e == pytest.approx(epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=DELTA, accountant="prv"), rel=0.05)


def test_zero_noise_and_empty_history():
    for acc in ("prv", "pld", "rdp"):
        assert epsilon(noise_multiplier=0.0, sample_rate=0.01, steps=10, delta=DELTA, accountant=acc) == math.inf
        assert history_epsilon(history=[], delta=DELTA, accountant=acc) == 0.0
    assert delta_for(epsilon=5.0, noise_multiplier=0.0, sample_rate=0.1, steps=1) == 1.0


def test_heterogeneous_history():
    a, b = (1.0, 0.02, 300), (2.0, 0.05, 100)
    for acc in ("prv", "pld", "rdp"):
        both = history_epsilon(history=[a, b], delta=DELTA, accountant=acc)
        only_a = history_epsilon(history=[a], delta=DELTA, accountant=acc)
        only_b = history_epsilon(history=[b], delta=DELTA, accountant=acc)
        assert max(only_a, only_b) < both < only_a + only_b + 0.05
        # A split homogeneous history equals the unsplit one.
        split = history_epsilon(history=[(1.0, 0.02, 100), (1.0, 0.02, 200)], delta=DELTA, accountant=acc)
        assert split == pytest.approx(only_a, rel=0.01)
    prv = history_epsilon(history=[a, b], delta=DELTA, accountant="prv")
    pld = history_epsilon(history=[a, b], delta=DELTA, accountant="pld")
    assert prv == pytest.approx(pld, rel=0.05)


def test_delta_for_inverts_epsilon():
    e = epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=DELTA, accountant="pld")
    assert delta_for(epsilon=e, noise_multiplier=1.0, sample_rate=0.01, steps=1000) == pytest.approx(DELTA, rel=0.05)
    with pytest.raises(ValueError, match="accountant='pld' only"):
        delta_for(epsilon=1.0, noise_multiplier=1.0, sample_rate=0.01, steps=10, accountant="rdp")


@pytest.mark.parametrize(
    "target,q,steps,acc",
    [(1.0, 0.01, 1000, "prv"), (8.0, 0.05, 500, "pld"), (3.0, 0.004, 2000, "pld"), (1.0, 1.0, 1, "rdp"), (0.5, 0.02, 200, "pld")],
)
def test_calibration_is_safe_and_tight(target, q, steps, acc):
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=acc)
    assert epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant=acc) <= target
    assert epsilon(noise_multiplier=sigma * 0.97, sample_rate=q, steps=steps, delta=DELTA, accountant=acc) > target


def test_calibration_q1_matches_analytic_sigma():
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=DELTA, sample_rate=1.0, steps=1, accountant="pld")
    assert sigma == pytest.approx(analytic_gaussian_sigma(epsilon=2.0, delta=DELTA), rel=0.02)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_epsilon=0.0), r"epsilon=0\.0 must be a finite number > 0"),
        (dict(target_epsilon=-1.0), r"epsilon=-1\.0"),
        (dict(target_epsilon=math.inf), r"epsilon=inf"),
        (dict(delta=0.0), r"delta=0\.0 must be a number strictly between 0 and 1"),
        (dict(delta=1.0), r"delta=1\.0"),
        (dict(sample_rate=0.0), r"sample_rate=0\.0 must be in \(0, 1\]"),
        (dict(sample_rate=1.5), r"sample_rate=1\.5"),
        (dict(steps=0), r"steps=0 must be an integer >= 1"),
        (dict(steps=10.0), r"steps=10\.0 must be an integer"),
        (dict(accountant="gdp"), r"accountant='gdp' is not known; use one of 'prv', 'rdp', 'pld'"),
        (dict(tolerance=0.0), r"tolerance=0\.0 must be in \(0, 1\)"),
    ],
)
def test_calibration_rejects_bad_inputs(kwargs, match):
    args = dict(target_epsilon=1.0, delta=DELTA, sample_rate=0.01, steps=100, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**args)


def test_calibration_reports_unreachable_target():
    # RDP's bound has a floor near log(1/δ)/62 ≈ 0.19 here; the error says so and names the way out.
    with pytest.raises(ValueError, match=r"target_epsilon=0\.01 cannot be met with delta=1e-05.*try accountant='prv' or 'pld'"):
        calibrate_noise_multiplier(target_epsilon=0.01, delta=DELTA, sample_rate=0.01, steps=100, accountant="rdp")


def test_calibration_is_keyword_only():
    with pytest.raises(TypeError):
        calibrate_noise_multiplier(1.0, DELTA, 0.01, 100)  # noqa


def test_epsilon_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"noise_multiplier=-1\.0 must be a finite number >= 0"):
        epsilon(noise_multiplier=-1.0, sample_rate=0.1, steps=1, delta=DELTA)
    with pytest.raises(ValueError, match=r"noise_multiplier=nan"):
        epsilon(noise_multiplier=float("nan"), sample_rate=0.1, steps=1, delta=DELTA)
    with pytest.raises(ValueError, match=r"history entry \(1\.0, 0\.1\) must be a \(noise_multiplier, sample_rate, steps\) triple"):
        history_epsilon(history=[(1.0, 0.1)], delta=DELTA)
    with pytest.raises(ValueError, match=r"delta=2 must be"):
        analytic_gaussian_epsilon(noise_multiplier=1.0, delta=2)


def test_check_delta_and_epsilon():
    assert check_delta(delta=1e-5, num_examples=1000) == 1e-5
    with pytest.raises(ValueError, match=r"delta=0\.001 is not below 1/num_examples = 1/1000.*e\.g\. 1/\(10N\) = 0\.0001"):
        check_delta(delta=1e-3, num_examples=1000)
    with pytest.raises(ValueError, match=r"num_examples=0 must be an integer >= 1"):
        check_delta(delta=1e-5, num_examples=0)
    with pytest.raises(ValueError, match=r"delta=-0\.1"):
        check_delta(delta=-0.1, num_examples=10)
    assert check_epsilon(epsilon=3) == 3.0
    for bad in (0, -1.0, math.inf, math.nan, "1", True):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            check_epsilon(epsilon=bad)


def test_accountant_steps_merge_and_json_round_trip():
    acc = Accountant(accountant="pld")
    for _ in range(50):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=150)
    acc.step(noise_multiplier=1.5, sample_rate=0.02, num_steps=100)
    assert acc.history == [Segment(1.0, 0.01, 200), Segment(1.5, 0.02, 100)]
    assert acc.total_steps == 300

    text = acc.to_json()
    json.loads(text)  # plain JSON, no pickle
    restored = Accountant.from_json(text)
    assert restored == acc
    assert restored.epsilon(delta=DELTA) == acc.epsilon(delta=DELTA)
    assert restored.epsilon(delta=DELTA) == history_epsilon(history=acc.history, delta=DELTA, accountant="pld")
    # Resuming continues the same bookkeeping.
    restored.step(noise_multiplier=1.5, sample_rate=0.02, num_steps=10)
    assert restored.history[-1] == Segment(1.5, 0.02, 110)
    assert restored.epsilon(delta=DELTA) > acc.epsilon(delta=DELTA)
    # The default accountant is PRV; another can be asked for per call.
    assert Accountant().accountant == "prv"
    assert acc.epsilon(delta=DELTA, accountant="rdp") >= 0.95 * acc.epsilon(delta=DELTA)


def test_accountant_rejects_bad_state():
    with pytest.raises(ValueError, match="not valid JSON"):
        Accountant.from_json("{nope")
    with pytest.raises(ValueError, match="expected 'privdiff-accountant'"):
        Accountant.from_json(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="version 99 is not supported"):
        Accountant.from_json(json.dumps({"format": "privdiff-accountant", "version": 99}))
    bad = json.dumps({"format": "privdiff-accountant", "version": 1, "accountant": "prv", "history": [[1.0, 2.0, 5]]})
    with pytest.raises(ValueError, match=r"sample_rate=2\.0 must be in \(0, 1\]"):
        Accountant.from_json(bad)
    with pytest.raises(ValueError, match=r"num_steps=0 must be an integer >= 1"):
        Accountant().step(noise_multiplier=1.0, sample_rate=0.1, num_steps=0)
    with pytest.raises(ValueError, match="accountant='moments' is not known"):
        Accountant(accountant="moments")


def test_import_is_cheap():
    import subprocess
    import sys

    code = (
        "import sys, privdiff.privacy; "
        "heavy = [m for m in ('torch', 'opacus', 'dp_accounting', 'scipy', 'safetensors', 'numpy') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
