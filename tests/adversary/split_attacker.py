"""The split server as an outsider-adversary: it has privdiff's code, the public weights, every default,
any seed a person types, and everything on the wire; not the client's secret.

Helpers for tests/adversary: run a recorded job on loopback as a client would, and the attacks that
follow from that position. The attacks get every advantage the test can give them (the linkage of
an image's messages across epochs and jobs, the truth to pick their best result against).
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from privdiff.pipelines.split_client import allowed_timesteps, train_split_client
from privdiff.pipelines.split_server import SplitJob, SplitTrainer
from privdiff.privacy.attacks import psnr, signal_to_noise
from privdiff.transport.keys import create_keys
from privdiff.transport.peer import SplitClient, SplitServer


@dataclass
class Recorder:
    """Everything the server receives, per client key: headers, and each batch's tensors."""

    headers: list = field(default_factory=list)  # (client key, kind, fields) of every message
    batches: list = field(default_factory=list)  # (client key, batch id, tensors), dropped ones included
    drop_next: int = 0  # drop this many batch messages unanswered (the client then reconnects)


class LoopbackServer:
    """A split server in a thread that keeps a copy of every message it receives (an honest-but-curious
    server; it reads the frames before privdiff's server code does), and can drop batch messages
    unanswered, as a server that restarted would, so that the client times out and reconnects."""

    def __init__(self, *, folder, pipeline, clients=("client",)):
        self.folder = folder
        create_keys(folder=folder / "keys", name="server")
        allowed = folder / "allowed"
        allowed.mkdir(parents=True)
        for name in clients:
            create_keys(folder=folder / "keys", name=name)
            (allowed / f"{name}.key").write_bytes((folder / "keys" / f"{name}.key").read_bytes())
        self.job = SplitJob(trainer=SplitTrainer(unet=copy.deepcopy(pipeline.unet), learning_rate=1e-4))
        self.record = Recorder()
        self.server = SplitServer(bind="tcp://127.0.0.1:*", server_key=folder / "keys" / "server.key_secret",
                                  allowed_clients=allowed, handler=self.job)
        real_handle = self.server._handle

        def handle(frames):
            header = json.loads(bytes(frames[1].buffer))
            client = str(frames[1].get("User-Id"))
            self.record.headers.append((client, header["kind"], header["fields"]))
            if header["kind"] == "batch":
                tensors = {spec["name"]: np.frombuffer(bytes(frame.buffer), dtype=spec["dtype"]).reshape(spec["shape"])
                           for spec, frame in zip(header["tensors"], frames[2:-1])}
                self.record.batches.append((client, header["fields"].get("batch_id"), tensors))
                if self.record.drop_next:
                    self.record.drop_next -= 1
                    self.server.sessions.clear()  # as a restarted server: the client must say hello again
                    return
            real_handle(frames)

        self.server._handle = handle
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, kwargs={"should_stop": self.stop.is_set}, daemon=True)
        self.thread.start()

    def client(self, name="client", **kwargs):
        return SplitClient(connect=self.server.endpoint, client_key=self.folder / "keys" / f"{name}.key_secret",
                           server_public_key=self.folder / "keys" / "server.key", name=name, **kwargs)

    def close(self):
        self.stop.set()
        self.thread.join()
        self.server.close()


def run_client(*, server, pipeline, dataset, config, secret, ledger, epochs=1, batch_size=8, name="client",
               should_stop=None, timeout=30.0):
    client = server.client(name, timeout=timeout, retries=3)
    try:
        return train_split_client(client=client, pipeline=pipeline, dataset=dataset, epochs=epochs,
                                  batch_size=batch_size, config=config, secret=secret, ledger=ledger,
                                  should_stop=should_stop)
    finally:
        client.close()


def decode(pipeline, latents: torch.Tensor) -> torch.Tensor:
    vae = pipeline.vae
    with torch.no_grad():
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return (images.float().clamp(-1, 1) + 1) / 2


def references(pipeline, dataset):
    """The VAE's own reconstruction of each private image (what every figure is scored against)."""
    from privdiff.training.diffusion import encode_latents

    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    with torch.no_grad():
        return decode(pipeline, encode_latents(vae=pipeline.vae, pixels=pixels.to(pipeline.vae.dtype)))


