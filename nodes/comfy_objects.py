"""Glue between ComfyUI's objects and the library's: models, progress, previews, folders.

What the two layouts *are* lives in `models/` (plain data, no ComfyUI import); here they are turned
into and out of ComfyUI's own classes, through ComfyUI's memory management.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# ---- models -------------------------------------------------------------------------------------


def comfy_model_from_spec(spec):
    """ComfyUI's own SD1 model class at a spec's sizes (config read from its weights) and latent scale."""
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.supported_models

    unet_config = comfy.model_detection.detect_unet_config(spec.unet_state_dict, "")
    unet_config.update(spec.unet_extra_config)

    class SpecLatent(comfy.latent_formats.SD15):
        def __init__(self):
            super().__init__(scale_factor=spec.latent_scale_factor)

    class SpecModel(comfy.supported_models.SD15):
        latent_format = SpecLatent

    SpecModel.unet_config = dict(unet_config)
    SpecModel.unet_extra_config = {}
    model_config = SpecModel(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(spec.unet_state_dict, strict=True)
    return model


def privdiff_tiny_objects():
    """privdiff-tiny as ComfyUI-native MODEL, CLIP and VAE, built from ComfyUI's own SD1 classes."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import folder_paths

    from ..models.comfy_layout import comfy_native_spec
    from ..models.privdiff_tiny import SHIPPED_DIR, load_privdiff_tiny

    spec = comfy_native_spec(load_privdiff_tiny())
    model = comfy_model_from_spec(spec)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())

    tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=str(SHIPPED_DIR / "tokenizer"),
                                  embedding_size=spec.clip_embedding_size, embedding_key="clip_l", max_length=77)
    encoder = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=spec.clip_config,
                                special_tokens=spec.clip_special_tokens, layer="last")
    target = comfy.supported_models_base.ClipTarget(functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=tokenizer),
                                                    functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=encoder))
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         model_options={"dtype": torch.float32})
    clip.load_sd(spec.clip_state_dict)
    vae = comfy.sd.VAE(sd=spec.vae_state_dict, config=spec.vae_config, dtype=torch.float32)
    return patcher, clip, vae


def _sd1_tokenizer(clip):
    slot = getattr(clip.tokenizer, "clip_l", None)
    return getattr(slot, "tokenizer", None)


def pipeline_from_comfy(*, model, clip, vae):
    """A diffusers pipeline holding the connected MODEL's weights (its patches applied, as ComfyUI's
    checkpoint saver does), CLIP's and VAE's: what the trainers take."""
    import comfy.model_management as mm

    from ..models.comfy_layout import pipeline_from_original_state_dict

    mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    state = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    pipeline = pipeline_from_original_state_dict(state_dict=state, tokenizer=_sd1_tokenizer(clip))
    del state
    mm.soft_empty_cache()
    return pipeline


def training_device() -> str:
    import comfy.model_management as mm

    return str(mm.get_torch_device())


def make_room_for_training() -> None:
    """Training holds its own copy of the model: unload ComfyUI's cached models first."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def model_with_weight_file(*, model, path: Path, strength: float = 1.0):
    """MODEL with a LoRA / weight-difference file applied, as ComfyUI's LoraLoaderModelOnly does."""
    import comfy.sd
    import comfy.utils

    patches = comfy.utils.load_torch_file(str(path), safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, patches, strength, 0)
    return patched


# ---- folders ------------------------------------------------------------------------------------


def models_folder(kind: str) -> Path:
    """ComfyUI's first folder for `kind` ("loras", "embeddings", "controlnet"), where its loaders look."""
    import folder_paths

    return Path(folder_paths.get_folder_paths(kind)[0])


def split_secret_file() -> Path:
    """The split client's noise secret for this ComfyUI (its ledger beside it), shared by every job and
    server: one image must never get two noisings, whichever job sends it. In ComfyUI's user folder."""
    import folder_paths

    return Path(folder_paths.get_user_directory()) / "privdiff" / "split-client.split-secret"


def split_client_secret():
    """This ComfyUI's split noise secret (made on first use; see `split_secret_file`)."""
    from ..privacy.split_secret import load_client_secret

    return load_client_secret(split_secret_file())


def run_folder(name: str) -> Path:
    """Where a privdiff run keeps its working files (checkpoints to resume from, samples): output/privdiff/<name>."""
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "privdiff" / name


