"""`privdiff split keys`, `serve`, `train` and `attack`."""

from __future__ import annotations

from pathlib import Path


def keys(args) -> int:
    from ..transport.keys import create_keys

    public, secret = create_keys(folder=args.out, name=args.name)
    print(f"public key: {public} (share it: a client's goes into the server's allowlist folder, the server's "
          f"to every client)\nsecret key: {secret} (keep it on this machine)")
    return 0


def _config(args):
    from ..pipelines.split_client import SplitConfig

    overrides = {k: getattr(args, k) for k in ("snr_bound", "sigma_label", "sigma_hint", "draws_per_image")
                 if getattr(args, k) is not None}
    if overrides.get("draws_per_image") == 0:
        overrides["draws_per_image"] = None
    return SplitConfig(mode=args.mode, **overrides)


def _planned_config(args, *, images: int):
    """The client's settings (the planner's when --target-margin-db is given), with what the planner
    expects of them printed before anything is sent."""
    from ..pipelines.split_plan import is_modelled, plan_split, predict_split

    if args.target_margin_db is not None:
        if any(getattr(args, k) is not None for k in ("snr_bound", "sigma_hint", "draws_per_image")) \
                or args.mode != "hardened":
            raise ValueError("--target-margin-db chooses k and σ_hint itself: drop --snr-bound, --sigma-hint, "
                             "--draws-per-image and --mode, or drop --target-margin-db.")
        prediction = plan_split(images=images, target_margin_db=args.target_margin_db)
        args.snr_bound, args.sigma_hint = prediction.snr_bound, prediction.sigma_hint
    config = _config(args)
    if is_modelled(config):
        print("what the measured frontier predicts for these settings:", *predict_split(config=config, images=images)
              .lines(), sep="\n", flush=True)
    else:
        print(f"no prediction for {config}: the planner models hardened mode, one noising per image, σ_label = 1; "
              "measure these settings with `privdiff split attack` first.", flush=True)
    return config


def plan(args) -> int:
    from ..pipelines.split_plan import plan_split

    prediction = plan_split(images=args.images, target_margin_db=args.target_margin_db)
    print(f"the settings that learn most within {args.target_margin_db:g} dB:", *prediction.lines(), sep="\n")
    print(f"use: privdiff split train --snr-bound {prediction.snr_bound:g} --sigma-hint {prediction.sigma_hint:g} ... "
          f"(or --target-margin-db {args.target_margin_db:g})")
    return 0


def _check_run(args) -> None:
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError(f"--epochs {args.epochs} and --batch-size {args.batch_size} must be at least 1.")


JOB_FILE = "job.safetensors"


def serve(args) -> int:
    import signal

    from tqdm.auto import tqdm

    from types import SimpleNamespace

    from ..models.loading import base_configs
    from ..pipelines.split_server import SplitJob, SplitTrainer, batch_limits
    from ..training.checkpoint import has_checkpoint, load_checkpoint
    from ..training.outputs import check_out_folder
    from ..transport.peer import SplitServer
    from .train import _pipeline

    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every {args.checkpoint_every} must be at least 1.")
    out = check_out_folder(args.out, resume=True)
    resumed = has_checkpoint(out, name=JOB_FILE)
    if resumed:  # a damaged or old-layout checkpoint is refused here, before the model loads
        load_checkpoint(folder=out, kind="split-job", name=JOB_FILE, fingerprint=None)
    configs = base_configs(base=args.base, config=args.config)
    handlers = {}
    # Listening first: a port in use, a bad address or a bad key is refused before the model loads. The
    # limits come from the model: no frame larger than the job's largest legitimate tensor is accepted.
    server = SplitServer(bind=args.bind, server_key=args.server_key, allowed_clients=args.allowed_clients,
                         handler=lambda client, message: handlers["job"](client, message),
                         limits=batch_limits(SimpleNamespace(**configs["unet"])))
    try:
        job = SplitJob(trainer=SplitTrainer(unet=_pipeline(args).unet, learning_rate=args.learning_rate, seed=args.seed),
                       num_train_timesteps=configs["scheduler"].get("num_train_timesteps", 1000))
        if resumed:
            job.load_checkpoint(out)
            print(f"resumed the job at step {job.trainer.steps} from {out}", flush=True)
        last_saved = {"step": job.trainer.steps}
        bar = tqdm(initial=job.trainer.steps, desc="split job", unit="step")

        def handle(client, message):
            reply = job(client, message)
            if message.kind == "batch" and reply.kind == "ack" and not reply.fields.get("duplicate"):
                bar.update(1)
                bar.set_postfix(client=server.name_of(client), loss=f"{job.losses[-1]:.4f}", refresh=False)
            if job.trainer.steps - last_saved["step"] >= args.checkpoint_every:
                job.save_checkpoint(out)
                last_saved["step"] = job.trainer.steps
            return reply

        handlers["job"] = handle
        stop = {"requested": False}
        signal.signal(signal.SIGINT, lambda *a: stop.update(requested=True))
        signal.signal(signal.SIGTERM, lambda *a: stop.update(requested=True))
        print(f"serving the split ControlNet job on {server.endpoint} (Ctrl-C: checkpoint and stop)", flush=True)
        try:
            server.serve(should_stop=lambda: stop["requested"])
        finally:
            bar.close()
            job.save_checkpoint(out)
    finally:
        server.close()
    print(f"stopped at step {job.trainer.steps}; checkpoint in {out}")
    return 0


