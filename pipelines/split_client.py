"""Split-learning ControlNet (arXiv 2409.08503), client side: what leaves the client, per sample.

The client holds the images, hints and prompts and only frozen parts (VAE encoder, noising, and in
`paper` mode the UNet's `conv_in`); the server trains the ControlNet from what is sent and sends
nothing back during training. Per sample and training step the client sends (DESIGN.md 3.1):

- `paper` (the reference design; it leaks): `conv_in(z_t)`, `h`, `t` and the label ε. `conv_in` is
  public and linear, so the server recovers z_t, then z_0 = (z_t - sqrt(1 - ab_t) ε) / sqrt(ab_t)
  exactly, and the image with the public VAE decoder;
- `hardened` (the default): z_t itself (same information as conv_in(z_t), far fewer bytes), `h`,
  `t` drawn only where the signal-to-noise ratio ab_t / (1 - ab_t) is at most `snr_bound`, and the
  label ε + σ_label·n (the MSE gradient stays unbiased in expectation); the hint latent may get
  Gaussian noise σ_hint before it is mixed into `h`.

h = fp16(symsigmoid(hint_latent + z_t)), symsigmoid(x) = |x|·(2·sigmoid(x) - 1): the privacy
activation. Every random draw comes from the client's secret (`privacy.split_secret`), keyed on the
image's content and the draw's number, so the server cannot recompute it, and a batch re-sent after
a reconnect or a resume is the identical message. The ledger refuses any second, different noising.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..privacy.attacks import signal_to_noise, symsigmoid
from ..privacy.split_secret import ClientSecret, SentLedger  # noqa: F401  (what train_split_client takes)

MODES = ("hardened", "paper")


@dataclass(frozen=True)
class SplitConfig:
    mode: str = "hardened"
    # k: hardened mode draws t only where ab_t / (1 - ab_t) <= k. Each message tells the server z_0
    # up to an error of variance 1 / (SNR_t (1 + 1/σ_label²)) per latent value. The default is the
    # planner's rule (`split_plan.plan_split`, target 3 dB): the largest k whose measured image attack
    # margin stays within 3 dB of the mean-image guess for every secret measured (privacy/threat_model.py).
    snr_bound: float = 0.014
    sigma_label: float = 1.0  # hardened: the label is ε + σ_label·n
    # hardened: Gaussian noise on the hint latent (hint privacy against hint-following); the default is the
    # least measured noise that keeps the hint attack within 3 dB of the mean-hint guess (0 gives it away).
    sigma_hint: float = 0.5
    # How many different noisings (t, ε, label and hint noise) one image ever gets: epoch e reuses draw
    # e mod M, so a server linking every message of a run learns no more than from M of them, however
    # long the run. None: a fresh draw every epoch (paper mode's behaviour). Fresh draws add up: at
    # k = 0.01 the best attack climbs from +1.3 dB to +6.6 dB over 10 linked epochs (RESULTS.md).
    draws_per_image: int | None = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}.")
        if not self.snr_bound > 0:
            raise ValueError(f"snr_bound={self.snr_bound} must be positive.")
        if self.sigma_label < 0 or self.sigma_hint < 0:
            raise ValueError("sigma_label and sigma_hint must not be negative.")
        if self.draws_per_image is not None and (isinstance(self.draws_per_image, bool)
                                                 or not isinstance(self.draws_per_image, int)
                                                 or self.draws_per_image < 1):
            raise ValueError(f"draws_per_image={self.draws_per_image!r} must be a whole number >= 1, or None "
                             "for a fresh draw every epoch.")

    def draw_index(self, epoch: int) -> int:
        """Which of an image's noisings its message in `epoch` uses."""
        if self.mode == "paper" or self.draws_per_image is None:
            return epoch
        return epoch % self.draws_per_image


