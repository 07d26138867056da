"""DPAgg-TI (arXiv 2411.14639): one Textual Inversion embedding per image, clipped, noisily averaged.

Every private image (or disjoint subset, or subject) gets its own placeholder token; all of them
train side by side, each sample's prompt naming its own token, so n embeddings cost about what one
TI run costs per step. Embedding i depends on its own images and its own random stream only
(`dpagg_units`), which is what the aggregation's sensitivity assumes. Then:

    release = init + (sum over kept i of clip_C(e_i - init) + N(0, σ²C²I)) / (q·n)

with Poisson subsampling at rate q (q = 1: every embedding). σ is calibrated to the target (ε, δ)
under the chosen adjacency: the analytic Gaussian mechanism when q = 1, dp-accounting's PLD
otherwise. Per-subset units are accounted as replace-one over subsets: adding an image changes one
subset's embedding (sensitivity 2C), it does not add a unit. The per-unit embeddings are the most
sensitive by-product: they stay in memory and never enter a released file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..training.inputs import resolve_base, resolve_data
from ..training.outputs import BYPRODUCTS
from ..training.result import Progress, TrainResult
from ..vocabulary import legacy_repr


def _check_token(token: str, template: str) -> None:
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"token={token!r} must be one word without spaces, e.g. '<my-style>'.")
    if "{token}" not in template:
        raise ValueError(f"template={template!r} must contain {{token}}, where the new token goes.")


@dataclass(frozen=True)
class DPAggConfig:
    token: str = "<my-style>"
    init_word: str = "painting"
    num_vectors: int = 1
    template: str = "a picture in the style of {token}"  # public prompt; {token} is the placeholder
    epsilon: float | None = 1.0  # None: the plain average, WITHOUT privacy (comparison runs only)
    delta: float | None = None  # default: 1 / (10 n)
    clip_norm: float = 0.5  # C: the bound on each embedding's (centred) L2 norm
    center: bool = True  # clip e_i - init rather than e_i
    sample_rate: float = 1.0  # q: Poisson subsampling of the per-image embeddings
    num_subsets: int | None = None  # None: one embedding per image; k: k disjoint subsets
    # "example": the unit is an image (or a subset); "subject": one embedding per person, from all
    # of that person's images (the dataset's subject ids), so the guarantee covers whole people.
    privacy_unit: str = "example"
    steps: int = 100  # optimisation steps of every embedding
    batch_size: int = 16  # samples per step (each naming its own embedding's token)
    learning_rate: float = 5e-3
    seed: int = 0
    secure_noise: bool = True  # DP noise and the units' streams from the OS; False only for reproducible tests
    adjacency: str = "add-remove"  # or "replace-one" (one image or subject replaced by another)
    # How the run is kept and released, not what it trains (left out of the checkpoint's fingerprint):
    a1111: bool = field(default=False, repr=False)  # also write an A1111 .pt embedding (SD1/SD2)
    checkpoint_every: int = field(default=25, repr=False)  # a kill loses at most this many steps
    num_items: int | None = field(default=None, repr=False)  # of a built-in set (default: all)
    # The key of the units' streams (32 bytes); None: from the OS. Tests inject one to replay a run.
    secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from ..privacy.accounting import check_adjacency

        check_adjacency(self.adjacency)
        _check_checkpoint_every(self.checkpoint_every)
        if self.adjacency == "replace-one" and self.num_subsets is not None:
            raise ValueError("adjacency='replace-one' with num_subsets: replacing one image can change two subsets; "
                             "use per-image units (leave num_subsets unset) or adjacency='add-remove'.")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"epsilon={self.epsilon} must be positive (smaller is more private); for a non-private "
                             "comparison run use --no-dp (epsilon=None from Python).")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta} must lie in (0, 1), below 1/n.")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm={self.clip_norm} must be positive.")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate={self.sample_rate} must lie in (0, 1].")
        if self.num_subsets is not None and self.num_subsets < 1:
            raise ValueError(f"num_subsets={self.num_subsets} must be at least 1.")
        if self.privacy_unit not in ("example", "subject"):
            raise ValueError(f"privacy_unit={self.privacy_unit!r} must be 'example' or 'subject'.")
        if self.privacy_unit == "subject" and self.num_subsets is not None:
            raise ValueError("privacy_unit='subject' makes one embedding per subject; leave num_subsets unset.")
        for name in ("steps", "batch_size", "num_vectors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        _check_token(self.token, self.template)


@dataclass(frozen=True)
class AggregateResult:
    release: torch.Tensor  # [k, d]
    noise_multiplier: float
    kept: int  # embeddings kept by the Poisson subsampling (a by-product: not released)


def calibrate_aggregate_sigma(*, epsilon: float, delta: float, sample_rate: float,
                              adjacency: str = "add-remove") -> float:
    """σ (relative to each unit's bound C) for one (subsampled) Gaussian release at (ε, δ) under
    `adjacency` over the units: analytic when q = 1 (replace-one moves the sum by 2C), PLD otherwise."""
    from ..privacy.accounting import analytic_gaussian_sigma, calibrate_noise_multiplier

    try:
        if sample_rate == 1.0:
            return analytic_gaussian_sigma(epsilon=epsilon, delta=delta) * (2.0 if adjacency == "replace-one" else 1.0)
        return calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=1,
                                          accountant="pld", adjacency=adjacency)
    except ValueError as error:
        raise ValueError(f"target epsilon={epsilon} cannot be met with delta={delta} and sample rate {sample_rate} "
                         f"({error}); raise epsilon or delta, or lower the sample rate.") from None


def aggregate(*, embeddings: torch.Tensor, init: torch.Tensor, clip: float, noise_multiplier: float,
              sample_rate: float, generator: torch.Generator, center: bool = True) -> AggregateResult:
    """The DPAgg release from per-unit embeddings [n, k, d]: clip each unit's whole [k, d] block to
    norm C (after subtracting `init` when `center`), Poisson-subsample at q, sum, add N(0, σ²C²), divide by q·n."""
    n = embeddings.shape[0]
    base = init.expand_as(embeddings[0]) if center else torch.zeros_like(embeddings[0])
    centred = (embeddings - base).double()
    norms = centred.flatten(1).norm(dim=1)
    clipped = centred * (clip / (norms + 1e-12)).clamp(max=1.0)[:, None, None]
    keep = torch.rand(n, generator=generator, dtype=torch.float64) < sample_rate if sample_rate < 1 \
        else torch.ones(n, dtype=torch.bool)
    total = clipped[keep].sum(dim=0)
    if noise_multiplier > 0:
        total = total + noise_multiplier * clip * torch.randn(total.shape, generator=generator, dtype=torch.float64)
    release = base.double() + total / (sample_rate * n)
    return AggregateResult(release=release.to(embeddings.dtype), noise_multiplier=noise_multiplier, kept=int(keep.sum()))


# Where a stopped TI run keeps its checkpoint: for DPAgg-TI the per-unit embeddings, the most sensitive
# by-product (outside the guarantee). Deleted when the run releases.


def _run_secret(*, config, folder: Path, resume: bool) -> bytes:
    """The key of the units' streams (and of the subset assignment): 256 bits from the OS, kept in
    the checkpoint across a stop; derived from the seed only when secure_noise is off (tests)."""
    import hashlib
    import os

    if resume:
        from ..training.checkpoint import load_checkpoint

        return bytes.fromhex(load_checkpoint(folder=folder, kind="dpagg-ti", fingerprint=None).state["secret"])
    if config.secure_noise:
        return os.urandom(32)
    return hashlib.sha256(f"privdiff-dpagg-test-secret/{config.seed}".encode()).digest()


EMBEDDING_FILE = "learned_embeds.safetensors"  # what a finished TI run leaves in its folder


@dataclass(frozen=True)
class DPAggPlan:
    """What a DPAgg-TI request comes to, checked before anything loads: units, δ, σ."""

    num_images: int
    units: int
    protected: int  # the privacy units the guarantee counts: images (also with subsets) or subjects
    accounted: str  # the relation over the released units
    delta: float
    noise_multiplier: float  # 0 without DP


def plan_dpagg(*, dataset, config: DPAggConfig) -> DPAggPlan:
    """Check a DPAgg-TI request against its data (no model needed) and calibrate σ."""
    from ..data.base import DatasetError
    from .dpagg_units import expected_units

    n_images = len(dataset)
    if n_images < 2:
        raise DatasetError(f"the dataset has {n_images} image(s); DPAgg-TI needs at least 2.")
    if config.num_subsets is not None and config.num_subsets > n_images:
        raise ValueError(f"num_subsets={config.num_subsets} is more than the {n_images} images: every subset needs "
                         "at least one image; use at most that many subsets.")
    units = expected_units(num_images=n_images, privacy_unit=config.privacy_unit, num_subsets=config.num_subsets,
                           dataset=dataset)
    # The guarantee is for images (or subjects); with subsets, adding one image replaces a subset's embedding.
    protected = n_images if config.num_subsets is not None else units
    accounted = "replace-one" if config.num_subsets is not None else config.adjacency
    delta = config.delta if config.delta is not None else 1.0 / (10 * protected)
    sigma = 0.0
    if config.epsilon is not None:
        from ..privacy.accounting import check_delta

        check_delta(delta=delta, num_examples=protected)
        sigma = calibrate_aggregate_sigma(epsilon=config.epsilon, delta=delta, sample_rate=config.sample_rate,
                                          adjacency=accounted)
    return DPAggPlan(num_images=n_images, units=units, protected=protected, accounted=accounted, delta=delta,
                     noise_multiplier=sigma)


def check_ti_out(*, out, resume: bool) -> Path:
    """A TI run's output folder, checked before anything loads (a release cut short is completed first)."""
    from ..training.checkpoint import has_checkpoint
    from ..training.outputs import check_out_folder
    from ..training.release import recover_release

    out = Path(out)
    if out.is_dir():
        recover_release(out)
    if not (resume and (out / EMBEDDING_FILE).exists()):
        check_out_folder(out, results=[EMBEDDING_FILE], resume=resume,
                         has_checkpoint=has_checkpoint(out / BYPRODUCTS) if resume else None)
    return out


def _finished(out: Path, *, units: int) -> TrainResult:
    """A resumed run whose release is already complete: its files, and nothing more to do."""
    import shutil

    from ..privacy.record import read_record

    names = {"diffusers": EMBEDDING_FILE, "comfyui": "learned_embeds_comfyui.safetensors",
             "a1111": "learned_embeds_a1111.pt"}
    files = {kind: out / name for kind, name in names.items() if (out / name).is_file()}
    shutil.rmtree(out / BYPRODUCTS, ignore_errors=True)  # what a crash after the release left behind
    record = read_record(files["diffusers"])
    # DPAgg-TI records each embedding's steps in its settings; DP-SGD TI's are the record's own.
    steps = record.extra.get("dp_ti", {}).get("steps", record.steps)
    return TrainResult(out=out, files=files, record=record, figures={"num_units": units, "steps_done": steps})


def _release_embedding(*, out: Path, vectors, token: str, text_encoders, record, a1111: bool) -> dict:
    """The embedding's files, all or none (`training.release`), then the by-products deleted."""
    import shutil

    from ..training.release import Release
    from .textual_inversion import save_embedding

    release = Release(out)
    with release as staging:
        files = save_embedding(vectors=vectors, token=token, text_encoders=text_encoders, out=staging, record=record,
                               a1111=a1111)
    shutil.rmtree(out / BYPRODUCTS, ignore_errors=True)  # the checkpoint: per-unit embeddings, or the rows
    return {kind: release.final(path) for kind, path in files.items()}


def _check_checkpoint_every(checkpoint_every: int) -> None:
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise ValueError(f"checkpoint_every={checkpoint_every!r} must be a whole number of steps, at least 1.")


def train_dpagg_ti(*, base, data, out: str | Path, config: DPAggConfig = DPAggConfig(),
                   progress: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
                   resume: bool = False) -> TrainResult:
    """Train one embedding per unit (`config.steps` steps each), release their DP average, write the files.

    Works on SD1/SD2 and SDXL pipelines (the token gets rows in both SDXL encoders; a unit's rows in
    both are clipped together as one vector). `should_stop` is polled after each step: a stopped run
    releases nothing and leaves a checkpoint in out/BYPRODUCTS that `resume=True` continues exactly; so
    does a release that fails, and a kill loses at most `config.checkpoint_every` steps. `config.secret`
    (32 bytes) keys the units' streams; by default it comes from the OS. `base` and `data` are what
    every trainer takes (`training.inputs`)."""
    from ..privacy.dp_sgd import secure_generator
    from ..privacy.record import PrivacyRecord, record_for_gaussian_aggregate
    from ..training.outputs import prepare_out_folder
    from .dpagg_units import make_units, train_unit_embeddings
    from .textual_inversion import check_a1111, check_token_and_init_word, encoder_slots

    dataset = resolve_data(base=base, data=data, seed=config.seed, num_items=config.num_items)
    plan = plan_dpagg(dataset=dataset, config=config)
    out = check_ti_out(out=out, resume=resume)
    if resume and (out / EMBEDDING_FILE).exists():
        return _finished(out, units=plan.units)
    pipeline = resolve_base(base)
    check_a1111(a1111=config.a1111, num_encoders=len(encoder_slots(pipeline)))
    check_token_and_init_word(pipeline=pipeline, token=config.token, num_vectors=config.num_vectors,
                              init_word=config.init_word)
    folder = out / BYPRODUCTS
    prepare_out_folder(out)
    secret = config.secret if config.secret is not None else _run_secret(config=config, folder=folder, resume=resume)
    units = make_units(dataset=dataset, secret=secret, privacy_unit=config.privacy_unit,
                       num_subsets=config.num_subsets)
    fingerprint = {"config": legacy_repr(config, renamed={"clip_norm": "clip"}), "num_images": plan.num_images}
    trained = train_unit_embeddings(
        pipeline=pipeline, dataset=dataset, units=units, secret=secret, template=config.template,
        init_word=config.init_word, num_vectors=config.num_vectors, steps=config.steps, batch_size=config.batch_size,
        learning_rate=config.learning_rate, progress=_step_reporter(progress), should_stop=should_stop,
        checkpoint_folder=folder, resume=resume, fingerprint=fingerprint, checkpoint_state={"secret": secret.hex()},
        checkpoint_every=config.checkpoint_every)
    if trained.stopped:
        return TrainResult(out=out, stopped=True, figures={"num_units": plan.units, "steps_done": trained.steps_done})
    noise_generator = secure_generator() if config.secure_noise else torch.Generator().manual_seed(config.seed + 1)
    result = aggregate(embeddings=trained.embeddings, init=trained.init, clip=config.clip_norm,
                       noise_multiplier=plan.noise_multiplier, sample_rate=config.sample_rate,
                       generator=noise_generator, center=config.center)
    widths, text_encoders = trained.widths, trained.text_encoders
    del trained  # the per-unit embeddings: the most sensitive by-product, never written
    settings = {"method": "dpagg", "token": config.token, "init_word": config.init_word,
                "num_vectors": config.num_vectors, "template": config.template, "steps": config.steps,
                "center": config.center, "num_images": plan.num_images, "privacy_unit": config.privacy_unit,
                "num_subsets": config.num_subsets, "units": plan.units}
    if config.epsilon is not None:
        record = record_for_gaussian_aggregate(noise_multiplier=plan.noise_multiplier, clip=config.clip_norm,
                                               sample_rate=config.sample_rate, num_examples=plan.protected,
                                               delta=plan.delta, privacy_unit=config.privacy_unit,
                                               adjacency=config.adjacency, accounted_adjacency=plan.accounted,
                                               extra={"dp_ti": settings})
    else:
        record = PrivacyRecord(mechanism="none", extra={"dp_ti": settings,
                                                        "warning": "averaged WITHOUT differential privacy"})
    files = _release_embedding(out=out, vectors=list(torch.split(result.release, widths, dim=-1)), token=config.token,
                               text_encoders=text_encoders, record=record, a1111=config.a1111)
    return TrainResult(out=out, files=files, record=record,
                       figures={"num_units": plan.units, "steps_done": config.steps})


@dataclass(frozen=True)
class DPSGDTIConfig:
    """The DP-SGD TI baseline: one embedding over the whole set, per-sample clipping and noise."""

    token: str = "<my-style>"
    init_word: str = "painting"
    num_vectors: int = 1
    template: str = "a picture in the style of {token}"
    epsilon: float = 1.0
    delta: float | None = None
    clip_norm: float = 0.01  # C: the per-example (per-subject) L2 bound on the gradient
    epochs: float = 20.0
    batch_size: int = 16
    learning_rate: float = 5e-3
    privacy_unit: str = "example"  # or "subject": subjects sampled, their images clipped together
    max_examples_per_subject: int = 1
    seed: int = 0
    secure_noise: bool = True
    adjacency: str = "add-remove"  # or "replace-one"
    # How the run is kept and released, not what it trains (left out of the checkpoint's fingerprint):
    a1111: bool = field(default=False, repr=False)  # also write an A1111 .pt embedding (SD1/SD2)
    checkpoint_every: int = field(default=25, repr=False)  # a kill loses at most this many steps
    num_items: int | None = field(default=None, repr=False)  # of a built-in set (default: all)

    def __post_init__(self) -> None:
        from ..privacy.accounting import check_adjacency

        check_adjacency(self.adjacency)
        _check_checkpoint_every(self.checkpoint_every)
        if self.privacy_unit not in ("example", "subject"):
            raise ValueError(f"privacy_unit={self.privacy_unit!r} must be 'example' or 'subject'.")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon={self.epsilon} must be positive (smaller is more private).")
        _check_token(self.token, self.template)
        if self.batch_size < 1 or not self.epochs > 0 or self.num_vectors < 1:
            raise ValueError("batch_size, epochs and num_vectors must be positive.")


def plan_dpsgd_ti(*, dataset, config: DPSGDTIConfig) -> tuple[int, list | None, int, float]:
    """Check a DP-SGD TI request against its data (no model needed): (examples, subjects, units, δ)."""
    from ..data.base import DatasetError
    from ..privacy.accounting import check_delta
    from .dpagg_units import subject_ids

    n = len(dataset)
    if n < 2:
        raise DatasetError(f"the dataset has {n} image(s); DP-SGD TI needs at least 2.")
    if config.batch_size > n:
        raise ValueError(f"batch_size={config.batch_size} is larger than the dataset ({n} images).")
    subjects = subject_ids(dataset) if config.privacy_unit == "subject" else None
    units = n if subjects is None else len(set(subjects))
    if config.batch_size > units:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {units} privacy units.")
    delta = config.delta if config.delta is not None else 1.0 / (10 * units)
    check_delta(delta=delta, num_examples=units)
    return n, subjects, units, delta


class DPSGDTIRun:
    """One DP-SGD TI run: the placeholder rows AdamW trains, the engine that clips and noises their
    per-example gradients, the generators; saved and restored through the one checkpoint unit.

    `extra_units` (an audit's canaries, `pipelines.canary_audit.RowCanaries`) follow the protocol of
    `training.fine_tune.ExtraUnits` with this run as `run`: they are units n..n+count-1 of the
    engine's Poisson sampling, at the data's sample rate and plan of steps, and read the noisy
    average before the optimizer. None (every training run): the run is exactly as without the hook.
    """

    def __init__(self, *, pipeline, placeholders, dataset, config: DPSGDTIConfig, n: int, subjects, units: int,
                 delta: float, extra_units=None):
        from ..privacy.accounting import default_accountant
        from ..privacy.dp_sgd import secure_generator
        from ..privacy.engine import DPConfig, DPSGDEngine
        from ..training.diffusion import training_scheduler
        from .dpagg_units import encode_images
        from .textual_inversion import placeholder_names

        if extra_units is not None and subjects is not None:
            raise ValueError("extra units (canaries) join a run with privacy_unit='example': each is one example.")
        self.pipeline, self.placeholders, self.extra_units = pipeline, placeholders, extra_units
        encoded = encode_images(pipeline=pipeline, dataset=dataset, indices=range(n))
        self.latents = torch.stack([encoded[i] for i in range(n)])
        names = placeholder_names(token=config.token, num_vectors=config.num_vectors)
        self.prompt_ids = placeholders.prompt_ids([config.template.format(token=" ".join(names))])
        self.image_size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        self.scheduler = training_scheduler(pipeline)
        pipeline.unet.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([rows.rows for rows in placeholders.rows],
                                           lr=config.learning_rate * config.batch_size / 16, weight_decay=0.0)
        self.steps = max(1, math.ceil(config.epochs * units / config.batch_size))
        self.train_generator = torch.Generator().manual_seed(config.seed + 1)
        self.engine = DPSGDEngine(
            model=torch.nn.ModuleList(placeholders.text_encoders), optimizer=self.optimizer,
            num_examples=n + (extra_units.count if extra_units is not None else 0),
            config=DPConfig(delta=delta, max_grad_norm=config.clip_norm, sample_rate=config.batch_size / units,
                            steps=self.steps, target_epsilon=config.epsilon, physical_batch_size=64,
                            privacy_unit=config.privacy_unit, adjacency=config.adjacency,
                            accountant=default_accountant(config.adjacency),
                            max_examples_per_subject=config.max_examples_per_subject),
            subjects=subjects,
            generator=secure_generator() if config.secure_noise else torch.Generator().manual_seed(config.seed),
        )
        self.generators = {"train": self.train_generator, "noise": self.engine.generator}
        if self.engine.sampler.generator is not self.engine.generator:
            self.generators["sampling"] = self.engine.sampler.generator
        if extra_units is not None:
            extra_units.attach(run=self)  # after the engine: its clipper's hooks come first

    def train_step(self) -> dict:
        """One DP-SGD step (the engine's report). Indices from n on are the extra units': they compute
        their own losses, with the data's in one pass, and read the engine's noisy average."""
        if self.extra_units is None:
            return self.engine.step(self.per_sample_loss)
        extra = self.extra_units
        return self.engine.step(lambda indices: extra.per_sample_loss(indices, data_loss=self.per_sample_loss),
                                after_noise=extra.read_noisy_average)

    def per_sample_loss(self, indices):
        from ..training.diffusion import denoising_target
        from .textual_inversion import encode_prompts

        z0, scheduler = self.latents[indices], self.scheduler
        noise = torch.randn(z0.shape, generator=self.train_generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(indices),), generator=self.train_generator)
        context, added = encode_prompts(pipeline=self.pipeline, image_size=self.image_size,
                                        ids=[ids.expand(len(indices), -1) for ids in self.prompt_ids])
        prediction = self.pipeline.unet(scheduler.add_noise(z0, noise, t), t, context, added_cond_kwargs=added).sample
        target = denoising_target(scheduler=scheduler, z0=z0, noise=noise, t=t)
        return (prediction - target).pow(2).mean(dim=(1, 2, 3))

    def save(self, *, folder: Path, fingerprint: dict, step: int) -> None:
        from ..training import checkpoint as ckpt

        tensors, param_groups = ckpt.optimizer_tensors(self.optimizer)
        tensors.update({f"rows.{i}": rows.rows for i, rows in enumerate(self.placeholders.rows)})
        tensors.update(ckpt.generator_tensors(self.generators))
        ckpt.save_checkpoint(folder=folder, kind="dpsgd-ti", tensors=tensors, fingerprint=fingerprint, state={
            "step": step, "accountant": self.engine.accountant.to_json(), "param_groups": param_groups})

    def load(self, *, folder: Path, fingerprint: dict) -> int:
        """Restore a checkpoint; returns the step it was taken after."""
        from ..privacy.accounting import Accountant
        from ..training import checkpoint as ckpt

        saved = ckpt.load_checkpoint(folder=folder, kind="dpsgd-ti", fingerprint=fingerprint)
        with torch.no_grad():
            for i, rows in enumerate(self.placeholders.rows):
                rows.rows.copy_(saved.tensors[f"rows.{i}"])
        ckpt.restore_optimizer(self.optimizer, tensors=saved.tensors, param_groups=saved.state["param_groups"])
        ckpt.restore_generators(self.generators, tensors=saved.tensors)
        first, self.engine.accountant = saved.state["step"], Accountant.from_json(saved.state["accountant"])
        if self.engine.accountant.total_steps != first:
            raise ckpt.CheckpointError(f"the checkpoint in {folder} is inconsistent (step {first}, "
                                       f"{self.engine.accountant.total_steps} noisy steps accounted); start a new run.")
        return first


