"""Federated diffusion on Flower (arXiv 2311.16538): FedAvg of a diffusion model's trainable set.

This module holds what the apps (`apps`: ClientApp, ServerApp, `simulate`) share: the settings,
the data and its partition, the trainable set's values, the round records and the run's state.

Flower does the federated parts: the ServerApp and ClientApp (Message API), `FedAvg` weighted by each
client's example count, the simulation runtime (`simulation`) and the deployment runtime. privdiff supplies the model,
the data and the local trainer ([3/7]'s `train_in_memory`: plain AdamW, or DP-SGD per client when
`local_epsilon` is set). Only the trainable set travels (`attention`, `lora`, `full`, ...). The server
writes the global set after every round as `global-round-<r>.safetensors`, each carrying the privacy
record of the run so far (composed over its rounds), and a run resumes from its last round. What the
server computes on private items (held-out losses, client reports, the loss plot) is a by-product in
`byproducts-not-covered-by-dp/`, deleted at the end unless kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..training.outputs import BYPRODUCTS
from ..vocabulary import current_names

#: Flower, Ray and Hugging Face phone home unless told not to; privdiff runs offline by default.
QUIET_ENVIRONMENT = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
                     "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
                     "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
HELDOUT_TIMESTEPS = (50, 200, 400, 600, 800)
# Below this many clients, client-level DP cannot both mean something and let the average learn.
FEW_CLIENTS_FOR_CLIENT_DP = 100


def quiet_telemetry() -> None:
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class FederatedConfig:
    base: str = "tiny"
    data: str = "digits"
    num_items: int = 600  # examples shared among the clients
    heldout_items: int = 100  # the set's next items: the held-out loss after every round
    num_clients: int = 3
    rounds: int = 3
    beta: float | None = None  # Dirichlet(β) non-IID split by label; None: IID
    seed: int = 0
    trainable: str = "attention"
    lora_rank: int = 4
    local_epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 1e-4
    # Local DP-SGD on every client: each client's TOTAL ε over the whole run (its σ is calibrated over
    # rounds × its local steps; the rounds compose). None: off.
    local_epsilon: float | None = None
    local_clip_norm: float = 0.01
    # Token rows of these public words train and travel too (DP-LDM's conditioning embedder), e.g.
    # "0".."9" for digits, which privdiff-tiny's text encoder never learnt to tell apart.
    conditioning_words: tuple[str, ...] = ()
    # Client-level DP from Flower (DifferentialPrivacyClientSideFixedClipping): each client's update is
    # clipped to this L2 norm on the client, the server adds N(0, (z·C/m)²) to the equal-weight mean of
    # the m updates. None: off.
    client_noise_multiplier: float | None = None
    client_clip_norm: float = 0.1
    client_delta: float | None = None  # default min(1e-5, 0.1 / clients): well below 1 / clients
    secure_aggregation: bool = False  # Flower's SecAgg+: the server sees only the clients' sum
    # FedProx (Flower's strategy): the server sends mu as "proximal-mu"; each client adds
    # (mu/2)·||w - w_global||² to its local objective, which keeps non-IID clients near the global model.
    proximal_mu: float = 0.0
    # Neighbouring datasets of every guarantee: one unit (example; client, for client-level DP) added
    # or removed, or replaced by another.
    adjacency: str = "add-remove"

    def __post_init__(self) -> None:
        from ..training.fine_tune import check_proximal_mu
        from ..training.trainable import TRAINABLE_SETS
        from .partition import check_partition_request

        check_partition_request(num_examples=self.num_items, num_clients=self.num_clients, beta=self.beta)
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds} must be at least 1.")
        check_proximal_mu(self.proximal_mu)
        if self.proximal_mu and self.secure_aggregation:
            raise ValueError("proximal_mu (FedProx) with secure_aggregation is not supported yet: the SecAgg+ path "
                             "runs Flower's legacy FedAvg; drop one of them.")
        if self.secure_aggregation and self.num_clients < 3:
            raise ValueError(f"secure_aggregation needs at least 3 clients, not num_clients={self.num_clients}: "
                             "Flower's SecAgg+ shares each client's secret among more than 2; add clients or "
                             "drop secure_aggregation.")
        if self.trainable not in TRAINABLE_SETS:
            raise ValueError(f"trainable={self.trainable!r} is not a parameter set privdiff knows; choose one of "
                             f"{', '.join(TRAINABLE_SETS)}.")
        if self.heldout_items < 1:
            raise ValueError(f"heldout_items={self.heldout_items} must be at least 1.")
        if self.client_noise_multiplier is not None and not self.client_noise_multiplier > 0:
            raise ValueError(f"client_noise_multiplier={self.client_noise_multiplier} must be positive.")
        if not self.client_clip_norm > 0:
            raise ValueError(f"client_clip_norm={self.client_clip_norm} must be positive.")
        if self.client_delta is not None and not 0 < self.client_delta < 1 / self.num_clients:
            raise ValueError(f"client_delta={self.client_delta} must lie in (0, 1/clients) = (0, "
                             f"{1 / self.num_clients:.3g}), and well below it: e.g. 1e-5.")
        if self.local_epsilon is not None and not self.local_epsilon > 0:
            raise ValueError(f"local_epsilon={self.local_epsilon} must be positive: each client's total ε over "
                             "the run.")
        from ..privacy.accounting import check_adjacency

        check_adjacency(self.adjacency)

    @property
    def client_dp(self) -> bool:
        return self.client_noise_multiplier is not None

    @property
    def client_level_delta(self) -> float:
        return self.client_delta if self.client_delta is not None else min(1e-5, 0.1 / self.num_clients)

    @property
    def accountant(self) -> str:
        from ..privacy.accounting import default_accountant

        return default_accountant(self.adjacency)

    def client_level_epsilon(self, *, rounds: int | None = None) -> float | None:
        """ε of client-level DP after `rounds` rounds (default: all): every client takes part in every
        round, so each round is one Gaussian mechanism of noise multiplier z on the clipped mean, and
        rounds compose (no amplification by sampling is claimed)."""
        from ..privacy.accounting import epsilon

        if not self.client_dp:
            return None
        return epsilon(noise_multiplier=self.client_noise_multiplier, sample_rate=1.0,
                       steps=self.rounds if rounds is None else rounds, delta=self.client_level_delta,
                       accountant=self.accountant, adjacency=self.adjacency)

    def few_clients_warning(self) -> str | None:
        """A plain warning when client-level DP is on over too few clients to mean anything."""
        if not self.client_dp or self.num_clients >= FEW_CLIENTS_FOR_CLIENT_DP:
            return None
        return (f"client-level DP over {self.num_clients} clients hides each client among only {self.num_clients}: "
                "noise that makes ε meaningful (z of 1 or more) has a norm of z·C·√(values)/clients, far above the "
                f"average of the updates (at most C), so with fewer than {FEW_CLIENTS_FOR_CLIENT_DP} clients expect "
                "either a large ε or no learning; to protect each client's examples instead, use local DP-SGD "
                "(local_epsilon).")

    def local_plan(self, *, num_examples: int) -> "LocalPlan":
        """One client's local DP-SGD over the whole run: its batch, rate, steps per round and the σ
        that keeps its ε over all rounds at `local_epsilon` (None when local DP is off)."""
        import math

        batch = min(self.batch_size, num_examples)
        steps = max(1, math.ceil(self.local_epochs * num_examples / batch))
        sigma = None
        if self.local_epsilon is not None:
            from ..privacy.accounting import calibrate_noise_multiplier

            sigma = calibrate_noise_multiplier(target_epsilon=self.local_epsilon, delta=self.local_delta(num_examples),
                                               sample_rate=batch / num_examples, steps=steps * self.rounds,
                                               accountant=self.accountant, adjacency=self.adjacency)
        return LocalPlan(batch_size=batch, sample_rate=batch / num_examples, steps_per_round=steps,
                         noise_multiplier=sigma, num_examples=num_examples)

    @staticmethod
    def local_delta(num_examples: int) -> float:
        return 1.0 / (10 * num_examples)

    def local_config(self, *, client: int, round_number: int, num_examples: int, proximal_mu: float | None = None):
        """The DP-LDM trainer's settings for one client's local training in one round: under local DP,
        the σ of `local_plan` (calibrated over every round), so the rounds add up to `local_epsilon`.
        `proximal_mu`: FedProx's mu as the server sent it (default: this config's)."""
        from ..training.fine_tune import DPLDMConfig

        plan = self.local_plan(num_examples=num_examples)
        return DPLDMConfig(trainable=self.trainable, lora_rank=self.lora_rank, epsilon=self.local_epsilon,
                           noise_multiplier=plan.noise_multiplier, delta=self.local_delta(num_examples),
                           conditioning_words=tuple(self.conditioning_words), adjacency=self.adjacency,
                           clip_norm=self.local_clip_norm, epochs=self.local_epochs,
                           batch_size=plan.batch_size, learning_rate=self.learning_rate,
                           proximal_mu=self.proximal_mu if proximal_mu is None else float(proximal_mu),
                           seed=self.seed + 1000 * round_number + client)

    def to_run_config(self) -> dict:
        """Flower run config (flat scalars; None written as the empty string / -1)."""
        values = asdict(self)
        values["beta"] = -1.0 if self.beta is None else float(self.beta)
        values["local_epsilon"] = -1.0 if self.local_epsilon is None else float(self.local_epsilon)
        values["conditioning_words"] = " ".join(self.conditioning_words)
        values["client_noise_multiplier"] = (-1.0 if self.client_noise_multiplier is None
                                             else float(self.client_noise_multiplier))
        values["client_delta"] = -1.0 if self.client_delta is None else float(self.client_delta)
        values["secure_aggregation"] = int(self.secure_aggregation)
        return {key.replace("_", "-"): value for key, value in values.items()}

    def to_json(self) -> dict:
        """The settings as JSON values (what records and resume checks compare)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_file(cls, path) -> "FederatedConfig":
        """The settings a run wrote to its config.json (or any JSON of the same fields)."""
        values = current_names(json.loads(Path(path).read_text()), known=cls.__dataclass_fields__, where=str(path))
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown federated settings {unknown}; known: {sorted(cls.__dataclass_fields__)}.")
        if "conditioning_words" in values:
            values["conditioning_words"] = tuple(values["conditioning_words"])
        return cls(**values)

    @classmethod
    def from_run_config(cls, run_config) -> "FederatedConfig":
        values = current_names(dict(run_config), known=cls.__dataclass_fields__, where="Flower run config")
        values = {key.replace("-", "_"): value for key, value in values.items()
                  if key.replace("-", "_") in cls.__dataclass_fields__}
        for key in ("beta", "local_epsilon", "client_noise_multiplier", "client_delta"):
            if key in values and float(values[key]) < 0:
                values[key] = None
        if "secure_aggregation" in values:
            values["secure_aggregation"] = str(values["secure_aggregation"]).lower() in ("1", "true", "1.0")
        for key in ("num_items", "heldout_items", "num_clients", "rounds", "seed", "lora_rank", "batch_size"):
            if key in values:
                values[key] = int(values[key])
        if "conditioning_words" in values:
            values["conditioning_words"] = tuple(str(values["conditioning_words"]).split())
        return cls(**values)


