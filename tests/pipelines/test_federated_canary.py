"""[14] Canary audit of client-level DP in federated diffusion, through Flower's own clipping mod,
DP strategy and noise: canaries reach the noisy sum clipped to C under noise z·C, a correct run stays
under its recorded ε, and broken ones are caught: noise cut 4x and clipping off (test-only breaks of
Flower's own functions), and clients that time out (a real configuration, which privdiff records as
if every client had replied)."""

import json

import numpy as np
import pytest

pytest.importorskip("flwr", reason="federated diffusion needs Flower: pip install 'privdiff[federated]'")

import flwr.clientapp.mod.centraldp_mods as centraldp_mods  # noqa: E402

from privdiff.federated.fedavg import FederatedConfig  # noqa: E402
from privdiff.pipelines.canary_audit import AUDIT_FILE, write_canary_audit  # noqa: E402
from privdiff.pipelines.federated_canary import audit_client_level_dp  # noqa: E402

Z, ROUNDS, CLIENTS, CANARIES = 2.0, 2, 3, 1000
# Recorded ε about 2.95 at δ = 1e-5 (two Gaussian rounds of z = 2, no sampling).
CONFIG = FederatedConfig(num_items=16, heldout_items=1, num_clients=CLIENTS, rounds=ROUNDS, batch_size=8,
                         learning_rate=1e-3, client_noise_multiplier=Z, client_clip_norm=0.1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/pipelines/conftest.py


def stand_in_audit(**kwargs):
    return audit_client_level_dp(**{"config": CONFIG, "num_canaries": CANARIES, "real_clients": "stand-in",
                                    "seed": 0, **kwargs})


@pytest.fixture(scope="module")
def correct_audit():
    return stand_in_audit()


def test_each_canary_reaches_the_noisy_sum_clipped_to_c_under_noise_z_c(correct_audit):
    scores, included = correct_audit.scores, correct_audit.included
    # In units of C on the sum, per round: an included canary adds 1 (its 10·C cut to C by Flower's mod),
    # an excluded one 0.001, under noise of sd z: Flower's z·C/N on the mean of N = 1,003 replies.
    assert abs(scores[included].mean() - ROUNDS) < 0.3 and abs(scores[~included].mean()) < 0.3
    expected_sd = Z * ROUNDS**0.5
    assert 0.9 < scores[included].std() / expected_sd < 1.1 and 0.9 < scores[~included].std() / expected_sd < 1.1
    settings = correct_audit.settings
    assert settings["num_sampled_clients"] == settings["replies_per_round"] == CLIENTS + CANARIES
    assert settings["values"] == 8 * CANARIES and settings["real_clients"] == "stand-in"


def test_a_correct_mechanism_stays_under_its_recorded_epsilon(correct_audit):
    audit = correct_audit.audit
    assert audit.mechanism == "dp-fedavg" and audit.bound == "fdp" and audit.confidence == 0.99
    assert audit.recorded_epsilon == CONFIG.client_level_epsilon() == pytest.approx(2.95, abs=0.05)
    assert audit.delta == CONFIG.client_level_delta == 1e-5 and audit.num_canaries == CANARIES
    assert 0 < audit.epsilon_lower_bound <= audit.recorded_epsilon and not audit.exceeds_recorded
    assert max(audit.epsilon_lower_bound_eps_delta, audit.epsilon_lower_bound_fdp_eps_delta) <= audit.recorded_epsilon
    assert audit.epsilon_lower_bound < audit.epsilon_estimate_gaussian_fit <= audit.recorded_epsilon  # the fit


def test_the_record_is_labelled_as_an_audit(correct_audit, tmp_path):
    path = write_canary_audit(result=correct_audit, out=tmp_path)
    assert path == tmp_path / AUDIT_FILE
    record = json.loads(path.read_text())
    assert record["kind"] == "canary audit" and "not a privacy guarantee" in record["label"]
    assert record["mechanism"] == "dp-fedavg" and record["settings"]["method"] == "dp-fedavg"
    assert "DifferentialPrivacyClientSideFixedClipping" in record["settings"]["flower_path"]


def test_noise_cut_fourfold_is_caught(monkeypatch):
    from privdiff.federated import client_dp

    real = client_dp.add_private_noise  # where the ServerApp's wrapper draws its noise
    monkeypatch.setattr(client_dp, "add_private_noise", lambda arrays, *, std, generator=None:
                        real(arrays, std=std / 4, generator=generator))
    audit = stand_in_audit().audit
    assert audit.recorded_epsilon == pytest.approx(2.95, abs=0.05)  # the record still believes the full noise
    assert audit.exceeds_recorded and audit.epsilon_lower_bound > 4.0
    assert audit.epsilon_lower_bound_eps_delta > audit.recorded_epsilon  # the assumption-free test refutes it too
    assert audit.fit_exceeds_recorded


def test_clipping_switched_off_is_caught(monkeypatch):
    # Flower's fixedclipping_mod then sends every update as it is: a canary's 10·C reaches the sum.
    monkeypatch.setattr(centraldp_mods, "compute_clip_model_update", lambda **kwargs: None)
    audit = stand_in_audit().audit
    assert audit.exceeds_recorded and audit.epsilon_lower_bound > 5.0
    assert audit.epsilon_lower_bound_eps_delta > audit.recorded_epsilon


def test_the_audit_catches_flowers_wrapper_averaging_timed_out_clients_away():
    # A real weak spot of Flower's DP wrapper, no monkeypatch: configured for 4N clients of which N reply,
    # Flower warns, averages the N and adds z·C/(4N) to the mean, so the sum gets z·C/4 while the record
    # says z. The audit builds the bare wrapper, so it sees it; privdiff's ServerApp refuses such a round
    # (`apps.check_replies`, tests/federated/test_fedavg.py).
    result = stand_in_audit(dropouts=3 * (CLIENTS + CANARIES))
    assert result.settings["num_sampled_clients"] == 4 * result.settings["replies_per_round"]
    assert result.audit.exceeds_recorded and result.audit.epsilon_lower_bound_eps_delta > result.audit.recorded_epsilon


def test_real_clients_train_with_privdiffs_client_app(monkeypatch):
    from privdiff.federated import apps

    calls = []
    real = apps.train_round

    def counted(**kwargs):
        calls.append((kwargs["client"], kwargs["round_number"]))
        return real(**kwargs)

    monkeypatch.setattr(apps, "train_round", counted)
    config = FederatedConfig(num_items=16, heldout_items=1, num_clients=2, rounds=2, batch_size=8, learning_rate=1e-3,
                             client_noise_multiplier=1.0, client_clip_norm=0.1)
    result = audit_client_level_dp(config=config, num_canaries=64, seed=0)
    assert sorted(calls) == [(0, 1), (0, 2), (1, 1), (1, 2)]  # each real client trained in each round
    assert result.settings["trainable"] == "attention" and result.settings["values"] > 100_000
    scores, included = result.scores, result.included
    assert abs(scores[included].mean() - 2) < 1.0 and abs(scores[~included].mean()) < 1.0  # sd of a mean: 0.25
    audit = result.audit
    assert audit.recorded_epsilon == config.client_level_epsilon()
    assert 0 <= audit.epsilon_lower_bound <= audit.recorded_epsilon


def test_same_seed_same_audit_and_numpys_generator_left_as_it_was():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first, again = stand_in_audit(num_canaries=64), stand_in_audit(num_canaries=64)
    assert np.array_equal(np.random.get_state()[1], before)
    assert first.audit == again.audit and np.array_equal(first.scores, again.scores)
    assert not np.array_equal(first.scores, stand_in_audit(num_canaries=64, seed=1).scores)


@pytest.mark.parametrize(
    ("overrides", "kwargs", "message"),
    [
        (dict(client_noise_multiplier=None), {}, "client_noise_multiplier"),
        (dict(secure_aggregation=True), {}, "secure_aggregation=False"),
        (dict(client_delta=1e-3), {}, "2·m·δ <= 1"),
        ({}, dict(num_canaries=8), "at least 32"),
        ({}, dict(canary_norm=1.0), "must exceed 1"),
        ({}, dict(real_clients="fake"), "real_clients='fake'"),
        ({}, dict(dropouts=-1), "dropouts=-1"),
        ({}, dict(bound="nope"), "bound='nope'"),
    ],
)
def test_bad_settings_are_refused_with_what_to_do(overrides, kwargs, message):
    config = FederatedConfig(**{**dict(num_items=16, heldout_items=1, num_clients=3, client_noise_multiplier=1.0),
                                **overrides})
    with pytest.raises(ValueError, match=message):
        audit_client_level_dp(config=config, **{"real_clients": "stand-in", **kwargs})


@pytest.mark.slow
def test_a_correct_run_with_real_clients_and_a_thousand_canaries_stays_under_epsilon():
    # The real trainer, privdiff-tiny's attention set (558,464 values) and 1,000 canaries: ~5 GB and ~5 minutes.
    config = FederatedConfig(num_items=48, heldout_items=1, num_clients=3, rounds=3, batch_size=8,
                             learning_rate=1e-3, client_noise_multiplier=1.0, client_clip_norm=0.1)
    audit = audit_client_level_dp(config=config, num_canaries=1000, seed=0).audit
    assert 0 < audit.epsilon_lower_bound <= audit.recorded_epsilon
