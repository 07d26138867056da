"""Canary audit of client-level DP in federated diffusion: an empirical lower bound on ε from one run
of Flower's own clipping, aggregation and noise.

The mechanism audited is the one `federated.apps` configures when `client_noise_multiplier` is set:
each client's update is clipped on the client by Flower's `fixedclipping_mod`, and the server wraps
FedAvg (FedProx with `proximal_mu`), weighted equally by "dp-weight", in Flower's
`DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier=z, clipping_norm=C,
num_sampled_clients=num_clients)`, whose noise draw privdiff replaces (`federated.client_dp`). The
audit runs those objects, privdiff's wrapper included, not a re-implementation: the
strategy's own `start` loop (its `configure_train` puts C into every message, its `aggregate_train`
averages and adds the noise) over an in-process Flower `Grid` that hands each message to a Flower
`ClientApp` in this process and returns its reply `Message`. The real clients are privdiff's own
`client_app()` (`train_round` on the config's partition, clipped by `_clip_when_asked`, i.e.
`fixedclipping_mod`); with `real_clients="stand-in"` they are cheap stand-ins (below). The strategy
is built with the same arguments apps.py passes (a copy of those few lines: apps.py builds it inside
its ServerApp, which also loads the model, the held-out data and writes checkpoints).

m canary clients join the config's n clients, each canary included with probability 1/2 (the
secret S, `privacy.canary.canary_inclusion`). Canary i's update is `canary_norm`·C along its own unit
direction u_i (random weights on a random set of the trainable values; the sets are disjoint, so the
directions are orthonormal and no canary blurs another's score; each spreads over many arrays, so a
clipping done per array instead of on the whole update would show), far outside the clip ball, so a
correct client cuts it to C·u_i. An excluded canary still replies, with the nearly-zero update
1e-3·C·u_i: the number of replies N = n + m, FedAvg's denominator, is then the same public number in
both worlds, and the two worlds' sums differ by 0.999·C·u_i, within the sensitivity the recorded ε
is for (C under add-remove, 2C under replace-one). Exactly zero would be cleaner, but Flower's
clipping divides by the update's norm: a zero update raises ZeroDivisionError in
`clip_inputs_inplace`, the client's reply is an error, and the server skips the round.

How many clients the noise is calibrated for. Flower adds N(0, (z·C/num_sampled_clients)²) to every
value of the equal-weight mean of the N replies (`compute_stdv`; FedAvg divides by the sum of the
weights, N). privdiff sets num_sampled_clients = num_clients and every client takes part in every
round, so N = num_sampled_clients and N·(release - previous global) = Σ clipped updates + N(0, (z·C)²):
the Gaussian mechanism on the sum with sensitivity C and noise multiplier z, whatever N is. The
canaries are clients of the audited federation, so it is configured for N = n + m
(num_sampled_clients = min_train_nodes = n + m, as apps.py would for a federation of n + m clients),
and its ε is the one `FederatedConfig.client_level_epsilon` records for the n-client config: that ε
depends on z, the rounds and δ only (no sampling), and δ = min(1e-5, 0.1/clients) is 1e-5 for both
while n + m <= 10,000 (the audit uses the config's own δ for both). Had the canaries been left out of
num_sampled_clients, the noise on the sum would be (n + m)/n times too large and the audit vacuous.
The converse is the weak spot: when fewer clients reply than num_sampled_clients (a client that times
out; `dropouts` here), Flower only warns (its strict check is on only with its own accountant, which
privdiff does not pass) and the noise on the sum shrinks to z·C·N/num_sampled_clients, while the
record still claims z. This audit found that; privdiff's ServerApp now refuses such a round
(`federated.apps.check_replies`). The audit wraps Flower's bare FedAvg, without that refusal, so
`dropouts` still shows it.

Each round's noisy aggregate update (the new global model minus the previous one, read through the
strategy's `evaluate_fn`, where apps.py reads it too) is turned back into the noisy sum in units of C
(times N/C), projected on every u_i, and the projections add up over the rounds: with every client in
every round and the same noise each round this sum is the likelihood-ratio test. R rounds of the
Gaussian mechanism compose to exactly (√R/z)-GDP, so the default bound is "fdp" (sound here, as for
full-batch DP-SGD; see `privacy.canary`). The audit is an audit, not a guarantee; nothing of it is
released (`write_canary_audit` writes a record labelled as an audit).

The noise is drawn by privdiff's wrapper (`federated.client_dp.client_dp_strategy`, the one the
ServerApp runs: Flower's wrapper with its draw from numpy's global generator replaced), here from a
torch generator seeded from `seed`, so that the audit is repeatable; a release draws it from the OS.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..federated.fedavg import FederatedConfig
from ..privacy.canary import (
    BOUNDS,
    audit_scores,
    audit_streams,
    canary_inclusion,
    default_guesses,
    torch_generator,
)
from .canary_audit import CanaryAuditResult

MECHANISM = "dp-fedavg"
REAL_CLIENTS = ("trained", "stand-in")
EXCLUDED_SCALE = 1e-3  # an excluded canary's update, in units of C: not zero, which Flower's clipping cannot take
STAND_IN_VALUES_PER_CANARY = 8  # the stand-in set's size, per canary
_RUN_ID = 1
_FIRST_NODE = 100  # node ids of the in-process federation (Flower's SuperLink is node 1)


@dataclass(frozen=True)
class CanaryDirections:
    """m orthonormal directions in a flat vector of `dim` values: canary i has weights `weights[i]`
    (a unit vector) at the values `index[i]`, the sets disjoint."""

    index: np.ndarray  # [m, s] int64
    weights: np.ndarray  # [m, s] float64, rows of norm 1

    def project(self, flat: np.ndarray) -> np.ndarray:
        """<flat, u_i> for every canary (float64)."""
        return (flat[self.index] * self.weights).sum(axis=1)


def disjoint_directions(*, num_canaries: int, dim: int, generator: torch.Generator) -> CanaryDirections:
    """Unit directions on disjoint random sets of dim // m values each (so exactly orthonormal),
    with Gaussian weights: every canary reaches values all over the set, at no memory cost."""
    per = dim // num_canaries
    if per < 1:
        raise ValueError(f"the trainable set has {dim} values, fewer than num_canaries={num_canaries}: use at most "
                         f"{dim} canaries or a larger trainable set.")
    index = torch.randperm(dim, generator=generator)[:num_canaries * per].reshape(num_canaries, per)
    weights = torch.randn(num_canaries, per, generator=generator, dtype=torch.float64)
    weights /= weights.norm(dim=1, keepdim=True)
    return CanaryDirections(index=index.numpy(), weights=weights.numpy())


class _Layout:
    """Names, shapes and offsets of the arrays that travel, to move between them and one flat vector."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.names = list(arrays)
        sizes = [arrays[name].size for name in self.names]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.dim = int(self.offsets[-1])

    def flatten(self, record) -> np.ndarray:
        """An ArrayRecord's values in this order, as float64."""
        return np.concatenate([record[name].numpy().reshape(-1).astype(np.float64) for name in self.names])

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(array number, position inside it) of flat positions."""
        owner = np.searchsorted(self.offsets, index, side="right") - 1
        return owner, index - self.offsets[owner]


class _InProcessGrid:
    """A Flower Grid whose nodes are ClientApps in this process: `push_messages` hands each message to its
    node at once (in node order, so float sums do not depend on arrival order) and keeps the reply for
    `pull_messages`; `send_and_receive` is the two. A `silent` node never replies, as a client that timed
    out. Made a subclass of Flower's Grid on use."""

    def __init__(self, *, nodes: dict, silent: list[int]):
        self.nodes, self.silent = nodes, list(silent)
        self._run = None
        self._replies: dict[str, object] = {}  # message id -> the node's reply, until pulled
        self._pushed = 0

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        from flwr.app import Message

        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self):
        return [*self.nodes, *self.silent]

    def push_messages(self, messages):
        # Ids are this grid's own count: hashing each message (Flower's object id) would serialise every
        # copy of the model sent to ~1,000 canary clients.
        ids = []
        for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            self._pushed += 1
            ids.append(str(self._pushed))
            node = message.metadata.dst_node_id
            if node in self.nodes:
                app, context = self.nodes[node]
                self._replies[ids[-1]] = app(message, context)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _flower_grid(**kwargs):
    from flwr.serverapp import Grid

    return type("InProcessGrid", (_InProcessGrid, Grid), {})(**kwargs)


