"""The `privdiff` command. Subcommands share option names: --base, --data, --out, --seed."""

from __future__ import annotations

import argparse
import os
import sys

# Privacy users expect silence: no library telemetry unless they turn it back on themselves.
for _var, _value in {"HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "FLWR_TELEMETRY_ENABLED": "0",
                     "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_var, _value)


def _add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="tiny",
                        help="base model: 'tiny' (built in), a diffusers model folder, or a .safetensors/.ckpt file")
    parser.add_argument("--config", default=None,
                        help="for a single file of a non-standard size: a diffusers folder with the same architecture")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for a single-file checkpoint")
    parser.add_argument("--tokenizer-2", default=None, help="second tokenizer folder (SDXL single files)")


def _add_adjacency(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adjacency", default="add-remove", choices=["add-remove", "replace-one"],
                        help="which datasets the guarantee calls neighbours: one unit added or removed (default), "
                             "or one replaced by another (σ is calibrated for it; the record states it)")


def _add_common(parser: argparse.ArgumentParser, *, data_default: str | None = None, out_required: bool = True) -> None:
    parser.add_argument("--data", default=data_default,
                        help="a folder of images with captions, or a procedural set's name (circles, shapes, ...)")
    parser.add_argument("--out", required=out_required, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="privdiff", description="Private adaptation of diffusion models.")
    parser.add_argument("--version", action="version", version=f"privdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run every feature on the built-in tiny model and procedural data")
    _add_base(demo)
    _add_common(demo, out_required=True)
    demo.add_argument("--only", default=None, help="run one feature only (see the summary for names)")

    pretrain = sub.add_parser("pretrain", help="pretrain privdiff-tiny from scratch on public procedural shapes")
    _add_common(pretrain, out_required=True)
    pretrain.add_argument("--unet-steps", type=int, default=None, help="UNet + text encoder steps (default 4000)")
    pretrain.add_argument("--vae-steps", type=int, default=None, help="autoencoder steps on 32 px crops (default 1200)")
    pretrain.add_argument("--num-images", type=int, default=None, help="public images rendered (default 16000)")

    train = sub.add_parser("train", help="private fine-tuning")
    methods = train.add_subparsers(dest="method", required=True, metavar="METHOD")
    ldm = methods.add_parser("dp-ldm", help="DP-SGD fine-tuning of the UNet's attention (DP-LDM)")
    _add_base(ldm)
    _add_common(ldm, data_default=None, out_required=True)
    ldm.add_argument("--epsilon", type=float, default=10.0, help="target ε (default 10)")
    ldm.add_argument("--no-dp", action="store_true", help="train WITHOUT privacy, for comparison runs only")
    ldm.add_argument("--delta", type=float, default=None, help="δ (default 1/(10 N))")
    ldm.add_argument("--epochs", type=float, default=10.0)
    ldm.add_argument("--batch-size", type=int, default=32, help="expected logical batch size (sample rate B/N)")
    ldm.add_argument("--physical-batch-size", type=int, default=16, help="micro-batch that fits in memory")
    ldm.add_argument("--max-grad-norm", type=float, default=0.01, help="per-example clipping bound C")
    ldm.add_argument("--lr", type=float, default=1e-4, help="learning rate at batch 32 (scaled with the batch)")
    ldm.add_argument("--trainable", default="attention",
                     choices=["cross_attention", "attention", "transformer", "lora", "full"],
                     help="what is trained (default attention; lora writes one standard LoRA file)")
    ldm.add_argument("--lora-rank", type=int, default=4, help="LoRA rank for --trainable lora")
    ldm.add_argument("--conditioning-word", action="append", default=None,
                     help="also train this public word's token-table row (repeatable; e.g. class names the "
                          "base model never saw; never words taken from the private captions)")
    ldm.add_argument("--conditioning-clip-share", type=float, default=0.0,
                     help="share of the clipping budget C² kept for the conditioning rows (group-wise clipping; "
                          "ε is unchanged; default 0: one joint clip)")
    ldm.add_argument("--ablation-blocks", type=int, default=0, help="train only transformer blocks >= k")
    ldm.add_argument("--backend", default="privdiff", choices=["privdiff", "opacus"],
                     help="per-sample clipping: privdiff's fast clipping (default) or opacus' hooks (reference)")
    ldm.add_argument("--privacy-unit", default="example", choices=["example", "subject"])
    ldm.add_argument("--max-examples-per-subject", type=int, default=1)
    ldm.add_argument("--num-items", type=int, default=None, help="items of a procedural set (default: its own)")
    ldm.add_argument("--resume", action="store_true", help="continue a stopped run from its checkpoint")
    ldm.add_argument("--device", default=None, help="where to train: cuda, cpu, ... (default: cpu)")
    ldm.add_argument("--sample-prompt", action="append", default=None,
                     help="prompt for samples.png (repeatable; default: the set's public prompt templates)")
    _add_adjacency(ldm)
    ldm.add_argument("--keep-byproducts", action="store_true",
                     help="keep loss curve and checkpoint (computed on private data, NOT covered by ε)")

    ti = methods.add_parser("dp-ti", help="differentially private Textual Inversion (DPAgg-TI or DP-SGD TI)")
    _add_base(ti)
    _add_common(ti, data_default=None, out_required=True)
    ti.add_argument("--method", dest="ti_method", default="dpagg", choices=["dpagg", "dpsgd"])
    ti.add_argument("--token", required=True, help='the new token, e.g. "<my-style>"')
    ti.add_argument("--init-word", default="painting", help="a one-token word the embedding starts from")
    ti.add_argument("--num-vectors", type=int, default=1)
    ti.add_argument("--template", default="a picture in the style of {token}", help="training prompt ({token})")
    ti.add_argument("--epsilon", type=float, default=1.0)
    ti.add_argument("--no-dp", action="store_true", help="dpagg without noise or clipping bound: comparison only")
    ti.add_argument("--delta", type=float, default=None, help="δ (default 1/(10 n))")
    ti.add_argument("--clip", type=float, default=0.5, help="dpagg: bound C on each embedding's centred norm")
    ti.add_argument("--sample-rate", type=float, default=1.0, help="dpagg: Poisson subsampling rate q")
    ti.add_argument("--num-subsets", type=int, default=None, help="dpagg: disjoint subsets (default: one per image)")
    ti.add_argument("--steps", type=int, default=100, help="dpagg: optimisation steps of every embedding")
    ti.add_argument("--epochs", type=float, default=20.0, help="dpsgd: passes over the data")
    ti.add_argument("--max-grad-norm", type=float, default=0.01, help="dpsgd: per-example clipping bound")
    ti.add_argument("--batch-size", type=int, default=16)
    ti.add_argument("--lr", type=float, default=5e-3)
    ti.add_argument("--privacy-unit", default="example", choices=["example", "subject"],
                    help="subject: the guarantee covers each person's images together (needs subject ids)")
    ti.add_argument("--max-examples-per-subject", type=int, default=1, help="dpsgd with --privacy-unit subject")
    ti.add_argument("--num-items", type=int, default=None, help="items of a procedural set")
    ti.add_argument("--a1111", action="store_true", help="also write an A1111 .pt (with a .privacy.json sidecar)")
    _add_adjacency(ti)

    audit = sub.add_parser("audit", help="measure what a released model gives away")
    attacks = audit.add_subparsers(dest="attack", required=True, metavar="ATTACK")
    mia = attacks.add_parser("mia", help="loss-threshold membership inference on a DP-LDM output")
    _add_base(mia)
    _add_common(mia, data_default=None, out_required=True)
    mia.add_argument("--weights", default=None,
                     help="a DP-LDM output folder or weights file (default: audit the base model itself)")
    mia.add_argument("--num-members", type=int, required=True,
                     help="how many items the run trained on (its --num-items); members are items 0..N-1")
    mia.add_argument("--nonmember-data", default=None,
                     help="held-out images of the same source (needed for a folder; default: the set's next items)")
    mia.add_argument("--num-nonmembers", type=int, default=None, help="default: as many as members")

    fed = sub.add_parser("fed", help="federated diffusion on Flower (FedAvg across clients)")
    fed_actions = fed.add_subparsers(dest="fed_action", required=True, metavar="ACTION")
    simulate = fed_actions.add_parser("simulate", help="a Flower simulation: one SuperNode per client on this machine")
    _add_base(simulate)
    _add_common(simulate, data_default="digits", out_required=True)
    simulate.add_argument("--num-items", type=int, default=600, help="examples shared among the clients")
    simulate.add_argument("--heldout-items", type=int, default=100, help="held-out examples for the per-round loss")
    simulate.add_argument("--clients", type=int, default=3)
    simulate.add_argument("--rounds", type=int, default=3)
    simulate.add_argument("--beta", type=float, default=None, help="Dirichlet non-IID split by label (default: IID)")
    simulate.add_argument("--trainable", default="attention", help="what travels and trains: attention, lora, full, ...")
    simulate.add_argument("--local-epochs", type=float, default=1.0)
    simulate.add_argument("--batch-size", type=int, default=32)
    simulate.add_argument("--lr", type=float, default=1e-4)
    simulate.add_argument("--local-epsilon", type=float, default=None,
                          help="local DP-SGD on each client: its TOTAL ε over all rounds (σ is calibrated over "
                               "rounds × local steps; default off)")
    simulate.add_argument("--client-dp-noise", type=float, default=None,
                          help="client-level DP (Flower, clipping on clients): noise multiplier z (default off)")
    simulate.add_argument("--client-dp-clip", type=float, default=0.1, help="client-level DP: update clipping norm C")
    simulate.add_argument("--client-dp-delta", type=float, default=None,
                          help="client-level DP: δ (default min(1e-5, 0.1/clients), well below 1/clients)")
    _add_adjacency(simulate)
    simulate.add_argument("--keep-byproducts", action="store_true",
                          help="keep the held-out losses, client reports and their plot (computed on private items, "
                               "NOT covered by ε) in <out>/byproducts-not-covered-by-dp")
    simulate.add_argument("--secure-aggregation", action="store_true",
                          help="Flower's SecAgg+: the server sees only the sum of the clients' models")
    simulate.add_argument("--settings", default=None,
                          help="take every setting from this JSON file (a run's config.json) instead of the options")

    certs = fed_actions.add_parser("certs", help="TLS files for a SuperLink and authentication keys for SuperNodes")
    certs.add_argument("--out", required=True, help="folder for ca.crt, server.pem, server.key and the node keys")
    certs.add_argument("--nodes", nargs="+", default=[], help="one key pair per SuperNode (site) name")
    certs.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1", "::1"],
                       help="names and addresses the SuperLink is reached at")

    split = sub.add_parser("split", help="split-learning ControlNet: keys, a training server, a client")
    split_actions = split.add_subparsers(dest="split_action", required=True, metavar="ACTION")
    keys = split_actions.add_parser("keys", help="create a CurveZMQ key pair (<name>.key public, <name>.key_secret)")
    keys.add_argument("--out", required=True, help="folder for the key files")
    keys.add_argument("--name", required=True, help="'server', or a client's name")
    serve = split_actions.add_parser("serve", help="run a training job's server (Ctrl-C: checkpoint and stop)")
    _add_base(serve)
    serve.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint to listen on")
    serve.add_argument("--server-key", required=True, help="the server's .key_secret file")
    serve.add_argument("--allowed-clients", required=True, help="folder of the admitted clients' public .key files")
    serve.add_argument("--out", required=True, help="job folder: checkpoints (resumed from when present)")
    serve.add_argument("--lr", type=float, default=1e-5)
    serve.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    serve.add_argument("--seed", type=int, default=0)
    client = split_actions.add_parser("train", help="send a private dataset's batches to a server, then download "
                                                    "the trained ControlNet")
    _add_base(client)
    _add_common(client, data_default=None, out_required=True)
    client.add_argument("--connect", default="tcp://127.0.0.1:5555")
    client.add_argument("--client-key", required=True, help="this client's .key_secret file")
    client.add_argument("--noise-secret", default=None,
                        help="the client's noise secret (made on first use; its ledger of sent images beside it); "
                             "default: <client key's name>.split-secret beside the key. Use one for every job and "
                             "server: an image must never get two noisings")
    client.add_argument("--server-key", required=True, help="the server's public .key file")
    client.add_argument("--mode", default="hardened", choices=["hardened", "paper"],
                        help="paper: the reference design, which gives the images away (for reproduction only)")
    client.add_argument("--snr-bound", type=float, default=None, help="hardened: largest SNR of a timestep drawn")
    client.add_argument("--sigma-label", type=float, default=None)
    client.add_argument("--sigma-hint", type=float, default=None)
    client.add_argument("--draws-per-image", type=int, default=None,
                        help="hardened: distinct noisings per image over the whole run (default 1; 0: a fresh one "
                             "every epoch)")
    client.add_argument("--epochs", type=int, default=1)
    client.add_argument("--batch-size", type=int, default=16)
    attack = split_actions.add_parser("attack", help="train a short job on loopback, record the traffic as the "
                                                     "server sees it and run the server's attacks on it")
    _add_base(attack)
    _add_common(attack, data_default="circles", out_required=False)
    attack.add_argument("--mode", default="hardened", choices=["hardened", "paper"])
    attack.add_argument("--snr-bound", type=float, default=None)
    attack.add_argument("--sigma-label", type=float, default=None)
    attack.add_argument("--sigma-hint", type=float, default=None)
    attack.add_argument("--draws-per-image", type=int, default=None, help="as for train (0: fresh every epoch)")
    attack.add_argument("--num-items", type=int, default=None, help="private images (default 32)")
    attack.add_argument("--epochs", type=int, default=5)
    attack.add_argument("--batch-size", type=int, default=8)
    attack.add_argument("--optimisation-steps", type=int, default=100,
                        help="steps of the total-variation inversion attack (0: skip it)")
    client.add_argument("--num-items", type=int, default=None, help="items of a procedural set")
    client.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply")

    inspect = sub.add_parser("inspect", help="tell what a single-file checkpoint holds (reads names and shapes only)")
    inspect.add_argument("checkpoint", help="a .safetensors or .ckpt file")
    return parser


