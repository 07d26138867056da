"""Acceptance 6 of DP-LDM: on privdiff-tiny fine-tuned on digits, ε = 10 gains at least 20 points of
digit accuracy over the base model, and the membership-inference AUC at ε = 1 is at most 0.55.

Slow (about an hour on 2 CPU cores): python -m pytest -m slow tests/pipelines/test_dp_ldm_digits.py
The same study, with ε = 1, 10 and without DP, is `python bench/dp_ldm_digits.py` (bench/RESULTS.md).
"""

import pytest


@pytest.mark.slow
def test_epsilon_10_learns_digits_and_epsilon_1_resists_membership_inference(tmp_path, load_bench):
    module = load_bench("dp_ldm_digits")
    args = module.default_arguments()
    figures = module.study(epsilons=[1.0, 10.0], workdir=tmp_path, **args)
    rows = figures["rows"]
    assert rows["eps=10"]["epsilon"] <= 10.0 and rows["eps=1"]["epsilon"] <= 1.0
    assert rows["eps=10"]["digit_accuracy"] >= rows["base"]["digit_accuracy"] + 0.20, rows
    assert rows["eps=1"]["mia_auc"] <= 0.55, rows
