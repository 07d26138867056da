"""Utility measured on generations: every private method reports it next to its privacy.

`evaluate_quality` generates images for a procedural set's evaluation prompts with a pipeline and
scores them with that set's analyzer (`privdiff.data.analyzers`). Evaluation prompts come from seeds
that no training run uses, and the digits classifier never saw the digits anyone trains on.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingConfig:
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    batch_size: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1 or self.batch_size < 1:
            raise ValueError("num_inference_steps and batch_size must be at least 1.")


@dataclass(frozen=True)
class QualityReport:
    """One set's scores: `metrics` maps a metric name to its value (fractions in 0..1)."""

    set_name: str
    num_images: int
    metrics: dict[str, float]
    images: list = field(default_factory=list, repr=False)
    prompts: list[str] = field(default_factory=list, repr=False)


def generate(*, pipeline, prompts: list[str], sampling: SamplingConfig = SamplingConfig(), **call_kwargs) -> list:
    """Images (HxWx3 float arrays in 0..1) for `prompts`, in batches, reproducible for a seed."""
    import torch

    images = []
    generator = torch.Generator().manual_seed(sampling.seed)
    for start in range(0, len(prompts), sampling.batch_size):
        batch = prompts[start:start + sampling.batch_size]
        output = pipeline(
            batch,
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            generator=generator,
            output_type="np",
            **{k: v[start:start + sampling.batch_size] if isinstance(v, list) else v for k, v in call_kwargs.items()},
        )
        images.extend(list(output.images))
    return images


def evaluation_items(*, set_name: str, num: int, seed: int = 0) -> list[dict]:
    """Held-out items of a procedural set whose captions serve as evaluation prompts."""
    from ..data import load_dataset
    from ..data.analyzers import EVAL_SEED_OFFSET, public_prompts

    if set_name == "shapes":
        return [{"caption": spec.caption, "spec": spec} for spec in public_prompts(num=num, seed=seed)]
    if set_name in ("digits", "mnist"):
        # Balanced labels: prompt i asks for digit i % 10; the classifier split is never trained on.
        return [{"caption": f"a handwritten digit {i % 10}", "label": i % 10} for i in range(num)]
    dataset = load_dataset(data=set_name, seed=EVAL_SEED_OFFSET + seed, num_items=num)
    return [dataset[i] for i in range(num)]


def score_images(*, set_name: str, images: list, items: list[dict], analyzer=None) -> dict[str, float]:
    """Score `images` generated for `items` with the set's analyzer; returns metric -> value."""
    from ..data.analyzers import analyzer_for

    analyzer = analyzer or analyzer_for(set_name)()
    if set_name == "shapes":
        score = analyzer.score(images=images, specs=[item["spec"] for item in items])
        return {"background_accuracy": score.background_accuracy, "color_accuracy": score.color_accuracy,
                "shape_accuracy": score.shape_accuracy}
    if set_name == "circles":
        # Chance level for this very model: its images scored against other items' hints. A model
        # that ignores the hint scores the same against its own hints.
        circles = [item["circle"] for item in items]
        shuffled = circles[1:] + circles[:1]
        return {"circle_iou": analyzer.score(images=images, circles=circles).value,
                "circle_iou_shuffled_hints": analyzer.score(images=images, circles=shuffled).value}
    if set_name in ("digits", "mnist"):
        return {"digit_accuracy": analyzer.score(images=images, labels=[item["label"] for item in items]).value}
    if set_name == "style":
        return {"style_match": analyzer.score(images=images).value}
    raise ValueError(f"set_name={set_name!r} has no analyzer; choose shapes, circles, digits, mnist or style.")


def evaluate_quality(*, pipeline, set_name: str, num: int = 200, sampling: SamplingConfig = SamplingConfig(),
                     prompt_transform=None, analyzer=None, **call_kwargs) -> QualityReport:
    """Generate `num` images for `set_name`'s evaluation prompts and score them.

    `prompt_transform` rewrites each caption (e.g. to insert a learnt token); `call_kwargs` go to the
    pipeline (e.g. `image=[...]` hints for a ControlNet pipeline, as lists aligned with the prompts).
    """
    items = evaluation_items(set_name=set_name, num=num, seed=sampling.seed)
    prompts = [item["caption"] for item in items]
    if prompt_transform is not None:
        prompts = [prompt_transform(p) for p in prompts]
    images = generate(pipeline=pipeline, prompts=prompts, sampling=sampling, **call_kwargs)
    metrics = score_images(set_name=set_name, images=images, items=items, analyzer=analyzer)
    return QualityReport(set_name=set_name, num_images=len(images), metrics=metrics, images=images, prompts=prompts)


