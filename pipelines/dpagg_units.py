"""DPAgg-TI's per-unit training, built so that each unit's embedding depends on that unit alone.

The aggregation's sensitivity C holds only if adding one image to the data adds one unit and leaves
every other unit's embedding bit for bit as it was (DESIGN.md 3.2). So:

- a unit is named by its content, not its position: per image, the SHA-256 of its pixels; per
  subject, of its images' hashes; per subset, the subset's number (images go to subsets by a keyed
  hash of their content, so adding one changes exactly one subset);
- every random draw of a unit (which of its images, the noise, the timestep) comes from its own
  stream, keyed on the run's secret and the unit's name: never from a stream shared with the other
  units, and never tied to their number or order;
- every unit takes exactly `steps` steps, one image each;
- units train side by side in batches of a fixed size (the last one padded with rows that name no
  unit), so a unit's arithmetic is the same whatever its neighbours; Adam is elementwise.

The per-unit embeddings are the run's most sensitive by-product: they stay in memory, and in the
resume checkpoint in the by-products folder, which the release deletes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Unit:
    name: str  # hex: the unit's identity, from its content (never its position)
    members: tuple[int, ...]  # its images' indices in the dataset (empty for an empty subset)


def image_fingerprint(pixels: torch.Tensor) -> bytes:
    """SHA-256 of an image as 8-bit pixels (what the image is, whatever its place in the folder)."""
    quantised = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    digest = hashlib.sha256(repr(tuple(quantised.shape)).encode())
    digest.update(quantised.numpy().tobytes())
    return digest.digest()


def make_units(*, dataset, secret: bytes, privacy_unit: str = "example", num_subsets: int | None = None) -> list[Unit]:
    """The run's units in a content order (sorted by name): per image, per subject or per subset."""
    fingerprints = [image_fingerprint(dataset[i]["pixel_values"]) for i in range(len(dataset))]
    if privacy_unit == "subject":
        members: dict = {}
        for index, subject in enumerate(subject_ids(dataset)):
            members.setdefault(subject, []).append(index)
        if len(members) < 2:
            raise ValueError(f"the dataset has {len(members)} subject(s); DPAgg-TI needs at least 2.")
        units = [Unit(name=hashlib.sha256(b"subject" + b"".join(sorted(fingerprints[i] for i in group))).hexdigest(),
                      members=tuple(group)) for group in members.values()]
    elif num_subsets is not None:
        groups: list[list[int]] = [[] for _ in range(num_subsets)]
        for index, fingerprint in enumerate(fingerprints):
            key = hmac.new(secret, b"subset" + fingerprint, hashlib.sha256).digest()
            groups[int.from_bytes(key[:8], "little") % num_subsets].append(index)
        units = [Unit(name=hashlib.sha256(f"subset/{s}".encode()).hexdigest(), members=tuple(group))
                 for s, group in enumerate(groups)]
    else:
        units = [Unit(name=hashlib.sha256(b"image" + fingerprint).hexdigest(), members=(i,))
                 for i, fingerprint in enumerate(fingerprints)]
    return sorted(units, key=lambda unit: unit.name)


def subject_ids(dataset) -> list:
    """Every image's subject id, refusing a dataset where any is missing."""
    subjects = dataset.subjects() if hasattr(dataset, "subjects") else None
    if not subjects or any(s is None for s in subjects):
        raise ValueError("privacy_unit='subject' needs a subject id for every image (a `subject` column in "
                         "the folder's captions file, or num_subjects for a procedural set).")
    return subjects


def unit_generator(*, secret: bytes, unit: Unit) -> torch.Generator:
    """The unit's own random stream: keyed on the run's secret and the unit's name only."""
    key = hmac.new(secret, b"privdiff-dpagg-unit/" + bytes.fromhex(unit.name), hashlib.sha256).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))


@dataclass
class UnitEmbeddings:
    units: list[Unit]
    embeddings: torch.Tensor  # [n, k, d]: each unit's rows in every encoder, side by side
    init: torch.Tensor  # [d]: the initialiser's row(s), side by side
    widths: list[int]  # each encoder's share of d
    text_encoders: list
    steps_done: int
    stopped: bool