def train_dpsgd_ti(*, base, data, out: str | Path, config: DPSGDTIConfig = DPSGDTIConfig(),
                   progress: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
                   resume: bool = False) -> TrainResult:
    """Train one embedding with DP-SGD on privdiff's engine: per-sample gradients of the new rows only
    (in both encoders for SDXL, clipped together). `should_stop` is polled after each step: a stopped
    run releases nothing and leaves a checkpoint in out/BYPRODUCTS that `resume=True` continues exactly;
    so does a release that fails, and a kill loses at most `config.checkpoint_every` steps."""
    from ..privacy.accounting import default_accountant
    from ..privacy.record import record_for_dp_sgd
    from ..training.outputs import prepare_out_folder
    from .textual_inversion import (Placeholders, check_a1111, check_token_and_init_word, encoder_slots,
                                    placeholder_names)

    dataset = resolve_data(base=base, data=data, seed=config.seed, num_items=config.num_items)
    n, subjects, units, delta = plan_dpsgd_ti(dataset=dataset, config=config)
    out = check_ti_out(out=out, resume=resume)
    if resume and (out / EMBEDDING_FILE).exists():
        return _finished(out, units=units)
    pipeline = resolve_base(base)
    check_a1111(a1111=config.a1111, num_encoders=len(encoder_slots(pipeline)))
    check_token_and_init_word(pipeline=pipeline, token=config.token, num_vectors=config.num_vectors,
                              init_word=config.init_word)
    placeholders = Placeholders(pipeline=pipeline, names=placeholder_names(token=config.token,
                                                                           num_vectors=config.num_vectors),
                                init_word=config.init_word)
    try:
        run = DPSGDTIRun(pipeline=pipeline, placeholders=placeholders, dataset=dataset, config=config, n=n,
                         subjects=subjects, units=units, delta=delta)
        folder, fingerprint = out / BYPRODUCTS, {"config": legacy_repr(config, renamed={"clip_norm": "max_grad_norm"}),
                                                   "num_images": n}
        first = run.load(folder=folder, fingerprint=fingerprint) if resume else 0
        prepare_out_folder(out)
        for step in range(first, run.steps):
            spent = run.train_step()["epsilon"]
            if progress is not None:
                progress(Progress(step=step + 1, total=run.steps, epsilon=spent))
            stop = should_stop is not None and step + 1 < run.steps and should_stop()
            # On a stop, every `checkpoint_every` steps (a kill loses no more) and at the end (a
            # release that fails resumes from it).
            if stop or step + 1 == run.steps or (step + 1) % config.checkpoint_every == 0:
                run.save(folder=folder, fingerprint=fingerprint, step=step + 1)
            if stop:
                run.engine.clipper.remove()
                return TrainResult(out=out, stopped=True, figures={
                    "num_units": units, "steps_done": step + 1, "epsilon": spent})
        vectors = [rows.rows.detach().clone() for rows in placeholders.rows]
        run.engine.clipper.remove()
    finally:
        placeholders.restore()
    record = record_for_dp_sgd(history=run.engine.accountant, clip=config.clip_norm, num_examples=units,
                               delta=delta, privacy_unit=config.privacy_unit,
                               accountant=default_accountant(config.adjacency),
                               extra={"dp_ti": {"method": "dpsgd", "token": config.token, "init_word": config.init_word,
                                                "num_vectors": config.num_vectors, "template": config.template}})
    files = _release_embedding(out=out, vectors=vectors, token=config.token, text_encoders=placeholders.text_encoders,
                               record=record, a1111=config.a1111)
    return TrainResult(out=out, files=files, record=record, figures={"num_units": units, "steps_done": run.steps})


def _step_reporter(progress):
    """A (step, total) callback that forwards to a `Progress` one."""
    if progress is None:
        return None
    return lambda step, total: progress(Progress(step=step, total=total))
