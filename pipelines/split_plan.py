"""The split privacy planner ([11]): what a split client's settings leak and what they learn, predicted
from the frontier measured on `circles` (`bench/split_circles.py frontier`, shipped as
`split_frontier.json` beside this module), and the settings that learn most within a target leak.

Two models, each fitted to the measured rows and stated with its uncertainty:

- The leak. With one noising per image (every linked epoch resends the same message) the best attack's
  PSNR margin over the mean-image guess depends on k alone, not on the number of images or epochs. An
  estimate of z_0 from a message at SNR k has an error variance shrinking like 1 / (1 + c k), so the
  margin is fitted as ``10 log10(1 + a k^b)`` (a straight line in log-log after the change of variable),
  and the planner promises the fit plus the widest excess over it that any measured secret showed.
  The hint's margin depends on σ_hint alone: measured points, interpolated linearly in σ_hint.
- The gain in circle IoU over the base model: a least-squares plane in (log10 k, log10 images, σ_hint),
  with its standard prediction interval; outside the measured ranges the prediction is flagged as an
  extrapolation.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRONTIER_FILE = Path(__file__).with_name("split_frontier.json")
# How many k the planner tries, from the smallest measured k up to the target's ceiling
# (never above the largest measured k).
_K_GRID_POINTS = 200


@dataclass(frozen=True)
class SplitPrediction:
    """What a setting is expected to leak and learn on a run of `images` images (one noising each)."""

    snr_bound: float
    sigma_hint: float
    images: int
    image_margin_db: float  # the fit: the best attack's PSNR over the mean-image guess, a typical secret
    image_margin_upper_db: float  # what the planner promises: the fit plus the widest measured excess
    hint_margin_db: float
    hint_margin_upper_db: float
    iou_gain: float  # circle IoU over the base model
    iou_gain_interval: float  # half-width of the 95 % prediction interval
    extrapolated: bool  # k, images or σ_hint outside what was measured

    def lines(self) -> list[str]:
        note = " (extrapolated beyond the measured frontier)" if self.extrapolated else ""
        return [f"k = {self.snr_bound:.3g}, σ_hint = {self.sigma_hint:.3g}, {self.images} images, one noising each",
                f"  image attack margin over the mean-image guess: {self.image_margin_db:+.1f} dB "
                f"(at most {self.image_margin_upper_db:+.1f} dB over the measured secrets), any number of epochs",
                f"  hint attack margin: {self.hint_margin_db:+.1f} dB (at most {self.hint_margin_upper_db:+.1f} dB)",
                f"  circle IoU gain over the base: {self.iou_gain:+.3f} ± {self.iou_gain_interval:.3f} (95 %){note}",
                "  (fitted on `circles` with privdiff-tiny; other data and models will differ: measure them with "
                "`privdiff split attack`)"]


@dataclass(frozen=True)
class SplitFrontier:
    """The fitted frontier; `SplitFrontier.load()` reads the shipped measurements. Each fit is made once,
    on first use (the rows never change), however many settings are then planned or predicted."""

    rows: tuple[dict, ...]

    @classmethod
    def load(cls, path: str | Path | None = None) -> "SplitFrontier":
        """The rows of `path` (default: the shipped frontier)."""
        return cls(tuple(json.loads(Path(path or FRONTIER_FILE).read_text())["rows"]))

    def __post_init__(self) -> None:
        if len({float(r["k"]) for r in self.rows}) < 2:
            raise ValueError("the split frontier needs attack rows at two values of k at least.")

    # -- the image leak ---------------------------------------------------------------------------------
    def _margins_by_k(self) -> dict[float, dict]:
        # The image attack does not depend on the run's size or σ_hint: per k, keep the measurement over
        # the most secrets (rows repeat their k's attack).
        best: dict[float, dict] = {}
        for row in self.rows:
            k = float(row["k"])
            if k not in best or row.get("secrets", 0) > best[k].get("secrets", 0):
                best[k] = row
        return {k: best[k]["image_margin_db"] for k in sorted(best)}

    @functools.cached_property
    def _margin_fit(self) -> tuple[float, float, float]:
        margins = self._margins_by_k()
        ks = np.array(list(margins))
        means = np.array([max(m["mean"], 0.05) for m in margins.values()])
        slope, intercept = np.polyfit(np.log(ks), np.log(10 ** (means / 10) - 1), 1)
        fitted = _margin(ks, intercept, slope)
        excess = max(float(m["max"]) - f for m, f in zip(margins.values(), fitted))
        return float(intercept), float(slope), max(excess, 0.0)

    def image_margin(self, snr_bound: float) -> tuple[float, float]:
        """(fit, promised upper bound) of the best image attack's margin in dB at SNR bound k."""
        intercept, slope, excess = self._margin_fit
        fit = float(_margin(np.array([snr_bound]), intercept, slope)[0])
        return fit, fit + excess

    def largest_k(self, target_margin_db: float) -> float:
        """The largest k whose promised image margin is within `target_margin_db`."""
        intercept, slope, excess = self._margin_fit
        room = target_margin_db - excess
        if room <= 0:
            raise ValueError(f"a target margin of {target_margin_db:g} dB is below the measured spread between "
                             f"secrets ({excess:.1f} dB): no k can promise it. Aim at {excess + 0.5:.1f} dB or more.")
        return float(math.exp((math.log(10 ** (room / 10) - 1) - intercept) / slope))

    # -- the hint leak ----------------------------------------------------------------------------------
    @functools.cached_property
    def _hint_points(self) -> list[tuple[float, float, float]]:
        points: dict[float, list] = {}
        for row in self.rows:
            points.setdefault(float(row["sigma_hint"]), []).append(row["hint_margin_db"])
        return sorted((s, float(np.mean([m["mean"] for m in ms])), float(max(m["max"] for m in ms)))
                      for s, ms in points.items())

    def hint_margin(self, sigma_hint: float) -> tuple[float, float]:
        """(mean, upper) hint attack margin in dB, interpolated between measured σ_hint (held flat
        beyond the largest: more noise never helps the attacker)."""
        sigmas, means, uppers = (np.array(v) for v in zip(*self._hint_points))
        return float(np.interp(sigma_hint, sigmas, means)), float(np.interp(sigma_hint, sigmas, uppers))

    def smallest_sigma_hint(self, target_margin_db: float) -> float:
        """The least hint noise whose upper hint margin is within the target (a grid of 0.05)."""
        top = max(s for s, _, _ in self._hint_points)
        for sigma in np.arange(0.0, top + 1e-9, 0.05):
            if self.hint_margin(float(sigma))[1] <= target_margin_db:
                return round(float(sigma), 2)
        raise ValueError(f"no measured hint noise keeps the hint attack within {target_margin_db:g} dB "
                         f"(σ_hint up to {top:g} measured).")

    # -- what is learnt ---------------------------------------------------------------------------------
    def _utility_rows(self) -> list[dict]:
        return [r for r in self.rows if int(r["images"]) > 0 and r.get("iou_gain") is not None]

    def _gain_design(self, k, images, sigma_hint) -> np.ndarray:
        return np.column_stack([np.ones_like(np.asarray(k, float)), np.log10(k), np.log10(images),
                                np.asarray(sigma_hint, float)])

    @functools.cached_property
    def _gain_fit(self) -> dict:
        rows = self._utility_rows()
        if len(rows) < 5:
            raise ValueError(f"the split frontier has {len(rows)} utility rows; the gain fit needs 5 or more.")
        x = self._gain_design([r["k"] for r in rows], [r["images"] for r in rows], [r["sigma_hint"] for r in rows])
        y = np.array([r["iou_gain"] for r in rows])
        # σ_hint enters only where it was varied; otherwise the plane has a column of constants.
        columns = [0, 1, 2] + ([3] if len({r["sigma_hint"] for r in rows}) > 1 else [])
        x = x[:, columns]
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        dof = max(len(y) - len(columns), 1)
        return {"columns": columns, "coef": coef, "residual": float(np.sum((y - x @ coef) ** 2) / dof),
                "inverse": np.linalg.pinv(x.T @ x),
                "ranges": {key: (min(float(r[key]) for r in rows), max(float(r[key]) for r in rows))
                           for key in ("k", "images", "sigma_hint")}}

    def iou_gain(self, *, snr_bound: float, images: int, sigma_hint: float) -> tuple[float, float, bool]:
        """(predicted gain, 95 % half-interval, extrapolated?)."""
        fit = self._gain_fit
        point = self._gain_design([snr_bound], [images], [sigma_hint])[0, fit["columns"]]
        interval = 1.96 * math.sqrt(fit["residual"] * (1 + float(point @ fit["inverse"] @ point)))
        extrapolated = not all(lo <= value <= hi for value, (lo, hi) in
                               zip((snr_bound, images, sigma_hint), fit["ranges"].values()))
        return float(point @ fit["coef"]), interval, extrapolated

    def predict(self, *, snr_bound: float, sigma_hint: float, images: int) -> SplitPrediction:
        image = self.image_margin(snr_bound)
        hint = self.hint_margin(sigma_hint)
        gain, interval, extrapolated = self.iou_gain(snr_bound=snr_bound, images=images, sigma_hint=sigma_hint)
        ks = [float(r["k"]) for r in self.rows]
        extrapolated = extrapolated or not min(ks) <= snr_bound <= max(ks)
        return SplitPrediction(snr_bound=snr_bound, sigma_hint=sigma_hint, images=images,
                               image_margin_db=image[0], image_margin_upper_db=image[1], hint_margin_db=hint[0],
                               hint_margin_upper_db=hint[1], iou_gain=gain, iou_gain_interval=interval,
                               extrapolated=extrapolated)

    def plan(self, *, images: int, target_margin_db: float = 3.0) -> SplitPrediction:
        """The settings with the largest predicted gain whose promised image and hint margins are within
        `target_margin_db`: σ_hint as small as the hint target allows, and the best k at or below the
        largest the image target allows (never above the largest measured k)."""
        if images < 1:
            raise ValueError(f"images={images} must be at least 1.")
        sigma_hint = self.smallest_sigma_hint(target_margin_db)
        ks = sorted({float(r["k"]) for r in self.rows})
        ceiling = min(self.largest_k(target_margin_db), ks[-1])
        candidates = np.geomspace(min(ks[0], ceiling), ceiling, _K_GRID_POINTS)
        best = max(candidates, key=lambda k: self.iou_gain(snr_bound=float(k), images=images,
                                                           sigma_hint=sigma_hint)[0])
        return self.predict(snr_bound=float(_round_down(best)), sigma_hint=sigma_hint, images=images)


