"""`privdiff demo`, `pretrain`, `train dp-ldm` and `train dp-ti`."""

from __future__ import annotations

import sys
from pathlib import Path

from ..console import get_logger

# Items of a built-in set a command uses when --num-items is not given.
FIRST_RUN_ITEMS = 1000


def demo(args) -> int:
    from ..models.loading import base_resolution
    from ..pipelines.demo import DEMO_FEATURES, run_demo
    from ..training.outputs import check_out_folder

    if args.data is not None:
        print("privdiff demo uses its own procedural data; --data is ignored here.", file=sys.stderr)
    if args.only is not None and args.only not in DEMO_FEATURES:
        raise ValueError(f"--only {args.only!r} is not a demo feature; choose one of: {', '.join(DEMO_FEATURES)}.")
    base_resolution(base=args.base, config=args.config)  # a bad --base is refused before anything is written
    check_out_folder(args.out)
    result = run_demo(out=args.out, only=args.only, base=loadable_base(args, folder=Path(args.out) / "base"),
                      seed=args.seed)
    total = sum(result.seconds.values())
    print(f"\nprivdiff demo finished in {total:.1f} s; outputs in {result.out}")
    for name, seconds in result.seconds.items():
        print(f"  {name:<12} {seconds:6.1f} s")
    if result.sample_grid is not None:
        print(f"sample grid: {result.sample_grid}")
    return 0


def pretrain(args) -> int:
    from ..pipelines.pretrain import PretrainConfig, pretrain
    from ..training.outputs import check_out_folder

    if args.data not in (None, "public"):
        raise ValueError(f"--data {args.data!r}: privdiff-tiny pretrains on the public corpus only "
                         "(shapes, glyphs and textures drawn in code); leave --data out.")
    overrides = {"seed": args.seed}
    for option, field in (("unet_steps", "unet_steps"), ("vae_steps", "vae_crop_steps"), ("num_images", "num_images")):
        if getattr(args, option) is not None:
            overrides[field] = getattr(args, option)
    config = PretrainConfig(**overrides)
    check_out_folder(args.out, results=["model_index.json"])
    result = pretrain(out=args.out, config=config, resume=args.resume)
    print(f"privdiff-tiny pretrained in {result.seconds['total'] / 60:.1f} min -> {result.out}")
    print(f"samples: {result.sample_grid}\nloss curve: {result.loss_curve}")
    print(f"use it: privdiff demo --base {result.out} --out demo-out")
    return 0


def _dataset(args, *, captions: bool = True):
    """The private set at the base model's resolution, read from its config: no weights load for it."""
    from ..data import PROCEDURAL_DATASETS, load_dataset
    from ..models.loading import base_resolution

    if args.data is None:
        raise ValueError("--data is required: a folder of images, or a procedural set's name (e.g. shapes).")
    options = {} if captions or args.data in PROCEDURAL_DATASETS else {"caption_required": False}
    resolution = base_resolution(base=args.base, config=args.config)
    dataset = load_dataset(data=args.data, resolution=resolution, seed=args.seed, num_items=args.num_items, **options)
    if args.num_items is None and args.data in PROCEDURAL_DATASETS and len(dataset) > FIRST_RUN_ITEMS:
        # A first run with the defaults should finish in minutes on a laptop's CPU, not hours.
        get_logger().info(f"using {FIRST_RUN_ITEMS:,} of {args.data}'s {len(dataset):,} items (--num-items N for more)")
        dataset = load_dataset(data=args.data, resolution=resolution, seed=args.seed, num_items=FIRST_RUN_ITEMS,
                               **options)
    return dataset


class _Bar:
    """Progress drawn when the work starts (after loading and checks), not before: one bar per phase
    on a terminal, one line per phase when the output goes to a file (no carriage returns there)."""

    def __init__(self, desc: str, unit: str = "step"):
        self.desc, self.unit, self.bar, self.phase = desc, unit, None, None

    def update(self, *, total: int, postfix: str = "") -> None:
        """One more step of `total` (the training phase)."""
        done = (self.bar.n if self.bar is not None and self.phase == "training" else 0) + 1
        self._show(phase="training", step=done, total=total, unit=self.unit, postfix=postfix)

    def report(self, info) -> None:
        """A trainer's `Progress`: its phase, its position, and while training the ε spent so far."""
        spent = "" if info.epsilon is None else f"ε={info.epsilon:.3g}"
        loss = "" if info.loss is None else f" loss={info.loss:.4f} (not covered by ε)"
        detail = f" {info.detail}" if info.detail else ""
        self._show(phase=info.phase, step=info.step, total=info.total, unit=info.unit,
                   postfix=f"{spent}{loss}{detail}".strip())

    def _show(self, *, phase: str, step: int, total: int, unit: str, postfix: str) -> None:
        if phase != self.phase:
            self.close()
            from tqdm.auto import tqdm

            self.phase = phase
            # disable=None: no bar when stderr is not a terminal; a plain line says what is happening
            self.bar = tqdm(desc=f"{self.desc}: {phase}", unit=unit, total=total, disable=None, leave=True)
            if self.bar.disable:
                print(f"{self.desc}: {phase} ({total} {unit}{'s' if total != 1 else ''})", file=sys.stderr, flush=True)
        self.bar.total = total
        if postfix:
            self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _stop_on_ctrl_c():
    """Ctrl-C asks for a stop after the current step (a checkpoint); a second one aborts."""
    import signal

    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, request_stop)
    return (lambda: stop["requested"]), (lambda: signal.signal(signal.SIGINT, previous))


