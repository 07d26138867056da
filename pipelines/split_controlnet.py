"""Split-learning ControlNet (arXiv 2409.08503): the pipeline that generates with one, and whole jobs on
loopback. The client is `split_client`, the server `split_server`, the attacks `split_attacks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .split_attacks import ReconstructionReport, reconstruct_from_traffic  # noqa: F401  (public names)
from .split_client import (SplitConfig, allowed_timesteps, client_latents, client_payload,  # noqa: F401
                           download_controlnet, train_split_client)
from .split_pipeline import (SPLIT_CONFIG_KEY, SplitControlNetPipeline, mark_split_controlnet,  # noqa: F401
                             split_control_residuals, split_controlnet_pipeline)
from .split_server import SplitJob, SplitTrainer, batch_limits  # noqa: F401


def save_split_controlnet(*, controlnet, out, record=None) -> None:
    """Save in diffusers format, marked as a split ControlNet."""
    mark_split_controlnet(controlnet)
    controlnet.save_pretrained(str(out))


@dataclass
class LoopbackRun:
    """What `run_loopback_job` returns: the server's job, the downloaded ControlNet and, when recorded,
    what the server received from each client (by its allowlist name): every batch message's tensors
    (`traffic`) and every message's kind and fields (`headers`), in order. `results` is each client's
    own account (which images each batch held: known on this machine only, for audits)."""

    job: SplitJob
    controlnet: object
    traffic: dict
    headers: dict
    results: dict


def run_loopback_job(*, pipeline, datasets: dict, config: SplitConfig, epochs: int, batch_size: int, folder,
                     learning_rate: float = 1e-4, seed: int = 0, record: bool = False, progress=None,
                     download: bool = True, latent_caches: dict | None = None,
                     secrets: dict | None = None, window: int = 4) -> LoopbackRun:
    """A whole split job on this machine, over the real transport: a CurveZMQ server in a thread and one
    client per entry of `datasets` (name -> dataset), one after the other; the last downloads the
    ControlNet (unless `download` is off). Keys live in `folder`/keys, and so does each client's noise
    secret and ledger (`<name>.split-secret`, `<name>.split-ledger.sqlite`), made on first use;
    `secrets` (name -> ClientSecret) injects them instead (tests). With `record`, the server also keeps
    a copy of every message it receives (what an honest-but-curious server could store), for the
    attacks. `latent_caches` (name -> latent cache) and `window` (batches on their way at once) are handed
    to each client's `train_split_client`."""
    import copy
    import threading
    from pathlib import Path

    from ..privacy.split_secret import SentLedger, ledger_path, open_client_secret, secret_path
    from ..transport.keys import create_keys
    from ..transport.peer import SplitClient, SplitServer

    folder = Path(folder)
    keys, allowed = folder / "keys", folder / "allowed-clients"
    allowed.mkdir(parents=True, exist_ok=True)
    for name in ("server", *datasets):
        if not (keys / f"{name}.key").exists():
            create_keys(folder=keys, name=name)
        if name != "server":
            (allowed / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    job = SplitJob(trainer=SplitTrainer(unet=copy.deepcopy(pipeline.unet), learning_rate=learning_rate, seed=seed),
                   num_train_timesteps=pipeline.scheduler.config.num_train_timesteps)
    traffic: dict[str, list[dict]] = {name: [] for name in datasets}
    headers: dict[str, list[dict]] = {name: [] for name in datasets}
    results: dict = {}
    server = None

    def handler(client, message):
        name = server.name_of(client)
        if record and name in traffic:
            headers[name].append({"kind": message.kind, "fields": dict(message.fields)})
            if message.kind == "batch":
                traffic[name].append({k: np.array(v) for k, v in message.tensors.items()})
        return job(client, message)

    server = SplitServer(bind="tcp://127.0.0.1:*", server_key=keys / "server.key_secret", allowed_clients=allowed,
                         handler=handler, limits=batch_limits(pipeline.unet.config))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set}, daemon=True)
    thread.start()
    controlnet = None
    try:
        for index, (name, dataset) in enumerate(datasets.items()):
            ledger = SentLedger(ledger_path(keys / f"{name}.key_secret"))
            client = SplitClient(connect=server.endpoint, client_key=keys / f"{name}.key_secret",
                                 server_public_key=keys / "server.key", name=name)
            try:
                secret = (secrets or {}).get(name) or open_client_secret(path=secret_path(keys / f"{name}.key_secret"),
                                                                         ledger=ledger)
                results[name] = train_split_client(client=client, pipeline=pipeline, dataset=dataset, epochs=epochs,
                                                   batch_size=batch_size, config=config, secret=secret, ledger=ledger,
                                                   progress=progress, latent_cache=(latent_caches or {}).get(name),
                                                   window=window)
                if download and index == len(datasets) - 1:
                    controlnet = download_controlnet(client=client)
            finally:
                client.close()
                ledger.close()
    finally:
        stop.set()
        thread.join()
        server.close()
    return LoopbackRun(job=job, controlnet=controlnet, traffic=traffic, headers=headers, results=results)


def traffic_by_epoch(*, messages: list[dict], batches: list, num_samples: int) -> list[dict]:
    """Regroup one client's recorded batch messages into one payload per epoch, each covering all its
    images in dataset order: image i's k-th message goes to epoch k. `batches` are the dataset indices
    each message held (the client's own account: this gives the attacks the linkage for free)."""
    per_image: list[list[dict]] = [[] for _ in range(num_samples)]
    if len(messages) != len(batches):
        raise ValueError(f"{len(messages)} recorded messages for {len(batches)} batches sent.")
    for message, indices in zip(messages, batches):
        for row, index in enumerate(indices):
            per_image[index].append({name: value[row] for name, value in message.items()})
    epochs = min(len(sent) for sent in per_image)
    return [{name: np.stack([per_image[i][e][name] for i in range(num_samples)]) for name in messages[0]}
            for e in range(epochs)]