@dataclass(frozen=True)
class LocalPlan:
    batch_size: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float | None  # None: no local DP
    num_examples: int

    def epsilon(self, *, rounds: int, config: "FederatedConfig") -> float | None:
        """This client's local ε after `rounds` rounds (its DP-SGD steps compose across rounds)."""
        from ..privacy.accounting import epsilon

        if self.noise_multiplier is None:
            return None
        return epsilon(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                       steps=self.steps_per_round * rounds, delta=config.local_delta(self.num_examples),
                       accountant=config.accountant, adjacency=config.adjacency)


class _Subset:
    """The items of a dataset a client holds (its partition), with the same item interface."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def subjects(self):
        subjects = self.dataset.subjects()
        return [subjects[i] for i in self.indices]


def load_data(config: FederatedConfig, *, resolution: int):
    """The whole set: the clients' `num_items` examples followed by `heldout_items` held-out ones."""
    from ..data import load_dataset

    return load_dataset(data=config.data, resolution=resolution, seed=config.seed,
                        num_items=config.num_items + config.heldout_items)


def client_partition(config: FederatedConfig, dataset):
    from .partition import dataset_labels, dirichlet_partition

    labels = dataset_labels(dataset)[:config.num_items]
    return dirichlet_partition(labels=labels, num_clients=config.num_clients, beta=config.beta, seed=config.seed)


