"""A federated simulation run from a GUI: the base model saved, `privdiff fed simulate` in a child
process (Flower's simulation engine starts Ray workers; they must not live inside ComfyUI), progress
read from the run's state file, and the global model released as one weight file with its record.

Layout of a run folder: `base/` (the base model, diffusers format), `federation/` (Flower's run: the
`global-round-<r>.safetensors` files, each with its record, and the by-products folder with the
requested settings, `state.json` and `simulation.log`, deleted when the run ends), and the released
files in the run folder itself.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from ..privacy.record import read_record
from ..training.inputs import is_dataset, resolve_base
from ..training.result import Progress, TrainResult


def train_federated(*, base, data, out, config, progress: Callable[[Progress], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, resume: bool = False) -> TrainResult:
    """Simulate `config` (a FederatedConfig) on `data` (a folder or a built-in set's name: every client
    process reads its own share) from `base` (saved into the run) in a child process, and release the
    global model. A stop ends the child; the rounds it finished stay, and `resume=True` continues from
    the last of them. `progress` hears each finished round with the client-level ε spent so far."""
    from ..federated.fedavg import BYPRODUCTS, check_resumable, last_round, load_state, loss_chart
    from .background import ChildCommand

    import importlib.util
    import sys

    if importlib.util.find_spec("flwr") is None:  # the child would only fail later, deep in its log
        raise ModuleNotFoundError(f"Flower is not installed for {sys.executable}: install it there with "
                                  "pip install 'flwr[simulation]>=1.41' (or pip install 'privdiff[federated]').")
    if is_dataset(data):
        raise TypeError("a federated simulation's clients read their data in their own processes: give a folder "
                        "or a built-in set's name as data, not a dataset object.")
    out = Path(out)
    federation, saved_base = out / "federation", out / "base"
    config = replace(config, base=str(saved_base), data=str(data))
    if resume:
        if not last_round(federation):
            raise FileNotFoundError(f"resume: no federated run to continue in {out}; turn resume off to start one.")
        check_resumable(out=federation, config=config)
    else:
        shutil.rmtree(out, ignore_errors=True)  # a new federation: nothing of an older one may leak in
    if not (saved_base / "model_index.json").is_file():
        resolve_base(base).save_pretrained(str(saved_base))
    byproducts = federation / BYPRODUCTS
    byproducts.mkdir(parents=True, exist_ok=True)
    settings = byproducts / "requested-config.json"
    settings.write_text(json.dumps(asdict(config), indent=1))

    def report():
        if progress is None:
            return
        state = load_state(federation)
        done = int(state.get("last_round", 0))
        losses = state.get("heldout_loss", {})  # on private held-out items: for the display only
        progress(Progress(step=done, total=config.rounds, unit="round", loss=losses.get(str(done)),
                          epsilon=config.client_level_epsilon(rounds=done) if done else None))

    # The child keeps its by-products (the log, the state): this process reads them, then deletes them.
    child = ChildCommand.start(name=f"federated:{out.resolve()}", log=byproducts / "simulation.log",
                               argv=["fed", "simulate", "--settings", str(settings), "--out", str(federation),
                                     "--keep-byproducts"])
    # Every finished round is already on disk (written atomically): a stop need not wait for Ray's shutdown.
    finished = child.wait(poll=report, should_stop=should_stop, grace_seconds=3.0)
    done = last_round(federation)
    if not finished:
        return TrainResult(out=out, stopped=True, figures={
            "rounds_done": done, "epsilon": config.client_level_epsilon(rounds=done) if done else None})
    child.raise_if_failed("the federated simulation")
    weights = release_global_model(federation=federation, out=out)
    # Held-out loss per round, as a picture in memory: computed on private items, labelled as outside
    # the guarantee, never written with the release.
    chart = loss_chart(load_state(federation))
    shutil.rmtree(byproducts, ignore_errors=True)
    return TrainResult(out=out, files=weights, record=read_record(next(iter(weights.values()))),
                       figures={"rounds_done": done, "loss_chart": chart})


def release_global_model(*, federation, out) -> dict:
    """The global model after the run's last round as the files DP-LDM releases (a LoRA, or weight
    differences from the base in diffusers and ComfyUI keys), each with the record of that round's
    global model (composed over every round)."""
    from safetensors.torch import load_file

    from ..federated.fedavg import config_from_release, last_round, load_parameters
    from ..models.loading import load_pipeline
    from ..training.diffusion import attach_conditioning_rows, trained_parameters
    from ..training.release import write_fine_tune_weights
    from ..training.trainable import select_trainable

    federation, out = Path(federation), Path(out)
    rounds = last_round(federation)
    if rounds < 1:
        raise ValueError(f"{federation} holds no finished round to release.")
    config = config_from_release(federation)
    source = federation / f"global-round-{rounds}.safetensors"
    pipeline = load_pipeline(base=config.base)
    chosen = select_trainable(unet=pipeline.unet, trainable=config.trainable, lora_rank=config.lora_rank)
    pipeline.text_encoder.requires_grad_(False)
    rows = attach_conditioning_rows(pipeline=pipeline, words=config.conditioning_words) if config.conditioning_words else None
    base_state = trained_parameters(pipeline=pipeline)
    load_parameters(pipeline, load_file(str(source)))
    return write_fine_tune_weights(pipeline=pipeline, chosen=chosen, base_state=base_state, text_rows=rows,
                                   record=read_record(source), out=out, stem="federated")
