"""The DP-SGD engine: Poisson batches, physical micro-batches, per-unit clipping, noise, accounting.

One logical step = one Poisson batch of privacy units (possibly empty), processed in physical
micro-batches that fit in memory; each unit's examples stay in one micro-batch so its clipped
gradient is whole. The noisy average is formed once per logical step, the accountant records it,
and the budget guard refuses any step that would take ε past the target. With noise multiplicity
(`draws_per_example` K, DPDM) each example enters the forward pass as K consecutive rows and its
loss is their mean, clipped once: K times the compute, the same sampling, noise and ε.

Two backends give the same clipped sum: `privdiff` (fast clipping, `clipping.py`) and `opacus`
(its per-sample gradient hooks, the reference). Under `torchrun` (torch.distributed initialised)
every rank draws the same Poisson batch, works on its share of the units, and the partial clipped
sums are all-reduced; only rank 0 adds noise, so it enters once per logical step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UserError, public_name
from .accounting import Accountant, calibrate_noise_multiplier, check_adjacency, check_delta
from .clipping import GradSampleClipper
from .dp_sgd import PoissonSampler, noisy_average, secure_generator


BACKENDS = ("privdiff", "opacus")


@public_name
class PrivacyBudgetExceeded(RuntimeError, UserError):
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
    accountant: str = "prv"  # replace-one needs "pld"
    adjacency: str = "add-remove"
    backend: str = "privdiff"
    # Group-wise clipping: ((layer-name prefix, share of C²), ...); see GradSampleClipper.
    clip_budget_shares: tuple[tuple[str, float], ...] = ()
    # Noise multiplicity: rows per example in the forward pass (its own (t, noise) draw each); the
    # example's loss is their mean. A micro-batch then holds physical_batch_size // K examples.
    draws_per_example: int = 1

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
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {', '.join(BACKENDS)}.")
        if self.physical_batch_size < 1:
            raise ValueError(f"physical_batch_size={self.physical_batch_size} must be at least 1.")
        if not 1 <= self.draws_per_example <= self.physical_batch_size:
            raise ValueError(f"draws_per_example={self.draws_per_example} must lie in [1, physical_batch_size="
                             f"{self.physical_batch_size}]: an example's draws share one forward pass (they are "
                             "clipped together); raise physical_batch_size or use fewer draws.")
        check_adjacency(self.adjacency, accountant=self.accountant)
        if self.clip_budget_shares and self.backend == "opacus":
            raise ValueError("clip_budget_shares (group-wise clipping) needs backend='privdiff'.")


class DPSGDEngine:
    """Runs DP-SGD steps for `model`'s trainable parameters with privdiff's fast clipping.

    `per_sample_loss(indices) -> tensor[len(indices)]` computes one loss per example (the caller
    runs the model); the engine does the rest. With `draws_per_example` K > 1, `indices` holds each
    example K times in a row, every row must get its own (t, noise) draw, and one loss per row is
    returned. `generator` draws the noise (default: OS-seeded). The Poisson batches come from
    `sampling_generator`, which must be in the same state on every rank; by default it is
    `generator` itself in one process, and a stream seeded by rank 0 and shared by all ranks under
    torch.distributed.
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
        sampling_generator: torch.Generator | None = None,
        accountant: Accountant | None = None,
    ):
        check_delta(delta=config.delta, num_examples=num_examples if subjects is None else len(set(subjects)))
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.generator = generator if generator is not None else secure_generator()
        self.rank, self.world_size = distributed_rank_and_size()
        if sampling_generator is None:
            sampling_generator = _sampling_generator(self.generator, world_size=self.world_size)
        self.accountant = accountant or Accountant(accountant=config.accountant, adjacency=config.adjacency)
        if self.accountant.adjacency != config.adjacency:
            raise ValueError(f"the accountant counts {self.accountant.adjacency} neighbours, the run "
                             f"{config.adjacency}; resume with the run's own adjacency.")
        if config.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=config.target_epsilon, delta=config.delta, sample_rate=config.sample_rate,
                steps=config.steps, accountant=config.accountant, adjacency=config.adjacency,
            )
        else:
            self.noise_multiplier = float(config.noise_multiplier)
        self.sampler = PoissonSampler(
            num_examples=num_examples, sample_rate=config.sample_rate, steps=config.steps, generator=sampling_generator,
            subjects=subjects if config.privacy_unit == "subject" else None,
            max_examples_per_subject=config.max_examples_per_subject,
        )
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if config.backend == "opacus":
            from .opacus_backend import OpacusClipper

            self.clipper = OpacusClipper(module=model, max_grad_norm=config.max_grad_norm)
        else:
            self.clipper = GradSampleClipper(module=model, max_grad_norm=config.max_grad_norm,
                                             budget_shares=dict(config.clip_budget_shares))
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

    def step(self, per_sample_loss: Callable[[torch.Tensor], torch.Tensor], *,
             after_noise: Callable[[], None] | None = None) -> dict:
        """One logical DP-SGD step. Returns {'batch_units', 'loss' (None if empty), 'epsilon' (ε spent,
        refreshed every `epsilon_every` steps)}. `after_noise` runs between the noisy average and the
        optimizer step, e.g. to add a regulariser's gradient: it must not read private data."""
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
        my_units = torch.arange(units)[self.rank::self.world_size]
        draws = config.draws_per_example
        per_chunk = max(1, config.physical_batch_size // draws)  # K rows per example in the forward pass
        # Micro-batches hold whole units, so a subject's examples are clipped together.
        for start in range(0, len(my_units), per_chunk):
            chunk_units = my_units[start:start + per_chunk]
            mask = (groups[:, None] == chunk_units[None, :]).any(dim=1)
            # Each example's K draws are consecutive rows of its unit: the clipper sums a unit's rows.
            chunk_indices = indices[mask].repeat_interleave(draws)
            chunk_groups = torch.searchsorted(chunk_units, groups[mask]).repeat_interleave(draws)
            with torch.profiler.record_function("privdiff.forward"):
                loss = per_sample_loss(chunk_indices)
            if loss.shape != (len(chunk_indices),):
                raise ValueError(f"per_sample_loss returned shape {tuple(loss.shape)}; it must return one loss per "
                                 f"row of `indices` ({len(chunk_indices)}).")
            with torch.profiler.record_function("privdiff.backward"):
                # The mean over an example's draws (not their sum): its clipped gradient is their mean's.
                self.clipper.backward(loss.sum() / draws, groups=chunk_groups)
            self.clipper.clip_and_accumulate(groups=chunk_groups)
            losses.append(loss.detach().reshape(-1, draws).mean(1))
            for p in self.parameters:
                p.grad = None  # autograd's own (unclipped) sum is never used
        with torch.profiler.record_function("privdiff.noise"):
            noisy_average(
                summed_grad=self.clipper.summed_grad, parameters=self.parameters,
                noise_multiplier=self.noise_multiplier, max_grad_norm=config.max_grad_norm,
                expected_batch_units=self.sampler.expected_batch_units, generator=self.generator,
                add_noise=self.rank == 0, all_reduce=_all_reduce_sum if self.world_size > 1 else None,
            )
        if after_noise is not None:
            after_noise()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=config.sample_rate)
        done = self.accountant.total_steps
        if self._epsilon is None or done % self.epsilon_every == 0 or done >= config.steps:
            self._epsilon = self.accountant.epsilon(delta=config.delta)
        loss_sum = float(torch.cat(losses).sum()) if losses else 0.0
        loss_count = float(sum(len(loss) for loss in losses))
        if self.world_size > 1:
            loss_sum, loss_count = _all_reduce_sum_floats([loss_sum, loss_count])
        mean_loss = loss_sum / loss_count if loss_count else None
        return {"batch_units": units, "loss": mean_loss, "epsilon": self._epsilon}


def distributed_rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sampling_generator(generator: torch.Generator, *, world_size: int) -> torch.Generator:
    """The Poisson sampler's generator: a CPU one (the sampler draws there), the same on every rank.

    In one process a CPU noise generator serves both; otherwise a CPU stream is seeded from rank 0's
    noise generator (which may live on a GPU) and broadcast.
    """
    import torch.distributed as dist

    if world_size == 1 and generator.device.type == "cpu":
        return generator
    seed = torch.zeros(1, dtype=torch.long)
    if world_size == 1 or dist.get_rank() == 0:
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).cpu()
    if world_size > 1:
        seed = seed.to(_collective_device())
        dist.broadcast(seed, src=0)
    return torch.Generator().manual_seed(int(seed))


def _collective_device() -> torch.device:
    """Where collective buffers must live: the GPU for NCCL, the CPU for gloo."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum the tensors over all ranks, in place, in one collective call."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _all_reduce_sum_floats(values: list[float]) -> list[float]:
    buffer = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    _all_reduce_sum([buffer])
    return buffer.tolist()
