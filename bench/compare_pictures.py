"""One picture per method: the base model, DP-adapted and non-private outputs for the same prompts and seeds.

    python bench/compare_pictures.py --out bench/results/dp_ldm_mnist.png \\
        --row "base=base" --row "DP-LDM ε=10=/tmp/runs/eps10" --row "no DP=/tmp/runs/no DP" \\
        --prompts "a handwritten digit {d}" --columns 10
    python bench/compare_pictures.py --out style.png --token "<privdiff-style>" \\
        --row "base=base" --row "DPAgg-TI ε=1=/tmp/style/run2/embedding.safetensors" \\
        --prompts "a picture in the style of {token}" --columns 8

Each row is LABEL=WHAT: `base` (`--base`: privdiff-tiny as shipped, or a diffusers folder such as
`bench/dp_ldm_digits.py --public-warmup`'s, which every row then starts from), a DP-LDM output (folder or weight file,
applied with `apply_fine_tune`), or a textual-inversion embedding (a .safetensors that holds one
embedding, loaded with diffusers' `load_textual_inversion` under --token). A row label may hold '='
(only the last '=' splits). Column c uses seed `--seed + c` in every row, so differences down a
column are the model's, not the noise's. `{d}` in a prompt is the column's digit (c % 10); `{token}`
is the token for embedding rows and `--init-word` for the others.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _load(what: str, token: str, base: str = "tiny"):
    from safetensors import safe_open

    from privdiff.models.loading import load_pipeline
    from privdiff.pipelines.fine_tuned import apply_fine_tune
    from privdiff.pipelines.textual_inversion import load_embedding

    pipeline = load_pipeline(base=base)
    pipeline.set_progress_bar_config(disable=True)
    if what == "base":
        return pipeline, False
    path = Path(what)
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
        if len(keys) <= 2 and not any("." in k for k in keys):  # an embedding file: emb_params / clip_l, clip_g
            load_embedding(pipeline=pipeline, path=path, token=token)
            return pipeline, True
    apply_fine_tune(pipeline=pipeline, weights=path)
    return pipeline, False


def compare(*, rows: list[tuple[str, str]], prompts: list[str], columns: int, out: Path, seed: int = 0,
            token: str = "<token>", init_word: str = "painting", steps: int = 30, guidance: float = 5.0,
            base: str = "tiny") -> Path:
    import torch

    from privdiff.data.images import make_grid, save_png

    images, labels = [], []
    for label, what in rows:
        pipeline, has_token = _load(what, token, base)
        for column in range(columns):
            prompt = prompts[column % len(prompts)].format(d=column % 10, token=token if has_token else init_word)
            generator = torch.Generator().manual_seed(seed + column)
            image = pipeline(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]
            images.append(image)
            labels.append(label if column == 0 else "")
    grid = make_grid(images, columns=columns, labels=labels, cell_size=64)
    return save_png(grid, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", required=True, help="LABEL=base|DP-LDM output|embedding file")
    parser.add_argument("--prompts", nargs="+", required=True)
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token", default="<token>")
    parser.add_argument("--init-word", default="painting")
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", default="tiny", help="the model every row starts from: 'tiny' or a diffusers folder")
    args = parser.parse_args(argv)
    rows = []
    for row in args.row:
        label, sep, what = row.rpartition("=")
        if not sep or not label:
            parser.error(f"--row {row!r}: write LABEL=WHAT (e.g. 'DP ε=10=/tmp/run')")
        rows.append((label, what))
    path = compare(rows=rows, prompts=args.prompts, columns=args.columns, out=Path(args.out), seed=args.seed,
                   token=args.token, init_word=args.init_word, base=args.base)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
