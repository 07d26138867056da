"""Canary audit of DPAgg-TI's aggregation: below the accountant's ε when correct, above it when broken."""

import pytest

from privdiff.pipelines import dp_ti
from privdiff.pipelines.dpagg_canary import audit_dpagg
from privdiff.privacy.accounting import gaussian_aggregate_epsilon


@pytest.mark.parametrize("sample_rate, center", [(1.0, True), (0.5, True), (1.0, False)])
def test_correct_aggregation_stays_below_its_epsilon(sample_rate, center):
    audit = audit_dpagg(epsilon=2.0, delta=1e-5, sample_rate=sample_rate, center=center, num_canaries=1000, seed=0)
    sigma = dp_ti.calibrate_aggregate_sigma(epsilon=2.0, delta=1e-5, sample_rate=sample_rate)
    assert audit.recorded_epsilon == gaussian_aggregate_epsilon(noise_multiplier=sigma, sample_rate=sample_rate,
                                                                delta=1e-5) <= 2.0 + 1e-9
    assert audit.mechanism == "gaussian-aggregate" and audit.num_canaries == 1000
    assert 0 <= audit.epsilon_lower_bound <= audit.recorded_epsilon and not audit.exceeds_recorded
    assert audit.epsilon_estimate_gaussian_fit <= audit.recorded_epsilon  # the fit of the same noisy sum


def test_aggregation_with_a_quarter_of_the_noise_is_caught(monkeypatch):
    real = dp_ti.aggregate

    def quarter_noise(**kwargs):
        return real(**{**kwargs, "noise_multiplier": kwargs["noise_multiplier"] / 4})

    monkeypatch.setattr(dp_ti, "aggregate", quarter_noise)
    audit = audit_dpagg(epsilon=2.0, delta=1e-5, num_canaries=1000, seed=0)
    assert audit.exceeds_recorded and audit.epsilon_lower_bound > audit.recorded_epsilon + 0.4
    assert audit.fit_exceeds_recorded


def test_aggregation_without_clipping_is_caught(monkeypatch):
    real = dp_ti.aggregate

    def no_clipping(**kwargs):
        # The noise keeps its scale σ·C, but no embedding is cut to norm C.
        huge = 1e9
        return real(**{**kwargs, "clip": huge, "noise_multiplier": kwargs["noise_multiplier"] * kwargs["clip"] / huge})

    monkeypatch.setattr(dp_ti, "aggregate", no_clipping)
    audit = audit_dpagg(noise_multiplier=4.0, delta=1e-5, num_canaries=1000, seed=0)
    assert audit.recorded_epsilon < 1.0 < 2.0 < audit.epsilon_lower_bound


def test_same_seed_same_audit_and_clear_errors():
    assert audit_dpagg(epsilon=1.0, num_canaries=256, seed=4) == audit_dpagg(epsilon=1.0, num_canaries=256, seed=4)
    with pytest.raises(ValueError, match="exactly one of epsilon"):
        audit_dpagg(epsilon=1.0, noise_multiplier=2.0)
    with pytest.raises(ValueError, match="clipping"):
        audit_dpagg(epsilon=1.0, canary_norm=1.0)
    with pytest.raises(ValueError, match="below 1/N"):
        audit_dpagg(epsilon=1.0, delta=1e-2)
