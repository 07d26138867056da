"""DP-SGD speed and memory: non-private training, opacus hooks and privdiff's engine.

    python bench/dp_sgd.py                                  # CPU: privdiff-tiny, 64 px, batch 16, 32, 64
    python bench/dp_sgd.py --device cuda --model sd15 --resolution 512 --dtype bf16            # the acceptance run
    python bench/dp_sgd.py --device cuda --model sd15 --resolution 512 --dtype bf16 --trainable lora
    python bench/dp_sgd.py --device cuda --model sd15 --resolution 512 --dtype bf16 --batch-sizes 16 --multiplicity 4
    python bench/dp_sgd.py ... --profile bench/results/dp_sgd_profile.txt   # one profiled step per method

The same UNet (attention projections, or rank-r LoRA adapters on them, trainable), batch and data go
through:
- `non-private`: mean loss, backward, AdamW step;
- `opacus`: opacus' GradSampleModule (hooks, every per-sample gradient kept) + DPOptimizer (with
  `--multiplicity` > 1, privdiff's engine on opacus' hooks, since units span several rows);
- `privdiff`: privdiff's DPSGDEngine (per-layer explicit or ghost norms, clipped sum, fp32 noise).
`--multiplicity K` gives each of the batch's examples K rows (noise draws) clipped as one unit; the
non-private baseline trains on the same rows. Each method runs `--warmup` untimed steps; then
`--repeats` rounds, each timing `--steps` steps of every method in turn (so drift hits all alike).
The table gives each method's median samples/s (examples/s) with its min-max, and the median of
the per-round speed ratios with their min-max. Peak memory: CUDA's allocator peak over one step
beyond what the method held before it (all methods in one process); on the CPU the peak
resident-set growth, sampled every millisecond, each method in a fresh process (the CPU allocator
keeps what an earlier method freed). An out-of-memory is reported as such. `--json` writes the
figures, `--profile` a per-range and per-kernel profile of one step of each method.
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


def _trainable(unet, trainable: str, lora_rank: int):
    from privdiff.training.trainable import select_trainable

    select_trainable(unet=unet, trainable=trainable, lora_rank=lora_rank)
    return unet


class _Method:
    """One method's model copy, optimizer, data and step function."""

    def __init__(self, *, method: str, base, trainable: str, lora_rank: int, batch: int, multiplicity: int,
                 resolution: int, dtype, device):
        import copy

        import torch

        self.method, self.device = method, device
        unet = _trainable(copy.deepcopy(base), trainable, lora_rank).to(device=device, dtype=dtype).train()
        self.unet = unet
        rows = batch * multiplicity
        generator = torch.Generator(device="cpu").manual_seed(0)
        side = resolution // 8
        z0 = torch.randn(rows, unet.config.in_channels, side, side, generator=generator).to(device, dtype)
        noise = torch.randn(z0.shape, generator=generator).to(device, dtype)
        context = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
        t = torch.randint(0, 1000, (rows,), generator=generator).to(device)
        params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = optimizer = torch.optim.AdamW(params, lr=1e-5)
        zt = 0.7 * z0 + 0.7 * noise

        def per_sample_loss(indices, module=unet):
            indices = indices.to(device)
            out = module(zt[indices], t[indices], context[indices]).sample
            return (out.float() - noise[indices].float()).pow(2).mean(dim=(1, 2, 3))

        everyone = torch.arange(rows)
        self.cleanup = lambda: None
        if method == "non-private":
            def step():
                per_sample_loss(everyone).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        elif method == "opacus" and multiplicity == 1:
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            wrapped = GradSampleModule(unet, batch_first=True, loss_reduction="mean")
            dp_optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=0.01, expected_batch_size=batch)

            def step():
                per_sample_loss(everyone, module=wrapped).mean().backward()
                dp_optimizer.step()
                dp_optimizer.zero_grad(set_to_none=True)
            self.cleanup = wrapped._close
        else:
            from privdiff.privacy.engine import DPConfig, DPSGDEngine

            grouped = multiplicity > 1
            engine = DPSGDEngine(
                model=unet, optimizer=optimizer, num_examples=rows,
                subjects=[i // multiplicity for i in range(rows)] if grouped else None,
                config=DPConfig(delta=1e-5 if batch > 1 else 0.5, max_grad_norm=0.01, sample_rate=1.0,
                                steps=10**9, noise_multiplier=1.0, physical_batch_size=batch,
                                privacy_unit="subject" if grouped else "example",
                                max_examples_per_subject=multiplicity,
                                backend="opacus" if method == "opacus" else "privdiff"),
                generator=torch.Generator(device=device).manual_seed(0),
            )
            self.engine = engine

            def step():
                engine.step(per_sample_loss)
            self.cleanup = engine.clipper.remove
        self.step = step

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, steps: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return time.perf_counter() - start

    def close(self):
        self.cleanup()
        del self.unet, self.optimizer, self.step


def _median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def run_batch(*, methods, base, args, batch: int, dtype, device) -> list[dict]:
    """All methods at one batch size in this process: warm-up, memory, then interleaved repeats."""
    import torch

    live, rows = {}, {}
    for method in methods:
        rows[method] = {"method": method, "batch": batch, "multiplicity": args.multiplicity,
                        "trainable": args.trainable, "oom": False, "error": None}
        try:
            runner = _Method(method=method, base=base, trainable=args.trainable, lora_rank=args.lora_rank,
                             batch=batch, multiplicity=args.multiplicity, resolution=args.resolution,
                             dtype=dtype, device=device)
            for _ in range(args.warmup):
                runner.step()
            with _PeakMemory(device) as memory:
                runner.step()
            rows[method]["peak_memory_mib"] = memory.bytes / 2**20
            live[method] = runner
        except torch.OutOfMemoryError:
            rows[method]["oom"] = True
        except Exception as error:  # a method that cannot run here (say opacus on a layer it lacks) is reported
            rows[method]["error"] = f"{type(error).__name__}: {error}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for method in live:
        rows[method]["samples_per_s_each"] = []
    for _ in range(args.repeats):
        for method, runner in live.items():
            try:
                seconds = runner.timed(args.steps)
                rows[method]["samples_per_s_each"].append(batch * args.steps / seconds)
            except torch.OutOfMemoryError:
                rows[method]["oom"] = True
    if args.profile:
        rows_profile = _profile(live, device)
        with open(args.profile, "a") as handle:
            handle.write(f"\n==== batch {batch}, multiplicity {args.multiplicity}, {args.trainable}, "
                         f"{args.model} {args.resolution} px {args.dtype} ====\n{rows_profile}\n")
    for method, runner in live.items():
        plans = getattr(getattr(runner, "engine", None), "clipper", None)
        if plans is not None and hasattr(plans, "plans"):
            counts = {}
            for chosen in plans.plans().values():
                for plan in chosen:
                    counts[plan] = counts.get(plan, 0) + 1
            rows[method]["layer_plans"] = counts
        runner.close()
    live.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for row in rows.values():
        each = row.get("samples_per_s_each") or []
        row["samples_per_s"] = _median(each) if each else None
    return list(rows.values())


def _profile(live: dict, device) -> str:
    """One profiled step per method: time per privdiff range and per kernel kind, and host syncs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = []
    for method, runner in live.items():
        runner.sync()
        with profile(activities=activities) as prof:
            runner.step()
            runner.sync()
        events = prof.key_averages()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        syncs = sum(e.count for e in events if "Synchronize" in e.key or "Memcpy DtoH" in e.key)
        out.append(f"--- {method}: host syncs (synchronize calls and device-to-host copies) {syncs}")
        ranges = [e for e in events if e.key.startswith("privdiff.")]
        for e in ranges:
            gpu = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
            out.append(f"  range {e.key:<24} cpu {e.cpu_time_total / 1e3:9.2f} ms  gpu {gpu / 1e3:9.2f} ms  x{e.count}")
        out.append(events.table(sort_by=sort, row_limit=25, max_name_column_width=60))
    return "\n".join(out)


def _run_isolated(args, *, method: str, batch: int) -> dict:
    import subprocess
    import sys

    command = [sys.executable, __file__, "--one", "--device", args.device, "--model", args.model,
               "--resolution", str(args.resolution), "--dtype", args.dtype, "--batch-sizes", str(batch),
               "--methods", method, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats), "--trainable", args.trainable, "--lora-rank", str(args.lora_rank),
               "--multiplicity", str(args.multiplicity)] + (["--profile", args.profile] if args.profile else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("ROW "))
    return json.loads(line[4:])


def _spread(values) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny (privdiff-tiny) or a bundled config: sd15, sd21")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (latents are /8)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--methods", nargs="+", default=["non-private", "opacus", "privdiff"])
    parser.add_argument("--trainable", default="attention", choices=["attention", "lora"])
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--multiplicity", type=int, default=1, help="rows (noise draws) per example, clipped as one unit")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of timed steps (median and spread)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", default=None, help="append a one-step profile of each method to this file")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one method, JSON out
    args = parser.parse_args(argv)
    if args.multiplicity < 1 or args.repeats < 1 or args.steps < 1:
        parser.error("--multiplicity, --repeats and --steps must be at least 1")

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.one or device.type == "cuda":
        base = _unet(args.model, torch.float32, torch.device("cpu")).to(device=device, dtype=dtype)
    if args.one:
        row = run_batch(methods=args.methods[:1], base=base, args=args, batch=args.batch_sizes[0], dtype=dtype,
                        device=device)[0]
        print("ROW " + json.dumps(row))
        return 0
    rows = []
    for batch in args.batch_sizes:
        if device.type == "cpu":
            batch_rows = [_run_isolated(args, method=method, batch=batch) for method in args.methods]
        else:
            batch_rows = run_batch(methods=args.methods, base=base, args=args, batch=batch, dtype=dtype, device=device)
        for row in batch_rows:
            print(json.dumps(row), flush=True)
        rows.extend(batch_rows)
    rows_per = f", {args.multiplicity} rows per example" if args.multiplicity > 1 else ""
    what = "attention" if args.trainable == "attention" else f"LoRA rank {args.lora_rank} on attention"
    print(f"\n{args.model} UNet, {what} trainable, {args.resolution} px, {args.dtype}{rows_per}, {name}; "
          f"median of {args.repeats} repeats x {args.steps} steps (min-max)")
    print("| batch | method | examples/s | peak memory (MiB) | speed vs non-private | speed vs opacus "
          "| memory vs non-private |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batch_sizes:
        by = {r["method"]: r for r in rows if r["batch"] == batch}
        base_row, opacus = by.get("non-private"), by.get("opacus")
        for method, row in by.items():
            if row["oom"] or row["error"]:
                print(f"| {batch} | {method} | {'out of memory' if row['oom'] else row['error'][:60]} | | | | |")
                continue

            def ratio(other):
                if other is None or other["oom"] or other["error"] or other is row:
                    return "-"
                pairs = [a / b for a, b in zip(row["samples_per_s_each"], other["samples_per_s_each"])]
                row.setdefault("ratios", {})[other["method"]] = pairs
                return f"{_median(pairs):.2f}x ({_spread(pairs)})"

            memory = "-" if base_row is None or base_row.get("peak_memory_mib") is None else \
                f"{row['peak_memory_mib'] / base_row['peak_memory_mib']:.2f}x"
            print(f"| {batch} | {method} | {row['samples_per_s']:.1f} ({_spread(row['samples_per_s_each'])}) | "
                  f"{row['peak_memory_mib']:.0f} | {ratio(base_row)} | {ratio(opacus)} | {memory} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "model": args.model, "resolution": args.resolution, "dtype": args.dtype,
                       "trainable": args.trainable, "multiplicity": args.multiplicity, "repeats": args.repeats,
                       "steps": args.steps, "torch": torch.__version__, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
