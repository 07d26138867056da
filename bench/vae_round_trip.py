"""What privdiff-tiny's autoencoder keeps of the private sets: the ceiling of every fine-tune above it.

    python bench/vae_round_trip.py --base tiny --out bench/results/tiny_vae_round_trip

Writes `<out>.json` (style pixels kept, mnist accuracy after the round trip, on the mnist analyzer's
300 held-out images) and `<out>.png` (originals above their round trips: style, mnist, public glyphs
and textures). Needs the mnist extra (`pip install privdiff[mnist]`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--out", default="bench/results/tiny_vae_round_trip")
    args = parser.parse_args(argv)

    import torch

    from privdiff.data import load_dataset
    from privdiff.data.analyzers import EVAL_SEED_OFFSET
    from privdiff.data.images import make_grid, save_png
    from privdiff.models.loading import load_pipeline
    from privdiff.pipelines.evaluation import vae_round_trip

    vae = load_pipeline(base=args.base).vae
    figures = vae_round_trip(vae=vae)
    rows = []
    for name, count in (("style", 4), ("mnist", 4), ("glyphs", 2), ("textures", 2)):
        dataset = load_dataset(data=name, seed=EVAL_SEED_OFFSET, num_items=count,
                               **({"split": "classifier"} if name == "mnist" else {}))
        rows += [dataset[i]["pixel_values"] for i in range(count)]
    pixels = torch.stack(rows)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    images = [((t.permute(1, 2, 0).numpy() + 1) / 2) for t in torch.cat([pixels, decoded])]
    labels = ["original"] * len(rows) + ["round trip"] * len(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(images, labels=labels, columns=len(rows), cell_size=96), out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps({"base": args.base, **figures}, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