def _public_real_images(*, num: int, seed: int):
    """Real public images drawn like the evaluation prompts: (dataset, images as HxWx3 arrays)."""
    import torch

    from ..data import ShapesDataset
    from ..data.analyzers import EVAL_SEED_OFFSET, images_from_pixel_values
    from ..data.private_sets import public_shapes_config

    dataset = ShapesDataset(public_shapes_config(num_items=num, seed=EVAL_SEED_OFFSET + seed))
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(num)])
    return dataset, images_from_pixel_values(pixel_values=pixels)


def ground_truth_quality(*, set_name: str, num: int = 200, seed: int = 0) -> dict[str, float]:
    """The analyzer's score on the set's own real images (the ceiling a perfect model reaches)."""
    import torch

    from ..data import load_dataset
    from ..data.analyzers import EVAL_SEED_OFFSET, images_from_pixel_values

    if set_name == "shapes":
        dataset, images = _public_real_images(num=num, seed=seed)
        items = [{"spec": dataset.attributes(i)} for i in range(num)]
        return score_images(set_name=set_name, images=images, items=items)
    dataset = load_dataset(data=set_name, seed=EVAL_SEED_OFFSET + seed, num_items=num)
    items = [dataset[i] for i in range(len(dataset))]
    pixels = torch.stack([item["pixel_values"] for item in items])
    return score_images(set_name=set_name, images=images_from_pixel_values(pixel_values=pixels), items=items)


def public_style_match(*, num: int = 200, seed: int = 0) -> float:
    """The style analyzer on real public images: how much 'style' the public data already has."""
    from ..data.analyzers import StyleAnalyzer

    _, images = _public_real_images(num=num, seed=seed)
    return StyleAnalyzer().score(images=images).value


def vae_round_trip(*, vae, num: int = 200, seed: int = 0) -> dict[str, float]:
    """What an autoencoder keeps of the private sets, the ceiling of every fine-tune above it.

    style_kept: the style analyzer's score on encoded-then-decoded ``style`` images over its score on
    the originals. mnist_accuracy: the mnist analyzer on round trips of the 300 images its
    classifier held back (mnist_real_accuracy: on the originals). Only held-out evaluation images
    are used; nothing here trains on them.
    """
    import torch

    from ..data import load_dataset
    from ..data.analyzers import EVAL_SEED_OFFSET, MnistAnalyzer, StyleAnalyzer, images_from_pixel_values
    from ..data.mnist import mnist_source, render_mnist
    from ..data.transforms import array_to_tensor

    def round_trip(pixels):
        with torch.no_grad():
            out = [vae.decode(vae.encode(pixels[i:i + 50].to(vae.dtype)).latent_dist.mean).sample.float()
                   for i in range(0, len(pixels), 50)]
        return torch.cat(out).clamp(-1, 1)

    style = load_dataset(data="style", seed=EVAL_SEED_OFFSET + seed, num_items=num)
    pixels = torch.stack([style[i]["pixel_values"] for i in range(num)])
    analyzer = StyleAnalyzer()
    real = analyzer.score(images=images_from_pixel_values(pixel_values=pixels)).value
    kept = analyzer.score(images=images_from_pixel_values(pixel_values=round_trip(pixels))).value

    mnist = MnistAnalyzer()
    images, labels = mnist_source()
    held = list(mnist.held_out_indices)
    pixels = torch.stack([array_to_tensor(render_mnist(image=images[i], resolution=64), value_range=(-1.0, 1.0))
                          for i in held])
    truth = [int(labels[i]) for i in held]
    return {
        "style_kept": kept / max(real, 1e-12),
        "mnist_accuracy": mnist.score(images=images_from_pixel_values(pixel_values=round_trip(pixels)), labels=truth).value,
        "mnist_real_accuracy": mnist.score(images=images_from_pixel_values(pixel_values=pixels), labels=truth).value,
    }
