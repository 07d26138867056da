"""Canary audit of DPAgg-TI's release: an empirical lower bound on ε from one call of `dp_ti.aggregate`.

m canary units join the per-unit embeddings, each included with probability 1/2 (Steinke, Nasr,
Jagielski 2023; the bound is `privacy.canary`'s). An included canary's embedding is
init + canary_norm·C·u_i, far outside the clip ball, so a correct `aggregate` cuts it to C·u_i; an
excluded one is the initializer itself, whose centred embedding is zero and adds nothing, so the
release's denominator q·n stays the same public number in both worlds. The release goes through the
real `aggregate` (looked up at call time, so a test can swap in a broken one), and each canary is
scored by the projection of the released noisy sum on its direction, the most powerful test for
one Gaussian release. The bound is compared with `gaussian_aggregate_epsilon` for the same σ, q, δ.
"""

from __future__ import annotations

import torch

from ..privacy.canary import (
    CanaryAudit,
    audit_scores,
    audit_streams,
    canary_directions,
    canary_inclusion,
    default_guesses,
    torch_generator,
)
from . import dp_ti

_REAL_DIM = 16  # the ordinary units' embeddings vary here, orthogonal to every canary direction


def audit_dpagg(*, epsilon: float | None = None, noise_multiplier: float | None = None, delta: float = 1e-5,
                clip: float = 0.5, sample_rate: float = 1.0, center: bool = True, num_canaries: int = 1000,
                num_units: int = 100, dim: int | None = None, canary_norm: float = 10.0, confidence: float = 0.99,
                seed: int = 0) -> CanaryAudit:
    """Audit one DPAgg release with m canaries among `num_units` ordinary units (add-remove adjacency).

    Give `epsilon` (σ is calibrated as DPAgg-TI does it) or `noise_multiplier`. Canary directions
    are orthonormal in `dim` (default m) embedding coordinates; the ordinary units vary in 16 more.
    """
    from ..privacy.accounting import check_delta, gaussian_aggregate_epsilon

    if (epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of epsilon (σ is calibrated) and noise_multiplier (σ is fixed).")
    if not canary_norm > 1:
        raise ValueError(f"canary_norm={canary_norm} must exceed 1 (a multiple of the clip C) so that clipping "
                         "matters; e.g. 10.")
    if not clip > 0:
        raise ValueError(f"clip={clip} must be positive.")
    if num_units < 1:
        raise ValueError(f"num_units={num_units} must be at least 1 (the release's ordinary units).")
    m, n, dim = num_canaries, num_units, dim or num_canaries
    check_delta(delta=delta, num_examples=n + m)
    sigma = (float(noise_multiplier) if noise_multiplier is not None
             else dp_ti.calibrate_aggregate_sigma(epsilon=epsilon, delta=delta, sample_rate=sample_rate))
    recorded = gaussian_aggregate_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, delta=delta)
    inclusion_stream, direction_stream, data_stream, noise_stream = audit_streams(seed=seed, count=4)
    included = canary_inclusion(num_canaries=m, stream=inclusion_stream)
    directions = canary_directions(num_canaries=m, dim=dim, generator=torch_generator(stream=direction_stream))
    data = torch_generator(stream=data_stream)
    init = torch.randn(1, dim + _REAL_DIM, generator=data, dtype=torch.float64)
    base = init if center else torch.zeros_like(init)
    # Ordinary units: offsets of about 2C (so they are clipped too) in the last 16 coordinates.
    ordinary = torch.randn(n, _REAL_DIM, generator=data, dtype=torch.float64) * (2 * clip / _REAL_DIM**0.5)
    canaries = directions * (canary_norm * clip) * torch.from_numpy(included).double()[:, None]
    offsets = torch.block_diag(canaries, ordinary)
    embeddings = (base + offsets)[:, None, :]  # [m + n, 1, d]: one vector per unit
    result = dp_ti.aggregate(embeddings=embeddings, init=init, clip=clip, noise_multiplier=sigma,
                             sample_rate=sample_rate, generator=torch_generator(stream=noise_stream), center=center)
    noisy_sum = (result.release.double().reshape(-1) - base.reshape(-1)) * (sample_rate * (n + m))
    scores = directions @ noisy_sum[:dim] / clip
    guesses = default_guesses(m)
    if sample_rate < 1:
        # A canary left out by the subsampling looks excluded: "included" guesses alone can be more precise.
        guesses += tuple((plus, 0) for plus, _ in guesses)
    return audit_scores(scores=scores.numpy(), included=included, delta=delta, confidence=confidence,
                        guesses=guesses, recorded_epsilon=recorded, mechanism="gaussian-aggregate")
