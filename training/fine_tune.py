"""The one fine-tune loop: DP-SGD (or, for comparison, plain AdamW) on a chosen trainable set.

DP-LDM runs it with files around it (`pipelines.dp_ldm.train_dp_ldm`: checkpoints, a release);
a federated client runs it in memory for each round (`train_in_memory`). Only the chosen trainable
set (attention projections by default, or LoRA adapters, plus optional conditioning rows) trains:
Poisson batches, per-example (or per-subject) clipping, Gaussian noise calibrated to the target
(ε, δ) over the planned steps, with noise multiplicity and logical batches over micro-batches.
`FineTuneRun` saves and resumes exactly through the one checkpoint unit (`checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from .diffusion import (attach_conditioning_rows, denoising_target, encode_latents, trained_parameters,
                        training_modules, training_scheduler)
from .result import Progress


def check_proximal_mu(value) -> None:
    """FedProx's mu: a finite number >= 0 (0: no proximal term). For DPLDMConfig and FederatedConfig."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"proximal_mu={value!r} must be a finite number >= 0 (0: no proximal term, plain FedAvg "
                         "when federated; FedProx uses 0.001 to 1).")


@dataclass(frozen=True)
class DPLDMConfig:
    trainable: str = "attention"
    ablation_blocks: int = 0
    lora_rank: int = 4  # for trainable='lora'
    # The conditioning embedder: token-table rows of these (public, single-token) words are trained
    # too, e.g. class names a base model never saw. Chosen by the user, never from the private captions.
    conditioning_words: tuple[str, ...] = ()
    # Share of the clipping budget C² reserved for the conditioning rows (group-wise clipping: the
    # rows and the UNet set are clipped separately to C·sqrt(share) and C·sqrt(1-share); ε unchanged).
    # 0: one joint clip, where a few hundred row values can be crowded out by the UNet's gradient.
    conditioning_clip_share: float = 0.0
    epsilon: float | None = 10.0  # None: a non-private run (no clipping, no noise), for comparison
    delta: float | None = None  # default: 1 / (10 N)
    # A fixed σ instead of one calibrated to `epsilon` over this run's steps: for a caller that accounts
    # over several runs (a federated client's rounds compose; its σ is calibrated over all of them).
    noise_multiplier: float | None = None
    clip_norm: float = 0.01  # C: the per-example (per-subject) L2 bound
    epochs: float = 10.0
    batch_size: int = 32  # expected logical batch: the sample rate is batch_size / N
    # What fits in one forward pass: the logical (Poisson) batch runs in micro-batches of
    # physical_batch_size // noise_draws whole units (examples, or subjects), their clipped gradients
    # summed and the noise added once per logical step.
    physical_batch_size: int = 16
    # Noise multiplicity (DPDM, Dockhorn et al. 2022): each example's loss is the mean over K (t, noise)
    # draws, clipped once. K times the compute per example, no privacy cost (same q, σ, steps, ε).
    # Its K rows share one forward pass, so K <= physical_batch_size.
    noise_draws: int = 1
    learning_rate: float = 1e-4  # at batch 32; scaled linearly with batch_size, as DP-LDM does
    privacy_unit: str = "example"
    max_examples_per_subject: int = 1
    seed: int = 0
    secure_noise: bool = True  # DP noise from an OS-seeded generator; False only for reproducible tests
    # Neighbouring datasets: one example (subject) added or removed, or one replaced by another (the
    # same noise then gives a larger ε; σ is calibrated for whichever is asked).
    adjacency: str = "add-remove"
    accountant: str | None = None  # default: "prv" for add-remove, "pld" (the one with replace-one) otherwise
    backend: str = "privdiff"  # per-sample clipping: privdiff's fast clipping, or "opacus" (the reference)
    checkpoint_every: int = 25
    keep_byproducts: bool = False
    num_samples: int = 16
    sample_prompts: tuple[str, ...] = ()  # prompts for samples.png; default: public shape prompts
    # FedProx's proximal term (mu/2)·||w - w_start||², w_start the set the run starts from (the round's
    # global model in federated training). It does not depend on the data, so under DP its gradient
    # is added after the noise: post-processing, ε unchanged.
    proximal_mu: float = 0.0
    # Where and on what it runs (not part of what a checkpoint must match): the device the pipeline
    # moves to (default: where it is), and how many items of a procedural set (default: all).
    device: str | None = None
    num_items: int | None = None

    def __post_init__(self) -> None:
        from .trainable import TRAINABLE_SETS

        if self.trainable not in TRAINABLE_SETS:
            raise ValueError(f"trainable={self.trainable!r} is not one of {', '.join(TRAINABLE_SETS)}.")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"epsilon={self.epsilon} must be positive (smaller is more private); "
                             "for a non-private comparison run use --no-dp (epsilon=None from Python).")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta} must lie in (0, 1), and below 1/N for N training images.")
        for name in ("batch_size", "physical_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if isinstance(self.noise_draws, bool) or not isinstance(self.noise_draws, int) or self.noise_draws < 1:
            raise ValueError(f"noise_draws={self.noise_draws!r} must be a whole number, at least 1 (1: one (t, noise) "
                             "draw per example, plain DP-LDM).")
        if self.noise_draws > self.physical_batch_size:
            raise ValueError(f"noise_draws={self.noise_draws} is more than physical_batch_size="
                             f"{self.physical_batch_size}: an example's draws share one forward pass; raise "
                             "physical_batch_size to at least noise_draws, or use fewer draws.")
        if self.num_samples < 0:
            raise ValueError(f"num_samples={self.num_samples} must be 0 (no sample grid) or more.")
        check_proximal_mu(self.proximal_mu)
        if not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs} must be positive.")
        if not self.clip_norm > 0 or not self.learning_rate > 0:
            raise ValueError("clip_norm and learning_rate must be positive.")
        if self.privacy_unit not in ("example", "subject"):
            raise ValueError(f"privacy_unit={self.privacy_unit!r} must be 'example' or 'subject'.")
        from ..privacy.accounting import check_adjacency

        check_adjacency(self.adjacency, accountant=self.accountant)
        if self.backend not in ("privdiff", "opacus"):
            raise ValueError(f"backend={self.backend!r} must be 'privdiff' or 'opacus'.")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank} must be at least 1.")
        if not 0 <= self.conditioning_clip_share < 1:
            raise ValueError(f"conditioning_clip_share={self.conditioning_clip_share} must lie in [0, 1).")
        if self.conditioning_clip_share and not self.conditioning_words:
            raise ValueError("conditioning_clip_share applies to conditioning_words; give some, or leave it 0.")
        if self.noise_multiplier is not None and (self.epsilon is None or not self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier={self.noise_multiplier} needs a private run (epsilon set) and must "
                             "be positive.")
        if self.conditioning_words and self.trainable == "lora":
            raise ValueError("conditioning_words go with the weight-difference sets (attention, transformer, ...), "
                             "not with lora: a LoRA file has no place for token-table rows.")


    @property
    def accountant_name(self) -> str:
        from ..privacy.accounting import default_accountant

        return self.accountant or default_accountant(self.adjacency)