@contextlib.contextmanager
def _flower_process():
    """What Flower's runtime sets up in a ServerApp process (its task identity, which every Message
    it creates reads), and quieter Flower logs (a line per client otherwise); all restored afterwards."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved_identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    logger = logging.getLogger("flwr")
    saved_level = logger.level
    threads = torch.get_num_threads()
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, _RUN_ID, SUPERLINK_NODE_ID
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved_identity
        logger.setLevel(saved_level)
        torch.set_num_threads(threads)  # train_round sets one thread: a client process's setting, not ours


def _client_dp_strategy(*, config: FederatedConfig, num_clients: int, noise_stream: np.random.SeedSequence):
    """The ServerApp's DP wrapper (`client_dp_strategy`, noise seeded from `noise_stream`) around Flower's
    bare FedAvg for `num_clients` clients: without privdiff's refusal of missing replies, which `dropouts`
    shows the need for."""
    from flwr.serverapp.strategy import FedAvg, FedProx

    from ..federated.client_dp import client_dp_strategy

    extra = {"proximal_mu": config.proximal_mu} if config.proximal_mu else {}
    inner = (FedProx if config.proximal_mu else FedAvg)(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_clients, min_available_nodes=num_clients,
        weighted_by_key="dp-weight", **extra)
    return client_dp_strategy(inner, config=config, num_clients=num_clients,
                              audit_generator=torch_generator(stream=noise_stream))


def _reply(*, message, arrays: list[np.ndarray], names: list[str], metrics: dict):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    record = ArrayRecord({name: Array(value) for name, value in zip(names, arrays)})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=message)


def _clipped_client(train):
    """A Flower ClientApp whose train function is `train`, behind Flower's `fixedclipping_mod`."""
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import fixedclipping_mod

    app = ClientApp()
    app.train(mods=[fixedclipping_mod])(train)
    return app


