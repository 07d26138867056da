"""DP-LDM: differentially private fine-tuning of a latent diffusion model's attention (arXiv 2305.15759).

Only the chosen trainable set (attention projections by default) is trained, with DP-SGD: Poisson
batches, per-example (or per-subject) clipping, Gaussian noise calibrated to the target (ε, δ) over
the planned steps. What leaves the run is the weight difference (diffusers and ComfyUI key names)
carrying its privacy record, and samples drawn from the private model (post-processing, covered by ε).
Everything else computed on private data (losses, checkpoints) is a by-product outside the guarantee:
kept under `<out>/byproducts-not-covered-by-dp/`, labelled, and deleted at the end unless asked.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..training.fine_tune import DPLDMConfig, FineTuneRun, is_main_process, validate_dataset
from ..training.inputs import is_unloaded, resolve_base, resolve_data
from ..training.result import Progress, TrainResult
from ..training.outputs import BYPRODUCTS
from ..training.release import Release, weight_file, write_fine_tune_weights

WEIGHTS_DIFFUSERS = weight_file("dp_ldm", "diffusers")
WEIGHTS_COMFYUI = weight_file("dp_ldm", "comfyui")
WEIGHTS_LORA = weight_file("dp_ldm", "lora")


def train_dp_ldm(
    *,
    base,
    data,
    out: str | Path,
    config: DPLDMConfig = DPLDMConfig(),
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune `base` on `data` with DP-LDM and write the outputs into `out`.

    `base` is a pipeline object or anything `load_pipeline` takes; `data` a dataset, a folder or a
    procedural set's name (`config.num_items` of it); `config.device` ("cuda", "cpu", ...) moves the
    pipeline there (default: where it is). Everything that can be checked (settings, device, data, δ
    against N, the output folder) is checked before the model loads and before anything is written.
    `progress` hears each phase: loading, encoding, calibrating σ, training, sampling. `should_stop` is polled after each
    step: a stopped run leaves a checkpoint that `resume=True` continues exactly. A write that fails
    (a full disk) stops the run with its last checkpoint intact and no partial release; the same call
    with `resume=True` continues. Resuming a run whose release is already complete returns it.
    """
    from ..models.loading import check_device
    from ..privacy.engine import distributed_rank_and_size
    from ..training.checkpoint import has_checkpoint
    from ..training.outputs import check_out_folder, prepare_out_folder
    from ..training.release import recover_release

    out = Path(out)
    byproducts = out / BYPRODUCTS
    check_device(config.device)
    if config.epsilon is None and distributed_rank_and_size()[1] > 1:
        raise ValueError("non-private comparison runs are single-process; run them without torchrun.")
    dataset = resolve_data(base=base, data=data, seed=config.seed, num_items=config.num_items)
    num_examples = validate_dataset(dataset=dataset, config=config)
    if out.is_dir():
        recover_release(out)  # a release a crash cut short after its commit is completed, else discarded
    results = (WEIGHTS_DIFFUSERS, WEIGHTS_LORA)
    if resume and any((out / name).exists() for name in results):
        return _finished(out=out, byproducts=byproducts)
    check_out_folder(out, results=results, resume=resume,
                     has_checkpoint=has_checkpoint(byproducts) if resume else None)
    if progress is not None and is_unloaded(base):
        progress(Progress(step=0, total=1, phase="loading", unit="model"))
    pipeline = resolve_base(base, device=config.device)
    run = FineTuneRun(pipeline=pipeline, dataset=dataset, config=config, num_examples=num_examples, progress=progress)
    if config.epsilon is not None and run.engine.planned_epsilon() > config.epsilon * (1 + 1e-9):
        raise ValueError(f"the plan ({run.total_steps} steps) would exceed epsilon={config.epsilon}; "
                         "this should not happen after calibration: please report it.")
    if resume:
        run.load_checkpoint(byproducts)
    prepare_out_folder(out)
    stopped = False
    while run.step < run.total_steps:
        info = run.train_step()
        if progress is not None:
            progress(info)
        if run.step % config.checkpoint_every == 0 and run.step < run.total_steps:
            _save(run, byproducts)
        if should_stop is not None and should_stop() and run.step < run.total_steps:
            _save(run, byproducts)
            stopped = True
            break
    if stopped or not is_main_process():  # under torchrun, rank 0 alone releases
        return TrainResult(out=out, stopped=stopped, figures={
            "steps_done": run.step, "total_steps": run.total_steps,
            "epsilon": run.engine.accountant.epsilon(delta=run.delta) if run.engine else None})
    _releasing(progress, 0)
    _save(run, byproducts)  # the trained state, kept until its release is complete: a failed release resumes
    return _release(run=run, out=out, progress=progress)


def _releasing(progress, step: int) -> None:
    # Saving the state, accounting ε and writing the files take seconds: say so between them.
    if progress is not None:
        progress(Progress(step=step, total=3, phase="releasing", unit="part"))