def _cmd_demo(args) -> int:
    from .pipelines.demo import run_demo

    if args.data is not None:
        print("privdiff demo uses its own procedural data; --data is ignored here.", file=sys.stderr)
    result = run_demo(out=args.out, only=args.only, base=args.base, seed=args.seed)
    total = sum(result.seconds.values())
    print(f"\nprivdiff demo finished in {total:.1f} s; outputs in {result.out}")
    for name, seconds in result.seconds.items():
        print(f"  {name:<12} {seconds:6.1f} s")
    if result.sample_grid is not None:
        print(f"sample grid: {result.sample_grid}")
    return 0


def _cmd_pretrain(args) -> int:
    from .pipelines.pretrain import PretrainConfig, pretrain

    if args.data not in (None, "shapes"):
        raise ValueError(f"--data {args.data!r}: privdiff-tiny pretrains on the public 'shapes' set only.")
    overrides = {"seed": args.seed}
    for option, field in (("unet_steps", "unet_steps"), ("vae_steps", "vae_crop_steps"), ("num_images", "num_images")):
        if getattr(args, option) is not None:
            overrides[field] = getattr(args, option)
    result = pretrain(out=args.out, config=PretrainConfig(**overrides))
    print(f"privdiff-tiny pretrained in {result.seconds['total'] / 60:.1f} min -> {result.out}")
    print(f"samples: {result.sample_grid}\nloss curve: {result.loss_curve}")
    print(f"use it: privdiff demo --base {result.out} --out demo-out")
    return 0


