"""Membership-inference audit: can an attacker tell training members from held-out examples?

The loss-threshold attack (Yeom et al., 2018) scores each example by the model's loss on it (lower
loss -> more likely a member). Its success is reported as ROC AUC (0.5 = chance) and as the true
positive rate at a 1% false positive rate, the figure that matters for a few confidently exposed
members (Carlini et al., 2022). A DP guarantee bounds both: TPR <= e^ε FPR + δ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MembershipAuditResult:
    auc: float
    tpr_at_1pct_fpr: float
    num_members: int
    num_nonmembers: int

    def to_dict(self) -> dict:
        return {"auc": self.auc, "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
                "num_members": self.num_members, "num_nonmembers": self.num_nonmembers}

    def summary_lines(self) -> list[str]:
        return [f"membership inference (loss threshold) on {self.num_members} members vs {self.num_nonmembers} "
                "non-members",
                f"AUC {self.auc:.3f} (0.5: the attacker guesses; 1: it tells every member)",
                f"TPR at 1% FPR {self.tpr_at_1pct_fpr:.3f} (0.01: no better than chance)",
                "computed on private data: NOT covered by the DP guarantee; keep it with the private data"]


def roc_auc(*, member_scores, nonmember_scores) -> float:
    """P(member score > non-member score), ties counted half (the Mann-Whitney statistic)."""
    members = np.asarray(member_scores, dtype=np.float64)
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64)
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("an audit needs at least one member and one non-member.")
    scores = np.concatenate([members, nonmembers])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    member_rank_sum = ranks[: members.size].sum()
    return float((member_rank_sum - members.size * (members.size + 1) / 2) / (members.size * nonmembers.size))


def tpr_at_fpr(*, member_scores, nonmember_scores, fpr: float = 0.01) -> float:
    """Largest true-positive rate of a threshold whose false-positive rate is at most `fpr`."""
    members = np.asarray(member_scores, dtype=np.float64)
    nonmembers = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(fpr * nonmembers.size))
    # Threshold strictly above the (allowed+1)-th highest non-member score.
    threshold = nonmembers[allowed] if allowed < nonmembers.size else -np.inf
    return float((members > threshold).mean())


def loss_threshold_audit(*, member_losses, nonmember_losses) -> MembershipAuditResult:
    """Audit from per-example losses: the attack's score is the negated loss."""
    members = -np.asarray(member_losses, dtype=np.float64)
    nonmembers = -np.asarray(nonmember_losses, dtype=np.float64)
    return MembershipAuditResult(
        auc=roc_auc(member_scores=members, nonmember_scores=nonmembers),
        tpr_at_1pct_fpr=tpr_at_fpr(member_scores=members, nonmember_scores=nonmembers, fpr=0.01),
        num_members=int(members.size),
        num_nonmembers=int(nonmembers.size),
    )
