"""The DP-SGD engine: Poisson batches, physical micro-batches, per-unit clipping, noise, accounting.

One logical step = one Poisson batch of privacy units (possibly empty), processed in physical
micro-batches that fit in memory; each unit's examples stay in one micro-batch so its clipped
gradient is whole. The noisy average is formed once per logical step, the accountant records it,
and the budget guard refuses any step that would take ε past the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .accounting import Accountant, calibrate_noise_multiplier, check_delta
from .clipping import GradSampleClipper
from .dp_sgd import PoissonSampler, noisy_average, secure_generator


class PrivacyBudgetExceeded(RuntimeError):
    """A step would spend more ε than the run's target."""


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings. Give `target_epsilon` to calibrate σ, or `noise_multiplier` to fix it."""

    delta: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    privacy_unit: str = "example"
    max_examples_per_subject: int = 1
    physical_batch_size: int = 16
    accountant: str = "prv"

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon (σ is calibrated) and noise_multiplier (σ is fixed).")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon={self.target_epsilon} must be positive (smaller is more private).")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier={self.noise_multiplier} must not be negative.")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta={self.delta} must lie in (0, 1); use well below 1/N, e.g. 1e-5.")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be positive.")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate={self.sample_rate} must lie in (0, 1] (batch size / dataset size).")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be at least 1.")
        if self.privacy_unit not in ("example", "subject"):
            raise ValueError(f"privacy_unit={self.privacy_unit!r} must be 'example' or 'subject'.")
        if self.physical_batch_size < 1:
            raise ValueError(f"physical_batch_size={self.physical_batch_size} must be at least 1.")


class DPSGDEngine:
    """Runs DP-SGD steps for `model`'s trainable parameters with privdiff's fast clipping.

    `per_sample_loss(indices) -> tensor[len(indices)]` computes one loss per example (the caller
    runs the model); the engine does the rest.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: DPConfig,
        num_examples: int,
        subjects=None,
        generator: torch.Generator | None = None,
        accountant: Accountant | None = None,
    ):
        check_delta(delta=config.delta, num_examples=num_examples if subjects is None else len(set(subjects)))
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.generator = generator if generator is not None else secure_generator()
        self.accountant = accountant or Accountant(accountant=config.accountant)
        if config.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=config.target_epsilon, delta=config.delta, sample_rate=config.sample_rate,
                steps=config.steps, accountant=config.accountant,
            )
        else:
            self.noise_multiplier = float(config.noise_multiplier)
        self.sampler = PoissonSampler(
            num_examples=num_examples, sample_rate=config.sample_rate, steps=config.steps, generator=self.generator,
            subjects=subjects if config.privacy_unit == "subject" else None,
            max_examples_per_subject=config.max_examples_per_subject,
        )
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.clipper = GradSampleClipper(module=model, max_grad_norm=config.max_grad_norm)
        # ε for progress reports is refreshed every `epsilon_every` steps (and at the last one): at most
        # about 100 accountant runs per training run.
        self.epsilon_every = max(1, config.steps // 100)
        self._epsilon: float | None = None

    def planned_epsilon(self) -> float:
        """ε after all planned steps (on top of what the accountant already holds)."""
        probe = Accountant.from_json(self.accountant.to_json())
        probe.step(noise_multiplier=self.noise_multiplier, sample_rate=self.config.sample_rate,
                   num_steps=self.config.steps - probe.total_steps)
        return probe.epsilon(delta=self.config.delta)

    def step(self, per_sample_loss: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """One logical DP-SGD step. Returns {'batch_units', 'loss' (None if empty), 'epsilon' (ε spent,
        refreshed every `epsilon_every` steps)}."""
        config = self.config
        within_plan = self.accountant.total_steps + 1 <= config.steps and all(
            (s.noise_multiplier, s.sample_rate) == (self.noise_multiplier, config.sample_rate)
            for s in self.accountant.history
        )
        # Within the calibrated plan ε cannot pass the target (ε grows with steps), so the costly
        # accountant runs only for steps beyond the plan or after a change of settings.
        if config.target_epsilon is not None and not within_plan:
            probe = Accountant.from_json(self.accountant.to_json())
            probe.step(noise_multiplier=self.noise_multiplier, sample_rate=config.sample_rate)
            spent = probe.epsilon(delta=config.delta)
            if spent > config.target_epsilon * (1 + 1e-9):
                raise PrivacyBudgetExceeded(
                    f"this step would bring ε to {spent:.4g}, past the target {config.target_epsilon}; "
                    "the run stops here with the budget intact."
                )
        indices, groups = self.sampler.sample()
        self.clipper.reset()
        losses = []
        units = int(groups.max()) + 1 if len(groups) else 0
        unit_order = torch.arange(units)
        # Micro-batches hold whole units, so a subject's examples are clipped together.
        for start in range(0, units, config.physical_batch_size):
            chunk_units = unit_order[start:start + config.physical_batch_size]
            mask = (groups[:, None] == chunk_units[None, :]).any(dim=1)
            chunk_indices, chunk_groups = indices[mask], groups[mask] - start
            loss = per_sample_loss(chunk_indices)
            if loss.shape != (len(chunk_indices),):
                raise ValueError(f"per_sample_loss returned shape {tuple(loss.shape)}; it must return one loss per example.")
            loss.sum().backward()
            self.clipper.clip_and_accumulate(groups=chunk_groups)
            losses.append(loss.detach())
            for p in self.parameters:
                p.grad = None  # autograd's own (unclipped) sum is never used
        noisy_average(
            summed_grad=self.clipper.summed_grad, parameters=self.parameters, noise_multiplier=self.noise_multiplier,
            max_grad_norm=config.max_grad_norm, expected_batch_units=self.sampler.expected_batch_units,
            generator=self.generator,
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=config.sample_rate)
        done = self.accountant.total_steps
        if self._epsilon is None or done % self.epsilon_every == 0 or done >= config.steps:
            self._epsilon = self.accountant.epsilon(delta=config.delta)
        mean_loss = float(torch.cat(losses).mean()) if losses else None
        return {"batch_units": units, "loss": mean_loss, "epsilon": self._epsilon}
