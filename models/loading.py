"""Loading a base model with no network: `tiny`, a diffusers folder, or one original-layout file.

Single files go through diffusers' own converter (`from_single_file`), given a bundled config folder
(`models/configs/`) so that it never asks the hub, and given the tokenizers explicitly, because a
single file holds none: they come from a folder the user names, the Hugging Face cache, or the hub
only when the user allows it. Layout detection reads tensor names and shapes only, never the weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..console import quiet_loading
from ..errors import public_name

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

# (family, UNet model_channels, cross-attention width) -> bundled config folder.
BUNDLED_CONFIGS = {
    ("sd1", 320, 768): "sd15",
    ("sd2", 320, 1024): "sd21",
    ("sdxl", 320, 2048): "sdxl",
}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# privdiff-tiny's own signature: its single files load through the shipped folder (which has a tokenizer).
PRIVDIFF_TINY_SIGNATURE = ("sd1", 64, 64)


def bundled_config_for(info: "CheckpointInfo") -> Path | None:
    """The config folder privdiff ships for a checkpoint's architecture, if any."""
    from .privdiff_tiny import SHIPPED_DIR, is_shipped

    key = (info.family, info.model_channels, info.context_dim)
    if key == PRIVDIFF_TINY_SIGNATURE and is_shipped():
        return SHIPPED_DIR
    name = BUNDLED_CONFIGS.get(key)
    return CONFIGS_DIR / name if name else None

# Where each family's tokenizer usually lives in a Hugging Face cache: (repo, subfolder).
TOKENIZER_SOURCES = {
    ("sd1", "tokenizer"): [
        ("openai/clip-vit-large-patch14", ""),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
        ("runwayml/stable-diffusion-v1-5", "tokenizer"),
    ],
    ("sd2", "tokenizer"): [
        ("stabilityai/stable-diffusion-2-1", "tokenizer"),
        ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
    ],
    ("sdxl", "tokenizer"): [
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
        ("openai/clip-vit-large-patch14", ""),
    ],
    ("sdxl", "tokenizer_2"): [
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
        ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""),
    ],
}


@public_name
class CheckpointLayoutError(ValueError):
    """A checkpoint whose layout privdiff cannot load (names what was found and what is supported)."""


@public_name
class MissingTokenizerError(FileNotFoundError):
    """A single-file checkpoint whose tokenizer could not be found locally."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint holds, read from tensor names and shapes alone."""

    path: Path
    family: str | None
    model_channels: int | None
    context_dim: int | None
    in_channels: int | None
    num_tensors: int
    sample_keys: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        if self.family is None:
            return f"{self.num_tensors} tensors, none in a known layout (first keys: {list(self.sample_keys)})"
        return (
            f"a {FAMILY_NAMES[self.family]}-layout checkpoint with UNet model_channels={self.model_channels}, "
            f"in_channels={self.in_channels}, cross-attention width={self.context_dim} ({self.num_tensors} tensors)"
        )


def read_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in a checkpoint, without reading the weights into memory."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointLayoutError(f"{path} is a folder; give a .safetensors or .ckpt file (a diffusers model "
                                    "folder goes to --base as it is).")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as error:  # safetensors raises its own error type for damaged headers
            raise CheckpointLayoutError(f"{path} is not a readable .safetensors file (empty, truncated or another "
                                        f"format: {str(error)[:120]}).") from None
    import pickle

    import torch

    # weights_only: a .ckpt is a pickle, and a pickle from a stranger can run code. torch's own refusal
    # suggests weights_only=False, which would run it: say plainly that the file will not be loaded.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ModuleNotFoundError):
        raise CheckpointLayoutError(
            f"{path} holds code or a format privdiff does not read (only tensors are loaded from a .ckpt); it will "
            "not be loaded. Convert it to .safetensors from a source you trust.") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointLayoutError(f"{path} does not hold a dictionary of tensors; it is not a model checkpoint.")
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def inspect_checkpoint(path: str | Path, *, shapes: dict[str, tuple[int, ...]] | None = None) -> CheckpointInfo:
    """Tell SD 1.x, SD 2.x and SDXL original-layout checkpoints apart by their tensor names and shapes
    (`shapes`: those of a checkpoint already in memory; default: read from `path`)."""
    path = Path(path)
    shapes = read_tensor_shapes(path) if shapes is None else shapes
    unet = {k[len("model.diffusion_model."):]: s for k, s in shapes.items() if k.startswith("model.diffusion_model.")}
    family = None
    if unet:
        if any(k.startswith("conditioner.embedders.1.model.") for k in shapes):
            family = "sdxl"
        elif any(k.startswith("cond_stage_model.model.") for k in shapes):
            family = "sd2"
        elif any(k.startswith("cond_stage_model.transformer.") for k in shapes):
            family = "sd1"
    conv_in = unet.get("input_blocks.0.0.weight")
    context = next((s[-1] for k, s in sorted(unet.items()) if k.endswith("attn2.to_k.weight")), None)
    return CheckpointInfo(
        path=path,
        family=family,
        model_channels=conv_in[0] if conv_in else None,
        in_channels=conv_in[1] if conv_in else None,
        context_dim=context,
        num_tensors=len(shapes),
        sample_keys=tuple(sorted(shapes)[:5]),
    )


