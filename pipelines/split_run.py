"""Split-learning ControlNet jobs from a GUI: a local server as a child process, a client that trains
through it and downloads the result, one-file releases, and the server's attacks on its traffic.

A real deployment runs `privdiff split serve` on a GPU machine elsewhere; `start_split_server` runs
the same command on this machine (for trying it, or when this machine is the server) and hands back
what a client needs to connect. ComfyUI must stay free to run the client's workflow meanwhile, so
the server is a child process, never a node that blocks the queue.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .split_client import SplitConfig

CLIENT_NAME = "local-client"
SPLIT_FILE_CONFIG_KEY = "privdiff_split_controlnet_config"  # the ControlNet's config.json, in the file's metadata
LATENT_SCALE_KEY = "privdiff_latent_scale"


@dataclass(frozen=True)
class SplitConnection:
    """What a client needs to reach a split-learning server: its endpoint, the server's public key,
    the client's own secret key (its public half is on the server's allowlist)."""

    endpoint: str
    server_public_key: str
    client_secret_key: str
    process_name: str = ""  # the local child serving it, when privdiff started it


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_split_server(*, base_pipeline, out, port: int = 0, learning_rate: float = 1e-5,
                       checkpoint_every: int = 20, seed: int = 0, startup_timeout: float = 300.0) -> SplitConnection:
    """Serve a split ControlNet job from `out` (keys, base model, job checkpoints; a job there is
    resumed) in a child process on 127.0.0.1. A server already running for `out` is reused.
    `base_pipeline`: the public base model, or a function returning it (called only when `out` holds
    no saved base yet)."""
    from ..transport.keys import create_keys
    from .background import ChildCommand

    out = Path(out).resolve()
    name = f"split-server:{out}"
    saved = out / "connection.json"
    if ChildCommand.find(name) is not None and saved.is_file():
        return SplitConnection(**json.loads(saved.read_text()))
    keys, allowed = out / "keys", out / "allowed-clients"
    for who in ("server", CLIENT_NAME):
        if not (keys / f"{who}.key").is_file():
            create_keys(folder=keys, name=who)
    allowed.mkdir(parents=True, exist_ok=True)
    (allowed / f"{CLIENT_NAME}.key").write_bytes((keys / f"{CLIENT_NAME}.key").read_bytes())
    if not (out / "base" / "model_index.json").is_file():
        # A pipeline is callable too: tell them apart by what a pipeline has.
        (base_pipeline if hasattr(base_pipeline, "save_pretrained") else base_pipeline()).save_pretrained(str(out / "base"))
    endpoint = f"tcp://127.0.0.1:{port or _free_port()}"
    log = out / "server.log"
    log.unlink(missing_ok=True)
    child = ChildCommand.start(name=name, log=log, argv=[
        "split", "serve", "--base", str(out / "base"), "--bind", endpoint, "--server-key", str(keys / "server.key_secret"),
        "--allowed-clients", str(allowed), "--out", str(out / "job"), "--lr", str(learning_rate),
        "--checkpoint-every", str(checkpoint_every), "--seed", str(seed)])
    deadline = time.monotonic() + startup_timeout
    while "serving the split ControlNet job" not in child.log_tail(50):
        if not child.running():
            child.raise_if_failed("the split-learning server")
            raise RuntimeError(f"the split-learning server exited before serving; its log {log}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            child.stop()
            raise TimeoutError(f"the split-learning server did not start within {startup_timeout:.0f} s; its log {log}:\n"
                               f"{child.log_tail()}")
        time.sleep(0.2)
    connection = SplitConnection(endpoint=endpoint, server_public_key=str(keys / "server.key"),
                                 client_secret_key=str(keys / f"{CLIENT_NAME}.key_secret"), process_name=name)
    saved.write_text(json.dumps(asdict(connection)))
    return connection


def stop_split_server(connection: SplitConnection) -> bool:
    """Stop the local server behind `connection` (it checkpoints first); False if none was running."""
    from .background import ChildCommand

    child = ChildCommand.find(connection.process_name) if connection.process_name else None
    if child is None:
        return False
    child.stop()
    return True


@dataclass(frozen=True)
class SplitTrainResult:
    steps: int  # this client's batches the server has trained (its own count, not the job's)
    stopped: bool
    controlnet_file: Path | None  # the released ControlNet (one safetensors file with its record and config)


def split_record(*, config: SplitConfig, steps: int, num_examples: int):
    """The record of a split ControlNet: the client's noise settings and what the threat model
    promises (and the adversary tests measure) for them."""
    from ..privacy.record import record_for_split
    from ..privacy.threat_model import split_promise

    settings = {k: v for k, v in asdict(config).items() if k != "mode"}
    return record_for_split(mode=config.mode, settings=settings, steps=steps, num_examples=num_examples,
                            attack=split_promise(config))


def train_split_controlnet(*, pipeline, dataset, connection: SplitConnection, config: SplitConfig, epochs: int,
                           batch_size: int, out, progress: Callable[[int, int, int], None] | None = None,
                           should_stop: Callable[[], bool] | None = None, timeout: float = 60.0,
                           stop_server: bool = False, secret_file=None) -> SplitTrainResult:
    """Send `dataset` (images with hints) to the server for `epochs` epochs, then download the trained
    ControlNet into `out`/split_controlnet.safetensors. `progress(batches sent, batches in all, server
    steps)`. A stop leaves the server running with what it trained; calling again re-sends the same
    batches, which the server acknowledges without training them twice. The client's noise secret is
    `secret_file` (its ledger beside it; default: beside the client key): use one for every job."""
    from ..privacy.split_secret import SentLedger, ledger_path, open_client_secret, secret_path
    from ..transport.peer import SplitClient
    from .split_client import check_split_dataset, download_controlnet, train_split_client

    check_split_dataset(dataset)
    # The noise secret and the ledger of sent images stay on this machine (never sent).
    secret_file = Path(secret_file) if secret_file is not None else secret_path(connection.client_secret_key)
    ledger = SentLedger(ledger_path(secret_file))
    try:
        secret = open_client_secret(path=secret_file, ledger=ledger)
        client = SplitClient(connect=connection.endpoint, client_key=connection.client_secret_key,
                             server_public_key=connection.server_public_key, name=CLIENT_NAME, timeout=timeout)
        try:
            result = train_split_client(client=client, pipeline=pipeline, dataset=dataset, epochs=epochs,
                                        batch_size=batch_size, config=config, secret=secret, ledger=ledger,
                                        progress=progress, should_stop=should_stop)
            if result.stopped:
                return SplitTrainResult(steps=result.applied, stopped=True, controlnet_file=None)
            controlnet = download_controlnet(client=client)
        finally:
            client.close()
    finally:
        ledger.close()
    if stop_server:
        stop_split_server(connection)
    path = save_split_controlnet_file(controlnet=controlnet, path=Path(out) / "split_controlnet.safetensors",
                                      record=split_record(config=config, steps=result.applied,
                                                          num_examples=len(dataset)),
                                      latent_scale=pipeline.vae.config.scaling_factor)
    return SplitTrainResult(steps=result.applied, stopped=False, controlnet_file=path)


def save_split_controlnet_file(*, controlnet, path, record, latent_scale: float) -> Path:
    """One safetensors file: the ControlNet's weights (diffusers names), its config, its record and
    the scale of the latents it was trained on (the base VAE's scaling factor: hints are encoded so)."""
    from ..privacy.record import write_safetensors
    from .split_controlnet import mark_split_controlnet

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    mark_split_controlnet(controlnet)
    config = {k: v for k, v in controlnet.config.items() if not k.startswith("_")}
    return write_safetensors(path=path, tensors=controlnet.state_dict(), record=record,
                             metadata={SPLIT_FILE_CONFIG_KEY: json.dumps(config, default=list),
                                       LATENT_SCALE_KEY: repr(float(latent_scale))})


@dataclass(frozen=True)
class SplitControlNetFile:
    controlnet: object  # diffusers ControlNetModel
    latent_scale: float  # hints are VAE latents times this, as in training


def load_split_controlnet_file(path) -> SplitControlNetFile:
    """The ControlNet saved by `save_split_controlnet_file`."""
    from diffusers import ControlNetModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if SPLIT_FILE_CONFIG_KEY not in metadata:
        raise ValueError(f"{path} is not a privdiff split ControlNet (no {SPLIT_FILE_CONFIG_KEY} in its metadata); "
                         "load other ControlNets with ComfyUI's own ControlNet loader.")
    controlnet = ControlNetModel.from_config(json.loads(metadata[SPLIT_FILE_CONFIG_KEY]))
    controlnet.load_state_dict(load_file(str(path)))
    return SplitControlNetFile(controlnet=controlnet.eval(), latent_scale=float(metadata[LATENT_SCALE_KEY]))


def audit_split_training(*, pipeline, dataset, config: SplitConfig, epochs: int, batch_size: int, folder,
                         optimisation_steps: int = 100, progress: Callable[[int, int], None] | None = None,
                         secret=None):
    """Train a short split job on loopback, keep every batch as the server receives it, and run the
    server's attacks on that traffic. The loopback client's noise secret is made in `folder`/keys
    (or given as `secret`, a ClientSecret); use a throwaway folder, never a real client's. Returns
    (ReconstructionReport, server steps)."""
    import warnings

    from .split_attacks import known_noise
    from .split_client import check_split_dataset, split_tensors
    from .split_controlnet import reconstruct_from_traffic, run_loopback_job, traffic_by_epoch

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must be at least 1.")
    check_split_dataset(dataset)

    def report(sent, total, applied):
        if progress is not None:
            progress(sent, total)

    with warnings.catch_warnings():
        if config.mode == "paper":
            warnings.simplefilter("ignore")  # the point of the audit is to show paper mode's leak
        run = run_loopback_job(pipeline=pipeline, datasets={"client": dataset}, config=config, epochs=epochs,
                               batch_size=batch_size, folder=Path(folder), record=True, progress=report,
                               download=False, secrets={"client": secret} if secret is not None else None)
    pixels, hints = split_tensors(dataset)
    traffic = traffic_by_epoch(messages=run.traffic["client"], batches=run.results["client"].batches,
                               num_samples=len(dataset))
    result = reconstruct_from_traffic(pipeline=pipeline, payloads=traffic, pixels=pixels, hint_pixels=hints * 2 - 1,
                                      optimisation_steps=optimisation_steps, **known_noise(config))
    return result, run.job.trainer.steps
