"""`privdiff audit mia`, `privdiff audit canary` and `privdiff inspect`."""

from __future__ import annotations

from pathlib import Path


def mia(args) -> int:
    from ..models.loading import base_resolution
    from ..pipelines.fine_tuned import apply_fine_tune
    from ..pipelines.membership import MembershipAuditConfig, audit_membership, write_audit
    from ..training.outputs import check_out_folder
    from .train import _pipeline

    if args.data is None:
        raise ValueError("--data is required: the training data (a folder or a procedural set's name).")
    if args.num_members < 1:
        raise ValueError(f"--num-members {args.num_members}: the audit needs at least one member (the items the "
                         "run trained on: its --num-items).")
    if args.num_nonmembers is not None and args.num_nonmembers < 1:
        raise ValueError(f"--num-nonmembers {args.num_nonmembers} must be at least 1.")
    if args.weights is not None and not Path(args.weights).exists():
        raise FileNotFoundError(f"--weights {args.weights}: nothing there; give a DP-LDM output folder or its weights "
                                "file.")
    base_resolution(base=args.base, config=args.config)
    check_out_folder(args.out)
    pipeline = _pipeline(args)
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


def canary(args) -> int:
    from ..pipelines.canary_audit import AUDIT_FILE, audit_gaussian, write_canary_audit
    from ..training.outputs import check_out_folder

    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence {args.confidence} must lie between 0 and 1, e.g. 0.99.")
    if args.canaries < 32:
        raise ValueError(f"--canaries {args.canaries}: an audit needs at least 32 (1,000 or more for a useful bound).")
    if args.runs < 1:
        raise ValueError(f"--runs {args.runs} must be at least 1 (10 runs of 1,000 canaries: a tighter bound).")
    if 2 * args.canaries * args.runs * args.delta > 1:
        raise ValueError(f"--canaries {args.canaries} x --runs {args.runs} with --delta {args.delta}: the audit needs "
                         f"canaries x runs <= 1/(2 delta) = {int(0.5 / args.delta)}; use fewer.")
    if not (args.epsilon > 0 and 0 < args.delta < 1):
        raise ValueError(f"--epsilon {args.epsilon} must be positive and --delta {args.delta} lie in (0, 1).")
    guesses = None if args.guesses == "grid" else args.guesses
    if args.method in ("dpsgd-ti", "federated") and (args.runs != 1 or guesses is not None):
        raise ValueError(f"--runs and --guesses planned are for --method dp-ldm and gaussian; the {args.method} "
                         "audit is one run with the grid of guesses (give more --canaries instead).")
    check_out_folder(args.out, results=[AUDIT_FILE])
    if args.method == "gaussian":
        result = audit_gaussian(epsilon=args.epsilon, delta=args.delta, num_canaries=args.canaries,
                                confidence=args.confidence, seed=args.seed, runs=args.runs, guesses=guesses)
    else:
        result = {"dp-ldm": _audit_dp_ldm, "dpsgd-ti": _audit_dpsgd_ti, "federated": _audit_federated}[args.method](
            args, guesses=guesses)
    path = write_canary_audit(result=result, out=args.out)
    for line in result.summary_lines():
        print(line)
    print(f"an audit, not a guarantee: a bound above the recorded ε means the mechanism is broken -> {path}")
    return 0


def _with_bar(audit, **kwargs):
    """An audit with a progress bar (no stop-and-resume: Ctrl-C ends an audit, which leaves nothing to continue)."""
    from .train import _Bar

    bar = _Bar("canary audit")
    try:
        return audit(**kwargs, progress=bar.report)
    finally:
        bar.close()


def _audit_dp_ldm(args, *, guesses):
    from ..pipelines.canary_audit import audit_dp_ldm
    from ..training.fine_tune import DPLDMConfig
    from .train import _dataset, base_spec

    dataset = _dataset(args)
    # Seeded noise: an audit is reproducible from its --seed (it tests the mechanism, not the OS's randomness).
    config = DPLDMConfig(epsilon=args.epsilon, delta=args.delta, epochs=args.epochs,
                         batch_size=len(dataset) if args.batch_size is None else args.batch_size,
                         physical_batch_size=args.physical_batch_size, clip_norm=args.clip_norm,
                         learning_rate=args.learning_rate, trainable=args.trainable, seed=args.seed,
                         secure_noise=False, num_items=args.num_items, num_samples=0)
    return _with_bar(audit_dp_ldm, base=base_spec(args), data=dataset, config=config, num_canaries=args.canaries,
                     confidence=args.confidence, runs=args.runs, guesses=guesses)


def _audit_dpsgd_ti(args, *, guesses=None):
    from ..pipelines.canary_audit import audit_dpsgd_ti
    from ..pipelines.dp_ti import DPSGDTIConfig
    from .train import _dataset, base_spec

    dataset = _dataset(args)
    config = DPSGDTIConfig(token="<audit>", init_word="circle", num_vectors=args.num_vectors, epsilon=args.epsilon,
                           delta=args.delta, epochs=args.epochs,
                           batch_size=len(dataset) if args.batch_size is None else args.batch_size,
                           num_items=args.num_items, clip_norm=args.clip_norm, learning_rate=args.learning_rate,
                           seed=args.seed, secure_noise=False)
    return _with_bar(audit_dpsgd_ti, base=base_spec(args), data=dataset, config=config, num_canaries=args.canaries,
                     confidence=args.confidence)


def _audit_federated(args, *, guesses=None):
    from ..pipelines.federated_canary import audit_client_level_dp, client_dp_config

    config = client_dp_config(epsilon=args.epsilon, delta=args.delta, rounds=args.rounds,
                              num_clients=args.num_clients, client_clip_norm=args.client_clip_norm,
                              base=str(args.base or "tiny"), data=args.data, seed=args.seed)
    return audit_client_level_dp(config=config, num_canaries=args.canaries, seed=args.seed,
                                 confidence=args.confidence, real_clients=args.real_clients)


def inspect(args) -> int:
    from ..models.loading import bundled_config_for, inspect_checkpoint
    from ..privacy.record import PrivacyRecordError, read_record

    path = Path(args.checkpoint)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a .safetensors or .ckpt file (for a diffusers model folder, its "
                         "model_index.json says what it holds).")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        record = read_record(path)
    except PrivacyRecordError:
        record = None
    if record is not None:  # a privdiff release: its guarantee first (with its adjacency)
        print(f"{path}: privacy record\n  " + "\n  ".join(record.summary_lines()))
    info = inspect_checkpoint(path)
    if info.family is None and record is not None:
        print(f"{path}: {info.num_tensors} tensors (a privdiff release, not a whole model checkpoint)")
        return 0
    print(f"{info.path}: {info.describe()}")
    found = bundled_config_for(info)
    print(f"bundled config: {found.name}" if found else "bundled config: none (pass --config <diffusers folder> to load it)")
    return 0
