import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from privdiff.privacy.audit import loss_threshold_audit, roc_auc, tpr_at_fpr


@pytest.mark.parametrize("shift", [0.0, 0.5, 3.0])
def test_auc_matches_scikit_learn(shift):
    rng = np.random.default_rng(0)
    members = rng.normal(shift, 1, 300).round(1)  # rounding creates ties
    nonmembers = rng.normal(0, 1, 500).round(1)
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(500)], np.r_[members, nonmembers])
    assert roc_auc(member_scores=members, nonmember_scores=nonmembers) == pytest.approx(expected, abs=1e-12)


def test_tpr_at_low_fpr_matches_the_roc_curve():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(2, 1, 1000), rng.normal(0, 1, 1000)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(1000), np.zeros(1000)], np.r_[members, nonmembers])
    expected = tpr[fpr <= 0.01].max()
    assert tpr_at_fpr(member_scores=members, nonmember_scores=nonmembers, fpr=0.01) == pytest.approx(expected)


def test_loss_threshold_direction_and_chance():
    rng = np.random.default_rng(2)
    same = loss_threshold_audit(member_losses=rng.random(2000), nonmember_losses=rng.random(2000))
    assert abs(same.auc - 0.5) < 0.03 and same.tpr_at_1pct_fpr < 0.03
    leaky = loss_threshold_audit(member_losses=rng.random(500) * 0.5, nonmember_losses=0.5 + rng.random(500))
    assert leaky.auc == 1.0 and leaky.tpr_at_1pct_fpr == 1.0


def test_empty_sides_are_refused():
    with pytest.raises(ValueError, match="at least one member"):
        roc_auc(member_scores=[], nonmember_scores=[1.0])