def claim_run(name: str, *, kind: str, resume: bool, part: str = "", resumable: bool = True) -> Path:
    """The run folder for a training node's `name` (output/privdiff/<name>[/part]), after the one rule
    for names, checked before any training: without resume, a name whose run folder or released file
    (<kind>/<name>.safetensors) exists is refused, so that no finished or stopped run is overwritten
    or thrown away; with resume, the run continues (a finished one is given back as it is).
    `resumable`: the node has a resume input, which the refusal then names."""
    from ..pipelines.release import check_release_name

    folder = run_folder(name) / part if part else run_folder(name)
    released = models_folder(kind) / f"{check_release_name(name)}.safetensors"
    earlier = [str(p) for p in (released, folder) if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if earlier and not resume:
        hint = "turn resume on to continue it (a finished run is given back as it is), or " if resumable else ""
        raise ValueError(f"the name '{name}' belongs to an earlier run ({' and '.join(earlier)}): {hint}give this "
                         "run another name, or delete those files. Nothing was trained.")
    return folder


def input_path(text: str) -> Path:
    """A user-typed path: absolute, or relative to ComfyUI's input folder."""
    import folder_paths

    path = Path(text).expanduser()
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


def data_source(text: str) -> str:
    """A procedural set's name as it is; anything else is a folder, resolved as `input_path` does
    (a child process does not know ComfyUI's input folder)."""
    from ..data import PROCEDURAL_DATASETS

    return text if text in PROCEDURAL_DATASETS else str(input_path(text))


def find_artifact(name: str | None) -> Path:
    """A file named as ComfyUI's loaders name it (`loras`, `embeddings`, `controlnet`), or a path."""
    import folder_paths

    import re

    text = (name or "").strip()  # an unset (optional, unlinked) input is no file
    # A TI node's prompt ("a picture in the style of embedding:<name>") names its embedding.
    embedding = re.search(r"embedding:(\S+)", text)
    if embedding:
        text = embedding.group(1)
    if not text:
        raise ValueError("no file given: link a training node's output, or choose a file.")
    kinds = ("loras", "embeddings", "controlnet")
    folder, _, rest = text.partition("/")
    if folder in kinds and rest:  # <folder>/<name>, as the report's file list names them
        found = folder_paths.get_full_path(folder, rest)
        if found:
            return Path(found)
    for kind in kinds:
        for candidate in (text, f"{text}.safetensors"):
            found = folder_paths.get_full_path(kind, candidate)
            if found:
                return Path(found)
    path = input_path(text)
    if path.exists():
        return path
    raise FileNotFoundError(f"no file named {name!r} in ComfyUI's loras, embeddings or controlnet folders, nor at {path}. "
                            "Give a file name as those loaders list it, or a full path.")


# ---- progress, stop button, previews -----------------------------------------------------------


LIVE_CHART_SECONDS = 3.0
# A phase without steps of its own (converting the model, calibrating σ, writing files) still says it
# is alive: its line is repeated with the time it has taken, at least this often.
HEARTBEAT_SECONDS = 2.0


class NodeProgress:
    """ComfyUI's progress bar (steps) and progress text (ε spent) for one node; the stop button.

    ComfyUI's progress hook raises its interrupt from inside a bar update and clears the flag as it
    does. Raised from a trainer's progress call, that would end the run before the trainer saw the
    stop and saved its checkpoint. So a report never raises: it remembers the stop, `stop_requested`
    tells the trainer (which saves and returns), and `raise_if_stopped` ends the node afterwards."""

    def __init__(self, *, node_id: str | None, total: int = 1, note: str = "", doing: str = "preparing"):
        import comfy.utils

        self.node_id, self.note = node_id, note  # note: shown after each training step's text
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.losses: list[float] = []
        self.stopped = False
        self._chart_at = 0.0  # when the live loss chart was last sent
        self._said, self._said_at, self._sent_at = "", 0.0, 0.0  # the last line, and when
        self.text(doing)  # the first line, until the work reports its own
        if node_id is not None:
            import threading

            threading.Thread(target=self._heartbeat, daemon=True).start()

    def text(self, message: str) -> None:
        import time

        self._said, self._said_at = message, time.monotonic()
        self._send(message)

    def _send(self, message: str) -> None:
        import time

        from server import PromptServer

        if self.node_id is not None and PromptServer.instance is not None:
            self._sent_at = time.monotonic()
            PromptServer.instance.send_progress_text(message, self.node_id)

    def _heartbeat(self) -> None:
        """Repeat the last line with its elapsed time while this node runs and says nothing new; ends
        when ComfyUI moves on to another node or the prompt ends (a thread: a phase blocks the node's)."""
        import time

        from server import PromptServer

        while True:
            time.sleep(0.5)
            server = PromptServer.instance
            if self.stopped or server is None or str(server.last_node_id) != str(self.node_id):
                return
            if time.monotonic() - self._sent_at >= HEARTBEAT_SECONDS:
                self._send(f"{self._said} · {time.monotonic() - self._said_at:.0f} s")

    def _bar(self, step: int, total: int, preview=None) -> None:
        import comfy.model_management as mm

        if self.stop_requested():
            return
        try:
            self.bar.update_absolute(step, total, preview)
        except mm.InterruptProcessingException:
            self.stopped = True  # the hook cleared ComfyUI's flag: keep the stop here

    def step(self, *, step: int, total: int, epsilon: float | None = None, loss: float | None = None,
             note: str = "", unit: str = "step") -> None:
        if loss is not None:
            self.losses.append(float(loss))
        self._bar(step, total, self._live_chart(final=step >= total))
        spent = f" · ε spent {epsilon:.3g}" if epsilon is not None else ""
        notes = "".join(f" · {n}" for n in (note, self.note) if n)
        self.text(f"{unit} {step}/{total}{spent}{notes}")

    def _live_chart(self, *, final: bool):
        """The loss so far as the node's live preview (as KSampler shows its latents), at most every
        few seconds; labelled as computed on private data outside the guarantee, and never saved."""
        import time

        if len(self.losses) < 2 or (time.monotonic() - self._chart_at < LIVE_CHART_SECONDS and not final):
            return None
        self._chart_at = time.monotonic()
        return ("PNG", loss_chart(self.losses, title="training loss (live)"), 512)

    def report(self, info) -> None:
        """One trainer's `Progress`: the bar, and a line naming the phase (ε spent while training)."""
        if info.phase == "training":
            self.step(step=info.step, total=info.total, epsilon=info.epsilon, loss=info.loss, unit=info.unit,
                      note=info.detail)
        else:
            self._bar(info.step, info.total)
            self.text(f"{info.phase}: {info.step}/{info.total} {info.unit}")

    def stop_requested(self) -> bool:
        import comfy.model_management as mm

        self.stopped = self.stopped or mm.processing_interrupted()
        return self.stopped

    def raise_if_stopped(self) -> None:
        import comfy.model_management as mm

        if self.stop_requested():
            mm.interrupt_current_processing(False)
            raise mm.InterruptProcessingException()


def image_batch(pictures) -> torch.Tensor:
    """PIL images (or PNG paths) -> IMAGE [B,H,W,C] in 0..1, each on a white canvas of the largest size
    (a batch has one size; resizing would distort charts)."""
    import numpy as np
    from PIL import Image

    images = [(Image.open(p) if isinstance(p, (str, Path)) else p).convert("RGB") for p in pictures]
    width, height = max(im.width for im in images), max(im.height for im in images)
    canvases = []
    for im in images:
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(im, ((width - im.width) // 2, (height - im.height) // 2))
        canvases.append(np.asarray(canvas, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(canvases))


def preview(pictures):
    """A UI preview of PIL images / PNG files, saved to ComfyUI's temp folder without workflow metadata."""
    from comfy_api.latest import ui

    return ui.PreviewImage(image_batch(pictures), cls=None)  # cls=None: no prompt/workflow in the PNG


def publish_to_comfy(*, source: Path, kind: str, name: str) -> Path:
    """Copy a released file into ComfyUI's `kind` folder as <name>.safetensors (record included)."""
    from ..pipelines.release import check_release_name, publish_release

    return publish_release(source=source, destination=models_folder(kind) / f"{check_release_name(name)}.safetensors")


def loss_chart(losses: list[float], *, title: str):
    """The training loss as a picture, labelled as computed on private data outside the guarantee."""
    from ..data.images import line_chart

    return line_chart({"training loss": losses}, title=title,
                      note="computed on private data: NOT covered by the DP guarantee")


def training_previews(*, losses: list[float], samples: Path | None, title: str):
    """The node's previews: samples from the released model (covered by ε) and the loss curve;
    shown, never saved with the outputs."""
    pictures = [samples] if samples is not None else []
    if losses:
        pictures.append(loss_chart(losses, title=f"{title} training loss"))
    return preview(pictures) if pictures else None


# ---- split ControlNet at inference ----------------------------------------------------------------


class _SplitControlModel(torch.nn.Module):
    """A split ControlNet in the shape ComfyUI's ControlNet runner calls: (x = z_t, hint = the hint's
    scaled VAE latent) -> residuals for the skip connections ("output") and the middle block."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    @property
    def dtype(self):
        return self.controlnet.dtype

    def forward(self, x, hint, timesteps, context=None, **unused):
        from ..pipelines.split_controlnet import split_control_residuals

        down, mid = split_control_residuals(controlnet=self.controlnet, model_input=x, hint_latent=hint,
                                            timestep=timesteps)
        return {"middle": [mid], "output": list(down)}


def apply_split_controlnet(*, positive, negative, path: Path, image, vae, strength: float, start_percent: float,
                           end_percent: float):
    """Attach a split ControlNet to conditioning exactly as ComfyUI's Apply ControlNet does, with
    ComfyUI's own runner: it resizes the hint, encodes it with `vae` at the training latents' scale
    and passes z_t (the model input) at every step; the privacy activation is formed there."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.model_management as mm
    import nodes as comfy_nodes

    from ..pipelines.split_run import load_split_controlnet_file

    loaded = load_split_controlnet_file(path)

    class TrainingLatents(comfy.latent_formats.SD15):
        def __init__(self):
            super().__init__(scale_factor=loaded.latent_scale)

    control = comfy.controlnet.ControlNet(_SplitControlModel(loaded.controlnet), compression_ratio=1,
                                          latent_format=TrainingLatents(), load_device=mm.get_torch_device(),
                                          extra_conds=[])
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, image, strength,
                                                                  start_percent, end_percent, vae=vae)