def dp_ldm(args) -> int:
    from ..pipelines.dp_ldm import DPLDMConfig, default_sample_prompts, train_dp_ldm

    if args.data is None:
        raise ValueError("--data is required: a folder of images with captions, or a procedural set's name.")
    config = DPLDMConfig(
        trainable=args.trainable, ablation_blocks=args.ablation_blocks, lora_rank=args.lora_rank,
        conditioning_words=tuple(args.conditioning_word or ()), conditioning_clip_share=args.conditioning_clip_share,
        backend=args.backend, epsilon=None if args.no_dp else args.epsilon,
        delta=args.delta, clip_norm=args.clip_norm, epochs=args.epochs, batch_size=args.batch_size,
        physical_batch_size=args.physical_batch_size, learning_rate=args.learning_rate, privacy_unit=args.privacy_unit,
        max_examples_per_subject=args.max_examples_per_subject, seed=args.seed, keep_byproducts=args.keep_byproducts,
        adjacency=args.adjacency, noise_draws=args.noise_draws, device=args.device,
        sample_prompts=tuple(args.sample_prompt or default_sample_prompts(data=args.data)),
    )
    dataset = _dataset(args)
    base = base_spec(args)  # train_dp_ldm checks everything else before it loads the model
    result = _stoppable("dp-ldm", lambda bar, should_stop: train_dp_ldm(
        base=base, data=dataset, out=args.out, config=config, resume=args.resume, progress=bar.report,
        should_stop=should_stop))
    if result.stopped:
        return _stopped(f"{result.figures['steps_done']}/{result.figures['total_steps']}")
    eps = "without DP" if result.epsilon is None else f"ε = {result.epsilon:.3g}"
    print(f"DP-LDM finished ({eps}) -> {result.out}")
    for kind, path in result.files.items():
        print(f"  {kind}: {path}")
    return 0


def _stoppable(name: str, run):
    """`run(bar, should_stop)` with a progress bar and Ctrl-C as a request to stop after the step."""
    should_stop, restore = _stop_on_ctrl_c()
    bar = _Bar(name)
    try:
        return run(bar, should_stop)
    finally:
        bar.close()
        restore()


def _stopped(at: str) -> int:
    print(f"stopped at step {at}; continue with the same command and --resume")
    return 130


def base_spec(args):
    """--base with --config, --tokenizer and --tokenizer-2: what every trainer's `base` takes."""
    from ..training.inputs import BaseSpec

    return BaseSpec(base=args.base, config=args.config, tokenizer=args.tokenizer, tokenizer_2=args.tokenizer_2)


def loadable_base(args, *, folder: Path) -> str:
    """--base as something any process loads by name: a single file that needs --config or tokenizers
    is loaded once with them and saved as a diffusers folder in `folder` (reused when already there)."""
    if not (args.config or args.tokenizer or args.tokenizer_2):
        return args.base
    if not (folder / "model_index.json").is_file():
        _pipeline(args).save_pretrained(folder)
    return str(folder)


def _pipeline(args):
    from ..training.inputs import resolve_base

    return resolve_base(base_spec(args))  # the one way a trainer loads its base, too


def dp_ti(args) -> int:
    from ..pipelines.dp_ti import (DPAggConfig, DPSGDTIConfig, check_ti_out, plan_dpagg, plan_dpsgd_ti, train_dpagg_ti,
                                   train_dpsgd_ti)

    if args.ti_method == "dpsgd" and args.no_dp:
        raise ValueError("--no-dp is for dpagg comparison runs; DP-SGD TI is always private.")
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every {args.checkpoint_every}: give a number of steps, at least 1.")
    common = dict(token=args.token, init_word=args.init_word, num_vectors=args.num_vectors, template=args.template,
                  delta=args.delta, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
                  privacy_unit=args.privacy_unit, adjacency=args.adjacency, a1111=args.a1111,
                  checkpoint_every=args.checkpoint_every,
                  **({} if args.clip_norm is None else {"clip_norm": args.clip_norm}))  # each method's own default
    if args.ti_method == "dpagg":
        config = DPAggConfig(epsilon=None if args.no_dp else args.epsilon, sample_rate=args.sample_rate,
                             num_subsets=args.num_subsets, steps=args.steps, **common)
        plan, train = plan_dpagg, train_dpagg_ti
    else:
        config = DPSGDTIConfig(epsilon=args.epsilon, epochs=args.epochs,
                               max_examples_per_subject=args.max_examples_per_subject, **common)
        plan, train = plan_dpsgd_ti, train_dpsgd_ti
    dataset = _dataset(args, captions=False)  # TI trains on its own template
    plan(dataset=dataset, config=config)  # units, δ against N, σ: refused here, before the model loads
    check_ti_out(out=args.out, resume=args.resume)
    pipeline = _pipeline(args)  # the token is checked against its tokenizer before training starts
    result = _stoppable(f"dp-ti ({args.ti_method})", lambda bar, should_stop: train(
        base=pipeline, data=dataset, out=args.out, config=config, progress=bar.report, should_stop=should_stop,
        resume=args.resume))
    if result.stopped:
        return _stopped(str(result.figures["steps_done"]))
    eps = "without DP" if result.epsilon is None else f"ε = {result.epsilon:.3g}"
    print(f"DP-TI {args.ti_method} finished ({eps}, {result.figures['num_units']} units) -> {result.out}")
    for kind, path in result.files.items():
        print(f"  {kind}: {path}")
    if getattr(pipeline, "text_encoder_2", None) is None:
        print(f'  diffusers: pipe.load_textual_inversion("{result.files["diffusers"]}", token="{args.token}")')
    else:  # SDXL: one tensor per text encoder
        print(f'  diffusers: privdiff.pipelines.textual_inversion.load_embedding(pipeline=pipe, '
              f'path="{result.files["diffusers"]}", token="{args.token}")')
    return 0
