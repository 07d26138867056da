"""Integration tests against a real ComfyUI: PRIVDIFF_COMFYUI names its folder (with main.py).

Run them with ComfyUI's own Python environment (privdiff installed into it):
    PRIVDIFF_COMFYUI=~/comfyui/ComfyUI ~/comfyui/venv/bin/python -m pytest -m comfyui tests/integration
"""

import os
import sys
from pathlib import Path

import pytest


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
