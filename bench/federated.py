"""Federated diffusion: bytes per round for each trainable set, round time, and utility on `digits`.

    python bench/federated.py bytes                         # privdiff-tiny and SD1.5 shapes, 3 clients
    python bench/federated.py digits --out /tmp/fed-digits  # a simulation, then digit accuracy vs the base
    python bench/federated.py non-iid --betas 0.1 5 --rounds 3 --num-items 300 --digit-words --out /tmp/fed-beta
    python bench/federated.py non-iid-direct --num-clients 10 --rounds 3 --local-epochs 30 --batch-size 10 --learning-rate 3e-3 --num-items 300 --digit-words
    python bench/federated.py labels --data mnist --settings iid 0.1 0.1:0.01 --seeds 0 1 2 --trainable full ...

`bytes`: the serialised arrays of the Flower messages each client receives and sends per round (the
global set down, its own set up; fp32), for `full`, `attention` and `lora`. `digits`: `privdiff fed simulate` on privdiff-tiny
with `digits` (IID or `--beta`), then the held-out digit classifier on 200 generations of the base
model and of the final global model, and each round's wall time against the sum (and the largest) of
its clients' local training times.
"""

from __future__ import annotations

import argparse
import json


def bytes_per_round(*, model: str, num_clients: int, lora_rank: int = 4) -> dict:
    from privdiff.federated.fedavg import FederatedConfig, initial_parameters

    if model == "tiny":
        from privdiff.models.privdiff_tiny import load_privdiff_tiny

        def pipeline():
            return load_privdiff_tiny()
    else:
        import types

        import torch
        from diffusers import UNet2DConditionModel

        from privdiff.models.loading import CONFIGS_DIR

        def pipeline():  # random weights at the real shapes; no text encoder (an empty module)
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS_DIR / model / "unet"))
            return types.SimpleNamespace(unet=unet, text_encoder=torch.nn.Module())

    from flwr.app import ArrayRecord

    out = {}
    for trainable in ("full", "attention", "lora"):
        config = FederatedConfig(trainable=trainable, lora_rank=lora_rank, num_clients=num_clients)
        parameters = initial_parameters(config, pipeline())
        # What Flower puts in a message: the ArrayRecord's serialised arrays (one each way per client).
        record_bytes = sum(len(array.data) for array in ArrayRecord(parameters).values())
        out[trainable] = {"values": sum(v.numel() for v in parameters.values()), "arrays": len(parameters),
                          "bytes_per_client_per_round": 2 * record_bytes,
                          "bytes_per_round": 2 * record_bytes * num_clients}
    return out


