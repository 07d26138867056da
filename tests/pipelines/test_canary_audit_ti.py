"""[14] Canary audit of the real DP-SGD Textual Inversion run on a tiny model: canaries in the new token
rows are clipped to C, a correct run stays under its recorded ε, a broken one (noise cut 4x, clipping
off) is caught, and the audit leaves the pipeline as it found it."""

import pytest
import torch

from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.pipelines.canary_audit import audit_dpsgd_ti
from privdiff.pipelines.dp_ti import DPSGDTIConfig

# Full batches (q = 1) of 16 "style" items, 4 steps; 16 vectors of 64 numbers: 1,024 >= 500 canaries, so
# their directions are orthonormal. The engine's micro-batches of 64 put 16 data rows and 48 canaries
# through the whole model, then canaries alone (the rows layer runs on the placeholder ids).
SMALL = dict(token="<stripes>", init_word="circle", num_vectors=16, clip_norm=0.01, batch_size=16, num_items=16,
             secure_noise=False, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/pipelines/conftest.py


def _base():
    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _audit(**overrides):
    config = DPSGDTIConfig(**{**SMALL, "epsilon": 2.0, "epochs": 4.0, **overrides})
    return audit_dpsgd_ti(base=_base(), data="style", config=config, num_canaries=500).audit


def test_each_canary_reaches_the_noisy_gradient_clipped_to_c_through_both_paths(monkeypatch):
    import privdiff.privacy.engine as engine

    real = engine.noisy_average
    monkeypatch.setattr(engine, "noisy_average", lambda **kw: real(**{**kw, "noise_multiplier": 0.0}))
    # Two data items in micro-batches of 64: canaries 0..61 share the first pass with the data (the
    # text encoder and UNet run, the rows' output cut), the rest run alone. Without noise an included
    # canary adds exactly 1 per step (its 10·C clipped to C), an excluded one 0, plus the two data
    # gradients' small projection on its direction.
    pipe = _base()
    table = pipe.text_encoder.get_input_embeddings()
    config = DPSGDTIConfig(**{**SMALL, "num_vectors": 8, "batch_size": 2, "num_items": 2, "epsilon": 8.0,
                              "epochs": 2.0})
    result = audit_dpsgd_ti(base=pipe, data="style", config=config, num_canaries=256, score="sum")
    scores, included = result.scores, result.included
    steps = result.settings["steps"]
    assert steps == 2 and result.settings["sample_rate"] == 1.0 and result.settings["orthonormal_canaries"]
    assert abs(scores[included].mean() - steps) < 0.05 and abs(scores[~included].mean()) < 0.05
    assert scores[included].std() < 0.3 and scores[~included].std() < 0.3
    mixed = torch.arange(256).numpy() < 62
    assert abs(scores[mixed & included].mean() - steps) < 0.1 and abs(scores[mixed & ~included].mean()) < 0.1
    # The pipeline is as it was: its own token table, no placeholder in its tokenizer.
    assert pipe.text_encoder.get_input_embeddings() is table and "<stripes>" not in pipe.tokenizer.get_vocab()


def test_sdxl_canaries_span_the_rows_of_both_encoders_once_each(monkeypatch):
    import privdiff.privacy.engine as engine

    real = engine.noisy_average
    monkeypatch.setattr(engine, "noisy_average", lambda **kw: real(**{**kw, "noise_multiplier": 0.0}))
    pipe = tiny_pipeline(spec=TinySpec(family="sdxl"), seed=0)
    pipe.set_progress_bar_config(disable=True)
    # The template names the token twice: each canary's gradient is still planted once (10·C, clipped to C).
    config = DPSGDTIConfig(**{**SMALL, "num_vectors": 4, "batch_size": 2, "num_items": 2, "epsilon": 8.0,
                              "epochs": 2.0, "template": "{token} a picture in the style of {token}"})
    result = audit_dpsgd_ti(base=pipe, data="style", config=config, num_canaries=256, score="sum")
    scores, included = result.scores, result.included
    assert result.settings["canary_dim"] == 4 * (32 + 48)
    assert abs(scores[included].mean() - 2) < 0.05 and abs(scores[~included].mean()) < 0.05
    assert scores.std() < 1.1  # included at 2, excluded at 0, each within about 0.1


def test_a_correct_run_stays_under_its_recorded_epsilon():
    audit = _audit()
    assert audit.mechanism == "dpsgd-ti" and audit.bound == "fdp" and audit.confidence == 0.99  # full batches: GDP
    assert audit.recorded_epsilon == pytest.approx(2.0, rel=0.02) and audit.delta == 1e-5
    assert 0 < audit.epsilon_lower_bound <= audit.recorded_epsilon and not audit.exceeds_recorded
    assert 0 < audit.epsilon_estimate_gaussian_fit <= audit.recorded_epsilon and not audit.fit_exceeds_recorded


def test_noise_cut_fourfold_is_caught(monkeypatch):
    import privdiff.privacy.engine as engine

    real = engine.noisy_average
    monkeypatch.setattr(engine, "noisy_average",
                        lambda **kw: real(**{**kw, "noise_multiplier": kw["noise_multiplier"] / 4}))
    audit = _audit()
    assert audit.recorded_epsilon == pytest.approx(2.0, rel=0.02)  # the accountant still believes the full noise
    assert audit.exceeds_recorded and audit.epsilon_lower_bound > 2.0 and audit.fit_exceeds_recorded


def test_clipping_switched_off_is_caught(monkeypatch):
    from privdiff.privacy.clipping import GradSampleClipper

    real_init = GradSampleClipper.__init__

    def unclipped(self, *, module, max_grad_norm, **kwargs):
        real_init(self, module=module, max_grad_norm=max_grad_norm * 1e6, **kwargs)

    monkeypatch.setattr(GradSampleClipper, "__init__", unclipped)
    audit = _audit()
    assert audit.exceeds_recorded and audit.epsilon_lower_bound > 2.0


@pytest.mark.parametrize(
    ("overrides", "kwargs", "message"),
    [
        (dict(delta=1e-2), {}, "2·m·δ <= 1"),
        (dict(privacy_unit="subject"), {}, "privacy_unit='example'"),
        ({}, dict(num_canaries=8), "at least 32"),
        ({}, dict(canary_norm=0.5), "must exceed 1"),
        ({}, dict(bound="nope"), "bound='nope'"),
    ],
)
def test_bad_settings_are_refused_with_what_to_do(overrides, kwargs, message):
    config = DPSGDTIConfig(**{**SMALL, "epsilon": 2.0, "epochs": 1.0, **overrides})
    with pytest.raises(ValueError, match=message):
        audit_dpsgd_ti(base="tiny", data="style", config=config, **{"num_canaries": 64, **kwargs})


def test_canaries_crowded_into_fewer_numbers_than_canaries_are_flagged_with_the_fix():
    from privdiff.pipelines.canary_audit import CanaryAuditResult
    from privdiff.privacy.canary import CanaryAudit

    audit = CanaryAudit(epsilon_lower_bound=0.05, confidence=0.99, delta=1e-5, num_canaries=1000, num_guesses=32,
                        guesses_included=16, correct=20, recorded_epsilon=2.0, mechanism="dpsgd-ti")
    crowded = CanaryAuditResult(audit=audit, settings={"method": "dpsgd-ti", "canary_dim": 32}).summary_lines()
    assert len(crowded) == 3 and "1000 canaries share 32 trainable numbers" in crowded[2]
    assert "at least 1000 trainable numbers" in crowded[2]
    roomy = CanaryAuditResult(audit=audit, settings={"method": "dpsgd-ti", "canary_dim": 1024}).summary_lines()
    assert len(roomy) == 2