def _cmd_train(args) -> int:
    if args.method == "dp-ti":
        return _cmd_train_ti(args)
    return _cmd_train_ldm(args)


def _cmd_train_ti(args) -> int:
    from tqdm.auto import tqdm

    from .data import load_dataset
    from .models.loading import load_pipeline
    from .pipelines.dp_ti import DPAggConfig, DPSGDTIConfig, train_dpagg_ti, train_dpsgd_ti

    if args.data is None:
        raise ValueError("--data is required: a folder of images, or a procedural set's name (e.g. style).")
    if args.ti_method == "dpsgd" and args.no_dp:
        raise ValueError("--no-dp is for dpagg comparison runs; DP-SGD TI is always private.")
    common = dict(token=args.token, init_word=args.init_word, num_vectors=args.num_vectors, template=args.template,
                  delta=args.delta, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                  privacy_unit=args.privacy_unit, adjacency=args.adjacency)
    if args.ti_method == "dpagg":
        config = DPAggConfig(epsilon=None if args.no_dp else args.epsilon, clip=args.clip, sample_rate=args.sample_rate,
                             num_subsets=args.num_subsets, steps=args.steps, **common)
        train = train_dpagg_ti
    else:
        config = DPSGDTIConfig(epsilon=args.epsilon, max_grad_norm=args.max_grad_norm, epochs=args.epochs,
                               max_examples_per_subject=args.max_examples_per_subject, **common)
        train = train_dpsgd_ti
    pipeline = load_pipeline(base=args.base, config=args.config, tokenizer=args.tokenizer)
    pipeline.set_progress_bar_config(disable=True)
    dataset = load_dataset(data=args.data, resolution=pipeline.unet.config.sample_size * pipeline.vae_scale_factor,
                           seed=args.seed, num_items=args.num_items)
    bar = tqdm(desc=f"dp-ti ({args.ti_method}, all per-image embeddings)" if args.ti_method == "dpagg" else "dp-ti (dpsgd)",
               unit="step")

    def progress(step, total):
        bar.total = total
        bar.update(1)

    try:
        result = train(pipeline=pipeline, dataset=dataset, out=args.out, config=config, progress=progress,
                       a1111=args.a1111)
    finally:
        bar.close()
    eps = "without DP" if result.epsilon is None else f"ε = {result.epsilon:.3g}"
    print(f"DP-TI {args.ti_method} finished ({eps}, {result.num_units} units) -> {result.out}")
    for kind, path in result.files.items():
        print(f"  {kind}: {path}")
    if getattr(pipeline, "text_encoder_2", None) is None:
        print(f'  diffusers: pipe.load_textual_inversion("{result.files["diffusers"]}", token="{args.token}")')
    else:  # SDXL: one tensor per text encoder
        print(f'  diffusers: privdiff.pipelines.textual_inversion.load_embedding(pipeline=pipe, '
              f'path="{result.files["diffusers"]}", token="{args.token}")')
    return 0


