"""Quality of a model's generations, scored by privdiff's analyzers, printed as a table.

    python bench/quality.py --base tiny --num 200            # privdiff-tiny on every set
    python bench/quality.py --base DIR --sets digits --num 100

Each row: the analyzer on N generations (DDIM, classifier-free guidance) next to the same analyzer on
the set's real images (the ceiling) and, for circles, a random circle (the floor a model that ignores
the hint reaches). Public-set figures for the shipped default go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--sets", default="shapes,circles,digits,mnist,style")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from privdiff.data.analyzers import random_circle_iou
    from privdiff.models.loading import load_pipeline
    from privdiff.pipelines.evaluation import SamplingConfig, evaluate_quality, ground_truth_quality

    pipeline = load_pipeline(base=args.base)
    sampling = SamplingConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    rows, results = [], {}
    for set_name in args.sets.split(","):
        start = time.perf_counter()
        report = evaluate_quality(pipeline=pipeline, set_name=set_name, num=args.num, sampling=sampling)
        truth = ground_truth_quality(set_name=set_name, num=args.num, seed=args.seed)
        seconds = time.perf_counter() - start
        results[set_name] = {"generated": report.metrics, "real_images": truth, "seconds": round(seconds, 1)}
        for metric, value in report.metrics.items():
            floor = ""
            if metric == "circle_iou":
                baseline = random_circle_iou(num=1000, seed=args.seed)
                results[set_name]["random_circle"] = baseline
                floor = f"{baseline:.3f}"
            rows.append((set_name, metric, f"{value:.3f}", f"{truth.get(metric, float('nan')):.3f}", floor))
    if "style" in results:
        # The style set must be unseen: the default's style match is compared with the public set's own.
        from privdiff.pipelines.evaluation import public_style_match

        results["style"]["public_images"] = public_style_match(num=args.num, seed=args.seed)
        rows.append(("shapes (real, public)", "style_match", "", f"{results['style']['public_images']:.3f}", ""))
    from privdiff.pipelines.evaluation import vae_round_trip

    round_trip = vae_round_trip(vae=pipeline.vae, num=args.num, seed=args.seed)
    rows.append(("style (autoencoder round trip)", "style pixels kept", f"{round_trip['style_kept']:.3f}", "1.000", ""))
    rows.append(("mnist (autoencoder round trip)", "held-out digit accuracy", f"{round_trip['mnist_accuracy']:.3f}",
                 f"{round_trip['mnist_real_accuracy']:.3f}", ""))
    print(f"\nbase={args.base}  N={args.num}  DDIM {args.steps} steps  guidance {args.guidance}  seed {args.seed}\n")
    print("| set | metric | generated | real images | random circle |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": args.base, "num": args.num, "steps": args.steps, "guidance": args.guidance,
                       "seed": args.seed, "results": results, "vae_round_trip": round_trip}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
