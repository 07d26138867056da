"""DPAgg-TI's batched per-image training against one plain Textual Inversion run, samples/s.

    python bench/dp_ti.py                                        # CPU, privdiff-tiny, batch 16
    python bench/dp_ti.py --device cuda --model sd15 --resolution 512 --batch-size 16

Same process, model, batch and data: `plain` trains one token shared by every sample; `per-image`
trains n tokens at once, each sample's prompt naming its own. The step is identical but for which
rows the gradient reaches, so the ratio should be about 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import time


def _pipeline(model: str, device, dtype):
    if model == "tiny":
        from privdiff.models.privdiff_tiny import load_privdiff_tiny

        pipe = load_privdiff_tiny()
    else:
        import torch
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from privdiff.models.loading import CONFIGS_DIR
        from privdiff.models.privdiff_tiny import load_privdiff_tiny

        torch.manual_seed(0)
        pipe = load_privdiff_tiny()  # tokenizer and scheduler; the UNet and text encoder are SD-sized
        pipe.unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS_DIR / model / "unet"))
        config = CLIPTextConfig.from_pretrained(CONFIGS_DIR / model / "text_encoder")
        config.vocab_size = max(config.vocab_size, len(pipe.tokenizer))
        pipe.text_encoder = CLIPTextModel(config)
    pipe.unet.to(device=device, dtype=dtype).requires_grad_(False)
    pipe.text_encoder.to(device=device, dtype=dtype)
    return pipe


def run(*, mode: str, pipe, batch: int, num_images: int, steps: int, warmup: int, resolution: int, device, dtype):
    import torch

    from privdiff.pipelines.textual_inversion import add_placeholder_tokens

    tokenizer = copy.deepcopy(pipe.tokenizer)
    count = num_images if mode == "per-image" else 1
    names = [f"<bench-{i}>" for i in range(count)]
    rows, _, _ = add_placeholder_tokens(tokenizer=tokenizer, text_encoder=pipe.text_encoder, names=names,
                                        init_word="circle")
    rows.to(device)
    prompts = [f"a picture in the style of {name}" for name in names]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    generator = torch.Generator().manual_seed(0)
    side = resolution // 8
    z = torch.randn(num_images, pipe.unet.config.in_channels, side, side, generator=generator).to(device, dtype)
    optimizer = torch.optim.AdamW([rows.rows], lr=1e-3)

    def step(i):
        picks = (torch.arange(batch) + i * batch) % num_images
        context = pipe.text_encoder(ids[picks % count])[0]
        t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        out = pipe.unet(z[picks], t, context).sample
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    pipe.text_encoder.set_input_embeddings(rows.base)
    return batch * steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipe = _pipeline(args.model, device, dtype)
    figures = {"plain": [], "per-image": []}
    for _ in range(args.rounds):
        for mode in figures:
            figures[mode].append(run(mode=mode, pipe=pipe, batch=args.batch_size, num_images=args.num_images,
                                     steps=args.steps, warmup=args.warmup, resolution=args.resolution,
                                     device=device, dtype=dtype))
    median = {mode: sorted(values)[len(values) // 2] for mode, values in figures.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(json.dumps({"device": name, "model": args.model, "batch": args.batch_size, "samples_per_s": median}))
    print(f"per-image / plain samples/s: {median['per-image'] / median['plain']:.2f}x ({name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