def _cmd_train_ldm(args) -> int:
    import signal

    from tqdm.auto import tqdm

    from .pipelines.dp_ldm import DPLDMConfig, default_sample_prompts, train_dp_ldm

    if args.data is None:
        raise ValueError("--data is required: a folder of images with captions, or a procedural set's name.")
    config = DPLDMConfig(
        trainable=args.trainable, ablation_blocks=args.ablation_blocks, lora_rank=args.lora_rank,
        conditioning_words=tuple(args.conditioning_word or ()), conditioning_clip_share=args.conditioning_clip_share,
        backend=args.backend, epsilon=None if args.no_dp else args.epsilon,
        delta=args.delta, max_grad_norm=args.max_grad_norm, epochs=args.epochs, batch_size=args.batch_size,
        physical_batch_size=args.physical_batch_size, learning_rate=args.lr, privacy_unit=args.privacy_unit,
        max_examples_per_subject=args.max_examples_per_subject, seed=args.seed, keep_byproducts=args.keep_byproducts,
        adjacency=args.adjacency,
        sample_prompts=tuple(args.sample_prompt or default_sample_prompts(data=args.data)),
    )
    stop = {"requested": False}

    def request_stop(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, request_stop)
    bar = tqdm(desc="dp-ldm", unit="step")

    def progress(info):
        bar.total = info.total_steps
        eps = "" if info.epsilon is None else f" ε={info.epsilon:.3g}"
        loss = "" if info.loss is None else f" loss={info.loss:.4f} (not covered by ε)"
        bar.set_postfix_str(f"{eps}{loss}".strip())
        bar.update(1)

    try:
        result = train_dp_ldm(base=args.base, data=args.data, out=args.out, config=config, num_items=args.num_items,
                              device=args.device, resume=args.resume, progress=progress, should_stop=lambda: stop["requested"])
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    if result.stopped:
        print(f"stopped at step {result.steps_done}/{result.total_steps}; continue with the same command and --resume")
        return 130
    eps = "without DP" if result.epsilon is None else f"ε = {result.epsilon:.3g}"
    print(f"DP-LDM finished ({eps}) -> {result.out}")
    for kind, path in result.weights.items():
        print(f"  {kind}: {path}")
    print(f"  samples: {result.sample_grid}")
    return 0