class ExtraUnits(Protocol):
    """Privacy units a run holds besides its N data units, e.g. an audit's canaries
    (`pipelines.canary_audit`). They are units N..N+count-1 of the engine's Poisson sampling; what
    they compute or read is a by-product of the run, never part of its release."""

    count: int

    def attach(self, *, run: FineTuneRun) -> None:
        """Called once the run's engine exists (e.g. to hook the trainable layers)."""

    def per_sample_loss(self, indices, *, data_loss: Callable) -> Any:
        """One loss per row of `indices` (data rows and extra rows mixed, in one forward pass):
        `data_loss` computes the data units' losses."""

    def read_noisy_average(self) -> None:
        """Called each step between the engine's noisy average and the optimizer."""


class FineTuneRun:
    """State of one training run, savable as safetensors + JSON (no pickle) for exact resumption."""

    def __init__(self, *, pipeline, dataset, config: DPLDMConfig, num_examples: int,
                 progress: Callable[[Progress], None] | None = None, extra_units: ExtraUnits | None = None):
        """`extra_units` (an audit's canaries; see `ExtraUnits`) join the privacy units after the N data
        units: sampled, clipped and noised with them at the data's sample rate and plan of steps."""
        import torch

        from ..privacy.engine import DPConfig, DPSGDEngine
        from ..privacy.dp_sgd import PoissonSampler, secure_generator
        from .trainable import select_trainable

        self.config = config
        self.pipeline = pipeline
        self.unet = pipeline.unet
        self.device = self.unet.device
        self.chosen = select_trainable(unet=self.unet, trainable=config.trainable,
                                       ablation_blocks=config.ablation_blocks, lora_rank=config.lora_rank)
        self.text_rows = None
        pipeline.text_encoder.requires_grad_(False)  # only chosen rows of it ever train
        if config.conditioning_words:
            self.text_rows = attach_conditioning_rows(pipeline=pipeline, words=config.conditioning_words)
        # One container for everything trained: the engine clips the UNet set and the text rows together.
        self.model = training_modules(pipeline)
        self.base_state = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.num_examples = num_examples
        self.sample_rate = min(1.0, config.batch_size / num_examples)
        self.total_steps = max(1, math.ceil(config.epochs * num_examples / config.batch_size))
        self.delta = config.delta if config.delta is not None else 1.0 / (10 * num_examples)
        lr = config.learning_rate * config.batch_size / 32
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.anchor = None
        if config.proximal_mu:
            self.anchor_proximal_term()
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=0.0)
        self.train_generator = torch.Generator().manual_seed(config.seed + 1)
        # DP noise is drawn where the parameters live (a CPU draw of every trainable weight per step
        # would dominate a GPU step); the Poisson batches always come from a CPU stream.
        noise_generator = (secure_generator(self.device) if config.secure_noise
                           else torch.Generator(self.device).manual_seed(config.seed))
        self.step = 0
        self.losses: list[float] = []
        self.extra_units = extra_units
        if extra_units is not None and (config.epsilon is None or config.privacy_unit != "example"):
            raise ValueError("extra units (canaries) join a private run with privacy_unit='example': set epsilon.")
        self._prepare(dataset, progress=progress)
        subjects = dataset.subjects() if config.privacy_unit == "subject" else None
        if progress is not None and config.epsilon is not None and config.noise_multiplier is None:
            progress(Progress(step=0, total=1, phase="calibrating", unit="σ"))
        if config.epsilon is None:
            self.engine = None
            self.sampler = PoissonSampler(num_examples=num_examples, sample_rate=self.sample_rate,
                                          steps=self.total_steps, generator=torch.Generator().manual_seed(config.seed))
        else:
            self.engine = DPSGDEngine(
                model=self.model,
                optimizer=self.optimizer,
                config=DPConfig(
                    delta=self.delta, max_grad_norm=config.clip_norm, sample_rate=self.sample_rate,
                    steps=self.total_steps, privacy_unit=config.privacy_unit,
                    target_epsilon=config.epsilon if config.noise_multiplier is None else None,
                    noise_multiplier=config.noise_multiplier,
                    max_examples_per_subject=config.max_examples_per_subject,
                    physical_batch_size=config.physical_batch_size, accountant=config.accountant_name,
                    adjacency=config.adjacency,
                    backend=config.backend,
                    clip_budget_shares=((("text_encoder.", config.conditioning_clip_share),)
                                        if config.conditioning_clip_share else ()),
                    draws_per_example=config.noise_draws,
                ),
                num_examples=num_examples + (extra_units.count if extra_units is not None else 0),
                subjects=subjects,
                generator=noise_generator,
            )
            self.sampler = self.engine.sampler
            if extra_units is not None:
                extra_units.attach(run=self)  # after the engine: its clipper's hooks come first

    def _prepare(self, dataset, *, progress=None) -> None:
        """Encode every image and caption once with the frozen VAE and text encoder (kept in memory)."""
        import torch

        pipe = self.pipeline
        latents, captions = [], []
        with torch.no_grad():
            for start in range(0, self.num_examples, 64):
                items = [dataset[i] for i in range(start, min(start + 64, self.num_examples))]
                pixels = torch.stack([item["pixel_values"] for item in items]).to(self.device, pipe.vae.dtype)
                latents.append(encode_latents(vae=pipe.vae, pixels=pixels))
                captions.extend(item["caption"] for item in items)
                if progress is not None:
                    progress(Progress(step=len(captions), total=self.num_examples, phase="encoding", unit="image"))
            unique = sorted(set(captions))
            ids = pipe.tokenizer(unique, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            table = pipe.text_encoder(ids)[0]
        row = {c: i for i, c in enumerate(unique)}
        self.latents = torch.cat(latents)
        which = torch.tensor([row[c] for c in captions], device=self.device)
        self.context = table[which]
        self.caption_ids = ids[which]  # the text encoder reruns on these when its rows train
        self.noise_scheduler = training_scheduler(pipe)

    def per_sample_loss(self, indices):
        """One loss per row of `indices`, each row with its own (t, noise) draw (an index repeated K
        times gets K draws: noise multiplicity)."""
        import torch

        # Draws come from a CPU generator whatever the device: a run resumes exactly, on any device.
        indices = indices.to(self.device)
        z0 = self.latents[indices]
        noise = torch.randn(z0.shape, generator=self.train_generator).to(self.device, z0.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(z0),),
                          generator=self.train_generator).to(self.device)
        zt = self.noise_scheduler.add_noise(z0, noise, t)
        context = self.pipeline.text_encoder(self.caption_ids[indices])[0] if self.text_rows is not None \
            else self.context[indices]
        prediction = self.unet(zt, t, context).sample
        target = denoising_target(scheduler=self.noise_scheduler, z0=z0, noise=noise, t=t)
        return (prediction - target).pow(2).mean(dim=(1, 2, 3))

    def anchor_proximal_term(self) -> None:
        """Take the trainable set's current values as w_start of the proximal term."""
        self.anchor = [p.detach().clone() for p in self.parameters]

    def _add_proximal_gradient(self) -> None:
        # d/dw (mu/2)·||w - w_start||² = mu·(w - w_start): public values only, so it may follow the DP noise.
        if self.anchor is None:
            return
        import torch

        with torch.no_grad():
            for p, start in zip(self.parameters, self.anchor):
                term = (p - start).mul_(self.config.proximal_mu)
                p.grad = term if p.grad is None else p.grad.add_(term)

    def _units_loss(self, indices):
        # Indices from N on are the extra units': they compute their own losses (with the data's, in one pass).
        if self.extra_units is None:
            return self.per_sample_loss(indices)
        return self.extra_units.per_sample_loss(indices, data_loss=self.per_sample_loss)

    def _after_noise(self) -> None:
        if self.extra_units is not None:
            self.extra_units.read_noisy_average()  # the engine's release alone, before the public proximal term
        self._add_proximal_gradient()

    def train_step(self) -> Progress:
        if self.engine is not None:
            info = self.engine.step(self._units_loss, after_noise=self._after_noise)
            loss, eps = info["loss"], info["epsilon"]
        else:
            indices, _ = self.sampler.sample()
            loss, eps = None, None
            if len(indices):
                draws = self.config.noise_draws  # each example's loss: the mean over its draws, as DP runs do
                losses = self.per_sample_loss(indices.repeat_interleave(draws)).reshape(-1, draws).mean(1)
                losses.mean().backward()
                self._add_proximal_gradient()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                loss = float(losses.detach().mean())
        self.step += 1
        if loss is not None:
            self.losses.append(loss)
        return Progress(step=self.step, total=self.total_steps, loss=loss, epsilon=eps)

    # ---- checkpoints (by-products: never released) --------------------------------------------

    def _fingerprint(self) -> dict:
        # Settings that only change what is kept or how often it is saved may differ on resume.
        settings = {k: v for k, v in asdict(self.config).items() if k not in ("keep_byproducts", "checkpoint_every", "device", "num_items")}
        settings["max_grad_norm"] = settings.pop("clip_norm")  # its name when checkpoints began
        if settings["noise_draws"] == 1:
            del settings["noise_draws"]  # checkpoints from before the setting existed still resume
        return {**settings, "num_examples": self.num_examples}

    def save_checkpoint(self, folder: Path) -> None:
        from .checkpoint import generator_tensors, optimizer_tensors, save_checkpoint

        if not is_main_process():
            return  # under torchrun every rank holds the same state; rank 0 writes it
        tensors = {f"param.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        optimizer, param_groups = optimizer_tensors(self.optimizer)
        tensors.update(optimizer)
        tensors.update(generator_tensors(self._generators()))
        save_checkpoint(folder=folder, kind="dp-ldm", tensors=tensors, fingerprint=self._fingerprint(), state={
            "step": self.step, "losses": self.losses, "param_groups": param_groups,
            "accountant": self.engine.accountant.to_json() if self.engine else None})

    def _generators(self) -> dict:
        return {"train": self.train_generator, "sampling": self.sampler.generator,
                "noise": self.engine.generator if self.engine else self.sampler.generator}

    def load_checkpoint(self, folder: Path) -> None:
        import torch

        from ..privacy.accounting import Accountant
        from .checkpoint import CheckpointError, load_checkpoint, restore_generators, restore_optimizer

        saved = load_checkpoint(folder=folder, kind="dp-ldm", fingerprint=self._fingerprint(),
                                resume_hint="start without --resume")
        state, tensors = saved.state, saved.tensors
        accountant = Accountant.from_json(state["accountant"]) if self.engine is not None else None
        if accountant is not None and accountant.total_steps != state["step"]:
            raise CheckpointError(f"the checkpoint in {folder} is inconsistent (step {state['step']}, "
                                  f"{accountant.total_steps} noisy steps accounted); start a new run.")
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    param.copy_(tensors[f"param.{name}"])
        restore_optimizer(self.optimizer, tensors=tensors, param_groups=state["param_groups"])
        restore_generators(self._generators(), tensors=tensors)
        self.step = state["step"]
        self.losses = list(state["losses"])
        if self.engine is not None:
            self.engine.accountant = accountant


def validate_dataset(*, dataset, config: DPLDMConfig) -> int:
    from ..privacy.accounting import check_delta

    n = len(dataset)
    if n < 2:
        raise ValueError(f"the dataset has {n} image(s); DP training needs at least 2 (and many more to be useful).")
    if config.batch_size > n:
        raise ValueError(f"batch_size={config.batch_size} is larger than the dataset ({n} images); "
                         f"use at most {n}.")
    units = n if config.privacy_unit == "example" else len({s for s in dataset.subjects()})
    if config.epsilon is not None:
        check_delta(delta=config.delta if config.delta is not None else 1.0 / (10 * n), num_examples=units)
    return n


@dataclass(frozen=True)
class LocalTrainingResult:
    """One in-memory fine-tune (a federated client's round): the trained set's values, and what to report."""

    parameters: dict  # name -> tensor (CPU), the trained set after training, keyed as `trained_parameters` does
    num_examples: int
    steps: int
    mean_loss: float | None  # computed on private data: outside any DP guarantee, for progress only
    epsilon: float | None  # this run's local DP-SGD ε (None: no local DP)


def train_in_memory(*, pipeline, dataset, config: DPLDMConfig, initial: dict | None = None,
                    progress: Callable[[Progress], None] | None = None) -> LocalTrainingResult:
    """Fine-tune `pipeline`'s trainable set on `dataset` in memory (no files): the same trainer as
    `train_dp_ldm` (DP-SGD when `config.epsilon` is set, plain AdamW when None). `initial` (name ->
    tensor, as `trained_parameters` returns) is loaded into the set first, e.g. the global model of a
    federated round. The pipeline is changed in place (its set is trained)."""
    import torch

    num_examples = validate_dataset(dataset=dataset, config=config)
    run = FineTuneRun(pipeline=pipeline, dataset=dataset, config=config, num_examples=num_examples)
    if initial is not None:
        current = dict(run.model.named_parameters())
        trained = {n for n, p in current.items() if p.requires_grad}
        if set(initial) != trained:
            missing, extra = sorted(trained - set(initial)), sorted(set(initial) - trained)
            raise ValueError(f"the initial parameters do not match the trainable set {config.trainable!r}: "
                             f"missing {missing[:3]}, unexpected {extra[:3]}.")
        with torch.no_grad():
            for name, value in initial.items():
                current[name].copy_(value)
        if config.proximal_mu:
            run.anchor_proximal_term()  # FedProx pulls toward the round's global model
    while run.step < run.total_steps:
        info = run.train_step()
        if progress is not None:
            progress(info)
    return LocalTrainingResult(
        parameters=trained_parameters(pipeline=pipeline), num_examples=num_examples,
        steps=run.step, mean_loss=sum(run.losses) / len(run.losses) if run.losses else None,
        epsilon=run.engine.accountant.epsilon(delta=run.delta) if run.engine else None)


def is_main_process() -> bool:
    """True in a single process, and on rank 0 under torchrun (the one rank that writes files)."""
    from ..privacy.engine import distributed_rank_and_size

    return distributed_rank_and_size()[0] == 0