def initial_parameters(config: FederatedConfig, pipeline) -> dict:
    """The base model's trainable set (adapters added for `lora`): round 0's global model."""
    from ..training.diffusion import attach_conditioning_rows, trained_parameters
    from ..training.trainable import select_trainable

    select_trainable(unet=pipeline.unet, trainable=config.trainable, lora_rank=config.lora_rank)
    pipeline.text_encoder.requires_grad_(False)
    if config.conditioning_words:
        attach_conditioning_rows(pipeline=pipeline, words=config.conditioning_words)
    return trained_parameters(pipeline=pipeline)


def check_request(config: FederatedConfig) -> dict:
    """Everything that can be checked before any Flower process starts: the model loads, has the
    trainable set, the data exists and splits into non-empty partitions. Returns a summary."""
    from ..models.loading import load_pipeline

    pipeline = load_pipeline(base=config.base)
    parameters = initial_parameters(config, pipeline)  # raises if the model lacks the set
    dataset = load_data(config, resolution=pipeline.unet.config.sample_size * pipeline.vae_scale_factor)
    partition = client_partition(config, dataset)
    return {"parameters": len(parameters), "values": sum(v.numel() for v in parameters.values()),
            "partition_sizes": partition.sizes}


def heldout_loss(*, pipeline, dataset, config: FederatedConfig) -> float:
    """Mean denoising loss on the held-out items under fixed timesteps and noise (comparable across rounds)."""
    from ..training.diffusion import diffusion_losses

    indices = list(range(config.num_items, config.num_items + config.heldout_items))
    losses = diffusion_losses(pipeline=pipeline, dataset=dataset, indices=indices, timesteps=HELDOUT_TIMESTEPS,
                              noise_draws=1)
    return float(losses.mean())


