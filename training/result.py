"""The one progress report and the one result every privdiff trainer gives.

Every trainer has the shape `train_<method>(*, base, data, out, config, progress=None,
should_stop=None, resume=False) -> TrainResult`: `progress` receives `Progress` reports, named by
phase so that a bar can say what a long silent stretch is; `should_stop` is polled between steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What a run does, in order; a trainer reports the phases it has.
PHASES = ("loading", "encoding", "calibrating", "training", "sampling", "releasing")


@dataclass(frozen=True)
class Progress:
    step: int  # done so far in this phase (steps, batches, rounds, ...)
    total: int
    phase: str = "training"
    loss: float | None = None  # computed on private data: NOT covered by ε, for the display only
    epsilon: float | None = None  # spent so far
    unit: str = "step"
    detail: str = ""  # e.g. "12 trained by the server"

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r} is not one of {', '.join(PHASES)}.")


@dataclass(frozen=True)
class TrainResult:
    """`files`: each released file by kind ("diffusers", "comfyui", "lora", "a1111", "controlnet",
    "samples", ...), empty when stopped; `record`: the release's privacy record (None when stopped,
    or for a run without one); `figures`: what the run reports beside its release: public counts
    (steps done and planned, units, rounds, the ε spent by a stopped run) and, for a federated run,
    `loss_chart`, the held-out loss per round as a picture in memory: a by-product computed on private
    items, labelled as outside the guarantee and never written with the release."""

    out: Path
    files: Mapping[str, Path] = field(default_factory=dict)
    record: Any = None  # privacy.record.PrivacyRecord
    stopped: bool = False  # stopped on request: a checkpoint kept, nothing released; resume=True continues
    figures: Mapping[str, Any] = field(default_factory=dict)

    @property
    def epsilon(self) -> float | None:
        """The released ε, or for a stopped run the ε spent so far (None without DP)."""
        return self.record.epsilon if self.record is not None else self.figures.get("epsilon")
