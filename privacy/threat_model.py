"""The promises of THREAT_MODEL.md that code and tests read, kept in one place.

Split learning gives no ε: what it promises is measured by the attacks in `tests/adversary/`, for the
hardened default, as the best attack's PSNR margin over guessing the mean image. THREAT_MODEL.md
states these numbers; a test checks that it states these very values.
"""

from __future__ import annotations

# The hardened default's settings, as SplitConfig() has them (a test checks they agree).
SPLIT_DEFAULT_SETTINGS = {"mode": "hardened", "snr_bound": 0.01, "sigma_label": 1.0, "sigma_hint": 0.0,
                          "draws_per_image": 1}
# Images: every attack in tests/adversary, over any number of linked epochs, with reconnects,
# resumes, a refused change of setting and a reordered folder in the run, stays within this many dB
# of the mean-image guess (PSNR against the VAE's own reconstruction; `circles` on privdiff-tiny).
# Measured with secret noise (bench/split_circles.py secrets): +1.33 dB mean, 0.41 spread, 0.67 to
# 2.17 over 16 secrets on 32 images; privdiff 0.1 promised 1 dB from one lucky seed.
SPLIT_DEFAULT_IMAGE_MARGIN_DB = 2.5
# Hints are NOT protected at the default sigma_hint = 0: the server rebuilds them almost exactly.
SPLIT_DEFAULT_HINTS_PROTECTED = False


def split_promise(config) -> dict:
    """What the threat model promises for a split client's settings (recorded with the ControlNet)."""
    settings = {"mode": config.mode, "snr_bound": config.snr_bound, "sigma_label": config.sigma_label,
                "sigma_hint": config.sigma_hint, "draws_per_image": config.draws_per_image}
    if config.mode == "paper":
        return {"promise": "none: the reference design gives every image and hint away (measured above 40 dB)"}
    if settings == SPLIT_DEFAULT_SETTINGS:
        return {"promise": f"images: the best attack within {SPLIT_DEFAULT_IMAGE_MARGIN_DB:g} dB PSNR of the "
                           "mean-image guess over any number of linked epochs; hints: not protected "
                           "(sigma_hint = 0: the server rebuilds them)",
                "image_margin_db": SPLIT_DEFAULT_IMAGE_MARGIN_DB, "hints_protected": SPLIT_DEFAULT_HINTS_PROTECTED,
                "measured_by": "tests/adversary (privacy/THREAT_MODEL.md)"}
    return {"promise": "none stated for these settings: measure them with `privdiff split attack`",
            "measured_by": None}
