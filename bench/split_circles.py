"""Split ControlNet on `circles`: what the ControlNet learns and what the server rebuilds, per setting.

    python bench/split_circles.py utility --mode paper --steps 3000 --batch 16
    python bench/split_circles.py utility --mode hardened --snr-bound 1 --draws-per-image 0 --steps 1000 --batch 64
    python bench/split_circles.py attack --mode hardened --snr-bound 0.01 --draws-per-image 1 --epochs 10 --secrets 8
    python bench/split_circles.py frontier --ks 0.03 0.1 0.3 1 --images 1000 10000 --sigma-hints 1 --run-epochs 4

`utility` trains a SplitTrainer on client payloads of 1,000 `circles` images (the client's latents are
computed once, as `train_split_client` caches them; batches are drawn at random) and prints the circle
IoU of 50 (`--eval-num`) generations against their hints every `--eval-every` steps, next to the base model's.
`attack` runs every server attack of `reconstruct_from_traffic` on `--epochs` epochs of traffic of 32
images, for each of `--secrets` client secrets (the noise is the secret's: the figures are a mean and a
spread). `--draws-per-image 0` means a fresh noising every step (or epoch).
`frontier` ([11]) runs both for every k x images x σ_hint, one noising per image: the IoU gain over
the base with a shuffled-hint control (the same generations' targets, hints permuted: a ControlNet that
follows hints loses its gain there) and the best attack's margin over the mean-image guess for images
and for hints; rows go to `--json` as they finish, so a cut run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import time


def _config(args):
    from privdiff.pipelines.split_controlnet import SplitConfig

    return SplitConfig(mode=args.mode, snr_bound=args.snr_bound, sigma_hint=args.sigma_hint,
                       draws_per_image=args.draws_per_image or None)


def _secret_and_ids(args, count: int, index: int = 0):
    """A benchmark's secret number `index`, fixed by --seed so figures reproduce (never do this with
    private data: real clients draw theirs from the OS), and one id per image index."""
    import hashlib

    from privdiff.pipelines.split_client import ClientSecret

    secret = ClientSecret(hashlib.sha256(f"privdiff-bench/{args.seed}/{index}".encode()).digest())
    return secret, [secret.image_id(str(i).encode()) for i in range(count)]


def _latents(pipeline, dataset):
    import torch

    from privdiff.pipelines.split_controlnet import client_latents

    parts = []
    for start in range(0, len(dataset), 100):
        items = [dataset[i] for i in range(start, min(len(dataset), start + 100))]
        parts.append(client_latents(pipeline=pipeline, pixels=torch.stack([it["pixel_values"] for it in items]),
                                    hint_pixels=torch.stack([it["hint"] for it in items]) * 2 - 1))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def utility(args) -> dict:
    import warnings

    import torch

    from privdiff.data import load_dataset
    from privdiff.models.privdiff_tiny import load_privdiff_tiny
    from privdiff.pipelines.evaluation import SamplingConfig, evaluate_quality, evaluation_items
    from privdiff.pipelines.split_controlnet import SplitTrainer, client_payload, split_controlnet_pipeline

    warnings.simplefilter("ignore")  # paper mode warns on every batch
    tiny = load_privdiff_tiny()
    tiny.set_progress_bar_config(disable=True)
    config = _config(args)
    image_latents, hint_latents = _latents(tiny, load_dataset(data="circles", num_items=args.num_items))
    trainer = SplitTrainer(unet=copy.deepcopy(tiny.unet), learning_rate=args.lr, seed=args.seed)
    sampling = SamplingConfig(num_inference_steps=30, guidance_scale=5.0)
    hints = [it["hint"].permute(1, 2, 0).numpy() for it in evaluation_items(set_name="circles", num=args.eval_num)]
    # The control: the same targets with the hints permuted (a fixed derangement-like shuffle).
    shuffled = [hints[i] for i in torch.randperm(len(hints), generator=torch.Generator().manual_seed(1)).tolist()]

    def evaluate():
        pipe = split_controlnet_pipeline(base=tiny, controlnet=trainer.controlnet.eval())
        pipe.set_progress_bar_config(disable=True)
        metrics = evaluate_quality(pipeline=pipe, set_name="circles", num=args.eval_num, sampling=sampling,
                                   image=hints).metrics
        if getattr(args, "shuffled_control", False):
            control = evaluate_quality(pipeline=pipe, set_name="circles", num=args.eval_num, sampling=sampling,
                                       image=shuffled).metrics
            metrics.update({f"shuffled_{k}": v for k, v in control.items()})
        trainer.controlnet.train()
        return metrics

    generator = torch.Generator().manual_seed(args.seed)
    secret, image_ids = _secret_and_ids(args, len(image_latents))
    losses, evaluations, start = [], [], time.time()
    for step in range(args.steps):
        ids = torch.randint(len(image_latents), (args.batch,), generator=generator)
        payload = client_payload(pipeline=tiny, latents=(image_latents[ids], hint_latents[ids]),
                                 image_ids=[image_ids[i] for i in ids.tolist()], epoch=step, config=config,
                                 secret=secret)
        losses.append(trainer.train_on(payload))
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {sum(losses[-100:]) / 100:.4f} ({time.time() - start:.0f} s)", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluations.append({"step": step + 1, "samples": (step + 1) * args.batch, **evaluate()})
            print(json.dumps(evaluations[-1]), flush=True)
            if args.out:
                trainer.controlnet.save_pretrained(args.out)
    base = evaluate_quality(pipeline=tiny, set_name="circles", num=args.eval_num, sampling=sampling).metrics
    if args.grid:
        save_grid(base=tiny, controlnet=trainer.controlnet.eval(), path=args.grid, label=args.mode)
    return {"config": repr(config), "lr": args.lr, "batch": args.batch, "base": base, "evaluations": evaluations,
            "loss_first_100": sum(losses[:100]) / min(100, len(losses)),
            "loss_last_100": sum(losses[-100:]) / min(100, len(losses))}


def save_grid(*, base, controlnet, path, label: str, num: int = 8) -> None:
    """Hints, their targets, the base model and the split ControlNet on the same prompts, one row each."""
    from privdiff.data.images import make_grid, save_png
    from privdiff.pipelines.evaluation import SamplingConfig, evaluation_items, generate
    from privdiff.pipelines.split_controlnet import split_controlnet_pipeline

    items = evaluation_items(set_name="circles", num=num)
    hints = [it["hint"].permute(1, 2, 0).numpy() for it in items]
    prompts = [it["caption"] for it in items]
    sampling = SamplingConfig(num_inference_steps=30, guidance_scale=5.0)
    pipe = split_controlnet_pipeline(base=base, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    rows = [hints, [it["pixel_values"].permute(1, 2, 0).numpy() * 0.5 + 0.5 for it in items],
            generate(pipeline=base, prompts=prompts, sampling=sampling),
            generate(pipeline=pipe, prompts=prompts, sampling=sampling, image=hints)]
    labels = [name for name in ("hint", "target", "base", f"split {label}") for _ in range(num)]
    save_png(make_grid([image for row in rows for image in row], columns=num, labels=labels, cell_size=96), path)


def attack(args) -> dict:
    import torch

    from privdiff.data import load_dataset
    from privdiff.models.privdiff_tiny import load_privdiff_tiny
    from privdiff.pipelines.split_attacks import known_noise
    from privdiff.pipelines.split_controlnet import client_payload, reconstruct_from_traffic

    tiny = load_privdiff_tiny()
    config = _config(args)
    dataset = load_dataset(data="circles", num_items=args.num_items)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    hints = torch.stack([dataset[i]["hint"] for i in range(len(dataset))]) * 2 - 1
    latents = _latents(tiny, dataset)
    runs = []
    for index in range(args.secrets):  # the noise is the client's secret: figures vary with it
        secret, ids = _secret_and_ids(args, len(dataset), index)
        traffic = [client_payload(pipeline=tiny, latents=latents, image_ids=ids, epoch=e, config=config, secret=secret)
                   for e in range(args.epochs)]
        report = reconstruct_from_traffic(pipeline=tiny, payloads=traffic, pixels=pixels, hint_pixels=hints,
                                          optimisation_steps=args.optimisation_steps, **known_noise(config))
        print(f"secret {index}:", "\n".join(report.lines()), flush=True)
        runs.append(report)

    def spread(values):
        values = sorted(values)
        return {"mean": sum(values) / len(values), "min": values[0], "max": values[-1],
                "std": (sum((v - sum(values) / len(values)) ** 2 for v in values) / len(values)) ** 0.5}

    return {"config": repr(config), "epochs": args.epochs, "secrets": args.secrets,
            "mean_image_psnr": runs[0].mean_image_psnr, "mean_image_ssim": runs[0].mean_image_ssim,
            "hint_mean_psnr": runs[0].hint_mean_psnr,
            "image_psnr": spread([r.image_psnr for r in runs]), "image_ssim": spread([r.image_ssim for r in runs]),
            "margin_db": spread([r.image_psnr - r.mean_image_psnr for r in runs]),
            "hint_psnr": spread([r.hint_psnr for r in runs]),
            "best_attacks": [max(r.attacks, key=lambda a: r.attacks[a]["psnr"]) for r in runs]}


def frontier(args) -> dict:
    """Every (k, images, σ_hint): utility (IoU gain, shuffled control) and attack margins, one noising
    per image; `--run-epochs` passes over the images (steps = epochs x images / batch)."""
    rows = []
    for sigma_hint in args.sigma_hints:
        for k in args.ks:
            point = argparse.Namespace(**{**vars(args), "mode": "hardened", "snr_bound": k, "sigma_hint": sigma_hint,
                                          "draws_per_image": 1})
            leak = attack(argparse.Namespace(**{**vars(point), "num_items": 32, "epochs": 2}))
            for images in args.images:
                run = argparse.Namespace(**{**vars(point), "num_items": images, "shuffled_control": True,
                                            "steps": max(1, args.run_epochs * images // args.batch),
                                            "eval_every": 10 ** 9, "out": None, "grid": None})
                start = time.time()
                figures = utility(run)
                final = figures["evaluations"][-1]
                rows.append({"k": k, "images": images, "sigma_hint": sigma_hint, "steps": run.steps,
                             "iou": final["circle_iou"], "iou_shuffled": final["shuffled_circle_iou"],
                             "iou_base": figures["base"]["circle_iou"],
                             "iou_gain": final["circle_iou"] - figures["base"]["circle_iou"],
                             "image_margin_db": leak["margin_db"], "hint_margin_db": {
                                 key: value - leak["hint_mean_psnr"] for key, value in leak["hint_psnr"].items()
                                 if key in ("mean", "min", "max")},
                             "minutes": round((time.time() - start) / 60, 1)})
                print(json.dumps(rows[-1]), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"rows": rows, "eval_num": args.eval_num, "batch": args.batch, "lr": args.lr}, f,
                                  indent=1)
    print("| k | images | σ_hint | IoU gain | IoU, shuffled hints | image margin dB (mean, max) | hint margin dB (mean, max) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['k']:g} | {r['images']} | {r['sigma_hint']:g} | {r['iou_gain']:+.3f} | {r['iou_shuffled']:.3f} | "
              f"{r['image_margin_db']['mean']:+.1f}, {r['image_margin_db']['max']:+.1f} | "
              f"{r['hint_margin_db']['mean']:+.1f}, {r['hint_margin_db']['max']:+.1f} |")
    return {"rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["utility", "attack", "frontier"])
    parser.add_argument("--mode", default="hardened", choices=["hardened", "paper"])
    parser.add_argument("--snr-bound", type=float, default=0.01)
    parser.add_argument("--sigma-hint", type=float, default=0.0)
    parser.add_argument("--draws-per-image", type=int, default=1, help="0: a fresh noising every step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-items", type=int, default=None, help="default: 1000 (utility) or 32 (attack)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-num", type=int, default=50, help="generations scored per evaluation")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--optimisation-steps", type=int, default=30)
    parser.add_argument("--secrets", type=int, default=8,
                        help="attack: client secrets to measure over (each gives other noise): mean and spread")
    parser.add_argument("--out", default=None, help="utility: save the ControlNet here at every evaluation")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--grid", default=None, help="utility: save a picture of hints, targets, base and split here")
    parser.add_argument("--ks", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0], help="frontier: the SNR bounds")
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000], help="frontier: images per run")
    parser.add_argument("--sigma-hints", type=float, nargs="+", default=[1.0], help="frontier: hint noise scales")
    parser.add_argument("--run-epochs", type=int, default=4, help="frontier: passes over each run's images")
    parser.add_argument("--shuffled-control", action="store_true", help="utility: also score with permuted hints")
    args = parser.parse_args(argv)
    args.num_items = args.num_items or (1000 if args.what == "utility" else 32)
    result = {"utility": utility, "attack": attack, "frontier": frontier}[args.what](args)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