def _margin(ks: np.ndarray, intercept: float, slope: float) -> np.ndarray:
    return 10 * np.log10(1 + np.exp(intercept) * ks ** slope)


def _round_down(k: float) -> float:
    """k to two significant figures, rounded down, so a plan reads like a setting a person would type."""
    scale = 10 ** (math.floor(math.log10(k)) - 1)
    return float(f"{math.floor(k / scale + 1e-9) * scale:.2g}")


@functools.lru_cache(maxsize=1)
def shipped_frontier() -> SplitFrontier:
    """The frontier shipped with privdiff, read and fitted once per process."""
    return SplitFrontier.load()


def plan_split(*, images: int, target_margin_db: float = 3.0) -> SplitPrediction:
    """The shipped frontier's plan for `images` images (see `SplitFrontier.plan`)."""
    return shipped_frontier().plan(images=images, target_margin_db=target_margin_db)


def is_modelled(config) -> bool:
    """Whether the planner models `config`: hardened mode, one noising per image, σ_label = 1 (what
    the frontier measured)."""
    return config.mode == "hardened" and config.draws_per_image == 1 and config.sigma_label == 1.0


def predict_split(*, config, images: int) -> SplitPrediction:
    """What the shipped frontier expects of a hardened `SplitConfig` with one noising per image."""
    if not is_modelled(config):
        raise ValueError("the planner models hardened mode with one noising per image (draws_per_image=1) and "
                         "sigma_label=1, as measured; measure other settings with `privdiff split attack`.")
    return shipped_frontier().predict(snr_bound=config.snr_bound, sigma_hint=config.sigma_hint, images=images)