def train_unit_embeddings(*, pipeline, dataset, units: list[Unit], secret: bytes, template: str, init_word: str,
                          num_vectors: int, steps: int, batch_size: int, learning_rate: float,
                          progress: Callable[[int, int], None] | None = None,
                          should_stop: Callable[[], bool] | None = None,
                          checkpoint_folder: Path | None = None, resume: bool = False,
                          fingerprint: dict | None = None, checkpoint_state: dict | None = None,
                          checkpoint_every: int = 25) -> UnitEmbeddings:
    """Train one embedding per unit, `steps` steps each. `should_stop` is polled after each step
    (one step of every unit); a stop, and the end, save a checkpoint to `checkpoint_folder` (with
    `checkpoint_state` beside the step) that `resume` continues exactly, refusing another set of
    units or other settings (`fingerprint`)."""
    from diffusers import DDPMScheduler

    from .textual_inversion import Placeholders, placeholder_names

    n = len(units)
    names = [placeholder_names(token=f"<privdiff-unit-{u}>", num_vectors=num_vectors) for u in range(n)]
    placeholders = Placeholders(pipeline=pipeline, names=[t for group in names for t in group], init_word=init_word)
    image_size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    try:
        latents = encode_images(pipeline=pipeline, dataset=dataset,
                                indices=sorted({i for unit in units for i in unit.members}))
        unit_ids = placeholders.prompt_ids([template.format(token=" ".join(names[u])) for u in range(n)])
        # Padding rows name no unit: the initialiser word in the template carries no trainable row.
        pad_ids = placeholders.prompt_ids([template.format(token=init_word)])
        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        optimizer = torch.optim.AdamW([rows.rows for rows in placeholders.rows], lr=learning_rate, weight_decay=0.0)
        generators = [unit_generator(secret=secret, unit=unit) for unit in units]
        pipeline.unet.requires_grad_(False)
        layout = "".join(f"{u.name}:{','.join(map(str, u.members))};" for u in units)
        fingerprint = {**(fingerprint or {}), "units": hashlib.sha256(layout.encode()).hexdigest()}
        first = 0
        if resume:
            first = _resume(folder=checkpoint_folder, fingerprint=fingerprint, placeholders=placeholders,
                            optimizer=optimizer, generators=generators)
        shape = next(iter(latents.values())).shape if latents else None
        for step in range(first, steps):
            for start in range(0, n, batch_size):
                chunk = [u for u in range(start, min(start + batch_size, n)) if units[u].members]
                if not chunk:
                    continue
                _chunk_backward(pipeline=pipeline, scheduler=scheduler, units=units, chunk=chunk,
                                generators=generators, latents=latents, shape=shape, unit_ids=unit_ids,
                                pad_ids=pad_ids, batch_size=batch_size, image_size=image_size)
            optimizer.step()  # once per step: every unit's rows get exactly its own gradient
            optimizer.zero_grad(set_to_none=True)
            if progress is not None:
                progress(step + 1, steps)
            stop = should_stop is not None and step + 1 < steps and should_stop()
            if checkpoint_folder is not None and (stop or step + 1 == steps or (step + 1) % checkpoint_every == 0):
                # On a stop, every `checkpoint_every` steps (a kill loses no more), and at the end: a
                # release that then fails resumes from here, not from scratch.
                _save(folder=checkpoint_folder, fingerprint=fingerprint,
                      state={**(checkpoint_state or {}), "step": step + 1},
                      optimizer=optimizer, placeholders=placeholders, generators=generators)
            if stop:
                return _result(units, placeholders, num_vectors, steps_done=step + 1, stopped=True)
        return _result(units, placeholders, num_vectors, steps_done=steps, stopped=False)
    finally:
        placeholders.restore()  # the pipeline's own tables, unchanged