def load_parameters(pipeline, parameters: dict) -> None:
    import torch

    from ..training.diffusion import training_modules

    current = dict(training_modules(pipeline).named_parameters())
    with torch.no_grad():
        for name, value in parameters.items():
            current[name].copy_(value)


def round_record(*, config: FederatedConfig, rounds: int, partition_sizes):
    """The privacy record of the global model after `rounds` rounds, composed over them: client-level
    DP (Flower's clipping and noise) when on, with the clients' local DP-SGD beside it; else local
    DP-SGD alone (the record of the client whose examples spent the most ε); else none."""
    from ..privacy.record import PrivacyRecord, record_for_dp_fedavg, record_for_dp_sgd

    extra = {"federated": {"config": config.to_json(), "rounds": rounds}}
    local = None
    if config.local_epsilon is not None:
        plans = [config.local_plan(num_examples=n) for n in partition_sizes]
        worst = max(plans, key=lambda plan: plan.epsilon(rounds=rounds, config=config))
        local = record_for_dp_sgd(history=[(worst.noise_multiplier, worst.sample_rate, worst.steps_per_round * rounds)],
                                  clip=config.local_clip_norm, num_examples=worst.num_examples,
                                  delta=config.local_delta(worst.num_examples), accountant=config.accountant,
                                  adjacency=config.adjacency, extra={
                                      **extra, "clients": [{"examples": p.num_examples, "sigma": p.noise_multiplier,
                                                            "sample_rate": p.sample_rate,
                                                            "steps": p.steps_per_round * rounds} for p in plans],
                                      "note": "each client's examples, at its own ε (all within local_epsilon); "
                                              "this record is the client whose ε is largest"})
    if config.client_dp:
        if local is not None:
            extra["local_dp_sgd"] = local.to_dict()
        warning = config.few_clients_warning()
        if warning:
            extra["warning"] = warning
        return record_for_dp_fedavg(history=[(config.client_noise_multiplier, 1.0, rounds)],
                                    clip=config.client_clip_norm, num_clients=config.num_clients,
                                    delta=config.client_level_delta, accountant=config.accountant,
                                    adjacency=config.adjacency, extra=extra)
    if local is not None:
        return local
    return PrivacyRecord(mechanism="none", extra={**extra, "warning": "no DP: the global model is a plain FedAvg of "
                                                                      "the clients' models"})


