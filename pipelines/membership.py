"""Membership-inference audit of a fine-tuned model: do its losses tell members from non-members?

Members are the examples a run trained on; non-members are held-out examples of the same set (for
a procedural set: the items right after the training ones, same seed; for a folder: a second folder
the run never saw). Each example's score is the model's denoising loss averaged over fixed
timesteps with fixed noise, identical draws for every example, so only the image and caption differ.
The audit's numbers are computed on private data: they are not covered by ε and are not released
with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NOT_COVERED = "computed on private data (members' losses): NOT covered by the DP guarantee; do not publish"


@dataclass(frozen=True)
class MembershipAuditConfig:
    timesteps: tuple[int, ...] = (20, 50, 100, 200, 300, 500)  # low t carries the most membership signal
    noise_draws: int = 2  # noise samples per timestep
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.timesteps or any(t < 0 for t in self.timesteps):
            raise ValueError(f"timesteps={self.timesteps} must be a non-empty list of timesteps >= 0.")
        if self.noise_draws < 1 or self.batch_size < 1:
            raise ValueError("noise_draws and batch_size must be at least 1.")


def diffusion_losses(*, pipeline, dataset, indices, config: MembershipAuditConfig = MembershipAuditConfig()):
    """Per-example denoising loss (numpy, one per index) under identical timesteps and noise draws."""
    from ..training.diffusion import diffusion_losses as losses

    return losses(pipeline=pipeline, dataset=dataset, indices=indices, timesteps=config.timesteps,
                  noise_draws=config.noise_draws, batch_size=config.batch_size, seed=config.seed)


def audit_membership(
    *,
    pipeline,
    data,
    num_members: int,
    data_seed: int = 0,
    nonmember_data=None,
    num_nonmembers: int | None = None,
    config: MembershipAuditConfig = MembershipAuditConfig(),
):
    """Loss-threshold attack on `pipeline`: members are items 0..num_members-1 of `data` (as the
    training run loaded them with `data_seed`); non-members the next items, or `nonmember_data`
    (a folder, a procedural set's name, or a dataset object)."""
    from ..data import PROCEDURAL_DATASETS, load_dataset
    from ..privacy.audit import loss_threshold_audit

    resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    num_nonmembers = num_nonmembers or num_members
    if nonmember_data is None:
        if not (isinstance(data, str) and data in PROCEDURAL_DATASETS):
            raise ValueError("for a folder of private images, give --nonmember-data: a folder of held-out images "
                             "from the same source that the run never trained on.")
        try:
            dataset = load_dataset(data=data, resolution=resolution, seed=data_seed,
                                   num_items=num_members + num_nonmembers)
        except ValueError as error:
            raise ValueError(f"{num_members} members (--num-members) and {num_nonmembers} non-members take "
                             f"{num_members + num_nonmembers} items of {data!r}, which it cannot give: {error}") from None
        members, held_out = dataset, dataset
        nonmember_indices = range(num_members, num_members + num_nonmembers)
    else:
        if hasattr(data, "__getitem__") and not isinstance(data, (str, Path)):
            members = data  # a dataset object: its first num_members items trained the model
            num_members = min(num_members, len(members))
        else:
            members = load_dataset(data=data, resolution=resolution, seed=data_seed, num_items=num_members)
        if hasattr(nonmember_data, "__getitem__") and not isinstance(nonmember_data, (str, Path)):
            held_out = nonmember_data  # a dataset object, e.g. another split of a procedural set
            num_nonmembers = min(num_nonmembers, len(held_out))
        else:
            held_out = load_dataset(data=nonmember_data, resolution=resolution, seed=data_seed,
                                    num_items=num_nonmembers)
        nonmember_indices = range(num_nonmembers)
    member_losses = diffusion_losses(pipeline=pipeline, dataset=members, indices=range(num_members), config=config)
    nonmember_losses = diffusion_losses(pipeline=pipeline, dataset=held_out, indices=nonmember_indices, config=config)
    return loss_threshold_audit(member_losses=member_losses, nonmember_losses=nonmember_losses)


def write_audit(*, result, out: str | Path, settings: dict) -> Path:
    """The audit's figures as `membership-audit.not-covered-by-dp.json`, labelled as computed on private data."""
    from ..privacy.record import write_byproduct_report

    return write_byproduct_report(folder=out, name="membership-audit", why=NOT_COVERED,
                                  data={**result.to_dict(), "settings": settings})
