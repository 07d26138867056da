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
    # Held-out loss per round, as a picture in memory: computed on private items, labelled as outside
    # the guarantee, never written with the release.
    loss_chart: object = None


def run_federated_simulation(*, base_pipeline, config, out, resume: bool = False,
                             progress: Callable[[FederatedProgress], None] | None = None,
                             should_stop: Callable[[], bool] | None = None) -> FederatedRunResult:
    """Simulate `config` (a FederatedConfig; its `base` is replaced by `base_pipeline`, saved into the
    run) in a child process and release the global model. A stop ends the child; the rounds it
    finished stay, and `resume=True` continues from the last of them."""
    from ..federated.fedavg import BYPRODUCTS, check_resumable, last_round, load_state, loss_chart
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
        if not last_round(federation):
            raise FileNotFoundError(f"resume: no federated run to continue in {out}; turn resume off to start one.")
        check_resumable(out=federation, config=config)
    else:
        shutil.rmtree(out, ignore_errors=True)  # a new federation: nothing of an older one may leak in
    if not (base / "model_index.json").is_file():
        base_pipeline.save_pretrained(str(base))
    byproducts = federation / BYPRODUCTS
    byproducts.mkdir(parents=True, exist_ok=True)
    settings = byproducts / "requested-config.json"
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

    # The child keeps its by-products (the log, the state): this process reads them, then deletes them.
    child = ChildCommand.start(name=f"federated:{out.resolve()}", log=byproducts / "simulation.log",
                               argv=["fed", "simulate", "--settings", str(settings), "--out", str(federation),
                                     "--keep-byproducts"])
    # Every finished round is already on disk (written atomically): a stop need not wait for Ray's shutdown.
    finished = child.wait(poll=report, should_stop=should_stop, grace_seconds=3.0)
    done = last_round(federation)
    if not finished:
        return FederatedRunResult(out=out, rounds_done=done, stopped=True, weights={}, epsilon=None)
    child.raise_if_failed("the federated simulation")
    weights = release_global_model(federation=federation, out=out)
    chart = loss_chart(load_state(federation))
    shutil.rmtree(byproducts, ignore_errors=True)
    return FederatedRunResult(out=out, rounds_done=done, stopped=False, weights=weights,
                              epsilon=config.client_level_epsilon(), loss_chart=chart)


def release_global_model(*, federation, out) -> dict:
    """The global model after the run's last round as the files DP-LDM releases (a LoRA, or weight
    differences from the base in diffusers and ComfyUI keys), each with the record of that round's
    global model (composed over every round)."""
    from safetensors.torch import load_file

    from ..federated.fedavg import config_from_release, last_round, load_parameters
    from ..models.loading import load_pipeline
    from ..privacy.record import read_record
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
