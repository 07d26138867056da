"""DP Textual Inversion's utility on privdiff-tiny and the `style` set: base, non-private TI, DPAgg-TI, DP-SGD TI.

    python bench/dp_ti_style.py                  # the published settings (bench/RESULTS.md), about 20 min on 2 cores
    python bench/dp_ti_style.py --epsilon 1 --num-eval 100 --json out.json

Every token is trained on the first 100 images of the `style` set with the public template
"a picture in the style of {token}", saved as the released files, loaded back into a fresh
privdiff-tiny with diffusers' `load_textual_inversion`, and measured two ways on that same template:
- `style_match`: the style analyzer (fraction of pixels in the unseen palette) on generations;
- `heldout_loss`: the mean denoising loss on 100 held-out style images the token never saw (fixed
  timesteps and noise for every row, as the membership audit draws them): lower means the token
  carries the style into the model's own (latent) space.
The base row uses the template with the initialiser word in place of the token: what the embedding
starts from. `--vae-ceiling` also scores the real images after a round trip through the frozen VAE:
no method that keeps the VAE frozen (Textual Inversion, DP-LDM) can draw more of the style than that.

Rows:
- `non-private TI`: one token trained on every image (DPAgg-TI's trainer with one subset and no noise);
- `DPAgg σ=0`: the plain mean of the clipped per-image embeddings (no privacy: shows what clipping and
  averaging alone cost);
- `DPAgg-TI ε`: the private release;
- `DP-SGD TI ε`: the baseline, one token with per-sample clipping and noise at the same ε.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

TEMPLATE = "a picture in the style of {token}"
TOKEN = "<privdiff-style>"

# The published settings (bench/RESULTS.md and the slow acceptance test).
DEFAULTS = dict(num_images=100, num_eval=100, init_word="painting", steps=60, batch_size=16, learning_rate=5e-3,
                clip=0.3, dpsgd_epochs=60.0, dpsgd_max_grad_norm=0.01, dpsgd_learning_rate=5e-3)


class _Prompted:
    """A dataset whose every caption is `prompt` (the template with the token), pixels unchanged."""

    def __init__(self, dataset, prompt: str):
        self.dataset, self.prompt = dataset, prompt

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "caption": self.prompt}


def _score(*, files: dict | None, init_word: str, num_eval: int, sampling, heldout) -> dict:
    import numpy as np

    from privdiff.models.privdiff_tiny import load_privdiff_tiny
    from privdiff.pipelines.evaluation import evaluate_quality
    from privdiff.pipelines.membership import MembershipAuditConfig, diffusion_losses
    from privdiff.pipelines.textual_inversion import load_embedding

    pipeline = load_privdiff_tiny()
    pipeline.set_progress_bar_config(disable=True)
    if files is None:
        prompt = TEMPLATE.format(token=init_word)
    else:
        load_embedding(pipeline=pipeline, path=files["diffusers"], token=TOKEN)
        prompt = TEMPLATE.format(token=TOKEN)
    report = evaluate_quality(pipeline=pipeline, set_name="style", num=num_eval, sampling=sampling,
                              prompt_transform=lambda caption: prompt)
    losses = diffusion_losses(pipeline=pipeline, dataset=_Prompted(heldout, prompt), indices=range(len(heldout)),
                              config=MembershipAuditConfig(timesteps=(100, 300, 500, 700), noise_draws=2))
    return {"style_match": report.metrics["style_match"], "heldout_loss": float(np.mean(losses))}


def vae_ceiling(*, num: int = 100) -> dict:
    """The style analyzer on real style images, as they are and after the frozen VAE's round trip."""
    import torch

    from privdiff.data import load_dataset
    from privdiff.data.analyzers import StyleAnalyzer, images_from_pixel_values
    from privdiff.models.privdiff_tiny import load_privdiff_tiny
    from privdiff.training.diffusion import encode_latents

    vae = load_privdiff_tiny().vae
    dataset = load_dataset(data="style", num_items=num)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(num)])
    with torch.no_grad():
        decoded = vae.decode(encode_latents(vae=vae, pixels=pixels) / vae.config.scaling_factor).sample.clamp(-1, 1)
    analyzer = StyleAnalyzer()
    return {"real": analyzer.score(images=images_from_pixel_values(pixel_values=pixels)).value,
            "vae_round_trip": analyzer.score(images=images_from_pixel_values(pixel_values=decoded)).value}