def audit_client_level_dp(*, config: FederatedConfig, num_canaries: int = 1000, canary_norm: float = 10.0,
                          seed: int = 0, confidence: float = 0.99, real_clients: str = "trained", dropouts: int = 0,
                          bound: str | None = None) -> CanaryAuditResult:
    """One federated run of `config.rounds` rounds with m canary clients beside the config's clients;
    the ε lower bound from it, against the ε privdiff records for the config (`client_level_epsilon`).

    `real_clients`: "trained" runs privdiff's ClientApp (`train_round` on the config's model, data and
    partition, in this process) for the n = num_clients real clients, and the config's trainable set
    travels; "stand-in" replaces each real client's update by a random vector of norm 2·C (clipped by
    Flower like any update) and the trainable set by two small arrays of 8 values per canary: the
    canaries, Flower's clipping, averaging and noise are the same, and no model loads. Memory: the
    server holds every reply at once, 4·values·(n + m) bytes of arrays (5.2 GB resident measured for
    1,000 canaries on privdiff-tiny's attention set, 558,464 values; about 5 minutes per audit of 3
    rounds on a shared CPU core, against seconds with stand-ins). `canary_norm`: a canary's update in
    units of `client_clip_norm`. `dropouts`: clients the federation is configured for (counted in
    num_sampled_clients) whose replies never come, as when a client times out; 0 is what the record
    assumes. `seed` draws the canaries, their directions, the stand-ins and Flower's noise.
    `bound` (see `privacy.canary.audit_scores`) defaults to "fdp": rounds of the Gaussian mechanism
    on the sum compose to a Gaussian, so it is sound here.
    """
    check_audit_request(config=config, num_canaries=num_canaries, canary_norm=canary_norm, real_clients=real_clients,
                        dropouts=dropouts, bound=bound)
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    m, n, clip = num_canaries, config.num_clients, config.client_clip_norm
    replying = n + m
    configured = replying + dropouts
    delta = config.client_level_delta
    inclusion_stream, direction_stream, stand_in_stream, noise_stream = audit_streams(seed=seed, count=4)
    included = canary_inclusion(num_canaries=m, stream=inclusion_stream)
    stand_in = torch_generator(stream=stand_in_stream)
    if real_clients == "trained":
        from ..federated.fedavg import initial_parameters
        from ..models.loading import load_pipeline

        initial = {name: value.detach().cpu().contiguous()
                   for name, value in initial_parameters(config, load_pipeline(base=config.base)).items()}
    else:
        initial = {"stand_in.weight": 0.05 * torch.randn(m, STAND_IN_VALUES_PER_CANARY - 1, generator=stand_in),
                   "stand_in.bias": 0.05 * torch.randn(m, generator=stand_in)}
    layout = _Layout({name: value.numpy() for name, value in initial.items()})
    directions = disjoint_directions(num_canaries=m, dim=layout.dim, generator=torch_generator(stream=direction_stream))
    owner, position = layout.locate(directions.index)
    planted = np.where(included, canary_norm, EXCLUDED_SCALE)[:, None] * clip * directions.weights
    metric_keys: list[str] = []  # the real clients' report keys: Flower wants the same keys in every reply

    def canary_train(message, context):
        i = int(context.node_config["canary"])
        arrays = message.content["arrays"].to_numpy_ndarrays()  # fresh, writable copies
        for k in np.unique(owner[i]):  # canary i's update: planted[i] on its own values
            here = owner[i] == k
            arrays[k].reshape(-1)[position[i][here]] += planted[i][here].astype(arrays[k].dtype)
        return _reply(message=message, arrays=arrays, names=layout.names,
                      metrics={**dict.fromkeys(metric_keys, 0.0), "dp-weight": 1.0})

    def stand_in_train(message, context):
        arrays = message.content["arrays"].to_numpy_ndarrays()
        update = torch.randn(layout.dim, generator=stand_in, dtype=torch.float64)
        update = (update * (2 * clip / update.norm())).numpy()
        arrays = [a + update[layout.offsets[k]:layout.offsets[k + 1]].reshape(a.shape).astype(a.dtype)
                  for k, a in enumerate(arrays)]
        return _reply(message=message, arrays=arrays, names=layout.names,
                      metrics={"dp-weight": 1.0, "num-examples": 1.0})

    if real_clients == "trained":
        from ..federated.apps import client_app

        real_app = client_app()
    else:
        real_app = _clipped_client(stand_in_train)

    def real(message, context):
        reply = real_app(message, context)
        if not reply.has_error() and not metric_keys:
            metric_keys.extend(next(iter(reply.content.metric_records.values())).keys())
        return reply

    canary_app = _clipped_client(canary_train)
    run_config = config.to_run_config()
    nodes = {}
    for client in range(n):
        nodes[_FIRST_NODE + client] = (real, Context(run_id=_RUN_ID, node_id=_FIRST_NODE + client, state=RecordDict(),
                                                     node_config={"partition-id": client, "num-partitions": n},
                                                     run_config=run_config))
    for i in range(m):
        node = _FIRST_NODE + n + i
        nodes[node] = (canary_app, Context(run_id=_RUN_ID, node_id=node, node_config={"canary": i}, state=RecordDict(),
                                           run_config=run_config))
    grid = _flower_grid(nodes=nodes, silent=[_FIRST_NODE + replying + k for k in range(dropouts)])

    scores = np.zeros(m)
    previous = [layout.flatten(ArrayRecord(initial))]

    def evaluate(server_round, arrays):
        # Called with the starting model, then with each round's noisy global model.
        flat = layout.flatten(arrays)
        if server_round > 0:
            scores[:] += directions.project(flat - previous[0]) * (replying / clip)  # the noisy sum, in units of C
        previous[0] = flat
        return None

    strategy = _client_dp_strategy(config=config, num_clients=configured, noise_stream=noise_stream)
    with _flower_process():
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=config.rounds, timeout=3600,
                       train_config=ConfigRecord(run_config), evaluate_fn=evaluate)
    bound = bound or "fdp"
    audit = audit_scores(scores=scores, included=included, delta=delta, confidence=confidence,
                         guesses=default_guesses(m), recorded_epsilon=config.client_level_epsilon(),
                         mechanism=MECHANISM, bound=bound)
    import flwr

    settings = {"method": MECHANISM, "rounds": config.rounds, "num_clients": n, "num_canaries": m,
                "num_sampled_clients": configured, "replies_per_round": replying, "dropouts": dropouts,
                "noise_multiplier": config.client_noise_multiplier, "clip_norm": clip, "canary_norm": canary_norm,
                "excluded_canary_norm": EXCLUDED_SCALE, "delta": delta, "adjacency": config.adjacency,
                "real_clients": real_clients, "values": layout.dim,
                "trainable": config.trainable if real_clients == "trained" else "stand-in", "base": config.base,
                "seed": seed, "score": "sum", "flower": flwr.__version__,
                "flower_path": "Strategy.start of privdiff's DifferentialPrivacyClientSideFixedClipping(FedAvg) "
                               "(client_dp_strategy, seeded noise) over an in-process Grid; clients are "
                               "ClientApps behind fixedclipping_mod"}
    return CanaryAuditResult(audit=audit, settings=settings, scores=scores.copy(), included=included)