def digits(args) -> dict:
    import warnings

    from privdiff.federated.apps import simulate
    from privdiff.federated.fedavg import load_parameters
    from privdiff.models.privdiff_tiny import load_privdiff_tiny
    from privdiff.pipelines.evaluation import SamplingConfig, evaluate_quality

    config = _digits_config(args, beta=args.beta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = simulate(config=config, out=args.out)
    from safetensors.torch import load_file

    from privdiff.federated.fedavg import initial_parameters

    sampling = SamplingConfig(num_inference_steps=30, guidance_scale=5.0)
    base = load_privdiff_tiny()
    base.set_progress_bar_config(disable=True)
    base_accuracy = evaluate_quality(pipeline=base, set_name=getattr(args, "data", "digits"), num=args.eval_num, sampling=sampling).metrics
    tuned = load_privdiff_tiny()
    tuned.set_progress_bar_config(disable=True)
    initial_parameters(config, tuned)  # the same set (and rows) as the run, then its final values
    load_parameters(tuned, load_file(f"{args.out}/global-round-{state['last_round']}.safetensors"))
    tuned_accuracy = evaluate_quality(pipeline=tuned, set_name=getattr(args, "data", "digits"), num=args.eval_num, sampling=sampling).metrics
    rounds = {r: {"wall_seconds": v["wall_seconds"],
                  "sum_local_seconds": sum(c["local-seconds"] for c in v["clients"]),
                  "max_local_seconds": max(c["local-seconds"] for c in v["clients"])}
              for r, v in state["rounds"].items()}
    return {"config": repr(config), "heldout_loss": state["heldout_loss"], "base": base_accuracy,
            "federated": tuned_accuracy, "rounds": rounds}


def _digits_config(args, *, beta, seed=None, proximal_mu=0.0):
    from privdiff.federated.fedavg import FederatedConfig

    return FederatedConfig(data=getattr(args, "data", "digits"), num_items=args.num_items, heldout_items=100,
                           num_clients=args.num_clients, rounds=args.rounds, beta=beta,
                           seed=args.seed if seed is None else seed, trainable=args.trainable,
                           local_epochs=args.local_epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                           conditioning_words=tuple("0123456789") if args.digit_words else (),
                           proximal_mu=proximal_mu)


def _direct_round(*, config, round_number: int, global_set: dict) -> dict:
    """One FedAvg round without Flower: every client's `train_round` (as the ClientApp calls it) from
    `global_set`, then their sample-weighted mean, the next global set."""
    from privdiff.federated.apps import train_round

    replies = [train_round(config=config, client=c, round_number=round_number, initial=global_set)
               for c in range(config.num_clients)]
    total = sum(m["num-examples"] for _, m in replies)
    return {k: sum(p[k] * (m["num-examples"] / total) for p, m in replies) for k in global_set}


def per_label(args) -> dict:
    """Per-label accuracy of the final global model for each setting and seed, without Flower or Ray
    (the same `train_round` the ClientApp calls, and FedAvg's sample-weighted mean; with a mu, the
    clients add FedProx's proximal term as they do when Flower's FedProx sends it). A setting is
    'iid', a Dirichlet β ('0.1'), or 'β:mu' for FedProx ('0.1:0.01')."""
    import numpy as np

    from privdiff.data.analyzers import analyzer_for
    from privdiff.federated.fedavg import client_partition, initial_parameters, load_data, load_parameters
    from privdiff.federated.partition import dataset_labels
    from privdiff.models.loading import load_pipeline
    from privdiff.pipelines.evaluation import SamplingConfig, evaluation_items, generate

    sampling = SamplingConfig(num_inference_steps=30, guidance_scale=5.0)
    analyzer = analyzer_for(args.data)()
    items = evaluation_items(set_name=args.data, num=args.eval_num, seed=sampling.seed)
    wanted = np.array([item["label"] for item in items])

    def scored(pipeline) -> dict:
        images = generate(pipeline=pipeline, prompts=[item["caption"] for item in items], sampling=sampling)
        hits = np.array(analyzer.score(images=images, labels=wanted.tolist()).predictions) == wanted
        return {"accuracy": float(hits.mean()), "per_label": [float(hits[wanted == d].mean()) for d in range(10)]}

    base = load_pipeline(base="tiny")
    base.set_progress_bar_config(disable=True)
    results = {"base": scored(base), "settings": {}}
    for setting in args.settings:
        beta_text, _, mu_text = setting.partition(":")
        beta = None if beta_text == "iid" else float(beta_text)
        mu = float(mu_text) if mu_text else 0.0
        rows = []
        for seed in args.seeds:
            config = _digits_config(args, beta=beta, seed=seed, proximal_mu=mu)
            pipeline = load_pipeline(base="tiny")
            pipeline.set_progress_bar_config(disable=True)
            global_set = initial_parameters(config, pipeline)
            dataset = load_data(config, resolution=pipeline.unet.config.sample_size * pipeline.vae_scale_factor)
            partition = client_partition(config, dataset)
            labels = np.array(dataset_labels(dataset)[:config.num_items])
            for round_number in range(1, config.rounds + 1):
                global_set = _direct_round(config=config, round_number=round_number, global_set=global_set)
            load_parameters(pipeline, global_set)
            row = scored(pipeline)
            row.update(seed=seed, partition_sizes=partition.sizes,
                       client_label_counts=[np.bincount(labels[list(ix)], minlength=10).tolist()
                                            for ix in partition.indices])
            print(f"{setting} seed {seed}: accuracy {row['accuracy']:.3f}, per label "
                  f"{' '.join(f'{v:.2f}' for v in row['per_label'])}", flush=True)
            rows.append(row)
        accuracies = [r["accuracy"] for r in rows]
        results["settings"][setting] = {"runs": rows, "accuracy_mean": float(np.mean(accuracies)),
                                        "accuracy_std": float(np.std(accuracies)),
                                        "per_label_mean": np.mean([r["per_label"] for r in rows], axis=0).tolist()}
    return results


def non_iid(args) -> dict:
    """The same federated run at several β (digits split by label, fixed seeds): final held-out loss."""
    import warnings
    from pathlib import Path

    from privdiff.federated.apps import simulate
    from privdiff.federated.fedavg import client_partition, load_data
    from privdiff.federated.partition import dataset_labels, label_skew

    results = {}
    for beta in args.betas:
        config = _digits_config(args, beta=beta)
        dataset = load_data(config, resolution=64)
        partition = client_partition(config, dataset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = simulate(config=config, out=Path(args.out) / f"beta-{beta:g}")
        results[str(beta)] = {"heldout_loss": state["heldout_loss"], "partition_sizes": partition.sizes,
                              "label_skew": label_skew(labels=dataset_labels(dataset)[:args.num_items],
                                                       partition=partition)}
    return results


def non_iid_direct(args) -> dict:
    """The non-IID comparison without Flower or Ray: the same `train_round` the ClientApp calls and the
    same sample-weighted average, in one process, with the held-out loss per timestep after every round."""
    import numpy as np

    from privdiff.federated.fedavg import (HELDOUT_TIMESTEPS, client_partition, initial_parameters, load_data,
                                           load_parameters)
    from privdiff.models.loading import load_pipeline
    from privdiff.pipelines.membership import MembershipAuditConfig, diffusion_losses

    results = {}
    for beta in args.betas:
        config = _digits_config(args, beta=beta)
        pipeline = load_pipeline(base="tiny")
        global_set = initial_parameters(config, pipeline)
        dataset = load_data(config, resolution=pipeline.unet.config.sample_size * pipeline.vae_scale_factor)
        heldout = list(range(config.num_items, config.num_items + config.heldout_items))

        def per_timestep():
            return {t: float(diffusion_losses(pipeline=pipeline, dataset=dataset, indices=heldout,
                                              config=MembershipAuditConfig(timesteps=(t,), noise_draws=1)).mean())
                    for t in HELDOUT_TIMESTEPS}

        history = [per_timestep()]
        for round_number in range(1, config.rounds + 1):
            global_set = _direct_round(config=config, round_number=round_number, global_set=global_set)
            load_parameters(pipeline, global_set)
            history.append(per_timestep())
        results[str(beta)] = {"partition_sizes": client_partition(config, dataset).sizes,
                              "heldout_loss": [float(np.mean(list(h.values()))) for h in history],
                              "final_per_timestep": history[-1]}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["bytes", "digits", "non-iid", "non-iid-direct", "labels"])
    parser.add_argument("--data", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--settings", nargs="+", default=["iid", "0.1", "0.1:0.01"],
                        help="labels: 'iid', a Dirichlet β, or 'β:mu' (FedProx)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="labels: one run per seed")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 5.0], help="non-iid: the β to compare")
    parser.add_argument("--model", default="tiny", help="bytes: tiny or sd15")
    parser.add_argument("--num-clients", "--clients", type=int, default=3)
    parser.add_argument("--out", default="/tmp/privdiff-fed-digits")
    parser.add_argument("--num-items", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainable", default="attention")
    parser.add_argument("--local-epochs", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--learning-rate", "--lr", type=float, default=3e-3)
    parser.add_argument("--digit-words", action="store_true", help="train the token rows of '0'..'9' too")
    parser.add_argument("--eval-num", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.what == "bytes":
        result = bytes_per_round(model=args.model, num_clients=args.num_clients)
    else:
        result = {"digits": digits, "non-iid": non_iid, "non-iid-direct": non_iid_direct,
                  "labels": per_label}[args.what](args)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
