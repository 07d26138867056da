"""`privdiff audit mia` and `privdiff inspect`."""

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
