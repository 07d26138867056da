"""Acceptance 3 of DP-TI: on privdiff-tiny and the `style` set (100 images), the non-private token
raises the style score well above the base model's; the ε = 1 DPAgg-TI token keeps >= 50% of that
gain, and DP-SGD TI at the same ε keeps less.

Slow (about 10 minutes on 2 CPU cores): python -m pytest -m slow tests/pipelines/test_dp_ti_style.py
The same study is `python bench/dp_ti_style.py --vae-ceiling` (bench/RESULTS.md). It fails today, and
cannot pass with the shipped privdiff-tiny: its frozen VAE does not carry the style's palette (real style
images score 1.0, after the VAE's round trip 0.004), so no token can make the model draw it.
"""

import pytest


@pytest.mark.slow
def test_dpagg_keeps_half_the_non_private_style_gain_and_dpsgd_keeps_less(tmp_path, load_bench):
    module = load_bench("dp_ti_style")
    figures = module.study(epsilon=1.0, workdir=tmp_path, **module.DEFAULTS)
    rows = figures["rows"]
    base = rows["base (initialiser word)"]["style_match"]
    gain = rows["non-private TI"]["style_match"] - base
    assert rows["DPAgg-TI ε=1"]["epsilon"] <= 1.0 and rows["DP-SGD TI ε=1"]["epsilon"] <= 1.0
    assert gain >= 0.2, f"the non-private token must raise the style score well above the base: {rows}"
    assert rows["DPAgg-TI ε=1"]["style_match"] - base >= 0.5 * gain, rows
    assert rows["DP-SGD TI ε=1"]["style_match"] < rows["DPAgg-TI ε=1"]["style_match"], rows