def _supported_summary() -> str:
    sizes = [f"{FAMILY_NAMES[f]} (model_channels={c}, cross-attention width={w}, config '{name}')"
             for (f, c, w), name in BUNDLED_CONFIGS.items()]
    return "; ".join(sizes + ["privdiff-tiny (model_channels=64, cross-attention width=64)"])


def resolve_config_dir(info: CheckpointInfo, config: str | Path | None) -> Path:
    """The diffusers config folder to build a single file's architecture from."""
    if config is not None:
        candidate = Path(config)
        if not candidate.is_dir() and (CONFIGS_DIR / str(config)).is_dir():
            candidate = CONFIGS_DIR / str(config)
        if not (candidate / "model_index.json").is_file():
            bundled = sorted(p.name for p in CONFIGS_DIR.iterdir() if (p / "model_index.json").is_file())
            raise CheckpointLayoutError(
                f"config={config!r} is neither a diffusers model folder (with model_index.json) nor a bundled "
                f"config name ({', '.join(bundled)})."
            )
        return candidate
    if info.family is None:
        raise CheckpointLayoutError(
            f"{info.path.name}: found {info.describe()}. privdiff loads original-layout checkpoints of "
            f"{_supported_summary()}. A diffusers-format model is a folder: pass the folder instead."
        )
    if info.in_channels not in (4, None):
        raise CheckpointLayoutError(
            f"{info.path.name}: found {info.describe()}; in_channels={info.in_channels} is an inpainting or "
            "depth variant, which privdiff does not support. Use a text-to-image checkpoint (in_channels=4)."
        )
    found = bundled_config_for(info)
    if found is None:
        raise CheckpointLayoutError(
            f"{info.path.name}: found {info.describe()}, which matches no bundled architecture: "
            f"{_supported_summary()}. For a model of another size pass config=<a diffusers folder of the same "
            "architecture> (--config on the command line)."
        )
    return found


def _cached_tokenizer_dir(repo: str, subfolder: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    prefix = f"{subfolder}/" if subfolder else ""
    found = [try_to_load_from_cache(repo, prefix + name) for name in ("vocab.json", "merges.txt")]
    if all(isinstance(p, str) for p in found):
        return Path(found[0]).parent
    return None


def resolve_tokenizer(
    *,
    family: str,
    slot: str,
    given=None,
    config_dir: Path | None = None,
    allow_download: bool | None = None,
):
    """Find the tokenizer for one text encoder of a single-file checkpoint.

    Order: `given` (a tokenizer object or folder), the config folder's own `<slot>/`, the Hugging
    Face cache, then the hub only if downloads are allowed (default: unless HF_HUB_OFFLINE is set).
    """
    from .tokenizer import load_clip_tokenizer

    if given is not None:
        return load_clip_tokenizer(given) if isinstance(given, (str, Path)) else given
    if config_dir is not None and (config_dir / slot).is_dir():
        return load_clip_tokenizer(config_dir / slot)
    sources = TOKENIZER_SOURCES.get((family, slot), [])
    for repo, subfolder in sources:
        cached = _cached_tokenizer_dir(repo, subfolder)
        if cached is not None:
            return load_clip_tokenizer(cached)
    if allow_download is None:
        allow_download = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false", "no")
    if allow_download and sources:
        from transformers import CLIPTokenizer

        repo, subfolder = sources[0]
        return CLIPTokenizer.from_pretrained(repo, subfolder=subfolder or None)
    flag = "--tokenizer" if slot == "tokenizer" else "--tokenizer-2"
    where = ", ".join(f"{r}" + (f" ({s}/)" if s else "") for r, s in sources)
    raise MissingTokenizerError(
        f"A single-file {FAMILY_NAMES.get(family, family)} checkpoint holds no tokenizer, and none was found for "
        f"'{slot}'. Provide one: pass {slot}=<folder> ({flag} DIR on the command line), a folder with vocab.json "
        f"and merges.txt such as the '{slot}/' folder of any diffusers {FAMILY_NAMES.get(family, family)} model; "
        f"or put one of these in the Hugging Face cache: {where}"
        + ("; or allow downloads (unset HF_HUB_OFFLINE)." if not allow_download else ".")
    )


def dtype_argument(dtype) -> dict:
    """The dtype keyword of diffusers' loaders: `dtype` where diffusers has it (where `torch_dtype` is
    deprecated and warns), `torch_dtype` in the older versions privdiff supports. Nothing for None."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_single_file(
    path: str | Path,
    *,
    config: str | Path | None = None,
    tokenizer=None,
    tokenizer_2=None,
    torch_dtype=None,
    allow_download: bool | None = None,
):
    """Load an original-layout `.safetensors` / `.ckpt` file as a diffusers pipeline, offline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    info = inspect_checkpoint(path)
    config_dir = resolve_config_dir(info, config)
    family = info.family
    if family is None:
        raise CheckpointLayoutError(f"{Path(path).name}: found {info.describe()}. Supported: {_supported_summary()}.")
    kwargs = {"tokenizer": resolve_tokenizer(family=family, slot="tokenizer", given=tokenizer, config_dir=config_dir, allow_download=allow_download)}
    if family == "sdxl":
        kwargs["tokenizer_2"] = resolve_tokenizer(
            family=family, slot="tokenizer_2", given=tokenizer_2, config_dir=config_dir, allow_download=allow_download
        )
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    with quiet_loading():
        pipeline = cls.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, **dtype_argument(torch_dtype), **kwargs
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def check_device(device: str | None) -> None:
    """Refuse a device this torch cannot use, before anything loads onto it."""
    if device is None:
        return
    import torch

    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device torch knows; use cpu, cuda, cuda:1 or mps.") from None
    if found.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; train on cpu, or "
                             "install a CUDA build of torch on a machine with a GPU.")
        if found.index is not None and found.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (0 to "
                             f"{torch.cuda.device_count() - 1}).")
    elif found.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: Apple's MPS is not available here; train on cpu.")
    elif found.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: privdiff trains on cpu, cuda or mps.")


