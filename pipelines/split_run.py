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

from ..training.inputs import resolve_base, resolve_data
from ..training.result import Progress, TrainResult
from .split_client import SplitConfig

CLIENT_NAME = "local-client"
CONTROLNET_FILE = "split_controlnet.safetensors"  # what a split client releases
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
    client_name: str = CLIENT_NAME  # how this client signs its messages (its key's name on the allowlist)


@dataclass(frozen=True)
class SplitTrainConfig:
    """Everything a split client's run needs besides the base, the data and the output folder: where the
    server is (`connection`), the privacy activation (`privacy`), and the schedule."""

    connection: SplitConnection
    privacy: SplitConfig = SplitConfig()
    epochs: int = 1
    batch_size: int = 8
    timeout: float = 60.0  # seconds to wait for the server's answer to one message
    stop_server: bool = False  # stop a server privdiff started, once the ControlNet is downloaded
    # The client's noise secret (its ledger of sent images beside it); default: beside the client key.
    # Use one for every job: the threat model's promise is per secret.
    secret_file: str | None = None
    num_items: int | None = None  # of a built-in set (default: all)
    seed: int = 0  # for a built-in set's items

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs={self.epochs} and batch_size={self.batch_size} must be at least 1.")


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
        "--allowed-clients", str(allowed), "--out", str(out / "job"), "--learning-rate", str(learning_rate),
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


def split_record(*, config: SplitConfig, steps: int, num_examples: int):
    """The record of a split ControlNet: the client's noise settings and what the threat model
    promises (and the adversary tests measure) for them."""
    from ..privacy.record import record_for_split
    from ..privacy.threat_model import split_promise

    settings = {k: v for k, v in asdict(config).items() if k != "mode"}
    return record_for_split(mode=config.mode, settings=settings, steps=steps, num_examples=num_examples,
                            attack=split_promise(config))


def train_split_controlnet(*, base, data, out, config: SplitTrainConfig,
                           progress: Callable[[Progress], None] | None = None,
                           should_stop: Callable[[], bool] | None = None, resume: bool = False) -> TrainResult:
    """Send `data` (images with hints) to the server for `config.epochs` epochs, then download the
    trained ControlNet into `out`/split_controlnet.safetensors (weights, config and privacy record).

    A stop leaves the server running with what it trained; calling again (`resume` or not: the server
    keeps the job) re-sends the same batches, which the server acknowledges without training them
    twice. The data, the output folder, the noise secret and the server's answer are all checked
    before the model loads."""
    from ..privacy.split_secret import SentLedger, ledger_path, open_client_secret, secret_path
    from ..training.outputs import check_out_folder, prepare_out_folder
    from ..transport.peer import SplitClient
    from .split_client import check_split_dataset, download_controlnet, train_split_client

    dataset = resolve_data(base=base, data=data, seed=config.seed, num_items=config.num_items)
    check_split_dataset(dataset)
    out = check_out_folder(out, results=() if resume else [CONTROLNET_FILE])
    connection = config.connection
    # A server that does not answer is found first, before anything is written or loaded.
    client = SplitClient(connect=connection.endpoint, client_key=connection.client_secret_key,
                         server_public_key=connection.server_public_key, name=connection.client_name,
                         timeout=config.timeout)
    # The noise secret and the ledger of sent images stay on this machine (never sent).
    secret_file = Path(config.secret_file) if config.secret_file else secret_path(connection.client_secret_key)
    ledger = None
    try:
        ledger = SentLedger(ledger_path(secret_file))
        secret = open_client_secret(path=secret_file, ledger=ledger)
        pipeline = resolve_base(base)
        prepare_out_folder(out)
        result = train_split_client(client=client, pipeline=pipeline, dataset=dataset, epochs=config.epochs,
                                    batch_size=config.batch_size, config=config.privacy, secret=secret, ledger=ledger,
                                    progress=_batch_reporter(progress), should_stop=should_stop)
        if result.stopped:
            return TrainResult(out=out, stopped=True, figures={"steps": result.applied})
        controlnet = download_controlnet(client=client)
    finally:
        client.close()
        if ledger is not None:
            ledger.close()
    if config.stop_server:
        stop_split_server(connection)
    record = split_record(config=config.privacy, steps=result.applied, num_examples=len(dataset))
    path = save_split_controlnet_file(controlnet=controlnet, path=out / CONTROLNET_FILE, record=record,
                                      latent_scale=pipeline.vae.config.scaling_factor)
    return TrainResult(out=out, files={"controlnet": path}, record=record, figures={"steps": result.applied})


def _batch_reporter(progress):
    """The split client's (sent, total, trained by the server) callback, as `Progress`."""
    if progress is None:
        return None
    return lambda sent, total, applied: progress(Progress(step=sent, total=total, unit="batch",
                                                          detail=f"{applied} trained by the server"))


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
