"""Split-learning ControlNet, server side: the trainer and the job that answers clients.

The server holds the frozen UNet and the trainable ControlNet; it learns from what clients send and
sends nothing back during training. Clients are their Curve keys (the transport authenticates them):
the job de-duplicates re-sent batches per key and reports to each client only its own count.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from ..errors import public_name


class SplitTrainer:
    """The server's side of one training job: a frozen UNet and a trainable ControlNet initialised
    from it, whose hint input is the 4-channel latent-resolution `h` (no down-sampling in its hint
    embedding). It learns from client payloads only; its loss stays on the server and nothing it
    computes is ever sent to a client during training.
    """

    def __init__(self, *, unet, learning_rate: float = 1e-5, seed: int = 0):
        from diffusers import ControlNetModel

        torch.manual_seed(seed)
        self.unet = unet.requires_grad_(False).eval()
        self.controlnet = ControlNetModel.from_unet(unet, conditioning_channels=unet.config.in_channels,
                                                    conditioning_embedding_out_channels=(16,))
        if self.controlnet.dtype != unet.dtype:
            self.controlnet = self.controlnet.to(dtype=unet.dtype)
        self.controlnet = self.controlnet.to(device=unet.device).train()
        self.optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=learning_rate, weight_decay=0.0)
        self.steps = 0

    def _context(self, batch: int) -> torch.Tensor:
        # The server never sees a prompt: an all-zero text context, as in the reference design.
        return torch.zeros(batch, 1, self.unet.config.cross_attention_dim, dtype=self.unet.dtype,
                           device=self.unet.device)

    def train_on(self, payload: dict) -> float:
        """One AdamW step of the ControlNet on one received batch; returns the loss (server-side only)."""
        device, dtype = self.unet.device, self.unet.dtype

        def tensor(name):
            return torch.from_numpy(np.array(payload[name])).to(device)  # a copy: received buffers are read-only

        t, h, label = tensor("t").long(), tensor("h").to(dtype), tensor("label").float()
        paper = "conv_in_z_t" in payload
        sample = tensor("conv_in_z_t" if paper else "z_t").to(dtype)
        context = self._context(len(t))
        # Paper mode: the client already applied conv_in, so both networks start after it.
        swapped = [(m, m.conv_in) for m in (self.unet, self.controlnet)] if paper else []
        for module, _ in swapped:
            module.conv_in = torch.nn.Identity()
        try:
            down, mid = self.controlnet(sample, t, encoder_hidden_states=context, controlnet_cond=h,
                                        return_dict=False)
            prediction = self.unet(sample, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                                   mid_block_additional_residual=mid).sample
        finally:
            for module, conv_in in swapped:
                module.conv_in = conv_in
        loss = (prediction.float() - label).pow(2).mean()
        if not torch.isfinite(loss):  # checked inputs should never get here; a NaN step would spoil every weight
            self.controlnet.zero_grad(set_to_none=True)
            raise BatchRefused(f"this batch gave a loss of {float(loss)}; it was not trained.")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return float(loss.detach())


DOWNLOAD_CHUNK = 64 * 2**20  # values per chunk of a downloaded ControlNet
MAX_BATCH = 1024  # samples one batch message may hold
LATENT_DTYPE = np.float16  # what clients send for z_t, h, the label and conv_in(z_t)


@public_name
class BatchRefused(ValueError):
    """A batch the job will not train: its sender is told why, the job and other clients carry on."""


def batch_limits(unet_config, *, max_batch: int = MAX_BATCH):
    """The codec's limits for a job on this UNet: the largest legitimate batch (conv_in's output in
    paper mode, at up to twice the model's own latent side) bounds every tensor, so an oversize
    frame is refused by libzmq before it is allocated (ZMQ_MAXMSGSIZE bounds each frame; it cannot
    bound how many frames a hostile client puts in one message)."""
    from ..transport.codec import Limits

    side = 2 * int(unet_config.sample_size if not isinstance(unet_config.sample_size, (list, tuple))
                   else max(unet_config.sample_size))
    channels = max(unet_config.in_channels, unet_config.block_out_channels[0])
    largest = max_batch * channels * side * side * np.dtype(LATENT_DTYPE).itemsize
    # A few tensors of slack over a batch's four: a client that sends a wrong set is told which
    # tensors a batch holds (check_batch) instead of being dropped unanswered by the codec.
    return Limits(max_tensors=8, max_tensor_bytes=largest, max_message_bytes=4 * largest, max_dims=4)


def check_batch(tensors, *, unet_config, num_train_timesteps: int, max_batch: int = MAX_BATCH) -> None:
    """Refuse (BatchRefused) a batch message that is not exactly what a client sends for this UNet:
    its tensors, dtypes, shapes, timesteps and finiteness."""
    paper = "conv_in_z_t" in tensors
    expected = {"h", "t", "label", "conv_in_z_t" if paper else "z_t"}
    if set(tensors) != expected:
        raise BatchRefused(f"a batch holds the tensors {sorted(expected)}; this one held {sorted(tensors)}.")
    t = tensors["t"]
    if t.dtype != np.int64 or t.ndim != 1 or not 1 <= len(t) <= max_batch:
        raise BatchRefused(f"t must be int64 of shape [B] with 1 <= B <= {max_batch}; it is {t.dtype} "
                           f"{list(t.shape)}.")
    if t.min() < 0 or t.max() >= num_train_timesteps:
        raise BatchRefused(f"timesteps must lie in [0, {num_train_timesteps}); they span [{t.min()}, {t.max()}].")
    latent = tensors["h"].shape
    factor = 2 ** (len(unet_config.block_out_channels) - 1)
    if (len(latent) != 4 or latent[0] != len(t) or latent[1] != unet_config.in_channels or latent[2] < factor
            or latent[2] % factor or latent[3] % factor or latent[3] < factor):
        raise BatchRefused(f"h must be [{len(t)}, {unet_config.in_channels}, H, W] with H and W multiples of "
                           f"{factor}; it is {list(latent)}.")
    shapes = {"h": latent, "label": latent, "z_t": latent,
              "conv_in_z_t": (len(t), unet_config.block_out_channels[0], *latent[2:])}
    for name in expected - {"t"}:
        value = tensors[name]
        if value.dtype != LATENT_DTYPE or tuple(value.shape) != tuple(shapes[name]):
            raise BatchRefused(f"{name} must be {np.dtype(LATENT_DTYPE).name} {list(shapes[name])}; it is "
                               f"{value.dtype} {list(value.shape)}.")
        if not np.isfinite(value).all():
            raise BatchRefused(f"{name} holds NaN or infinite values; the batch was not trained.")


class SplitJob:
    """The server's training job: answers clients' requests (a SplitServer handler).

    `batch` trains one step unless that client (its key) already had that `batch_id` applied (a batch
    re-sent after a reconnect or a resume is acknowledged, not trained twice); the `ack` carries only
    that client's own count, never the job's, which would tell each client what the others sent.
    `download` returns the ControlNet's weights, the only message that carries tensors back, sent only
    when a client asks at the end.
    """

    def __init__(self, *, trainer: SplitTrainer, num_train_timesteps: int = 1000):
        self.trainer = trainer
        self.num_train_timesteps = num_train_timesteps
        self.applied: set[str] = set()  # "<client key>/<batch id>"
        self.per_client: dict[str, int] = {}  # client key -> its batches trained
        self.losses: list[float] = []  # server-side only; never sent

    def save_checkpoint(self, folder) -> None:
        """ControlNet, optimizer, step count and applied batch ids as one atomic checkpoint: a server
        killed at any moment restarts from the last complete one, never with a stale `applied` set."""
        from ..training.checkpoint import optimizer_tensors, save_checkpoint

        tensors = {f"controlnet.{k}": v for k, v in self.trainer.controlnet.state_dict().items()}
        optimizer, param_groups = optimizer_tensors(self.trainer.optimizer)
        tensors.update(optimizer)
        save_checkpoint(folder=folder, kind="split-job", tensors=tensors, name="job.safetensors", state={
            "steps": self.trainer.steps, "applied": sorted(self.applied), "per_client": self.per_client,
            "losses": self.losses, "param_groups": param_groups})

    def load_checkpoint(self, folder) -> None:
        from ..training.checkpoint import load_checkpoint, restore_optimizer

        saved = load_checkpoint(folder=folder, kind="split-job", name="job.safetensors",
                                resume_hint="start the job in another --out folder")
        self.trainer.controlnet.load_state_dict({k[len("controlnet."):]: v for k, v in saved.tensors.items()
                                                 if k.startswith("controlnet.")})
        restore_optimizer(self.trainer.optimizer, tensors=saved.tensors, param_groups=saved.state["param_groups"])
        state = saved.state
        self.trainer.steps, self.applied = state["steps"], set(state["applied"])
        self.per_client, self.losses = dict(state["per_client"]), list(state["losses"])

    def __call__(self, client: str, message):
        from ..transport.codec import Message

        if message.kind == "batch":
            batch_id = f"{client}/{message.fields.get('batch_id')}"
            duplicate = batch_id in self.applied
            if not duplicate:
                try:
                    check_batch(message.tensors, unet_config=self.trainer.unet.config,
                                num_train_timesteps=self.num_train_timesteps)
                    self.losses.append(self.trainer.train_on(dict(message.tensors)))
                except BatchRefused as refusal:  # that client is told; the job and the others carry on
                    return Message(kind="ack", fields={"applied": self.per_client.get(client, 0),
                                                       "duplicate": False, "error": str(refusal)})
                self.applied.add(batch_id)
                self.per_client[client] = self.per_client.get(client, 0) + 1
            return Message(kind="ack", fields={"applied": self.per_client.get(client, 0), "duplicate": duplicate})
        if message.kind == "download":
            state = self.trainer.controlnet.state_dict()
            # One flat float32 vector in chunks of at most 64M values (256 MB, within the codec's
            # per-tensor limit), and an index of names and shapes: a few frames whatever the model.
            flat = torch.cat([v.detach().float().cpu().reshape(-1) for v in state.values()])
            chunks = {f"chunk_{i}": c.numpy() for i, c in enumerate(torch.split(flat, DOWNLOAD_CHUNK))}
            config = {k: v for k, v in self.trainer.controlnet.config.items() if not k.startswith("_")}
            return Message(kind="weights", tensors=chunks, fields={
                "config": json.loads(json.dumps(config, default=list)),
                "index": [[name, list(value.shape)] for name, value in state.items()]})
        return Message(kind="bye")
