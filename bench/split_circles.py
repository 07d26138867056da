"""Split ControlNet on `circles`: what the ControlNet learns and what the server rebuilds, per setting.

    python bench/split_circles.py utility --mode paper --steps 3000 --batch 16
    python bench/split_circles.py utility --mode hardened --snr-bound 1 --draws-per-image 0 --steps 1000 --batch 64
    python bench/split_circles.py attack --mode hardened --snr-bound 0.01 --draws-per-image 1 --epochs 10 --secrets 8
    python bench/split_circles.py frontier --ks 0.03 0.1 0.3 1 --images 1000 10000 --sigma-hints 1 --run-epochs 4
    python bench/split_circles.py plot --json privdiff/pipelines/split_frontier.json --out-png frontier.png

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
`pipelines/split_frontier.json` (what the planner fits, shipped) holds such rows; `plot` draws them.
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

    import numpy as np
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
    trainer = SplitTrainer(unet=copy.deepcopy(tiny.unet), learning_rate=args.learning_rate, seed=args.seed)
    sampling = SamplingConfig(num_inference_steps=30, guidance_scale=5.0)
    hints = [it["hint"].permute(1, 2, 0).numpy() for it in evaluation_items(set_name="circles", num=args.eval_num)]
    # The control: the same targets with the hints permuted (a fixed derangement-like shuffle).
    shuffled = [hints[i] for i in torch.randperm(len(hints), generator=torch.Generator().manual_seed(1)).tolist()]

    def evaluate():
        pipe = split_controlnet_pipeline(base=tiny, controlnet=trainer.controlnet.eval())
        pipe.set_progress_bar_config(disable=True)
        report = evaluate_quality(pipeline=pipe, set_name="circles", num=args.eval_num, sampling=sampling,
                                  image=hints)
        metrics = report.metrics
        last_images[:] = report.images
        if getattr(args, "shuffled_control", False):
            control = evaluate_quality(pipeline=pipe, set_name="circles", num=args.eval_num, sampling=sampling,
                                       image=shuffled).metrics
            metrics.update({f"shuffled_{k}": v for k, v in control.items()})
        trainer.controlnet.train()
        return metrics

    last_images = []  # the last evaluation's generations, for the gain's paired spread
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
    base_report = evaluate_quality(pipeline=tiny, set_name="circles", num=args.eval_num, sampling=sampling)
    base = base_report.metrics
    # The gain's standard error over the generations, paired (same prompts, hints and seeds for both models).
    from privdiff.data.analyzers import CirclesAnalyzer

    circles = [it["circle"] for it in evaluation_items(set_name="circles", num=args.eval_num)]
    paired = (np.array(CirclesAnalyzer().score(images=last_images, circles=circles).ious)
              - np.array(CirclesAnalyzer().score(images=base_report.images, circles=circles).ious))
    gain_se = float(paired.std(ddof=1) / np.sqrt(len(paired)))
    if args.grid:
        save_grid(base=tiny, controlnet=trainer.controlnet.eval(), path=args.grid, label=args.mode)
    return {"config": repr(config), "lr": args.learning_rate, "batch": args.batch, "base": base, "evaluations": evaluations,
            "iou_gain_se": gain_se,
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
    per image; `--run-epochs` passes over the images (steps = epochs x images / batch). With an
    existing `--json` its rows are kept (a rerun measures only what is missing) and its attacks reused;
    `--images` with no number measures the attacks alone (a row with images 0)."""
    import os

    rows = json.load(open(args.json))["rows"] if args.json and os.path.exists(args.json) else []
    attacks = {(r["k"], r["sigma_hint"]): r for r in rows}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "eval_num": args.eval_num, "batch": args.batch, "lr": args.learning_rate,
                           "secrets": args.secrets, "run_epochs": args.run_epochs}, f, indent=1)

    for sigma_hint in args.sigma_hints:
        for k in args.ks:
            point = argparse.Namespace(**{**vars(args), "mode": "hardened", "snr_bound": k, "sigma_hint": sigma_hint,
                                          "draws_per_image": 1})
            if (k, sigma_hint) not in attacks:
                leak = attack(argparse.Namespace(**{**vars(point), "num_items": 32, "epochs": 2}))
                attacks[(k, sigma_hint)] = {
                    "image_margin_db": leak["margin_db"], "hint_margin_db": {
                        key: value - leak["hint_mean_psnr"] for key, value in leak["hint_psnr"].items()
                        if key in ("mean", "min", "max")}, "secrets": args.secrets}
                if not args.images:
                    rows.append({"k": k, "images": 0, "sigma_hint": sigma_hint, **attacks[(k, sigma_hint)]})
                    print(json.dumps(rows[-1]), flush=True)
                    save()
            leak = attacks[(k, sigma_hint)]
            for images in args.images:
                if any(r["k"] == k and r["images"] == images and r["sigma_hint"] == sigma_hint
                       and r.get("seed", 0) == args.seed for r in rows):
                    continue
                run = argparse.Namespace(**{**vars(point), "num_items": images, "shuffled_control": True,
                                            "steps": max(1, args.run_epochs * images // args.batch),
                                            "eval_every": 10 ** 9, "out": None, "grid": None})
                start = time.time()
                figures = utility(run)
                final = figures["evaluations"][-1]
                rows.append({"k": k, "images": images, "sigma_hint": sigma_hint, "seed": args.seed,
                             "steps": run.steps, "iou": final["circle_iou"], "iou_shuffled": final["shuffled_circle_iou"],
                             "iou_base": figures["base"]["circle_iou"],
                             "iou_gain": final["circle_iou"] - figures["base"]["circle_iou"],
                             "iou_gain_se": figures["iou_gain_se"], "image_margin_db": leak["image_margin_db"], "hint_margin_db": leak["hint_margin_db"],
                             "secrets": leak.get("secrets"), "minutes": round((time.time() - start) / 60, 1)})
                print(json.dumps(rows[-1]), flush=True)
                save()
    print("| k | images | σ_hint | IoU gain | IoU, shuffled hints | image margin dB (mean, max) | hint margin dB (mean, max) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in (r for r in rows if r["images"]):
        print(f"| {r['k']:g} | {r['images']} | {r['sigma_hint']:g} | {r['iou_gain']:+.3f} | {r['iou_shuffled']:.3f} | "
              f"{r['image_margin_db']['mean']:+.1f}, {r['image_margin_db']['max']:+.1f} | "
              f"{r['hint_margin_db']['mean']:+.1f}, {r['hint_margin_db']['max']:+.1f} |")
    return {"rows": rows}


def plot(args) -> dict:
    """The frontier as a picture: attack margins against k (with the planner's fit and its promise) and
    the measured IoU gain against images per run, per (k, σ_hint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from privdiff.pipelines.split_plan import SplitFrontier

    frontier = SplitFrontier.load(args.json)
    rows = frontier.rows
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    margins = frontier._margins_by_k()
    ks = np.array(list(margins))
    means = np.array([m["mean"] for m in margins.values()])
    left.errorbar(ks, means, yerr=[means - [m["min"] for m in margins.values()],
                                   [m["max"] for m in margins.values()] - means], fmt="o", color="#1f77b4",
                  capsize=3, label="image attack, measured (mean, min-max over secrets)")
    grid = np.geomspace(ks.min() / 1.5, ks.max() * 1.5, 100)
    left.plot(grid, [frontier.image_margin(k)[0] for k in grid], color="#1f77b4", lw=1, label="fit 10 log10(1 + a k^b)")
    left.plot(grid, [frontier.image_margin(k)[1] for k in grid], color="#1f77b4", lw=1, ls="--",
              label="the planner's promise (fit + widest excess)")
    for sigma, mean, upper in frontier._hint_points:
        if mean < 20:
            left.axhline(mean, color="#2ca02c", lw=0.8, ls=":")
            left.text(ks.max() * 1.6, mean, f"hint, σ_hint={sigma:g}", fontsize=7, color="#2ca02c", va="center")
    left.axhline(3.0, color="#d62728", lw=0.8)
    left.set(xscale="log", xlabel="k (SNR bound), one noising per image", ylabel="dB over the mean guess",
             title="What the server rebuilds (32 circles images)")
    left.legend(fontsize=7, loc="upper left")
    utility = [r for r in rows if r["images"]]
    colors = {}
    for r in utility:
        key = (r["k"], r["sigma_hint"])
        color = colors.setdefault(key, f"C{len(colors)}")
        right.plot(r["images"], r["iou_gain"], "o", color=color)
    for (k, sigma), color in colors.items():
        right.plot([], [], "o", color=color, label=f"k={k:g}, σ_hint={sigma:g}")
    right.axhline(0, color="black", lw=0.6)
    right.axhline(0.15, color="#d62728", lw=0.8, ls="--")
    right.set(xscale="log", xlabel="images per run (one noising each)", ylabel="circle IoU gain over the base",
              title="What the ControlNet learns (200 generations)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out_png, dpi=110)
    return {"picture": args.out_png}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["utility", "attack", "frontier", "plot"])
    parser.add_argument("--mode", default="hardened", choices=["hardened", "paper"])
    parser.add_argument("--snr-bound", type=float, default=0.01)
    parser.add_argument("--sigma-hint", type=float, default=0.0)
    parser.add_argument("--draws-per-image", type=int, default=1, help="0: a fresh noising every step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-items", type=int, default=None, help="default: 1000 (utility) or 32 (attack)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--learning-rate", "--lr", type=float, default=1e-3)
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
    parser.add_argument("--images", type=int, nargs="*", default=[1000, 10000],
                        help="frontier: images per run (none: the attacks alone)")
    parser.add_argument("--sigma-hints", type=float, nargs="+", default=[1.0], help="frontier: hint noise scales")
    parser.add_argument("--run-epochs", type=int, default=4, help="frontier: passes over each run's images")
    parser.add_argument("--out-png", default=None, help="plot: the picture of the frontier in --json")
    parser.add_argument("--shuffled-control", action="store_true", help="utility: also score with permuted hints")
    args = parser.parse_args(argv)
    args.num_items = args.num_items or (1000 if args.what == "utility" else 32)
    result = {"utility": utility, "attack": attack, "frontier": frontier, "plot": plot}[args.what](args)
    print(json.dumps(result))
    if args.json and args.what not in ("frontier", "plot"):  # the frontier wrote its rows (and settings) as it went
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