def _save(run: "FineTuneRun", folder: Path) -> None:
    """A checkpoint, or one clear message when it cannot be written (the previous one stays intact)."""
    try:
        run.save_checkpoint(folder)
    except OSError as error:
        raise OSError(error.errno, f"the checkpoint at step {run.step} could not be written to {folder} "
                                   f"({error.strerror or error}); the previous checkpoint is intact: free space and "
                                   "run the same command with --resume") from None


def _finished(*, out: Path, byproducts: Path) -> TrainResult:
    """A resumed run whose release is already complete: its files, and nothing more to do."""
    from ..privacy.record import read_record

    files = {kind: out / name for kind, name in (("diffusers", WEIGHTS_DIFFUSERS), ("comfyui", WEIGHTS_COMFYUI),
                                                 ("lora", WEIGHTS_LORA), ("samples", "samples.png"))
             if (out / name).is_file()}
    record = read_record(next(iter(files.values())))
    shutil.rmtree(byproducts, ignore_errors=True)  # what a crash after the release left behind
    return TrainResult(out=out, files=files, record=record,
                       figures={"steps_done": record.steps or 0, "total_steps": record.steps or 0})


def _release(*, run: FineTuneRun, out: Path, progress=None) -> TrainResult:
    """Write the released files (weights + privacy record, samples) and clear the by-products."""
    import torch

    from ..data.images import line_chart, make_grid, save_png
    from ..privacy.record import PrivacyRecord, record_for_dp_sgd, write_sidecar

    config = run.config
    settings = {"trainable": config.trainable, "ablation_blocks": config.ablation_blocks,
                "learning_rate": config.learning_rate, "batch_size": config.batch_size, "epochs": config.epochs,
                "noise_draws": config.noise_draws}
    _releasing(progress, 1)
    if config.trainable == "lora":
        settings["lora_rank"] = config.lora_rank
    if config.conditioning_words:
        settings["conditioning_words"] = list(config.conditioning_words)
        settings["conditioning_clip_share"] = config.conditioning_clip_share
    if run.engine is not None:
        record = record_for_dp_sgd(history=run.engine.accountant, clip=config.clip_norm,
                                   num_examples=run.num_examples, delta=run.delta, accountant=config.accountant_name,
                                   privacy_unit=config.privacy_unit, extra={"dp_ldm": settings})
    else:
        record = PrivacyRecord(mechanism="none", extra={"dp_ldm": settings,
                                                        "warning": "trained WITHOUT differential privacy"})
    release = Release(out)  # the files appear together, or (after a failed write) not at all
    with release as staging:
        weights = write_fine_tune_weights(pipeline=run.pipeline, chosen=run.chosen, base_state=run.base_state,
                                          text_rows=run.text_rows, record=record, out=staging)
        _releasing(progress, 2)
        # Samples from the private model are post-processing of the DP release: covered by ε.
        pipe = run.pipeline
        pipe.set_progress_bar_config(disable=True)
        prompts = list(config.sample_prompts) or (_public_prompts(num=config.num_samples, seed=config.seed)
                                                   if config.num_samples else [])
        grid = None
        if prompts:
            images = pipe(prompts, num_inference_steps=30, guidance_scale=5.0, output_type="np",
                          callback_on_step_end=_sampling_progress(progress, steps=30),
                          generator=torch.Generator().manual_seed(config.seed)).images
            grid = save_png(make_grid(list(images), labels=prompts, columns=4, cell_size=96), staging / "samples.png")
            write_sidecar(path=grid, record=record)  # drawn from the released model: the same guarantee
    weights, grid = {kind: release.final(path) for kind, path in weights.items()}, release.final(grid)
    byproducts = out / BYPRODUCTS
    if config.keep_byproducts:  # the final checkpoint is there already (written before the release)
        save_png(line_chart({"training loss": run.losses}, title="DP-LDM training loss",
                            note="computed on private data: NOT covered by the DP guarantee"), byproducts / "loss.png")
    elif byproducts.exists():
        shutil.rmtree(byproducts)
    files = {**weights, **({"samples": grid} if grid is not None else {})}
    return TrainResult(out=out, files=files, record=record,
                       figures={"steps_done": run.step, "total_steps": run.total_steps})


def _sampling_progress(progress, *, steps: int):
    """A diffusers step-end callback that reports the sample grid's denoising steps."""
    if progress is None:
        return None

    def on_step_end(pipe, step, timestep, values):
        progress(Progress(step=step + 1, total=steps, phase="sampling"))
        return values

    return on_step_end


def _public_prompts(*, num: int, seed: int) -> list[str]:
    """Default prompts for the sample grid: public templates, never the private captions themselves."""
    from ..data.analyzers import public_prompts

    return [spec.caption for spec in public_prompts(num=num, seed=seed)]


def default_sample_prompts(*, data, num: int = 16) -> list[str]:
    """Public prompt templates for a procedural set's samples (none for a folder: its captions are private)."""
    from ..data import PROCEDURAL_DATASETS
    from .evaluation import evaluation_items

    if isinstance(data, str) and data in PROCEDURAL_DATASETS and data != "shapes":
        return [item["caption"] for item in evaluation_items(set_name=data, num=num)]
    return []