def old_recipe_draws(*, seed: int, sample_id: int, step: int, allowed: torch.Tensor, shape):
    """privdiff 0.1's draws, as its code made them: sha256 of a fixed string, the typed seed, the
    sample's position and the epoch; the timestep first, then ε."""
    digest = hashlib.sha256(f"privdiff-split/{seed}/{sample_id}/{step}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    t = allowed[torch.randint(len(allowed), (1,), generator=g)][0]
    return int(t), torch.randn(shape, generator=g)


def noise_recomputation_attack(*, pipeline, config, messages, seeds=range(0, 32)):
    """Recompute the client's noise from the code and a typed seed, for each received message in order.

    A message's sample ids are what its header says (privdiff 0.1: "epoch/start") or, when the id is
    opaque, its position in the sending order; a recomputed draw counts only if its timestep matches
    the received one. Returns (fraction of samples whose noise was recomputed, z0 estimates [N, ...]
    with the mean of the matched rows, NaN elsewhere, indexed by message order)."""
    allowed = allowed_timesteps(scheduler=pipeline.scheduler, config=config)
    alphas = pipeline.scheduler.alphas_cumprod.double()
    rows, matched = [], 0
    for position, (batch_id, tensors) in enumerate(messages):
        count = len(tensors["t"])
        shape = tensors["z_t"].shape[1:]
        try:
            epoch, start = (int(part) for part in str(batch_id).split("/"))
        except ValueError:  # an opaque id: guess the plainest order
            epoch, start = 0, position * count
        for row in range(count):
            estimate = None
            for seed in seeds:
                for step in (epoch, config.draw_index(epoch)):
                    t, eps = old_recipe_draws(seed=seed, sample_id=start + row, step=step, allowed=allowed, shape=shape)
                    if t == int(tensors["t"][row]):
                        ab = alphas[t]
                        z_t = torch.from_numpy(tensors["z_t"][row].astype(np.float64))
                        estimate = (z_t - (1 - ab).sqrt() * eps.double()) / ab.sqrt()
                        break
                if estimate is not None:
                    break
            matched += estimate is not None
            rows.append(estimate)
    return matched / max(1, len(rows)), rows


def two_equation_attack(*, pipeline, messages_by_image):
    """An image sent twice under the same noise ε but different timesteps (another snr_bound, say)
    gives two equations in z0 and ε: z_t = a z0 + b ε. Returns {image: exact z0} for every image that
    has two such messages."""
    alphas = pipeline.scheduler.alphas_cumprod.double()
    solved = {}
    for image, messages in messages_by_image.items():
        distinct = {int(m["t"]): torch.from_numpy(m["z_t"].astype(np.float64)) for m in messages}
        if len(distinct) < 2:
            continue
        (t1, z1), (t2, z2) = list(distinct.items())[:2]
        a1, b1, a2, b2 = alphas[t1].sqrt(), (1 - alphas[t1]).sqrt(), alphas[t2].sqrt(), (1 - alphas[t2]).sqrt()
        solved[image] = (z1 * b2 - z2 * b1) / (a1 * b2 - a2 * b1)
    return solved


def messages_by_image(*, recorder, results, order=None):
    """Each image's messages as the server received them, dropped and re-sent ones included (the
    clients' own accounts of which images each batch id held give the linkage for free). `order`
    maps a result's dataset indices to image numbers (for a reordered folder)."""
    contents = {}
    for k, result in enumerate(results):
        mapping = (order or {}).get(k, None)
        for batch_id, indices in zip(result.batch_ids, result.batches):
            contents[batch_id] = [mapping[i] if mapping is not None else i for i in indices]
    by_image: dict[int, list] = {}
    for _, batch_id, tensors in recorder.batches:
        for row, image in enumerate(contents[batch_id]):
            by_image.setdefault(image, []).append({k: v[row] for k, v in tensors.items()})
    return by_image


def mean_guess_psnr(reference: torch.Tensor) -> float:
    return psnr(estimate=reference.mean(0, keepdim=True).expand_as(reference), reference=reference)


__all__ = ["LoopbackServer", "Recorder", "decode", "mean_guess_psnr", "messages_by_image", "noise_recomputation_attack",
           "old_recipe_draws", "references", "run_client", "signal_to_noise", "two_equation_attack"]