def allowed_timesteps(*, scheduler, config: SplitConfig) -> torch.Tensor:
    """Timesteps the client may draw: all of them in paper mode, those with SNR <= k when hardened."""
    alphas = scheduler.alphas_cumprod.double()
    if config.mode == "paper":
        return torch.arange(len(alphas))
    allowed = (signal_to_noise(alphas) <= config.snr_bound).nonzero().flatten()
    if len(allowed) == 0:
        raise ValueError(f"no timestep has a signal-to-noise ratio at or below snr_bound={config.snr_bound}; "
                         f"raise it (the noisiest timestep's is {float(signal_to_noise(alphas)[-1]):.3g}).")
    return allowed


def client_latents(*, pipeline, pixels: torch.Tensor, hint_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen VAE encoder's latents of images and hints ([B, 3, H, W] in [-1, 1]; the hint as
    `2c - 1`). They never change, so a client may compute them once and reuse them every epoch."""
    from ..training.diffusion import encode_latents

    vae = pipeline.vae
    with torch.no_grad():
        return (encode_latents(vae=vae, pixels=pixels.to(vae.device, vae.dtype)).float().cpu(),
                encode_latents(vae=vae, pixels=hint_pixels.to(vae.device, vae.dtype)).float().cpu())


def client_payload(*, pipeline, image_ids, epoch: int, config: SplitConfig, secret,
                   pixels: torch.Tensor | None = None, hint_pixels: torch.Tensor | None = None,
                   latents: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """What the client sends for one batch: numpy arrays ready for the wire.

    Give `pixels` and `hint_pixels` ([B, 3, H, W] in [-1, 1], the hint as `2c - 1`), or their
    `latents` from `client_latents`; `image_ids` are the images' ids under `secret` (a
    `ClientSecret`): each image's noising `config.draw_index(epoch)` comes from its own secret stream.
    """
    if config.mode == "paper":
        warnings.warn("split mode 'paper' is the reference design: the server can reconstruct every private "
                      "image exactly from what it receives. Use mode='hardened' for private data.", stacklevel=2)
    if (latents is None) == (pixels is None or hint_pixels is None):
        raise ValueError("give either pixels and hint_pixels, or latents=(image latents, hint latents).")
    z0, hint_latent = latents if latents is not None else client_latents(pipeline=pipeline, pixels=pixels,
                                                                         hint_pixels=hint_pixels)
    unet, scheduler = pipeline.unet, pipeline.scheduler
    allowed = allowed_timesteps(scheduler=scheduler, config=config)
    shape = tuple(z0.shape[1:])
    with torch.no_grad():
        z0, hint_latent = z0.float().cpu(), hint_latent.float().cpu()
        draws = [secret.draws(image_id=i, draw=config.draw_index(epoch)) for i in image_ids]
        t = torch.tensor([int(allowed[g.integers(len(allowed))]) for g in draws])
        eps, hint_noise, label_noise = (torch.from_numpy(np.stack([g.standard_normal(shape, dtype=np.float32)
                                                                   for g in draws])) for _ in range(3))
        alphas = scheduler.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        z_t = alphas.sqrt() * z0 + (1 - alphas).sqrt() * eps
        if config.mode == "hardened":
            hint_latent = hint_latent + config.sigma_hint * hint_noise
            label = eps + config.sigma_label * label_noise
        else:
            label = eps
        h = symsigmoid(hint_latent + z_t).half()
        payload = {"h": h, "t": t.long(), "label": label.half()}
        if config.mode == "paper":
            payload["conv_in_z_t"] = unet.conv_in(z_t.to(unet.device, unet.dtype)).half().cpu()
        else:
            payload["z_t"] = z_t.half()
    return {name: value.cpu().numpy() for name, value in payload.items()}


def message_hashes(payload: dict[str, np.ndarray]) -> list[str]:
    """One hash per sample of everything the server receives about it (the ledger compares them)."""
    count = len(payload["t"])
    hashes = []
    for i in range(count):
        digest = hashlib.sha256()
        for name in sorted(payload):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(payload[name][i]).tobytes())
        hashes.append(digest.hexdigest())
    return hashes


def model_fingerprint(pipeline) -> str:
    """What makes the client's latents and noising: the VAE encoder's weights and the noise schedule."""
    digest = hashlib.sha256()
    vae = pipeline.vae
    for name, tensor in sorted({**vae.encoder.state_dict(prefix="encoder."),
                                **vae.quant_conv.state_dict(prefix="quant_conv.")}.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(pipeline.scheduler.alphas_cumprod.double().numpy().tobytes())
    digest.update(repr(float(vae.config.scaling_factor)).encode())
    return digest.hexdigest()


def ledger_settings(*, config: SplitConfig, pipeline, resolution: int) -> dict:
    """What an image is sent under: a second send under anything else is refused."""
    return {"mode": config.mode, "snr_bound": config.snr_bound, "sigma_label": config.sigma_label,
            "sigma_hint": config.sigma_hint, "draws_per_image": config.draws_per_image,
            "model": model_fingerprint(pipeline), "resolution": int(resolution)}


@dataclass(frozen=True)
class SplitClientResult:
    applied: int  # this client's batches the server has trained (its own count; never the job's)
    batches_sent: int
    duplicates: int  # re-sent batches the server acknowledged without training them again
    stopped: bool
    # For audits on this machine only: the dataset indices of each batch, in the order sent, and their ids.
    batches: list = field(default_factory=list, repr=False)
    batch_ids: list = field(default_factory=list, repr=False)


def check_split_dataset(dataset) -> None:
    """A split dataset needs images with hints (control images); say so before anything connects."""
    from ..data.base import DatasetError

    if len(dataset) < 1:
        raise DatasetError("the split dataset is empty: give images with hints (control images).")
    first = dataset[0]
    if first.get("hint") is None:
        raise DatasetError("the split dataset has no hints (control images): a split ControlNet learns from "
                           "image/hint pairs; give a folder with a hint per image, or a set such as circles.")


def split_tensors(dataset, *, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` items (all: None) of a split dataset as its images ([B, 3, H, W] in [-1, 1])
    and hints (in [0, 1]), as the items hold them."""
    check_split_dataset(dataset)
    items = [dataset[i] for i in range(len(dataset) if count is None else min(count, len(dataset)))]
    return torch.stack([it["pixel_values"] for it in items]), torch.stack([it["hint"] for it in items])


