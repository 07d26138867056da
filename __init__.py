"""privdiff: private adaptation of Stable-Diffusion-class models.

This file is both the Python package root and ComfyUI's entry point for the node pack, so it
imports nothing heavy: ComfyUI imports every node pack at start-up.
"""

__version__ = "0.1.0"

# ComfyUI serves this folder to its frontend: web/privdiff.js shows a node's result text on the node.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the node classes are imported only when ComfyUI asks for them."""
    from .nodes import PrivDiffExtension

    return PrivDiffExtension()
