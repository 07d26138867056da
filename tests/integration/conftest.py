"""Integration tests against a real ComfyUI: PRIVDIFF_COMFYUI names its folder (with main.py).

Run them with ComfyUI's own Python environment (privdiff installed into it):
    PRIVDIFF_COMFYUI=~/comfyui/ComfyUI ~/comfyui/venv/bin/python -m pytest -m comfyui tests/integration
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # comfy_server.py, beside this file


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    folder = os.environ.get("PRIVDIFF_COMFYUI")
    if not folder:
        pytest.skip("PRIVDIFF_COMFYUI is not set: point it at a ComfyUI folder (with main.py) to run these tests")
    root = Path(folder).expanduser().resolve()
    if not (root / "main.py").is_file():
        pytest.skip(f"PRIVDIFF_COMFYUI={folder} has no main.py: it is not a ComfyUI folder")
    try:
        import comfy  # noqa: F401  (already importable: fine)
    except ImportError:
        sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # as `main.py --cpu`: these machines have no GPU
        import comfy.sd  # noqa: F401
    except ImportError as error:
        pytest.skip(f"ComfyUI at {root} does not import in this Python ({error}); use ComfyUI's own venv")
    return root


@pytest.fixture(scope="session")
def comfy_tiny_model(comfyui_root):
    """A builder: spec -> privdiff-tiny's UNet built from ComfyUI's own classes."""
    return _comfy_tiny_model


def _comfy_tiny_model(spec):
    """privdiff-tiny's UNet built from ComfyUI's own classes, as the pack's loader node builds it."""
    from privdiff.nodes.comfy_objects import comfy_model_from_spec

    return comfy_model_from_spec(spec)


@pytest.fixture(scope="session")
def comfy_server(comfyui_root, tmp_path_factory):
    """A real ComfyUI server (its own process, a fresh base folder) with this checkout as a node pack."""
    import socket

    from comfy_server import ComfyServer

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ComfyServer(comfyui_root=comfyui_root, base=tmp_path_factory.mktemp("comfy-base"), port=port)
    server.start()
    yield server
    server.stop()


SD15_CACHE = Path(os.environ.get("PRIVDIFF_TEST_CACHE", "~/.cache/privdiff-tests")).expanduser()


@pytest.fixture(scope="session")
def sd15_checkpoint(comfyui_root) -> Path:
    """A randomly initialised SD1.5-shaped single-file checkpoint (fp16, ~2 GB), made once and cached
    outside the repository: ComfyUI's own CheckpointLoaderSimple recognises it as SD1.5."""
    path = SD15_CACHE / "sd15-random-fp16.safetensors"
    if path.is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from privdiff.models.loading import CONFIGS_DIR
    from privdiff.models.original_layout import save_single_file
    from privdiff.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    folder = CONFIGS_DIR / "sd15"
    pipeline = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")),
        tokenizer=build_clip_tokenizer(), scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float16)
    partial = path.with_name(path.name + ".partial")
    save_single_file(pipeline=pipeline, path=partial.with_suffix(".safetensors"))
    partial.with_suffix(".safetensors").rename(path)
    return path