def train_split_client(*, client, pipeline, dataset, epochs: int, batch_size: int, config: SplitConfig, secret,
                       ledger, progress: Callable[[int, int, int], None] | None = None, cache_latents: bool = True,
                       latent_cache: dict | None = None, should_stop: Callable[[], bool] | None = None,
                       window: int = 4) -> SplitClientResult:
    """Send every image of `dataset` for `epochs` epochs through `client`.

    `secret` (a `ClientSecret`) keys every draw, the images' order (a secret shuffle per epoch) and
    the opaque batch ids; `ledger` (a `SentLedger`) refuses, before anything is sent, images already
    sent under other settings, and records each message before it leaves. Batches are cut from the
    images' content, not their positions, so the same call after a failure, a stop, or on a reordered
    folder re-sends identical messages, which the server acknowledges without training them twice.
    Up to `window` batches are on their way at once (`SplitClient.stream`): the client makes the next
    while the server trains the ones before (1: one at a time).
    `progress(batches acknowledged, batches in all, batches applied)`; `should_stop()` is asked before
    every batch is made (the batches already on their way are still acknowledged). With
    `cache_latents` each image is encoded once per call (pass your own `latent_cache`, content id ->
    (image latent, hint latent), to keep them across calls)."""
    from ..privacy.split_secret import content_hash
    from ..transport.codec import Message

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must be at least 1.")
    check_split_dataset(dataset)
    ids = [secret.image_id(content_hash(pixels=dataset[i]["pixel_values"], hint=dataset[i]["hint"]))
           for i in range(len(dataset))]
    settings = ledger_settings(config=config, pipeline=pipeline, resolution=dataset[0]["pixel_values"].shape[-1])
    ledger.check_settings(image_ids=ids, settings=settings)  # refused here, before anything is sent
    cache: dict = {} if latent_cache is None else latent_cache
    per_epoch = -(-len(dataset) // batch_size)
    chunks: dict[str, tuple] = {}  # batch id -> its dataset indices, for batches on their way
    stopped = False

    def messages():
        nonlocal stopped
        for epoch in range(epochs):
            order = sorted(range(len(dataset)), key=lambda i: secret.order_key(image_id=ids[i], epoch=epoch))
            for start in range(0, len(order), batch_size):
                if should_stop is not None and should_stop():
                    stopped = True
                    return
                chunk = order[start:start + batch_size]
                latents = _latents(pipeline=pipeline, dataset=dataset, indices=chunk, ids=ids, cache=cache,
                                   keep=cache_latents)
                chunk_ids = [ids[i] for i in chunk]
                payload = client_payload(pipeline=pipeline, latents=latents, image_ids=chunk_ids, epoch=epoch,
                                         config=config, secret=secret)
                draw = config.draw_index(epoch)
                ledger.check_and_record(entries=[(i, draw, m) for i, m in zip(chunk_ids, message_hashes(payload))],
                                        settings=settings)
                batch_id = secret.batch_id(epoch=epoch, image_ids=chunk_ids)
                chunks[batch_id] = tuple(chunk)
                yield Message(kind="batch", fields={"batch_id": batch_id}, tensors=payload)

    applied = sent = duplicates = 0
    batches, batch_ids = [], []
    for request, reply in client.stream(messages(), window=window):
        reply = _answered(reply)
        applied = int(reply.fields["applied"])
        duplicates += bool(reply.fields.get("duplicate"))
        sent += 1
        batch_id = request.fields["batch_id"]
        batches.append(chunks.pop(batch_id))
        batch_ids.append(batch_id)
        if progress is not None:
            progress(sent, epochs * per_epoch, applied)
    return SplitClientResult(applied=applied, batches_sent=sent, duplicates=duplicates, stopped=stopped,
                             batches=batches, batch_ids=batch_ids)


def _answered(reply):
    """A reply, or the server's refusal as one clear error."""
    from ..transport.peer import TransportError

    if reply.fields.get("error"):
        raise TransportError(f"the split server refused: {reply.fields['error']}")
    return reply


def _latents(*, pipeline, dataset, indices, ids, cache: dict, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [i for i in indices if ids[i] not in cache]
    fresh = {}
    if missing:
        items = [dataset[i] for i in missing]
        z0, hint_latent = client_latents(pipeline=pipeline, pixels=torch.stack([it["pixel_values"] for it in items]),
                                         hint_pixels=torch.stack([it["hint"] for it in items]) * 2 - 1)
        fresh = {ids[i]: (z0[k], hint_latent[k]) for k, i in enumerate(missing)}
        if keep:
            cache.update(fresh)
    pairs = [cache[ids[i]] if ids[i] in cache else fresh[ids[i]] for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def download_controlnet(*, client):
    """Ask the server for the trained ControlNet (the explicit end-of-job request)."""
    from diffusers import ControlNetModel

    from ..transport.codec import Message

    reply = _answered(client.request(Message(kind="download")))
    flat = torch.cat([torch.from_numpy(np.array(reply.tensors[f"chunk_{i}"])) for i in range(len(reply.tensors))])
    state, offset = {}, 0
    for name, shape in reply.fields["index"]:
        size = int(np.prod(shape))
        state[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    if offset != flat.numel():
        raise ValueError(f"the downloaded weights hold {flat.numel()} values; their index describes {offset}.")
    controlnet = ControlNetModel.from_config(reply.fields["config"])
    controlnet.load_state_dict(state)
    return controlnet