def save_round(*, out: Path, round_number: int, parameters: dict, record) -> Path:
    """The global set after `round_number`, with its record (one file, written atomically)."""
    from ..privacy.record import write_safetensors

    return write_safetensors(path=Path(out) / f"global-round-{round_number}.safetensors",
                             tensors={k: v.contiguous() for k, v in parameters.items()}, record=record)


def last_round(out: Path) -> int:
    """The last round a run in `out` finished: its newest global-round file (written last, atomically)."""
    import re

    rounds = [int(m.group(1)) for p in Path(out).glob("global-round-*.safetensors")
              if (m := re.fullmatch(r"global-round-(\d+)\.safetensors", p.name))]
    return max(rounds, default=0)


def write_state(out: Path, state: dict) -> None:
    from ..privacy.record import atomic_target

    path = Path(out) / BYPRODUCTS / "state.json"
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps({**state, "note": "computed on private data (held-out items, client reports): "
                                                    "NOT covered by any DP guarantee; do not share"}, indent=1))


def load_state(out: Path) -> dict:
    """The server's by-products so far (held-out losses, client reports), with `last_round` from the files."""
    path = Path(out) / BYPRODUCTS / "state.json"
    state = json.loads(path.read_text()) if path.is_file() else {"rounds": {}}
    state["last_round"] = last_round(out)
    return state


def check_resumable(*, out: Path, config: FederatedConfig) -> None:
    """A resumed federation must be the one whose rounds are in `out`: the settings its last release
    records, all but the number of rounds; under local DP not even that (each client's σ was
    calibrated for the whole run's rounds)."""
    from ..privacy.record import read_record

    done = last_round(out)
    saved = read_record(Path(out) / f"global-round-{done}.safetensors").extra.get("federated", {}).get("config")
    if saved is not None:  # releases made before the names changed
        saved = current_names(saved, known=FederatedConfig.__dataclass_fields__, where="", notice=False)
    wanted = config.to_json()
    keep = {"rounds"} if config.local_epsilon is None else set()
    changed = sorted(k for k in wanted if k not in keep and (saved or {}).get(k) != wanted[k])
    if saved is None or changed:
        raise ValueError(f"resume: the federated run in {out} was made with other settings ({', '.join(changed) or 'unknown'}); "
                         "use them again" + ("" if config.local_epsilon is None else " (under local DP the number of "
                                             "rounds too: each client's σ is calibrated for all of them)")
                         + ", or start afresh in another folder.")


def loss_chart(state: dict):
    """The global model's held-out loss after each round (round 0: the base), as an image array;
    labelled as outside the guarantee (it is computed on private items)."""
    from ..data.images import line_chart

    losses = state.get("heldout_loss", {})
    if not losses:
        return None
    series = [losses[str(r)] for r in range(max(int(r) for r in losses) + 1) if str(r) in losses]
    return line_chart({"held-out loss": series}, title="federated diffusion: global model per round", x_label="round",
                      note="computed on private items: NOT covered by the DP guarantee")


def plot_rounds(*, out: Path, state: dict) -> Path | None:
    """`byproducts-not-covered-by-dp/loss-per-round.png`, from `loss_chart`."""
    from ..data.images import save_png

    chart = loss_chart(state)
    return None if chart is None else save_png(chart, Path(out) / BYPRODUCTS / "loss-per-round.png")


def config_from_release(out: Path) -> FederatedConfig:
    """The settings of the federated run in `out`, from its last global model's record."""
    from ..privacy.record import read_record

    done = last_round(out)
    if not done:
        raise FileNotFoundError(f"{out} holds no global-round file: no federated run finished a round there.")
    saved = read_record(Path(out) / f"global-round-{done}.safetensors").extra["federated"]["config"]
    saved["conditioning_words"] = tuple(saved.get("conditioning_words", ()))
    return FederatedConfig(**saved)
