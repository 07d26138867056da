"""DP-SGD speed and memory: non-private attention training, opacus hooks and privdiff's engine.

    python bench/dp_sgd.py                                  # CPU: privdiff-tiny, 64 px, batch 16 and 32
    python bench/dp_sgd.py --device cuda --model sd15 --resolution 512 --dtype bf16 --batch-sizes 16 32
    python bench/dp_sgd.py --device cuda --model sd15 --resolution 512 --dtype bf16 --batch-sizes 64 --steps 2

In one process, the same UNet (attention projections trainable), batch and data go through:
- `non-private`: mean loss, backward, AdamW step;
- `opacus`: opacus' GradSampleModule (hooks, every per-sample gradient kept) + DPOptimizer;
- `privdiff`: privdiff's DPSGDEngine (ghost/explicit norms per layer, clipped sum by one GEMM).
Each runs `--warmup` untimed steps, then `--steps` timed ones. Peak memory: CUDA's allocator peak on a
GPU (all methods in one process); on the CPU the peak resident-set growth over the method's run,
sampled every millisecond, each method in a fresh process (the CPU allocator keeps what an earlier
method freed, which would hide a later method's peak). An out-of-memory is reported as such.
`--json` also writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time


def _unet(model: str, dtype, device):
    import torch

    if model == "tiny":
        from privdiff.models.privdiff_tiny import load_privdiff_tiny

        unet = load_privdiff_tiny().unet
    else:
        from diffusers import UNet2DConditionModel

        from privdiff.models.loading import CONFIGS_DIR

        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS_DIR / model / "unet"))
    return unet.to(device=device, dtype=dtype).train()


class _PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled resident-set growth on the CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = self.peak - self.start
        return False


def _rss() -> int:
    import os

    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_method(*, method: str, model: str, batch: int, resolution: int, dtype, device, steps: int, warmup: int) -> dict:
    import torch

    from privdiff.pipelines.trainable import select_trainable

    unet = _unet(model, dtype, device)
    select_trainable(unet=unet, trainable="attention")
    generator = torch.Generator(device="cpu").manual_seed(0)
    side = resolution // 8
    z0 = torch.randn(batch, unet.config.in_channels, side, side, generator=generator).to(device, dtype)
    noise = torch.randn(z0.shape, generator=generator).to(device, dtype)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    zt = (0.7 * z0 + 0.7 * noise)

    def per_sample_loss(indices, module=unet):
        indices = indices.to(device)
        out = module(zt[indices], t[indices], context[indices]).sample
        return (out.float() - noise[indices].float()).pow(2).mean(dim=(1, 2, 3))

    everyone = torch.arange(batch)
    if method == "non-private":
        def step():
            per_sample_loss(everyone).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elif method == "opacus":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        wrapped = GradSampleModule(unet, batch_first=True, loss_reduction="mean")
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=0.01, expected_batch_size=batch)

        def step():
            per_sample_loss(everyone, module=wrapped).mean().backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)
    else:
        from privdiff.privacy.engine import DPConfig, DPSGDEngine

        engine = DPSGDEngine(
            model=unet, optimizer=optimizer, num_examples=batch,
            config=DPConfig(delta=1e-5, max_grad_norm=0.01, sample_rate=1.0, steps=100_000, noise_multiplier=1.0,
                            physical_batch_size=batch),
            generator=torch.Generator(device=device).manual_seed(0),
        )

        def step():
            engine.step(per_sample_loss)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        with _PeakMemory(device) as memory:
            for _ in range(warmup):
                step()
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            seconds = time.perf_counter() - start
        return {"method": method, "batch": batch, "samples_per_s": batch * steps / seconds,
                "peak_memory_mib": memory.bytes / 2**20, "oom": False}
    except torch.OutOfMemoryError:
        return {"method": method, "batch": batch, "samples_per_s": None, "peak_memory_mib": None, "oom": True}
    finally:
        del unet, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _run_isolated(args, *, method: str, batch: int) -> dict:
    import subprocess
    import sys

    command = [sys.executable, __file__, "--one", "--device", args.device, "--model", args.model,
               "--resolution", str(args.resolution), "--dtype", args.dtype, "--batch-sizes", str(batch),
               "--methods", method, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("ROW "))
    return json.loads(line[4:])


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny (privdiff-tiny) or a bundled config: sd15, sd21")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (latents are /8)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--methods", nargs="+", default=["non-private", "opacus", "privdiff"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one method, JSON out
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.one:
        row = run_method(method=args.methods[0], model=args.model, batch=args.batch_sizes[0],
                         resolution=args.resolution, dtype=dtype, device=device, steps=args.steps, warmup=args.warmup)
        print("ROW " + json.dumps(row))
        return 0
    rows = []
    for batch in args.batch_sizes:
        for method in args.methods:
            if device.type == "cpu":
                row = _run_isolated(args, method=method, batch=batch)
            else:
                row = run_method(method=method, model=args.model, batch=batch, resolution=args.resolution,
                                 dtype=dtype, device=device, steps=args.steps, warmup=args.warmup)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.model} UNet, attention trainable, {args.resolution} px, {args.dtype}, {name}")
    print("| batch | method | samples/s | peak memory (MiB) | speed vs non-private | speed vs opacus | memory vs non-private |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batch_sizes:
        by = {r["method"]: r for r in rows if r["batch"] == batch}
        base, opacus = by.get("non-private"), by.get("opacus")
        for method, row in by.items():
            if row["oom"]:
                print(f"| {batch} | {method} | out of memory | | | | |")
                continue

            def ratio(other, key):
                if other is None or other["oom"] or not other[key]:
                    return "-"
                return f"{row[key] / other[key]:.2f}x"

            print(f"| {batch} | {method} | {row['samples_per_s']:.1f} | {row['peak_memory_mib']:.0f} | "
                  f"{ratio(base, 'samples_per_s')} | {ratio(opacus, 'samples_per_s')} | {ratio(base, 'peak_memory_mib')} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "model": args.model, "resolution": args.resolution, "dtype": args.dtype,
                       "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