def _cmd_audit(args) -> int:
    from .models.loading import load_pipeline
    from .pipelines.fine_tuned import apply_fine_tune
    from .pipelines.membership import MembershipAuditConfig, audit_membership, write_audit

    if args.data is None:
        raise ValueError("--data is required: the training data (a folder or a procedural set's name).")
    pipeline = load_pipeline(base=args.base, config=args.config, tokenizer=args.tokenizer)
    record = apply_fine_tune(pipeline=pipeline, weights=args.weights) if args.weights else None
    result = audit_membership(pipeline=pipeline, data=args.data, num_members=args.num_members, data_seed=args.seed,
                              nonmember_data=args.nonmember_data, num_nonmembers=args.num_nonmembers,
                              config=MembershipAuditConfig(seed=args.seed))
    settings = {"base": str(args.base), "weights": args.weights, "data": args.data,
                "epsilon": None if record is None else record.epsilon}
    path = write_audit(result=result, out=args.out, settings=settings)
    claim = "" if record is None or record.epsilon is None else f" (model released at ε = {record.epsilon:.3g})"
    print(f"membership inference{claim}: ROC AUC {result.auc:.3f} (0.5 = chance), "
          f"TPR at 1% FPR {result.tpr_at_1pct_fpr:.3f}; {result.num_members} members vs "
          f"{result.num_nonmembers} non-members -> {path}")
    print("these figures were computed on private data and are not covered by ε: keep them in-house.")
    return 0


