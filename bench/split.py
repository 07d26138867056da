"""Split-learning ControlNet: bytes per sample on the wire, and training samples/s over loopback.

    python bench/split.py                      # wire bytes at 512 px, SD1.5 shapes; samples/s on privdiff-tiny
    python bench/split.py --throughput-model sd15 --device cuda --dtype bf16 --resolution 512 --batch 16

Each layout's batch is encoded by privdiff's codec (header, buffers and MAC: what travels inside the
Curve channel) and divided by the batch size:
- `reference`: what the reference code sends per sample: h, conv_in(z_t), t, the all-zero text context
  (77 x 768) and the label ε, all fp16 (DESIGN.md 3.1);
- `paper`: privdiff's paper mode: the same without the zero context (the server makes it itself);
- `hardened`: z_t instead of conv_in(z_t), h, t, the noisy label.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def layouts(*, resolution: int, batch: int, latent_channels: int = 4, conv_in_channels: int = 320,
            context: tuple[int, int] = (77, 768)) -> dict[str, dict[str, np.ndarray]]:
    side = resolution // 8
    latent = np.zeros((batch, latent_channels, side, side), dtype=np.float16)
    shared = {"h": latent, "t": np.zeros(batch, dtype=np.int64), "label": latent}
    conv_in = np.zeros((batch, conv_in_channels, side, side), dtype=np.float16)
    return {
        "reference": {**shared, "conv_in_z_t": conv_in, "context": np.zeros((batch, *context), dtype=np.float16)},
        "paper": {**shared, "conv_in_z_t": conv_in},
        "hardened": {**shared, "z_t": latent},
    }


def wire_bytes_per_sample(*, resolution: int, batch: int) -> dict[str, float]:
    from privdiff.transport.codec import Message, encode

    out = {}
    for name, tensors in layouts(resolution=resolution, batch=batch).items():
        frames = encode(Message(kind="batch", fields={"batch_id": "0/0"}, tensors=tensors), key=b"k" * 32,
                        session="0" * 32, seq=1)
        out[name] = sum(memoryview(f).nbytes for f in frames) / batch
    return out


def training_throughput(*, model: str, device: str, dtype: str, resolution: int | None, batch: int, steps: int,
                        warmup: int, window: int = 4, server: str | None = None) -> dict:
    """Hardened split training, samples/s: the client's noising and the server's ControlNet step in one
    process, against the same through the real transport (CurveZMQ + codec + MAC, a server thread and a
    client on loopback, `--window` batches in flight). Latents are random (the client's VAE is not timed: it
    runs once per image, see `train_split_client`); the UNet is privdiff-tiny's or random from a
    bundled config (sd15)."""
    import tempfile
    import types

    import torch

    from privdiff.pipelines.split_controlnet import SplitConfig, SplitTrainer, client_payload, run_loopback_job
    from privdiff.privacy.split_secret import ClientSecret, content_hash

    server = server or ("process" if model == "tiny" else "thread")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if model == "tiny":
        from privdiff.models.privdiff_tiny import load_privdiff_tiny

        tiny = load_privdiff_tiny()
        unet, scheduler, vae = tiny.unet, tiny.scheduler, tiny.vae
    else:
        tiny = None
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        from privdiff.models.loading import CONFIGS_DIR

        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS_DIR / model / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS_DIR / model / "vae"))
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet = unet.to(device=device, dtype=torch_dtype)
    side = (resolution // 8) if resolution else unet.config.sample_size
    pool = 4 * batch
    generator = torch.Generator().manual_seed(0)
    latents = (torch.randn(pool, unet.config.in_channels, side, side, generator=generator),
               torch.randn(pool, unet.config.in_channels, side, side, generator=generator))
    client_side = types.SimpleNamespace(unet=unet, scheduler=scheduler, vae=vae)
    config = SplitConfig()
    secret = ClientSecret(bytes(32))  # a benchmark's fixed secret: never one for private data

    class Placeholder:  # what train_split_client iterates over: tiny distinct images, latents in the cache
        def __len__(self):
            return pool

        def __getitem__(self, i):
            image = torch.full((3, 8, 8), -1.0)
            image.view(-1)[[b for b in range(32) if i >> b & 1]] = 1.0  # i in binary: distinct contents
            return {"pixel_values": image, "hint": torch.zeros(3, 8, 8)}

    image_ids = [secret.image_id(content_hash(pixels=Placeholder()[i]["pixel_values"], hint=torch.zeros(3, 8, 8)))
                 for i in range(pool)]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def batch_latents(step):
        ids = [(step * batch + i) % pool for i in range(batch)]
        return [image_ids[i] for i in ids], (latents[0][ids], latents[1][ids])

    trainer = SplitTrainer(unet=unet, learning_rate=1e-5)
    for step in range(warmup):
        ids, lat = batch_latents(step)
        trainer.train_on(client_payload(pipeline=client_side, latents=lat, image_ids=ids, epoch=0, config=config,
                                        secret=secret))
    sync()
    start = time.perf_counter()
    for step in range(steps):
        ids, lat = batch_latents(step)
        trainer.train_on(client_payload(pipeline=client_side, latents=lat, image_ids=ids, epoch=0, config=config,
                                        secret=secret))
    sync()
    in_process = steps * batch / (time.perf_counter() - start)
    del trainer

    # The loopback run: the same steps through run_loopback_job's server and client, the client's
    # latent cache pre-filled (so no dataset item is read), timed after the warm-up steps.
    timings = []
    cache = {image_ids[i]: (latents[0][i], latents[1][i]) for i in range(pool)}
    epochs = -(-(warmup + steps) * batch // pool)

    def progress(sent, total, applied):
        if applied in (warmup, warmup + steps):
            sync()
            timings.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as folder:
        if server == "process":
            server_steps = _process_server_run(tiny=tiny, client_side=client_side, dataset=Placeholder(), cache=cache,
                                               config=config, secret=secret, epochs=epochs, batch=batch,
                                               window=window, folder=folder, progress=progress)
        else:
            run = run_loopback_job(pipeline=client_side, datasets={"client": Placeholder()}, config=config,
                                   epochs=epochs, batch_size=batch, folder=folder, learning_rate=1e-5,
                                   progress=progress, download=False, latent_caches={"client": cache},
                                   secrets={"client": secret}, window=window)
            server_steps = run.job.trainer.steps
    loopback = steps * batch / (timings[1] - timings[0])
    return {"model": model, "device": device, "dtype": dtype, "latent_side": side, "batch": batch, "steps": steps,
            "in_process_samples_per_s": in_process, "loopback_samples_per_s": loopback,
            "loopback_vs_in_process": loopback / in_process, "server_steps": server_steps, "window": window,
            "server": server}


def _process_server_run(*, tiny, client_side, dataset, cache, config, secret, epochs, batch, window, folder,
                        progress) -> int:
    """The loopback run with the server in its own process (`privdiff split serve`, as the ComfyUI
    nodes start it), as a deployment has it: the client's process keeps one thread for its noising and
    the server's keeps its own, so neither waits for the other's cores. Returns the batches trained."""
    from pathlib import Path

    import torch

    from privdiff.pipelines.split_client import train_split_client
    from privdiff.pipelines.split_run import CLIENT_NAME, start_split_server, stop_split_server
    from privdiff.privacy.split_secret import SentLedger
    from privdiff.transport.peer import SplitClient

    if tiny is None:
        raise ValueError("--server process runs privdiff-tiny only (the server loads a saved base model).")
    connection = start_split_server(base_pipeline=tiny, out=Path(folder) / "server", learning_rate=1e-5,
                                    checkpoint_every=10 ** 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    client = SplitClient(connect=connection.endpoint, client_key=connection.client_secret_key,
                         server_public_key=connection.server_public_key, name=CLIENT_NAME)
    ledger = SentLedger(Path(folder) / "client.split-ledger.sqlite")
    try:
        result = train_split_client(client=client, pipeline=client_side, dataset=dataset, epochs=epochs,
                                    batch_size=batch, config=config, secret=secret, ledger=ledger,
                                    progress=progress, latent_cache=cache, window=window)
    finally:
        client.close()
        ledger.close()
        stop_split_server(connection)
        torch.set_num_threads(threads)
    return result.applied


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512, help="wire bytes: image side in pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--throughput-model", default="tiny", help="tiny, or a bundled config such as sd15; none: skip")
    parser.add_argument("--throughput-resolution", type=int, default=None,
                        help="samples/s: image side (default: the model's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--window", type=int, default=4, help="batches on their way at once (1: one at a time)")
    parser.add_argument("--server", default=None, choices=["thread", "process"],
                        help="loopback server in its own process (tiny only; its default) or in a thread of this "
                             "process (the default for other models)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = wire_bytes_per_sample(resolution=args.resolution, batch=args.batch)
    print(json.dumps(figures))
    print(f"| layout | bytes per sample ({args.resolution} px) | vs reference |")
    print("| --- | --- | --- |")
    for name, value in figures.items():
        print(f"| {name} | {value:,.0f} | 1/{figures['reference'] / value:.1f} |")
    result = {"wire_bytes_per_sample": figures}
    if args.throughput_model != "none":
        result["throughput"] = throughput = training_throughput(
            model=args.throughput_model, device=args.device, dtype=args.dtype, resolution=args.throughput_resolution,
            batch=args.batch, steps=args.steps, warmup=args.warmup, window=args.window,
            server=args.server)
        print(json.dumps(throughput))
        print(f"split training, {throughput['model']} on {args.device} ({args.dtype}), batch {args.batch}: "
              f"{throughput['in_process_samples_per_s']:.1f} samples/s in one process, "
              f"{throughput['loopback_samples_per_s']:.1f} over loopback ({throughput['loopback_vs_in_process']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
