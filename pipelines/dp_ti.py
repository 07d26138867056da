"""DPAgg-TI (arXiv 2411.14639): one Textual Inversion embedding per image, clipped, noisily averaged.

Every private image (or disjoint subset, or subject) gets its own placeholder token; all of them
train together in one batch, each sample's prompt naming its own token, so n embeddings cost about
what one TI run costs per step. Embedding i depends on its own images only (Adam is elementwise and
the schedule is fixed in advance), which is what the aggregation's sensitivity assumes. Then:

    release = init + (sum over kept i of clip_C(e_i - init) + N(0, σ²C²I)) / (q·n)

with Poisson subsampling at rate q (q = 1: every embedding) and add/remove-one adjacency, as opacus.
σ is calibrated to the target (ε, δ): the analytic Gaussian mechanism when q = 1, dp-accounting's PLD
otherwise. The per-image embeddings are the most sensitive by-product: they stay in memory and never
enter a released file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class DPAggConfig:
    token: str = "<my-style>"
    init_word: str = "painting"
    num_vectors: int = 1
    template: str = "a picture in the style of {token}"  # public prompt; {token} is the placeholder
    epsilon: float | None = 1.0  # None: the plain average, WITHOUT privacy (comparison runs only)
    delta: float | None = None  # default: 1 / (10 n)
    clip: float = 0.5  # C: the bound on each embedding's (centred) norm
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
    secure_noise: bool = True

    def __post_init__(self) -> None:
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"epsilon={self.epsilon} must be positive (smaller is more private).")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta} must lie in (0, 1), below 1/n.")
        if not self.clip > 0:
            raise ValueError(f"clip={self.clip} must be positive.")
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
        if "{token}" not in self.template:
            raise ValueError(f"template={self.template!r} must contain {{token}}.")


@dataclass(frozen=True)
class AggregateResult:
    release: torch.Tensor  # [k, d]
    noise_multiplier: float
    kept: int  # embeddings kept by the Poisson subsampling (a by-product: not released)


def calibrate_aggregate_sigma(*, epsilon: float, delta: float, sample_rate: float) -> float:
    """σ for one (subsampled) Gaussian release at (ε, δ): analytic when q = 1, PLD otherwise."""
    from ..privacy.accounting import analytic_gaussian_sigma, calibrate_noise_multiplier

    try:
        if sample_rate == 1.0:
            return analytic_gaussian_sigma(epsilon=epsilon, delta=delta)
        return calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=1,
                                          accountant="pld")
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


@dataclass(frozen=True)
class DPAggResult:
    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    epsilon: float | None = None
    num_units: int = 0
    stopped: bool = False  # stopped on request: a checkpoint in out/BYPRODUCTS, nothing released
    steps_done: int = 0


# Where a stopped DPAgg-TI run keeps its checkpoint: the per-unit embeddings, the most sensitive
# by-product (outside the guarantee). Deleted when the run releases its average.
BYPRODUCTS = "byproducts-not-covered-by-dp"


def _save_ti_checkpoint(*, folder: Path, placeholders, optimizer, generators: dict, fingerprint: dict,
                        meta: dict) -> None:
    """A stopped TI run's state (a by-product outside ε): the embedding rows, Adam's moments, the
    random generators and `meta` (step, cursor, accountant...), checked against `fingerprint` on resume."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"rows.{i}": rows.rows.detach().cpu().contiguous() for i, rows in enumerate(placeholders.rows)}
    for name, generator in generators.items():
        tensors[f"rng.{name}"] = generator.get_state()
    for i, rows in enumerate(placeholders.rows):
        state = optimizer.state.get(rows.rows, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"adam.{i}.{key}"] = state[key].detach().cpu().contiguous()
        if "step" in state:
            tensors[f"adam.{i}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    save_file(tensors, str(folder / "checkpoint.safetensors"))
    (folder / "checkpoint.json").write_text(json.dumps({**meta, "config": fingerprint,
                                                        "note": "computed on private data; NOT covered by DP"}))


def _load_ti_checkpoint(*, folder: Path, placeholders, optimizer, generators: dict, fingerprint: dict) -> dict:
    import json

    from safetensors.torch import load_file

    if not (folder / "checkpoint.json").is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {folder}; start without resume.")
    meta = json.loads((folder / "checkpoint.json").read_text())
    if meta["config"] != fingerprint:
        raise ValueError(f"the checkpoint in {folder} was made with other settings ({meta['config']}); resume with "
                         "those, or start a new run in another folder.")
    tensors = load_file(str(folder / "checkpoint.safetensors"))
    with torch.no_grad():
        for i, rows in enumerate(placeholders.rows):
            rows.rows.copy_(tensors[f"rows.{i}"])
            if f"adam.{i}.exp_avg" in tensors:
                optimizer.state[rows.rows] = {"step": tensors[f"adam.{i}.step"][0].clone(),
                                              "exp_avg": tensors[f"adam.{i}.exp_avg"].clone(),
                                              "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].clone()}
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.{name}"])
    return meta


def _encode_dataset(*, pipeline, dataset, chunk: int = 64) -> torch.Tensor:
    """Every image's VAE latent, encoded once (the VAE is frozen), in chunks that fit in memory."""
    from .dp_ldm import encode_latents

    with torch.no_grad():
        return torch.cat([
            encode_latents(vae=pipeline.vae, pixels=torch.stack(
                [dataset[i]["pixel_values"] for i in range(start, min(start + chunk, len(dataset)))]
            ).to(pipeline.vae.dtype))
            for start in range(0, len(dataset), chunk)
        ])


def _subject_ids(dataset) -> list:
    """Every image's subject id, refusing a dataset where any is missing."""
    subjects = dataset.subjects() if hasattr(dataset, "subjects") else None
    if not subjects or any(s is None for s in subjects):
        raise ValueError("privacy_unit='subject' needs a subject id for every image (a `subject` column in "
                         "the folder's captions file, or num_subjects for a procedural set).")
    return subjects


def _units(*, num_images: int, num_subsets: int | None, dataset=None, privacy_unit: str = "example") -> list[list[int]]:
    """The images behind each released unit's embedding: one image, a disjoint subset, or a subject's images."""
    if privacy_unit == "subject":
        members: dict = {}
        for index, subject in enumerate(_subject_ids(dataset)):
            members.setdefault(subject, []).append(index)
        if len(members) < 2:
            raise ValueError(f"the dataset has {len(members)} subject(s); DPAgg-TI needs at least 2.")
        return list(members.values())
    if num_subsets is None:
        return [[i] for i in range(num_images)]
    if num_subsets > num_images:
        raise ValueError(f"num_subsets={num_subsets} is more than the {num_images} images: every subset needs "
                         "at least one image; use at most that many subsets.")
    return [list(range(s, num_images, num_subsets)) for s in range(num_subsets)]


def train_dpagg_ti(*, pipeline, dataset, out: str | Path, config: DPAggConfig = DPAggConfig(),
                   progress: Callable[[int, int], None] | None = None, a1111: bool = False,
                   should_stop: Callable[[], bool] | None = None, resume: bool = False) -> DPAggResult:
    """Train one embedding per unit in one batched run, release their DP average, write the files.

    Works on SD1/SD2 and SDXL pipelines (the token gets rows in both SDXL encoders; a unit's rows in
    both are clipped together as one vector). `should_stop` is polled after each step: a stopped run
    releases nothing and leaves a checkpoint in out/BYPRODUCTS that `resume=True` continues exactly."""
    import shutil

    from ..data.base import DatasetError
    from ..privacy.dp_sgd import secure_generator
    from ..privacy.record import PrivacyRecord, record_for_gaussian_aggregate
    from .dp_ldm import denoising_target
    from .textual_inversion import (Placeholders, check_a1111, check_new_token, encode_prompts, encoder_slots,
                                    placeholder_names, save_embedding)

    out = Path(out)
    n_images = len(dataset)
    if n_images < 2:
        raise DatasetError(f"the dataset has {n_images} image(s); DPAgg-TI needs at least 2.")
    check_a1111(a1111=a1111, num_encoders=len(encoder_slots(pipeline)))
    units = _units(num_images=n_images, num_subsets=config.num_subsets, dataset=dataset,
                   privacy_unit=config.privacy_unit)
    n = len(units)
    delta = config.delta if config.delta is not None else 1.0 / (10 * n)
    if config.epsilon is not None:
        from ..privacy.accounting import check_delta

        check_delta(delta=delta, num_examples=n)
        sigma = calibrate_aggregate_sigma(epsilon=config.epsilon, delta=delta, sample_rate=config.sample_rate)
    else:
        sigma = 0.0
    for word in placeholder_names(token=config.token, num_vectors=config.num_vectors):
        for tokenizer, _ in encoder_slots(pipeline):
            check_new_token(tokenizer=tokenizer, token=word)
    # One placeholder per unit (on tokenizer copies); the released token's name is set only when the file is written.
    names = [placeholder_names(token=f"<privdiff-unit-{u}>", num_vectors=config.num_vectors) for u in range(n)]
    placeholders = Placeholders(pipeline=pipeline, names=[t for group in names for t in group],
                                init_word=config.init_word)
    image_size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    try:
        latents = _encode_dataset(pipeline=pipeline, dataset=dataset)
        unit_of = torch.empty(n_images, dtype=torch.long)
        for u, members in enumerate(units):
            unit_of[members] = u
        prompt_ids = placeholders.prompt_ids([config.template.format(token=" ".join(names[u])) for u in range(n)])
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        optimizer = torch.optim.AdamW([rows.rows for rows in placeholders.rows], lr=config.learning_rate,
                                      weight_decay=0.0)
        generator = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(n_images, generator=generator)
        cursor = 0
        pipeline.unet.requires_grad_(False)
        total_steps = math.ceil(config.steps * n_images / config.batch_size)
        fingerprint = {"config": repr(config), "num_images": n_images, "units": n}
        checkpoint = dict(folder=out / BYPRODUCTS, placeholders=placeholders, optimizer=optimizer,
                          generators={"train": generator}, fingerprint=fingerprint)
        first = 0
        if resume:
            meta = _load_ti_checkpoint(**checkpoint)
            first, cursor = meta["step"], meta["cursor"]
        for step in range(first, total_steps):
            # A fixed cyclic schedule over the images (data-independent): every image gets the same steps.
            picks = order[(torch.arange(config.batch_size) + cursor) % n_images]
            cursor = (cursor + config.batch_size) % n_images
            z0 = latents[picks]
            noise = torch.randn(z0.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(picks),), generator=generator)
            context, added = encode_prompts(pipeline=pipeline, ids=[ids[unit_of[picks]] for ids in prompt_ids],
                                            image_size=image_size)
            prediction = pipeline.unet(scheduler.add_noise(z0, noise, t), t, context, added_cond_kwargs=added).sample
            target = denoising_target(scheduler=scheduler, z0=z0, noise=noise, t=t)
            (prediction - target).pow(2).mean(dim=(1, 2, 3)).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if progress is not None:
                progress(step + 1, total_steps)
            if should_stop is not None and step + 1 < total_steps and should_stop():
                _save_ti_checkpoint(meta={"step": step + 1, "cursor": cursor}, **checkpoint)
                return DPAggResult(out=out, num_units=n, stopped=True, steps_done=step + 1)
        # A unit's embedding is its rows in every encoder, side by side: clipped as one vector.
        widths = [rows.rows.shape[1] for rows in placeholders.rows]
        embeddings = torch.cat([rows.rows.detach().reshape(n, config.num_vectors, -1) for rows in placeholders.rows],
                               dim=-1)
        init = torch.cat(placeholders.init)
        noise_generator = secure_generator() if config.secure_noise else torch.Generator().manual_seed(config.seed + 1)
        result = aggregate(embeddings=embeddings, init=init, clip=config.clip, noise_multiplier=sigma,
                           sample_rate=config.sample_rate, generator=noise_generator, center=config.center)
        del embeddings  # the per-unit embeddings: the most sensitive by-product, never written
    finally:
        placeholders.restore()  # the pipeline's own tables, unchanged
    settings = {"method": "dpagg", "token": config.token, "init_word": config.init_word,
                "num_vectors": config.num_vectors, "template": config.template, "steps": config.steps,
                "center": config.center, "num_images": n_images, "privacy_unit": config.privacy_unit,
                "num_subsets": config.num_subsets}
    if config.epsilon is not None:
        record = record_for_gaussian_aggregate(noise_multiplier=sigma, clip=config.clip, sample_rate=config.sample_rate,
                                               num_examples=n, delta=delta, extra={"dp_ti": settings})
        epsilon = record.epsilon
    else:
        record = PrivacyRecord(mechanism="none", extra={"dp_ti": settings,
                                                        "warning": "averaged WITHOUT differential privacy"})
        epsilon = None
    vectors = list(torch.split(result.release, widths, dim=-1))
    files = save_embedding(vectors=vectors, token=config.token, text_encoders=placeholders.text_encoders, out=out,
                           record=record, a1111=a1111)
    shutil.rmtree(out / BYPRODUCTS, ignore_errors=True)  # the per-unit embeddings of a resumed run
    return DPAggResult(out=out, files=files, epsilon=epsilon, num_units=n, steps_done=total_steps)


@dataclass(frozen=True)
class DPSGDTIConfig:
    """The DP-SGD TI baseline: one embedding over the whole set, per-sample clipping and noise."""

    token: str = "<my-style>"
    init_word: str = "painting"
    num_vectors: int = 1
    template: str = "a picture in the style of {token}"
    epsilon: float = 1.0
    delta: float | None = None
    max_grad_norm: float = 0.01
    epochs: float = 20.0
    batch_size: int = 16
    learning_rate: float = 5e-3
    privacy_unit: str = "example"  # or "subject": subjects sampled, their images clipped together
    max_examples_per_subject: int = 1
    seed: int = 0
    secure_noise: bool = True

    def __post_init__(self) -> None:
        if self.privacy_unit not in ("example", "subject"):
            raise ValueError(f"privacy_unit={self.privacy_unit!r} must be 'example' or 'subject'.")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon={self.epsilon} must be positive.")
        if "{token}" not in self.template:
            raise ValueError(f"template={self.template!r} must contain {{token}}.")
        if self.batch_size < 1 or not self.epochs > 0 or self.num_vectors < 1:
            raise ValueError("batch_size, epochs and num_vectors must be positive.")


def train_dpsgd_ti(*, pipeline, dataset, out: str | Path, config: DPSGDTIConfig = DPSGDTIConfig(),
                   progress: Callable[[int, int], None] | None = None, a1111: bool = False,
                   should_stop: Callable[[], bool] | None = None, resume: bool = False) -> DPAggResult:
    """Train one embedding with DP-SGD on privdiff's engine: per-sample gradients of the new rows only
    (in both encoders for SDXL, clipped together). `should_stop` is polled after each step: a stopped
    run releases nothing and leaves a checkpoint in out/BYPRODUCTS that `resume=True` continues exactly."""
    import shutil

    from diffusers import DDPMScheduler

    from ..data.base import DatasetError
    from ..privacy.accounting import check_delta
    from ..privacy.dp_sgd import secure_generator
    from ..privacy.engine import DPConfig, DPSGDEngine
    from ..privacy.record import record_for_dp_sgd
    from .dp_ldm import denoising_target
    from .textual_inversion import (Placeholders, check_a1111, encode_prompts, encoder_slots, placeholder_names,
                                    save_embedding)

    n = len(dataset)
    if n < 2:
        raise DatasetError(f"the dataset has {n} image(s); DP-SGD TI needs at least 2.")
    if config.batch_size > n:
        raise ValueError(f"batch_size={config.batch_size} is larger than the dataset ({n} images).")
    check_a1111(a1111=a1111, num_encoders=len(encoder_slots(pipeline)))
    subjects = _subject_ids(dataset) if config.privacy_unit == "subject" else None
    units = n if subjects is None else len(set(subjects))
    if config.batch_size > units:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {units} privacy units.")
    delta = config.delta if config.delta is not None else 1.0 / (10 * units)
    check_delta(delta=delta, num_examples=units)
    names = placeholder_names(token=config.token, num_vectors=config.num_vectors)
    placeholders = Placeholders(pipeline=pipeline, names=names, init_word=config.init_word)
    image_size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    try:
        latents = _encode_dataset(pipeline=pipeline, dataset=dataset)
        prompt_ids = placeholders.prompt_ids([config.template.format(token=" ".join(names))])
        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        pipeline.unet.requires_grad_(False)
        optimizer = torch.optim.AdamW([rows.rows for rows in placeholders.rows],
                                      lr=config.learning_rate * config.batch_size / 16, weight_decay=0.0)
        steps = max(1, math.ceil(config.epochs * units / config.batch_size))
        train_generator = torch.Generator().manual_seed(config.seed + 1)
        engine = DPSGDEngine(
            model=torch.nn.ModuleList(placeholders.text_encoders), optimizer=optimizer, num_examples=n,
            config=DPConfig(delta=delta, max_grad_norm=config.max_grad_norm, sample_rate=config.batch_size / units,
                            steps=steps, target_epsilon=config.epsilon, physical_batch_size=64,
                            privacy_unit=config.privacy_unit,
                            max_examples_per_subject=config.max_examples_per_subject),
            subjects=subjects,
            generator=secure_generator() if config.secure_noise else torch.Generator().manual_seed(config.seed),
        )

        def per_sample_loss(indices):
            z0 = latents[indices]
            noise = torch.randn(z0.shape, generator=train_generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(indices),), generator=train_generator)
            context, added = encode_prompts(pipeline=pipeline, ids=[ids.expand(len(indices), -1) for ids in prompt_ids],
                                            image_size=image_size)
            prediction = pipeline.unet(scheduler.add_noise(z0, noise, t), t, context, added_cond_kwargs=added).sample
            target = denoising_target(scheduler=scheduler, z0=z0, noise=noise, t=t)
            return (prediction - target).pow(2).mean(dim=(1, 2, 3))

        from ..privacy.accounting import Accountant

        out = Path(out)
        generators = {"train": train_generator, "noise": engine.generator}
        if engine.sampler.generator is not engine.generator:
            generators["sampling"] = engine.sampler.generator
        checkpoint = dict(folder=out / BYPRODUCTS, placeholders=placeholders, optimizer=optimizer,
                          generators=generators, fingerprint={"config": repr(config), "num_images": n})
        first = 0
        if resume:
            meta = _load_ti_checkpoint(**checkpoint)
            first, engine.accountant = meta["step"], Accountant.from_json(meta["accountant"])
        for step in range(first, steps):
            engine.step(per_sample_loss)
            if progress is not None:
                progress(step + 1, steps)
            if should_stop is not None and step + 1 < steps and should_stop():
                _save_ti_checkpoint(meta={"step": step + 1, "accountant": engine.accountant.to_json()}, **checkpoint)
                engine.clipper.remove()
                return DPAggResult(out=out, num_units=units, stopped=True, steps_done=step + 1)
        vectors = [rows.rows.detach().clone() for rows in placeholders.rows]
        engine.clipper.remove()
    finally:
        placeholders.restore()
    record = record_for_dp_sgd(history=engine.accountant, clip=config.max_grad_norm, num_examples=units, delta=delta,
                               privacy_unit=config.privacy_unit,
                               extra={"dp_ti": {"method": "dpsgd", "token": config.token, "init_word": config.init_word,
                                                "num_vectors": config.num_vectors, "template": config.template}})
    files = save_embedding(vectors=vectors, token=config.token, text_encoders=placeholders.text_encoders, out=out,
                           record=record, a1111=a1111)
    shutil.rmtree(Path(out) / BYPRODUCTS, ignore_errors=True)  # a resumed run's checkpoint
    return DPAggResult(out=Path(out), files=files, epsilon=record.epsilon, num_units=units, steps_done=steps)