def _cmd_inspect(args) -> int:
    from .models.loading import bundled_config_for, inspect_checkpoint

    from .privacy.record import PrivacyRecordError, read_record

    try:
        record = read_record(args.checkpoint)
    except (PrivacyRecordError, FileNotFoundError):
        record = None
    if record is not None:  # a privdiff release: its guarantee first (with its adjacency)
        print(f"{args.checkpoint}: privacy record\n  " + "\n  ".join(record.summary_lines()))
    info = inspect_checkpoint(args.checkpoint)
    print(f"{info.path}: {info.describe()}")
    found = bundled_config_for(info)
    print(f"bundled config: {found.name}" if found else "bundled config: none (pass --config <diffusers folder> to load it)")
    return 0


def _cmd_fed(args) -> int:
    from .federated.fedavg import FederatedConfig, simulate

    if args.fed_action == "certs":
        from .federated.deploy import create_node_key, create_tls_material

        files = create_tls_material(folder=args.out, hosts=tuple(args.hosts))
        for name in args.nodes:
            files.update({f"{name} ({kind})": path for kind, path in create_node_key(folder=args.out, name=name).items()})
        print("\n".join(f"{name}: {path}" for name, path in files.items()))
        return 0
    if args.config or args.tokenizer:
        raise ValueError("fed simulate loads --base on every client; give a model folder that loads on its own "
                         "(no --config or --tokenizer).")
    if args.settings:
        config = FederatedConfig.from_file(args.settings)
    else:
        config = FederatedConfig(base=args.base or "tiny", data=args.data, num_items=args.num_items,
                                 heldout_items=args.heldout_items, num_clients=args.clients, rounds=args.rounds,
                                 beta=args.beta, seed=args.seed, trainable=args.trainable, local_epochs=args.local_epochs,
                                 batch_size=args.batch_size, learning_rate=args.lr, local_epsilon=args.local_epsilon,
                                 client_dp_noise_multiplier=args.client_dp_noise, client_dp_clipping_norm=args.client_dp_clip,
                                 client_dp_delta=args.client_dp_delta, secure_aggregation=args.secure_aggregation,
                                 adjacency=args.adjacency)
    state = simulate(config=config, out=args.out, keep_byproducts=args.keep_byproducts)
    losses = state.get("heldout_loss", {})
    print("held-out loss per round (not covered by ε): "
          + ", ".join(f"{r}: {losses[r]:.4f}" for r in sorted(losses, key=int)))
    from pathlib import Path

    from .privacy.record import read_record

    final = Path(args.out) / f"global-round-{state['last_round']}.safetensors"
    print(f"global model after round {state['last_round']}: {final}")
    print("  " + "\n  ".join(read_record(final).summary_lines()))
    return 0


