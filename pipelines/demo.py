"""`privdiff demo`: every feature that exists, end to end, on the tiny default and procedural data.

Each feature is one function that writes its pictures into its own folder and returns a few summary
lines; later features register themselves in DEMO_FEATURES. The whole demo stays under 5 minutes
on 2 CPU cores.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class DemoContext:
    out: Path
    base: str
    seed: int
    resolution: int = 64


@dataclass(frozen=True)
class DemoResult:
    out: Path
    summaries: dict[str, list[str]]
    seconds: dict[str, float]
    sample_grid: Path | None  # written by the 'generate' feature


def _demo_data(ctx: DemoContext) -> list[str]:
    from ..data import load_dataset
    from ..data.images import make_grid, save_png

    folder = ctx.out / "data"
    lines = []
    for name in ("circles", "shapes"):
        dataset = load_dataset(data=name, resolution=64, seed=ctx.seed, num_items=8)
        items = [dataset[i] for i in range(len(dataset))]
        pictures, labels = [], []
        for item in items:
            if item.get("hint") is not None:
                pictures.append(item["hint"] * 2 - 1)  # hints are 0..1, grids take -1..1 tensors
                labels.append("hint")
            pictures.append(item["pixel_values"])
            labels.append(item["caption"])
        path = save_png(make_grid(pictures, labels=labels, columns=4, cell_size=96), folder / f"{name}.png")
        lines.append(f"{name}: {len(dataset)} procedural items -> {path.relative_to(ctx.out)}")
    return lines


def _demo_generate(ctx: DemoContext) -> list[str]:
    import torch

    from ..data.analyzers import public_prompts
    from ..data.images import make_grid, save_png
    from ..models.loading import load_pipeline

    pipeline = load_pipeline(base=ctx.base)
    prompts = [spec.caption for spec in public_prompts(num=8, seed=ctx.seed)]
    generator = torch.Generator().manual_seed(ctx.seed)
    images = pipeline(
        prompts,
        num_inference_steps=30,
        guidance_scale=5.0,
        generator=generator,
        output_type="np",
        height=ctx.resolution,
        width=ctx.resolution,
    ).images
    path = save_png(make_grid(list(images), labels=prompts, columns=4, cell_size=96), ctx.out / "samples.png")
    return [f"base '{ctx.base}': {len(images)} samples for shape captions -> {path.relative_to(ctx.out)}"]


def _demo_single_file(ctx: DemoContext) -> list[str]:
    import numpy as np
    import torch

    from ..models.loading import load_pipeline
    from ..models.original_layout import save_single_file

    folder = ctx.out / "single-file"
    pipeline = load_pipeline(base=ctx.base)
    path = save_single_file(pipeline=pipeline, path=folder / "model.safetensors")
    # privdiff-tiny's architecture is recognised from the file alone; other sizes need their folder.
    config = None
    if ctx.base != "tiny":
        config = folder / "diffusers"
        pipeline.save_pretrained(config)
    reloaded = load_pipeline(base=path, config=config)

    def sample(p):
        g = torch.Generator().manual_seed(ctx.seed)
        return p("a red circle on a blue background", num_inference_steps=4, generator=g, output_type="np",
                 height=ctx.resolution, width=ctx.resolution).images

    identical = bool(np.array_equal(sample(pipeline), sample(reloaded)))
    if not identical:
        raise RuntimeError("single-file round trip changed the images; please report this as a bug")
    size_kb = path.stat().st_size / 1024
    return [f"{ctx.base} -> original-layout {path.name} ({size_kb:.0f} KiB) -> reloaded: images bit-identical"]


def _demo_dp_ldm(ctx: DemoContext) -> list[str]:
    from ..privacy.record import read_record
    from .dp_ldm import WEIGHTS_DIFFUSERS, DPLDMConfig, default_sample_prompts, train_dp_ldm

    # A few DP-SGD steps on 64 handwritten digits: enough to show the outputs and their record.
    config = DPLDMConfig(epsilon=10.0, epochs=1.0, batch_size=16, physical_batch_size=16, seed=ctx.seed,
                         num_samples=8, sample_prompts=tuple(default_sample_prompts(data="digits", num=8)))
    out = ctx.out / "dp-ldm"
    if (out / WEIGHTS_DIFFUSERS).exists():
        shutil.rmtree(out)  # the demo's own earlier result: a re-run into the same --out replaces it
    result = train_dp_ldm(base=ctx.base, data="digits", out=out, config=replace(config, num_items=64))
    record = read_record(result.files["comfyui"])
    return [
        f"DP-LDM on 64 digits, {result.figures['total_steps']} steps: ε={record.epsilon:.3g}, δ={record.delta:.2g}, "
        f"σ={record.noise_multiplier:.3g}, C={record.clip}, q={record.sample_rate:.3g}",
        f"weights (ComfyUI LoRA loader): {result.files['comfyui'].relative_to(ctx.out)}; "
        f"samples: {result.files['samples'].relative_to(ctx.out)}",
    ]


def _demo_dp_ti(ctx: DemoContext) -> list[str]:
    from ..data import load_dataset
    from ..models.loading import load_pipeline
    from .dp_ti import DPAggConfig, train_dpagg_ti

    # DPAgg-TI on 16 private style images: 16 embeddings trained in one batch, clipped, noisily averaged.
    pipeline = load_pipeline(base=ctx.base)
    pipeline.set_progress_bar_config(disable=True)
    dataset = load_dataset(data="style", num_items=16, seed=ctx.seed,
                           resolution=pipeline.unet.config.sample_size * pipeline.vae_scale_factor)
    config = DPAggConfig(token="<privdiff-style>", init_word="circle", epsilon=1.0, steps=5, batch_size=16,
                         seed=ctx.seed)
    result = train_dpagg_ti(base=pipeline, data=dataset, out=ctx.out / "dp-ti", config=config)
    return [
        f"DPAgg-TI on 16 style images: {result.figures['num_units']} per-image embeddings -> one token at "
        f"ε={result.epsilon:.3g}",
        f"embedding (ComfyUI models/embeddings): {result.files['comfyui'].relative_to(ctx.out)}; diffusers: "
        f"load_textual_inversion('{result.files['diffusers'].relative_to(ctx.out)}', token='<privdiff-style>')",
    ]


def _demo_split(ctx: DemoContext) -> list[str]:
    import torch

    from ..data import load_dataset
    from ..models.loading import load_pipeline
    from .split_controlnet import SplitConfig, reconstruct_from_traffic, run_loopback_job, traffic_by_epoch
    from .split_run import save_split_controlnet_file, split_record

    # A split-learning job on loopback: one CurveZMQ server, two clients with their own circles images;
    # the server records what it receives, and its attacks then try to rebuild client-a's images. Each
    # client's noise secret is made from the OS in a scratch folder (a real client keeps it beside its key).
    import tempfile

    folder = ctx.out / "split"
    pipeline = load_pipeline(base=ctx.base)
    datasets = {name: load_dataset(data="circles", num_items=8, seed=ctx.seed + index)
                for index, name in enumerate(("client-a", "client-b"))}
    epochs, config = 3, SplitConfig()
    with tempfile.TemporaryDirectory() as scratch:
        run = run_loopback_job(pipeline=pipeline, datasets=datasets, config=config, epochs=epochs, batch_size=4,
                               folder=scratch, seed=ctx.seed, record=True)
    path = save_split_controlnet_file(
        controlnet=run.controlnet, path=folder / "split_controlnet.safetensors", latent_scale=pipeline.vae.config.scaling_factor,
        record=split_record(config=config, steps=run.results["client-b"].applied, num_examples=len(datasets["client-b"])))
    data = datasets["client-a"]
    pixels = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    hints = torch.stack([data[i]["hint"] for i in range(len(data))]) * 2 - 1
    report = reconstruct_from_traffic(pipeline=pipeline, payloads=traffic_by_epoch(
        messages=run.traffic["client-a"], batches=run.results["client-a"].batches, num_samples=len(data)),
        pixels=pixels, hint_pixels=hints, sigma_label=config.sigma_label, optimisation_steps=0)
    return [f"split job on loopback (CurveZMQ): 2 clients, {run.job.trainer.steps} server steps, "
            f"ControlNet -> {path.relative_to(ctx.out)}",
            f"server's best attack on client-a's {epochs} epochs of hardened traffic: {report.image_psnr:.1f} dB "
            f"(mean-image guess {report.mean_image_psnr:.1f} dB); `privdiff split attack` measures both modes"]


def _demo_fed(ctx: DemoContext) -> list[str]:
    import shutil
    import warnings

    from ..federated.apps import simulate
    from ..federated.fedavg import FederatedConfig

    # Two simulated sites with their own digits, one FedAvg round on Flower's simulation engine.
    folder = ctx.out / "federated"
    shutil.rmtree(folder, ignore_errors=True)  # a re-run starts its federation afresh
    config = FederatedConfig(base=ctx.base, data="digits", num_items=64, heldout_items=32, num_clients=2, rounds=2,
                             batch_size=16, learning_rate=1e-3, seed=ctx.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = simulate(config=config, out=folder)
    losses = state["heldout_loss"]
    last = state["last_round"]
    trajectory = " -> ".join(f"{losses[r]:.4f}" for r in sorted(losses, key=int))
    return [f"federated (Flower simulation): 2 clients, {last} FedAvg rounds; held-out loss {trajectory}; "
            f"global model: {(folder / f'global-round-{last}.safetensors').relative_to(ctx.out)}"]


DEMO_FEATURES: dict[str, Callable[[DemoContext], list[str]]] = {
    "data": _demo_data,
    "generate": _demo_generate,
    "single-file": _demo_single_file,
    "dp-ldm": _demo_dp_ldm,
    "dp-ti": _demo_dp_ti,
    "split": _demo_split,
    "fed": _demo_fed,
}


def run_demo(*, out: str | Path, only: str | None = None, base: str = "tiny", seed: int = 0,
             progress: Callable[[str], None] = print) -> DemoResult:
    """Run every demo feature (or just `only`) and write its outputs under `out`."""
    if only is not None and only not in DEMO_FEATURES:
        raise ValueError(f"--only {only!r} is not a demo feature; choose one of: {', '.join(DEMO_FEATURES)}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out=out, base=base, seed=seed)
    summaries, seconds = {}, {}
    for name, feature in DEMO_FEATURES.items():
        if only is not None and name != only:
            continue
        progress(f"[demo] {name} ...")
        start = time.perf_counter()
        summaries[name] = feature(ctx)
        seconds[name] = time.perf_counter() - start
        for line in summaries[name]:
            progress(f"  {line}")
    grid = out / "samples.png"
    return DemoResult(out=out, summaries=summaries, seconds=seconds, sample_grid=grid if grid.exists() else None)