def check_audit_request(*, config: FederatedConfig, num_canaries: int, canary_norm: float, real_clients: str,
                        dropouts: int, bound: str | None) -> None:
    """Everything about an audit request that can be checked before anything runs."""
    if not config.client_dp:
        raise ValueError("the canary audit measures client-level DP: give the config a client_noise_multiplier "
                         "(e.g. 1.0); a run without it has no client-level ε to audit.")
    if config.secure_aggregation:
        raise ValueError("secure_aggregation runs Flower's legacy SecAgg+ workflow, which this audit does not drive; "
                         "audit with secure_aggregation=False (the same clipping norm and noise multiplier).")
    if real_clients not in REAL_CLIENTS:
        raise ValueError(f"real_clients={real_clients!r} must be one of {', '.join(REAL_CLIENTS)}.")
    if not canary_norm > 1:
        raise ValueError(f"canary_norm={canary_norm} must exceed 1 (a multiple of client_clip_norm) so that clipping "
                         "matters; e.g. 10.")
    if num_canaries < 32:
        raise ValueError(f"num_canaries={num_canaries} is too few for an audit; use at least 32 (1,000 or more for "
                         "a useful bound).")
    if isinstance(dropouts, bool) or not isinstance(dropouts, int) or dropouts < 0:
        raise ValueError(f"dropouts={dropouts!r} must be a whole number >= 0 (clients that never reply).")
    if bound is not None and bound not in BOUNDS:
        raise ValueError(f"bound={bound!r} must be one of {', '.join(BOUNDS)}, or None for 'fdp'.")
    delta = config.client_level_delta
    if 2 * num_canaries * delta > 1:
        raise ValueError(f"client-level delta={delta} with {num_canaries} canaries: the audit needs 2·m·δ <= 1; "
                         f"use at most {math.floor(0.5 / delta)} canaries or a smaller client_delta.")


def client_dp_config(*, epsilon: float, delta: float = 1e-5, rounds: int = 3, num_clients: int = 3,
                     client_clip_norm: float = 0.1, base: str = "tiny", data: str = "digits", seed: int = 0,
                     **settings) -> FederatedConfig:
    """A federation whose recorded client-level ε is `epsilon` at `delta`: the noise multiplier z is
    calibrated over `rounds` rounds of every client (16 items each unless `settings` say otherwise)."""
    import dataclasses

    from ..privacy.accounting import calibrate_noise_multiplier

    plain = FederatedConfig(**{"num_items": 16 * num_clients, "heldout_items": 1, "batch_size": 8,
                               "learning_rate": 1e-3, **settings}, base=base, data=data, num_clients=num_clients,
                            rounds=rounds, client_clip_norm=client_clip_norm, client_delta=delta, seed=seed)
    z = calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=rounds,
                                   accountant=plain.accountant, adjacency=plain.adjacency)
    return dataclasses.replace(plain, client_noise_multiplier=z)
