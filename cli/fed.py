"""`privdiff fed simulate` and `privdiff fed certs`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path


def certs(args) -> int:
    from ..federated.deploy import check_certs_request, create_node_key, create_tls_material

    check_certs_request(folder=args.out, nodes=args.nodes, hosts=args.hosts)  # nothing is written on a refusal
    files = create_tls_material(folder=args.out, hosts=tuple(args.hosts))
    for name in args.nodes:
        files.update({f"{name} ({kind})": path for kind, path in create_node_key(folder=args.out, name=name).items()})
    print("\n".join(f"{name}: {path}" for name, path in files.items()))
    return 0


def _settings(path) -> "FederatedConfig":  # noqa: F821 (imported below)
    from ..federated.fedavg import FederatedConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--settings {path}: no such file.")
    try:
        return FederatedConfig.from_file(path)
    except json.JSONDecodeError as error:
        raise ValueError(f"--settings {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                         f"{error.msg}).") from None
    except TypeError as error:  # a value of the wrong kind for a field
        raise ValueError(f"--settings {path}: {error}") from None


def simulate(args) -> int:
    from ..federated.apps import simulate
    from ..federated.fedavg import FederatedConfig, last_round
    from ..models.loading import base_resolution
    from ..privacy.record import read_record
    from ..training.outputs import check_out_folder

    from .train import loadable_base

    if args.settings:
        config = _settings(args.settings)
    else:
        config = FederatedConfig(base=args.base or "tiny", data=args.data, num_items=args.num_items,
                                 heldout_items=args.heldout_items, num_clients=args.num_clients, rounds=args.rounds,
                                 beta=args.beta, seed=args.seed, trainable=args.trainable, local_epochs=args.local_epochs,
                                 batch_size=args.batch_size, learning_rate=args.learning_rate, local_epsilon=args.local_epsilon,
                                 client_noise_multiplier=args.client_noise_multiplier, client_clip_norm=args.client_clip_norm,
                                 client_delta=args.client_delta, secure_aggregation=args.secure_aggregation,
                                 proximal_mu=args.proximal_mu,
                                 adjacency=args.adjacency)
    import flwr  # noqa: F401  (refused here, with the install command, before anything loads)

    base_resolution(base=config.base, config=args.config)
    check_out_folder(args.out)
    if not args.settings:  # a settings file names its own base, which every client loads as it is
        # Every client process loads the base by name: a file that needs --config or tokenizers is
        # saved once, with them, as a diffusers folder beside the run.
        config = replace(config, base=loadable_base(args, folder=Path(args.out) / "base-model"))
    state = simulate(config=config, out=args.out, keep_byproducts=args.keep_byproducts, verbose=args.verbose)
    losses = state.get("heldout_loss", {})
    print("held-out loss per round (not covered by ε): "
          + ", ".join(f"{r}: {losses[r]:.4f}" for r in sorted(losses, key=int)))
    final = Path(args.out) / f"global-round-{last_round(Path(args.out))}.safetensors"
    print(f"global model after round {state['last_round']}: {final}")
    print("  " + "\n  ".join(read_record(final).summary_lines()))
    return 0