def study(*, epsilon: float = 1.0, num_images: int, num_eval: int, init_word: str, steps: int, batch_size: int,
          learning_rate: float, clip: float, dpsgd_epochs: float, dpsgd_max_grad_norm: float,
          dpsgd_learning_rate: float, workdir=None, log=print, seeds=(0,)) -> dict:
    """The private rows run once per seed in `seeds` (their own sampling and noise); the reference rows once."""
    from privdiff.data import load_dataset
    from privdiff.models.privdiff_tiny import load_privdiff_tiny
    from privdiff.pipelines.dp_ti import DPAggConfig, DPSGDTIConfig, train_dpagg_ti, train_dpsgd_ti
    from privdiff.pipelines.evaluation import SamplingConfig

    sampling = SamplingConfig(num_inference_steps=30, guidance_scale=5.0)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="privdiff-style-"))
    dataset = load_dataset(data="style", num_items=num_images)
    heldout = load_dataset(data="style", num_items=100, seed=1)  # another seed: other images, never trained on
    common = dict(token=TOKEN, init_word=init_word, template=TEMPLATE)
    dpagg = dict(steps=steps, batch_size=batch_size, learning_rate=learning_rate, clip_norm=clip, **common)
    runs = {
        "non-private TI": lambda out: train_dpagg_ti(
            base=load_privdiff_tiny(), data=dataset, out=out,
            config=DPAggConfig(epsilon=None, num_subsets=1, seed=0, **dpagg)),
        "DPAgg σ=0 (no privacy)": lambda out: train_dpagg_ti(
            base=load_privdiff_tiny(), data=dataset, out=out, config=DPAggConfig(epsilon=None, seed=0, **dpagg)),
    }
    suffix = (lambda seed: f" seed={seed}") if len(seeds) > 1 else (lambda seed: "")
    for seed in seeds:
        runs[f"DPAgg-TI ε={epsilon:g}{suffix(seed)}"] = lambda out, seed=seed: train_dpagg_ti(
            base=load_privdiff_tiny(), data=dataset, out=out,
            config=DPAggConfig(epsilon=epsilon, seed=seed, **dpagg))
    for seed in seeds:
        runs[f"DP-SGD TI ε={epsilon:g}{suffix(seed)}"] = lambda out, seed=seed: train_dpsgd_ti(
            base=load_privdiff_tiny(), data=dataset, out=out,
            config=DPSGDTIConfig(epsilon=epsilon, epochs=dpsgd_epochs, batch_size=batch_size, seed=seed,
                                 clip_norm=dpsgd_max_grad_norm, learning_rate=dpsgd_learning_rate, **common))
    rows = {"base (initialiser word)": _score(files=None, init_word=init_word, num_eval=num_eval, sampling=sampling,
                                              heldout=heldout)}
    log(f"base: {rows['base (initialiser word)']}")
    for index, (name, train) in enumerate(runs.items()):
        out = workdir / f"run{index}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        result = train(out)
        seconds = time.perf_counter() - start
        scores = _score(files=result.files, init_word=init_word, num_eval=num_eval, sampling=sampling, heldout=heldout)
        rows[name] = {**scores, "epsilon": result.epsilon, "train_seconds": round(seconds)}
        log(f"{name}: {scores}, ε {result.epsilon}, trained in {seconds / 60:.1f} min")
    base = rows["base (initialiser word)"]
    reference = rows["non-private TI"]
    for name, row in rows.items():
        for metric, sign in (("style_match", 1), ("heldout_loss", -1)):
            gain = sign * (reference[metric] - base[metric])
            row[f"{metric}_share_of_non_private_gain"] = sign * (row[metric] - base[metric]) / gain if gain > 0 else None
    import numpy as np

    summary = {}
    for method in ("DPAgg-TI", "DP-SGD TI"):
        shares = [row["style_match_share_of_non_private_gain"] for name, row in rows.items()
                  if name.startswith(method + " ")]
        if shares and None not in shares:
            summary[method] = {"style_share_mean": float(np.mean(shares)), "style_share_min": float(min(shares)),
                               "style_share_max": float(max(shares))}
    return {"num_images": num_images, "num_eval": num_eval, "template": TEMPLATE, "epsilon": epsilon,
            "seeds": list(seeds), "summary": summary,
            "settings": dict(init_word=init_word, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                             clip=clip, dpsgd_epochs=dpsgd_epochs, dpsgd_max_grad_norm=dpsgd_max_grad_norm,
                             dpsgd_learning_rate=dpsgd_learning_rate),
            "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=1.0)
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of each private row per seed")
    parser.add_argument("--vae-ceiling", action="store_true", help="also score real images after the VAE round trip")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    settings = {key: getattr(args, key) for key in DEFAULTS}
    figures = study(epsilon=args.epsilon, workdir=args.workdir, log=lambda line: print(line, flush=True),
                    seeds=tuple(args.seeds), **settings)
    if args.vae_ceiling:
        figures["vae_ceiling"] = vae_ceiling()
        print(f"style analyzer on real images: {figures['vae_ceiling']}")
    print(json.dumps({"rows": figures["rows"], "summary": figures["summary"]}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
