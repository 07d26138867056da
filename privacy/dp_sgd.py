"""DP-SGD's sampling and noise: Poisson batches of examples or subjects, and the noisy average.

The accountant's guarantee assumes exactly this: every step includes each privacy unit
independently with probability q (so a batch may be empty), and the released gradient is
(sum of clipped unit gradients + N(0, sigma^2 C^2 I)) / (q * N), the expected batch size, as
opacus does it. Noise comes only from an explicit torch.Generator; `secure_generator` seeds one
from the operating system for real runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from the OS (os.urandom): noise nobody can replay from a seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


class PoissonSampler:
    """Yields, per step, the example indices of a Poisson-sampled batch (possibly empty).

    Privacy unit `example`: each example is kept with probability `sample_rate`.
    Privacy unit `subject`: each subject is kept with probability `sample_rate`, and a kept subject
    contributes at most `max_examples_per_subject` of its examples (chosen at random), so that one
    person's influence on a step is bounded before clipping.
    """

    def __init__(
        self,
        *,
        num_examples: int,
        sample_rate: float,
        steps: int,
        generator: torch.Generator,
        subjects: Sequence[str | None] | None = None,
        max_examples_per_subject: int = 1,
    ):
        if num_examples < 1:
            raise ValueError(f"num_examples={num_examples}: the dataset is empty.")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate} must lie in (0, 1] (batch size / dataset size).")
        if steps < 0:
            raise ValueError(f"steps={steps} must not be negative.")
        self.num_examples = num_examples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.generator = generator
        self.max_examples_per_subject = max_examples_per_subject
        self._members: list[list[int]] | None = None
        if subjects is not None:
            if len(subjects) != num_examples:
                raise ValueError(f"{len(subjects)} subject ids for {num_examples} examples: give one per example.")
            missing = [i for i, s in enumerate(subjects) if s is None]
            if missing:
                raise ValueError(
                    f"privacy unit 'subject' needs a subject id for every example; {len(missing)} have none "
                    f"(first: index {missing[0]}). Add a 'subject' to metadata.jsonl, or use the unit 'example'."
                )
            if max_examples_per_subject < 1:
                raise ValueError(f"max_examples_per_subject={max_examples_per_subject} must be at least 1.")
            order: dict[str, list[int]] = {}
            for index, subject in enumerate(subjects):
                order.setdefault(str(subject), []).append(index)
            self._members = [order[key] for key in sorted(order)]

    @property
    def num_units(self) -> int:
        return len(self._members) if self._members is not None else self.num_examples

    @property
    def expected_batch_units(self) -> float:
        """q * (number of privacy units): the denominator of the noisy average."""
        return self.sample_rate * self.num_units

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's batch: (example indices, their unit ids 0..k-1 within the batch)."""
        keep = torch.rand(self.num_units, generator=self.generator) < self.sample_rate
        units = keep.nonzero().flatten().tolist()
        if self._members is None:
            return torch.tensor(units, dtype=torch.long), torch.arange(len(units))
        indices, groups = [], []
        for slot, unit in enumerate(units):
            members = self._members[unit]
            if len(members) > self.max_examples_per_subject:
                pick = torch.randperm(len(members), generator=self.generator)[: self.max_examples_per_subject]
                members = [members[i] for i in sorted(pick.tolist())]
            indices.extend(members)
            groups.extend([slot] * len(members))
        return torch.tensor(indices, dtype=torch.long), torch.tensor(groups, dtype=torch.long)

    def __iter__(self):
        for _ in range(self.steps):
            yield self.sample()

    def __len__(self) -> int:
        return self.steps


def noisy_average(
    *,
    summed_grad: dict[torch.nn.Parameter, torch.Tensor],
    parameters: Sequence[torch.nn.Parameter],
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_units: float,
    generator: torch.Generator | None,
    add_noise: bool = True,
    all_reduce: Callable[[list[torch.Tensor]], None] | None = None,
) -> None:
    """Set each parameter's .grad to (clipped sum + N(0, (sigma C)^2)) / (q N).

    A parameter missing from `summed_grad` (an empty batch) gets noise alone: the step still
    happens, as the accountant assumes, and nothing about the batch being empty leaks.
    Across processes (DDP), every rank passes its partial sum and an `all_reduce` that sums in
    place; only one rank has `add_noise=True`, so the noise enters the sum once per logical step.
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must not be negative.")
    if not expected_batch_units > 0:
        raise ValueError(f"expected_batch_units={expected_batch_units} must be positive.")
    std = noise_multiplier * max_grad_norm
    if not parameters:
        return
    # One flat buffer for every parameter: a handful of kernels per step instead of several per
    # parameter (the step is launch-bound at small batches). The sum and the noise stay in fp32 for
    # bf16/fp16 parameters (fp64 for fp64); only the finished gradient is rounded to their dtype.
    acc = torch.float64 if any(p.dtype == torch.float64 for p in parameters) else torch.float32
    device = parameters[0].device
    sizes = [p.numel() for p in parameters]
    total = torch.cat([
        summed_grad[p].reshape(-1).to(device, acc) if p in summed_grad
        else torch.zeros(p.numel(), dtype=acc, device=device)
        for p in parameters
    ])
    if add_noise and std > 0:
        noise = torch.randn(total.shape, generator=generator, dtype=acc, device=generator.device)
        total.add_(noise.to(device), alpha=std)
    if all_reduce is not None:
        all_reduce([total])
    total.div_(expected_batch_units)
    for param, grad in zip(parameters, total.split(sizes)):
        param.grad = grad.view(param.shape).to(param.dtype)
