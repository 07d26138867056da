"""[14] Canary audit of the real DP-LDM fine-tune on a tiny model: canaries are clipped to C, a correct
run stays under its recorded ε, a broken one (noise cut 4x, clipping off) is caught, and the audit
writes only its labelled record and chart."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.pipelines.canary_audit import AUDIT_CHART, AUDIT_FILE, audit_dp_ldm, write_canary_audit
from privdiff.training.fine_tune import DPLDMConfig

# Full batches of 16 items in micro-batches of 16: every step has one pure data micro-batch, then
# canary-only ones (the layers run alone on stand-in inputs).
SMALL = dict(batch_size=16, num_items=16, physical_batch_size=16, secure_noise=False, clip_norm=0.01,
             learning_rate=1e-3, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/pipelines/conftest.py


def _base():
    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_each_canary_reaches_the_noisy_gradient_clipped_to_c_through_both_paths():
    # 12 items in micro-batches of 16: the first micro-batch mixes 12 data rows and 4 canaries (the
    # whole UNet runs, canary outputs cut after each trainable layer); the rest hold canaries alone.
    config = DPLDMConfig(epsilon=8.0, noise_multiplier=0.2, epochs=2.0, **{**SMALL, "batch_size": 12, "num_items": 12})
    result = audit_dp_ldm(base=_base(), data="shapes", config=config, num_canaries=256, score="sum")
    scores, included = result.scores, result.included
    steps = result.settings["steps"]
    assert steps == 2 and result.settings["sample_rate"] == 1.0
    # In units of C per step: an included canary adds exactly 1 (its gradient of 10·C clipped to C), an
    # excluded one 0, under noise of sd 0.2·sqrt(2) = 0.28 (and a little of the other canaries' signal).
    assert abs(scores[included].mean() - steps) < 0.1 and abs(scores[~included].mean()) < 0.1
    assert 0.25 < scores[included].std() < 0.4 and 0.25 < scores[~included].std() < 0.4
    mixed = np.arange(256) < 4  # canaries 0..3 rode in the mixed micro-batch
    assert np.all(np.abs(scores[mixed & included] - steps) < 1.2) and np.all(np.abs(scores[mixed & ~included]) < 1.2)


@pytest.fixture(scope="module")
def correct_audit():
    config = DPLDMConfig(epsilon=2.0, epochs=4.0, **SMALL)
    return audit_dp_ldm(base=_base(), data="shapes", config=config, num_canaries=500)


def test_a_correct_run_stays_under_its_recorded_epsilon(correct_audit):
    audit = correct_audit.audit
    assert audit.mechanism == "dp-ldm" and audit.bound == "fdp" and audit.confidence == 0.99  # full batches: GDP
    assert audit.recorded_epsilon == pytest.approx(2.0, rel=0.02) and audit.delta == 1e-5
    assert 0 < audit.epsilon_lower_bound <= audit.recorded_epsilon and not audit.exceeds_recorded
    # the Gaussian fit of the same run's summed projections: tighter, and below the recorded ε too
    assert audit.epsilon_lower_bound < audit.epsilon_estimate_gaussian_fit <= audit.recorded_epsilon
    assert not audit.fit_exceeds_recorded


def test_the_audit_writes_only_its_labelled_record_and_chart(correct_audit, tmp_path):
    path = write_canary_audit(result=correct_audit, out=tmp_path / "audit")
    assert path == tmp_path / "audit" / AUDIT_FILE
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == sorted([AUDIT_CHART, AUDIT_FILE])
    record = json.loads(path.read_text())
    assert record["kind"] == "canary audit" and "not a privacy guarantee" in record["label"]
    assert record["epsilon_lower_bound"] == correct_audit.audit.epsilon_lower_bound
    assert record["settings"]["num_canaries"] == 500 and record["settings"]["steps"] == 4
    assert "scores" not in json.dumps(record)  # the per-canary scores stay in memory
    assert Image.open(tmp_path / "audit" / AUDIT_CHART).size == (480, 300)


def test_noise_cut_fourfold_is_caught(monkeypatch):
    import privdiff.privacy.engine as engine

    real = engine.noisy_average
    monkeypatch.setattr(engine, "noisy_average",
                        lambda **kw: real(**{**kw, "noise_multiplier": kw["noise_multiplier"] / 4}))
    config = DPLDMConfig(epsilon=2.0, epochs=4.0, **SMALL)
    audit = audit_dp_ldm(base=_base(), data="shapes", config=config, num_canaries=500).audit
    assert audit.recorded_epsilon == pytest.approx(2.0, rel=0.02)  # the accountant still believes the full noise
    assert audit.exceeds_recorded and audit.epsilon_lower_bound > 2.0
    assert audit.fit_exceeds_recorded


def test_clipping_switched_off_is_caught(monkeypatch):
    from privdiff.privacy.clipping import GradSampleClipper

    real_init = GradSampleClipper.__init__

    def unclipped(self, *, module, max_grad_norm, **kwargs):
        real_init(self, module=module, max_grad_norm=max_grad_norm * 1e6, **kwargs)

    monkeypatch.setattr(GradSampleClipper, "__init__", unclipped)
    config = DPLDMConfig(epsilon=2.0, epochs=4.0, **SMALL)
    audit = audit_dp_ldm(base=_base(), data="shapes", config=config, num_canaries=500).audit
    assert audit.exceeds_recorded and audit.epsilon_lower_bound > 2.0


def test_a_subsampled_run_is_audited_with_the_sound_eps_delta_form():
    config = DPLDMConfig(epsilon=4.0, epochs=2.0, **{**SMALL, "batch_size": 8})
    audit = audit_dp_ldm(base=_base(), data="shapes", config=config, num_canaries=500).audit
    assert audit.bound == "fdp-eps-delta"  # Poisson batches are not GDP
    assert 0 < audit.epsilon_lower_bound <= audit.recorded_epsilon
    assert 0 < audit.epsilon_estimate_gaussian_fit <= audit.recorded_epsilon


@pytest.mark.parametrize(
    ("overrides", "kwargs", "message"),
    [
        (dict(epsilon=None), {}, "give epsilon"),
        (dict(delta=1e-2), {}, "2·m·δ <= 1"),
        ({}, dict(num_canaries=8), "at least 32"),
        ({}, dict(canary_norm=0.5), "must exceed 1"),
        ({}, dict(bound="nope"), "bound='nope'"),
        (dict(conditioning_words=("zebra",)), {}, "without conditioning_words"),
    ],
)
def test_bad_settings_are_refused_with_what_to_do(overrides, kwargs, message):
    config = DPLDMConfig(**{**dict(epsilon=2.0, epochs=1.0, **SMALL), **overrides})
    with pytest.raises(ValueError, match=message):
        audit_dp_ldm(base=_base(), data="shapes", config=config, **{"num_canaries": 64, **kwargs})


def test_pooled_runs_audit_every_canary_of_independent_runs_with_planned_guesses():
    """The many-run variant: each run trains its own copy of the base with its own canaries and noise;
    the audit pools them (m·runs canaries), with the one guess pair planned from the recorded ε."""
    from privdiff.privacy.canary import planned_guesses

    base = _base()
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    config = DPLDMConfig(epsilon=2.0, epochs=2.0, **SMALL)
    result = audit_dp_ldm(base=base, data="shapes", config=config, num_canaries=256, runs=2, guesses="planned")
    audit = result.audit
    assert audit.runs == 2 and audit.num_canaries == 512 and len(result.scores) == 512
    assert result.settings["runs"] == 2 and result.settings["guesses"] == "planned"
    plus, minus = planned_guesses(num_canaries=512, epsilon=audit.recorded_epsilon, delta=audit.delta)[0]
    assert (audit.guesses_included, audit.num_guesses) == (plus, plus + minus)
    assert audit.epsilon_lower_bound <= audit.recorded_epsilon
    # the two runs drew different canaries: their inclusion vectors differ
    assert not np.array_equal(result.included[:256], result.included[256:])
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())  # copies were trained
