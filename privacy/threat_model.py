"""The promises of THREAT_MODEL.md that code and tests read, kept in one place.

Split learning gives no ε: what it promises is measured by the attacks in `tests/adversary/`, for the
hardened default, as the best attack's PSNR margin over guessing the mean image (and the mean hint).
THREAT_MODEL.md states these numbers; a test checks that it states these very values.
"""

from __future__ import annotations

# The hardened default's settings, as SplitConfig() has them (a test checks they agree). They are the
# planner's choice for a 3 dB target (pipelines/split_plan.py, fitted to bench/RESULTS.md's frontier;
# a test checks that too): the largest k and the least σ_hint that keep both attacks within 3 dB.
SPLIT_DEFAULT_SETTINGS = {"mode": "hardened", "snr_bound": 0.014, "sigma_label": 1.0, "sigma_hint": 0.5,
                          "draws_per_image": 1}
# The target the default is planned for, and what every attack in tests/adversary stays within, over
# any number of linked epochs, with reconnects, resumes, a refused change of setting and a reordered
# folder in the run (PSNR against the VAE's own reconstruction; `circles` on privdiff-tiny 2).
SPLIT_DEFAULT_TARGET_DB = 3.0
SPLIT_DEFAULT_IMAGE_MARGIN_DB = SPLIT_DEFAULT_TARGET_DB
SPLIT_DEFAULT_HINT_MARGIN_DB = SPLIT_DEFAULT_TARGET_DB
SPLIT_DEFAULT_HINTS_PROTECTED = True


def split_promise(config) -> dict:
    """What the threat model promises for a split client's settings (recorded with the ControlNet)."""
    settings = {"mode": config.mode, "snr_bound": config.snr_bound, "sigma_label": config.sigma_label,
                "sigma_hint": config.sigma_hint, "draws_per_image": config.draws_per_image}
    if config.mode == "paper":
        return {"promise": "none: the reference design gives every image and hint away (measured above 40 dB)"}
    if settings == SPLIT_DEFAULT_SETTINGS:
        return {"promise": f"images and hints: the best attack within {SPLIT_DEFAULT_IMAGE_MARGIN_DB:g} dB PSNR of "
                           "the mean guess over any number of linked epochs",
                "image_margin_db": SPLIT_DEFAULT_IMAGE_MARGIN_DB, "hint_margin_db": SPLIT_DEFAULT_HINT_MARGIN_DB,
                "hints_protected": SPLIT_DEFAULT_HINTS_PROTECTED,
                "measured_by": "tests/adversary (privacy/THREAT_MODEL.md)"}
    return {"promise": "none stated for these settings: measure them with `privdiff split attack` (the planner's "
                       "prediction, `privdiff split plan`, is an estimate, not a promise)",
            "measured_by": None}