def train(args) -> int:
    from ..pipelines.split_client import check_split_dataset
    from ..pipelines.split_run import SplitConnection, SplitTrainConfig, train_split_controlnet
    from ..transport.keys import load_keys
    from .train import _Bar, _dataset, base_spec

    _check_run(args)
    for option, path, secret in (("--client-key", args.client_key, True), ("--server-key", args.server_key, False)):
        if secret and load_keys(path)[1] is None:
            raise ValueError(f"{option} {path} holds no secret key; give this client's .key_secret file.")
        if not secret:
            load_keys(path)
    dataset = _dataset(args)
    check_split_dataset(dataset)
    connection = SplitConnection(endpoint=args.connect, server_public_key=args.server_key,
                                 client_secret_key=args.client_key, client_name=Path(args.client_key).name.split(".")[0])
    config = SplitTrainConfig(connection=connection, privacy=_planned_config(args, images=len(dataset)),
                              epochs=args.epochs, batch_size=args.batch_size, timeout=args.timeout,
                              secret_file=args.noise_secret or None)
    bar = _Bar(f"split ({args.mode})", unit="batch")
    try:  # the server's answer, the secret and the folder are checked before the model loads
        result = train_split_controlnet(base=base_spec(args), data=dataset, out=args.out,
                                        config=config, progress=bar.report)
    finally:
        bar.close()
    print(f"the server trained {result.figures['steps']} of this client's batches; split ControlNet (with its "
          f"privacy record) -> {result.files['controlnet']}")
    return 0


def attack(args) -> int:
    import tempfile

    from ..pipelines.split_client import check_split_dataset
    from ..pipelines.split_run import audit_split_training
    from ..privacy.record import write_byproduct_report
    from ..privacy.split_secret import load_client_secret
    from ..training.outputs import check_out_folder
    from .train import _Bar, _dataset, _pipeline

    config = _config(args)
    _check_run(args)
    if args.optimisation_steps < 0:
        raise ValueError(f"--optimisation-steps {args.optimisation_steps} must be 0 (skip) or more.")
    dataset = _dataset(args)
    check_split_dataset(dataset)
    if args.out:
        check_out_folder(args.out)
    pipeline = _pipeline(args)
    if config.mode == "paper":
        print("paper mode: the reference design, which the attacks below rebuild exactly", flush=True)
    bar = _Bar(f"split on loopback ({args.mode})", unit="batch")
    # The loopback job's keys, ledger and (without --noise-secret) throwaway noise secret live in a scratch
    # folder deleted after.
    secret = load_client_secret(args.noise_secret) if args.noise_secret else None
    with tempfile.TemporaryDirectory() as scratch:
        try:
            report, steps = audit_split_training(
                pipeline=pipeline, dataset=dataset, config=config, epochs=args.epochs, batch_size=args.batch_size,
                folder=Path(scratch), optimisation_steps=args.optimisation_steps, secret=secret,
                progress=lambda done, total: bar.update(total=total))
        finally:
            bar.close()
    print(f"{config.mode} mode, {len(dataset)} images, {steps} server steps; what the server rebuilds "
          "(PSNR/SSIM against the VAE's own reconstructions):")
    print("\n".join(report.lines()))
    if args.out:
        path = write_byproduct_report(
            folder=args.out, name="split-attack", why="measured on the images above: outside any guarantee; keep it "
                                                      "in-house",
            data={"settings": {**vars(config), "images": len(dataset), "epochs": args.epochs},
                  "figures": report.figures()})
        print(f"report (measured on the images above; NOT covered by any guarantee) -> {path}")
    return 0