def base_configs(*, base: str | Path, config: str | Path | None = None) -> dict[str, dict]:
    """The base model's unet, vae and scheduler configs, read from files only (no weights), so that
    data and settings can be checked, and bad input refused, before the model itself loads."""
    import json

    if str(base) == "tiny":
        from .privdiff_tiny import SHIPPED_DIR

        folder = SHIPPED_DIR
    else:
        path = Path(base).expanduser()
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise CheckpointLayoutError(
                    f"--base {path}: this folder has no model_index.json, so it is not a diffusers model folder. "
                    "Pass the folder that holds model_index.json, or a single .safetensors/.ckpt file.")
            folder = path
        elif path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise CheckpointLayoutError(
                    f"--base {path}: a single-file checkpoint ends in {', '.join(SINGLE_FILE_SUFFIXES)}.")
            folder = resolve_config_dir(inspect_checkpoint(path), config)
        else:
            raise FileNotFoundError(f"--base {base!r}: not 'tiny', not a diffusers model folder, not a checkpoint file "
                                    f"(nothing exists at {path}).")
    configs = {}
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        try:
            configs[part] = json.loads((folder / part / name).read_text())
        except (OSError, ValueError) as error:
            raise CheckpointLayoutError(f"--base {base}: its {part} config cannot be read ({error}).") from None
    return configs


def base_resolution(*, base: str | Path, config: str | Path | None = None) -> int:
    """The image side a base model works at, from its config files only (`base_configs`)."""
    configs = base_configs(base=base, config=config)
    unet, vae = configs["unet"], configs["vae"]
    sample_size = unet["sample_size"]
    side = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return int(side) * 2 ** (len(vae["block_out_channels"]) - 1)


def load_pipeline(
    *,
    base: str | Path,
    config: str | Path | None = None,
    tokenizer=None,
    tokenizer_2=None,
    torch_dtype=None,
    allow_download: bool | None = None,
):
    """Load the base model named by `--base`: 'tiny' (privdiff-tiny), a diffusers folder, or a single file."""
    if str(base) == "tiny":
        from .privdiff_tiny import load_privdiff_tiny

        return load_privdiff_tiny(torch_dtype=torch_dtype)
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointLayoutError(
                f"--base {path}: this folder has no model_index.json, so it is not a diffusers model folder. "
                "Pass the folder that holds model_index.json, or a single .safetensors/.ckpt file."
            )
        from diffusers import DiffusionPipeline

        import torch

        # Weights saved in fp16 (as privdiff-tiny is) would otherwise stay fp16, which CPUs run poorly.
        with quiet_loading():
            pipeline = DiffusionPipeline.from_pretrained(
                str(path), local_files_only=True, **dtype_argument(torch_dtype or torch.float32)
            )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise CheckpointLayoutError(
                f"--base {path}: a single-file checkpoint ends in {', '.join(SINGLE_FILE_SUFFIXES)}."
            )
        return load_single_file(
            path, config=config, tokenizer=tokenizer, tokenizer_2=tokenizer_2, torch_dtype=torch_dtype,
            allow_download=allow_download,
        )
    raise FileNotFoundError(
        f"--base {base!r}: not 'tiny', not a diffusers model folder, not a checkpoint file (nothing exists at {path})."
    )