def planned_settings(*, mode: str, snr_bound: float, sigma_label: float, sigma_hint: float,
                     draws_per_image: int | None, target_margin_db: float = 0.0):
    """A split client's `SplitConfig` from typed settings, or, with `target_margin_db` > 0, with the
    planner's k and σ_hint for that target (the typed ones ignored), and a few lines saying what they
    are, what the threat model promises for them and what the frontier predicts (the settings node's text)."""
    from ..privacy.threat_model import split_promise
    from .split_client import SplitConfig

    if target_margin_db > 0:
        if mode != "hardened" or draws_per_image != 1 or sigma_label != 1.0:
            raise ValueError("target_margin_db plans hardened mode with one noising per image and sigma_label 1: "
                             "set those, or set target_margin_db to 0.")
        plan = plan_split(images=1000, target_margin_db=target_margin_db)  # k and σ_hint do not depend on N
        snr_bound, sigma_hint = plan.snr_bound, plan.sigma_hint
    config = SplitConfig(mode=mode, snr_bound=snr_bound, sigma_label=sigma_label, sigma_hint=sigma_hint,
                         draws_per_image=draws_per_image or None)
    text = (f"{config.mode}: k = {config.snr_bound:g}, σ_label = {config.sigma_label:g}, σ_hint = {config.sigma_hint:g}, "
            f"noisings per image = {config.draws_per_image or 'fresh each epoch'}\n"
            f"promise: {split_promise(config)['promise']}")
    if is_modelled(config):
        expected = [predict_split(config=config, images=n) for n in (1_000, 10_000, 50_000)]
        first = expected[0]
        text += (f"\npredicted (measured frontier on circles): image attack margin {first.image_margin_db:+.1f} dB "
                 f"(at most {first.image_margin_upper_db:+.1f}), hint {first.hint_margin_db:+.1f} dB "
                 f"(at most {first.hint_margin_upper_db:+.1f}); circle IoU gain "
                 + ", ".join(f"{p.iou_gain:+.2f} ± {p.iou_gain_interval:.2f} at {p.images:,} images" for p in expected))
    return config, text