def _chunk_backward(*, pipeline, scheduler, units: list[Unit], chunk: list[int], generators: list, latents: dict,
                    shape, unit_ids: list, pad_ids: list, batch_size: int, image_size: int) -> None:
    """One step's loss for the units in `chunk`, padded to `batch_size` rows, back-propagated.

    Each unit draws its image, noise and timestep, in that order, from its own stream only.
    """
    from ..training.diffusion import denoising_target
    from .textual_inversion import encode_prompts

    picks, noise, t = [], [], []
    for u in chunk:
        members, g = units[u].members, generators[u]
        index = members[int(torch.randint(len(members), (1,), generator=g))] if len(members) > 1 else members[0]
        picks.append(latents[index])
        noise.append(torch.randn(shape, generator=g))
        t.append(int(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)))
    pad = batch_size - len(chunk)
    z0 = torch.stack(picks + [torch.zeros(shape)] * pad)
    eps = torch.stack(noise + [torch.zeros(shape)] * pad)
    timesteps = torch.tensor(t + [0] * pad)
    ids = [torch.cat([encoder_ids[chunk], pad_encoder_ids.expand(pad, -1)])
           for encoder_ids, pad_encoder_ids in zip(unit_ids, pad_ids)]
    context, added = encode_prompts(pipeline=pipeline, ids=ids, image_size=image_size)
    prediction = pipeline.unet(scheduler.add_noise(z0, eps, timesteps), timesteps, context,
                               added_cond_kwargs=added).sample
    target = denoising_target(scheduler=scheduler, z0=z0, noise=eps, t=timesteps)
    (prediction - target)[:len(chunk)].pow(2).mean(dim=(1, 2, 3)).sum().backward()


def _resume(*, folder: Path | None, fingerprint: dict, placeholders, optimizer, generators: list) -> int:
    """Restore the rows, the optimizer and every unit's stream; returns the step to continue from."""
    from ..training.checkpoint import load_checkpoint, restore_optimizer

    saved = load_checkpoint(folder=folder, kind="dpagg-ti", fingerprint=fingerprint)
    with torch.no_grad():
        for i, rows in enumerate(placeholders.rows):
            rows.rows.copy_(saved.tensors[f"rows.{i}"])
    restore_optimizer(optimizer, tensors=saved.tensors, param_groups=saved.state["param_groups"])
    for generator, state in zip(generators, saved.tensors["rng.units"]):
        generator.set_state(state.clone())
    return saved.state["step"]


def _save(*, folder: Path, fingerprint: dict, state: dict, optimizer, placeholders, generators: list) -> None:
    """A checkpoint of the rows, the optimizer and every unit's stream, with `state` (and the param groups)."""
    from ..training.checkpoint import optimizer_tensors, save_checkpoint

    tensors, param_groups = optimizer_tensors(optimizer)
    tensors.update({f"rows.{i}": rows.rows for i, rows in enumerate(placeholders.rows)})
    tensors["rng.units"] = torch.stack([g.get_state() for g in generators])
    save_checkpoint(folder=folder, kind="dpagg-ti", tensors=tensors, fingerprint=fingerprint,
                    state={**state, "param_groups": param_groups})


def _result(units, placeholders, num_vectors, *, steps_done: int, stopped: bool) -> UnitEmbeddings:
    n = len(units)
    return UnitEmbeddings(
        units=units, init=torch.cat(placeholders.init), widths=[rows.rows.shape[1] for rows in placeholders.rows],
        embeddings=torch.cat([rows.rows.detach().reshape(n, num_vectors, -1) for rows in placeholders.rows], dim=-1),
        text_encoders=placeholders.text_encoders, steps_done=steps_done, stopped=stopped)


def encode_images(*, pipeline, dataset, indices, chunk: int = 16) -> dict[int, torch.Tensor]:
    """The VAE latent of each image in `indices`, encoded once (the VAE is frozen), in batches of one
    fixed size (the last padded) so that an image's latent never depends on its neighbours."""
    from ..training.diffusion import encode_latents

    latents: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for start in range(0, len(indices), chunk):
            part = indices[start:start + chunk]
            pixels = torch.stack([dataset[i]["pixel_values"] for i in part])
            pixels = torch.cat([pixels, pixels.new_zeros((chunk - len(part), *pixels.shape[1:]))])
            encoded = encode_latents(vae=pipeline.vae, pixels=pixels.to(pipeline.vae.dtype)).float()
            latents.update(zip(part, encoded[:len(part)]))
    return latents


def expected_units(*, num_images: int, privacy_unit: str, num_subsets: int | None, dataset) -> int:
    """How many units a run makes (known before anything is trained)."""
    if privacy_unit == "subject":
        return len(set(subject_ids(dataset)))
    return num_subsets if num_subsets is not None else num_images
