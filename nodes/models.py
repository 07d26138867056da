"""Model loaders: privdiff-tiny as ComfyUI-native MODEL / CLIP / VAE."""

from comfy_api.latest import io


class PrivDiffTinyLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrivDiffTinyLoader",
            display_name="Load privdiff-tiny",
            category="privdiff/models",
            description="privdiff's small public text-to-image model (64 px, pretrained on public shapes, printed letters and textures drawn in code), "
                        "shipped with the pack: every privdiff workflow runs with it and no download. Swap in "
                        "ComfyUI's Load Checkpoint for a real SD1.5 model.",
            inputs=[],
            outputs=[io.Model.Output(tooltip="the UNet, as ComfyUI's own SD1 model class"),
                     io.Clip.Output(tooltip="the text encoder and its tokenizer"),
                     io.Vae.Output(tooltip="the x8 autoencoder")],
        )

    @classmethod
    def execute(cls):
        from .comfy_objects import privdiff_tiny_objects

        return io.NodeOutput(*privdiff_tiny_objects())


MODEL_NODES = [PrivDiffTinyLoader]
