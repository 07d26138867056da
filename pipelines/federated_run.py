"""A federated simulation run from a GUI: the base model saved, `privdiff fed simulate` in a child
process (Flower's simulation engine starts Ray workers; they must not live inside ComfyUI), progress
read from the run's state file, and the global model released as one weight file with its record.

Layout of a run folder: `base/` (the base model, diffusers format), `federation/` (Flower's run:
`config.json`, `state.json`, `global-round-<r>.safetensors`, `simulation.log`), and the released
files in the run folder itself.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class FederatedProgress:
    round: int  # rounds completed
    rounds: int
    client_level_epsilon: float | None  # spent so far, under client-level DP
    heldout_loss: float | None  # the global model's, after the last completed round


@dataclass(frozen=True)
class FederatedRunResult:
    out: Path
    rounds_done: int
    stopped: bool
    weights: dict  # "comfyui" / "diffusers" (weight differences) or "lora"; empty when stopped
    epsilon: float | None  # client-level ε of the release (None: no client-level DP)
    loss_plot: Path | None  # held-out loss per round (the server's own held-out data)


def _same_settings(saved: dict, config) -> bool:
    """A resumed federation must be the same one: everything but the number of rounds."""
    wanted = json.loads(json.dumps(asdict(config)))
    return ({k: v for k, v in saved.items() if k != "rounds"} == {k: v for k, v in wanted.items() if k != "rounds"})


def run_federated_simulation(*, base_pipeline, config, out, resume: bool = False,
                             progress: Callable[[FederatedProgress], None] | None = None,
                             should_stop: Callable[[], bool] | None = None) -> FederatedRunResult:
    """Simulate `config` (a FederatedConfig; its `base` is replaced by `base_pipeline`, saved into the
    run) in a child process and release the global model. A stop ends the child; the rounds it
    finished stay, and `resume=True` continues from the last of them."""
    from ..federated.fedavg import load_state
    from .background import ChildCommand

    import importlib.util
    import sys

    if importlib.util.find_spec("flwr") is None:  # the child would only fail later, deep in its log
        raise ModuleNotFoundError(f"Flower is not installed for {sys.executable}: install it there with "
                                  "pip install 'flwr[simulation]>=1.41' (or pip install 'privdiff[federated]').")
    out = Path(out)
    federation, base = out / "federation", out / "base"
    config = replace(config, base=str(base))
    if resume:
        saved = federation / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"resume: no federated run to continue in {out}; turn resume off to start one.")
        if not _same_settings(json.loads(saved.read_text()), config):
            raise ValueError(f"resume: the run in {out} was started with other settings (only rounds may change); "
                             "restore them, or turn resume off to start afresh.")
    else:
        shutil.rmtree(out, ignore_errors=True)  # a new federation: nothing of an older one may leak in
    if not (base / "model_index.json").is_file():
        base_pipeline.save_pretrained(str(base))
    federation.mkdir(parents=True, exist_ok=True)
    settings = federation / "requested-config.json"
    settings.write_text(json.dumps(asdict(config), indent=1))

    def report():
        if progress is None:
            return
        state = load_state(federation)
        done = int(state.get("last_round", 0))
        losses = state.get("heldout_loss", {})
        progress(FederatedProgress(round=done, rounds=config.rounds,
                                   client_level_epsilon=config.client_level_epsilon(rounds=done) if done else None,
                                   heldout_loss=losses.get(str(done))))

    child = ChildCommand.start(name=f"federated:{out.resolve()}", log=federation / "simulation.log",
                               argv=["fed", "simulate", "--settings", str(settings), "--out", str(federation)])
    # Every finished round is already on disk (written atomically): a stop need not wait for Ray's shutdown.
    finished = child.wait(poll=report, should_stop=should_stop, grace_seconds=3.0)
    done = int(load_state(federation).get("last_round", 0))
    if not finished:
        return FederatedRunResult(out=out, rounds_done=done, stopped=True, weights={}, epsilon=None, loss_plot=None)
    child.raise_if_failed("the federated simulation")
    weights = release_global_model(federation=federation, out=out)
    plot = federation / "loss-per-round.png"
    return FederatedRunResult(out=out, rounds_done=done, stopped=False, weights=weights,
                              epsilon=config.client_level_epsilon(), loss_plot=plot if plot.is_file() else None)


def federated_record(*, config, rounds: int):
    """The release's record: client-level DP (Flower's clipping and noise, composed over the rounds),
    or none, with what local DP-SGD the clients ran (per round; not composed into an end-to-end ε)."""
    from ..privacy.record import PrivacyRecord, record_for_dp_fedavg

    settings = {"clients": config.num_clients, "rounds": rounds, "trainable": config.trainable,
                "local_epochs": config.local_epochs, "learning_rate": config.learning_rate,
                "secure_aggregation": config.secure_aggregation, "data": config.data}
    if config.local_epsilon is not None:
        settings["local_dp_sgd"] = {"epsilon_per_round": config.local_epsilon,
                                    "max_grad_norm": config.local_max_grad_norm}
    if config.client_dp:
        return record_for_dp_fedavg(history=[(config.client_dp_noise_multiplier, 1.0, rounds)],
                                    clip=config.client_dp_clipping_norm, num_clients=config.num_clients,
                                    delta=config.client_level_delta, extra={"federated": settings})
    warning = ("no client-level DP: the global model is a plain FedAvg of the clients' models"
               + ("; each client's examples had local DP-SGD at the ε per round above, and rounds compose"
                  if config.local_epsilon is not None else ""))
    return PrivacyRecord(mechanism="none", extra={"federated": settings, "warning": warning})


def release_global_model(*, federation, out) -> dict:
    """The global model after the run's last round as the files DP-LDM releases (a LoRA, or weight
    differences from the base in diffusers and ComfyUI keys), each with the run's privacy record."""
    from safetensors.torch import load_file

    from ..federated.fedavg import FederatedConfig, load_parameters, load_state
    from ..models.loading import load_pipeline
    from .dp_ldm import attach_conditioning_rows, trained_parameters, write_fine_tune_weights
    from .trainable import select_trainable

    federation, out = Path(federation), Path(out)
    config = FederatedConfig.from_file(federation / "config.json")
    rounds = int(load_state(federation).get("last_round", 0))
    if rounds < 1:
        raise ValueError(f"{federation} holds no finished round to release.")
    pipeline = load_pipeline(base=config.base)
    chosen = select_trainable(unet=pipeline.unet, trainable=config.trainable, lora_rank=config.lora_rank)
    pipeline.text_encoder.requires_grad_(False)
    rows = attach_conditioning_rows(pipeline=pipeline, words=config.conditioning_words) if config.conditioning_words else None
    base_state = trained_parameters(pipeline=pipeline)
    load_parameters(pipeline, load_file(str(federation / f"global-round-{rounds}.safetensors")))
    return write_fine_tune_weights(pipeline=pipeline, chosen=chosen, base_state=base_state, text_rows=rows,
                                   record=federated_record(config=config, rounds=rounds), out=out, stem="federated")