def _cmd_split(args) -> int:
    if args.split_action == "serve":
        return _cmd_split_serve(args)
    if args.split_action == "train":
        return _cmd_split_train(args)
    if args.split_action == "attack":
        return _cmd_split_attack(args)
    from .transport.keys import create_keys

    public, secret = create_keys(folder=args.out, name=args.name)
    print(f"public key: {public} (share it: a client's goes into the server's allowlist folder, the server's "
          f"to every client)\nsecret key: {secret} (keep it on this machine)")
    return 0


def _split_config(args):
    from .pipelines.split_client import SplitConfig

    overrides = {k: getattr(args, k) for k in ("snr_bound", "sigma_label", "sigma_hint", "draws_per_image")
                 if getattr(args, k) is not None}
    if overrides.get("draws_per_image") == 0:
        overrides["draws_per_image"] = None
    return SplitConfig(mode=args.mode, **overrides)


def _cmd_split_attack(args) -> int:
    import tempfile
    from pathlib import Path

    from tqdm.auto import tqdm

    from .data import load_dataset
    from .models.loading import load_pipeline
    from .pipelines.split_run import audit_split_training

    config = _split_config(args)
    pipeline = load_pipeline(base=args.base, config=args.config, tokenizer=args.tokenizer)
    dataset = load_dataset(data=args.data, resolution=pipeline.unet.config.sample_size * pipeline.vae_scale_factor,
                           seed=args.seed, num_items=args.num_items or 32)
    if config.mode == "paper":
        print("paper mode: the reference design, which the attacks below rebuild exactly", flush=True)
    bar = tqdm(desc=f"split on loopback ({args.mode})", unit="batch")
    # The loopback job's keys and its throwaway noise secret live in a scratch folder deleted after.
    with tempfile.TemporaryDirectory() as scratch:
        report, steps = audit_split_training(
            pipeline=pipeline, dataset=dataset, config=config, epochs=args.epochs, batch_size=args.batch_size,
            folder=Path(scratch), optimisation_steps=args.optimisation_steps,
            progress=lambda done, total: (setattr(bar, "total", total), bar.update(1)))
    bar.close()
    print(f"{config.mode} mode, {len(dataset)} images, {steps} server steps; what the server rebuilds "
          "(PSNR/SSIM against the VAE's own reconstructions):")
    print("\n".join(report.lines()))
    if args.out:
        from .privacy.record import write_byproduct_report

        path = write_byproduct_report(
            folder=args.out, name="split-attack", why="measured on the images above: outside any guarantee; keep it "
                                                      "in-house",
            data={"settings": {**vars(config), "images": len(dataset), "epochs": args.epochs},
                  "figures": report.figures()})
        print(f"report (measured on the images above; NOT covered by any guarantee) -> {path}")
    return 0


def _cmd_split_serve(args) -> int:
    import signal
    from pathlib import Path

    from .models.loading import load_pipeline
    from .pipelines.split_server import SplitJob, SplitTrainer
    from .training.checkpoint import has_checkpoint
    from .transport.peer import SplitServer

    pipeline = load_pipeline(base=args.base, config=args.config, tokenizer=args.tokenizer)
    job = SplitJob(trainer=SplitTrainer(unet=pipeline.unet, learning_rate=args.lr, seed=args.seed))
    out = Path(args.out)
    if has_checkpoint(out, name="job.safetensors"):
        job.load_checkpoint(out)
        print(f"resumed the job at step {job.trainer.steps} from {out}", flush=True)
    last_saved = {"step": job.trainer.steps}
    from tqdm.auto import tqdm

    bar = tqdm(initial=job.trainer.steps, desc="split job", unit="step")

    def handler(client, message):
        reply = job(client, message)
        if message.kind == "batch" and not reply.fields.get("duplicate"):
            bar.update(1)
            bar.set_postfix(client=server.name_of(client), loss=f"{job.losses[-1]:.4f}", refresh=False)
        if job.trainer.steps - last_saved["step"] >= args.checkpoint_every:
            job.save_checkpoint(out)
            last_saved["step"] = job.trainer.steps
        return reply

    server = SplitServer(bind=args.bind, server_key=args.server_key, allowed_clients=args.allowed_clients,
                         handler=handler)
    stop = {"requested": False}
    signal.signal(signal.SIGINT, lambda *a: stop.update(requested=True))
    signal.signal(signal.SIGTERM, lambda *a: stop.update(requested=True))
    print(f"serving the split ControlNet job on {server.endpoint} (Ctrl-C: checkpoint and stop)", flush=True)
    try:
        server.serve(should_stop=lambda: stop["requested"])
    finally:
        bar.close()
        job.save_checkpoint(out)
        server.close()
    print(f"stopped at step {job.trainer.steps}; checkpoint in {out}")
    return 0


def _cmd_split_train(args) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from .data import load_dataset
    from .models.loading import load_pipeline
    from .pipelines.split_client import check_split_dataset, download_controlnet, train_split_client
    from .pipelines.split_run import save_split_controlnet_file, split_record
    from .privacy.split_secret import SentLedger, ledger_path, open_client_secret, secret_path
    from .transport.peer import SplitClient

    if args.data is None:
        raise ValueError("--data is required: a folder of images with hints, or a procedural set such as circles.")
    config = _split_config(args)
    pipeline = load_pipeline(base=args.base, config=args.config, tokenizer=args.tokenizer)
    dataset = load_dataset(data=args.data, resolution=pipeline.unet.config.sample_size * pipeline.vae_scale_factor,
                           seed=args.seed, num_items=args.num_items)
    check_split_dataset(dataset)
    # The noise secret and the ledger of what was sent stay on this machine (beside the key by default).
    secret_file = Path(args.noise_secret) if args.noise_secret else secret_path(args.client_key)
    ledger = SentLedger(ledger_path(secret_file))
    try:
        secret = open_client_secret(path=secret_file, ledger=ledger)
        client = SplitClient(connect=args.connect, client_key=args.client_key, server_public_key=args.server_key,
                             name=Path(args.client_key).name.split(".")[0], timeout=args.timeout)
        bar = tqdm(total=args.epochs * -(-len(dataset) // args.batch_size), desc=f"split ({args.mode})", unit="batch")
        try:
            result = train_split_client(
                client=client, pipeline=pipeline, dataset=dataset, epochs=args.epochs, batch_size=args.batch_size,
                config=config, secret=secret, ledger=ledger,
                progress=lambda sent, total, applied: (bar.update(1), bar.set_postfix(applied=applied)))
            controlnet = download_controlnet(client=client)
        finally:
            bar.close()
            client.close()
    finally:
        ledger.close()
    path = save_split_controlnet_file(controlnet=controlnet, path=Path(args.out) / "split_controlnet.safetensors",
                                      record=split_record(config=config, steps=result.applied,
                                                          num_examples=len(dataset)),
                                      latent_scale=pipeline.vae.config.scaling_factor)
    print(f"the server trained {result.applied} of this client's batches; split ControlNet (with its privacy "
          f"record) -> {path}")
    return 0


COMMANDS = {"demo": _cmd_demo, "pretrain": _cmd_pretrain, "train": _cmd_train, "audit": _cmd_audit,
            "inspect": _cmd_inspect, "split": _cmd_split, "fed": _cmd_fed}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # User errors (bad paths, bad layouts, bad data) read better without a traceback.
        print(f"privdiff {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"privdiff {args.command}: interrupted", file=sys.stderr)
        return 130
