"""FedAvg under Flower's SecAgg+ (secure aggregation): the server learns only the sum of the clients'
(weighted) models, never one client's.

In Flower 1.41 SecAgg+ exists only in its legacy API (`SecAggPlusWorkflow` with a legacy strategy and
`secaggplus_mod` on a NumPyClient), so this module builds the same federation as `fedavg` in that API
(the privdiff-fed app turns to it when its run config has `secure-aggregation = 1`):
the same local training (`train_round`), checkpoints, resume and held-out loss. SecAgg+ quantises each
weighted value (stochastically, 2^22 levels over ±`clipping_range`), so its aggregate equals plain
FedAvg's up to that quantisation. With client-level DP on, clients clip (Flower's legacy clipping mod,
inside SecAgg+) and the server adds the noise to the unmasked aggregate (from the OS, see `client_dp`).
SecAgg+ tolerates dropouts: it unmasks the mean of the clients whose masked vectors arrived. Under
client-level DP such a round is refused (its noise is calibrated for every configured client), and a
round that SecAgg+ halts is refused in every mode, rather than saved as an unchanged model.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from .apps import ServerRun, train_round
from .fedavg import FederatedConfig, initial_parameters

SECAGG_CLIPPING_RANGE = 8.0  # Flower's default: |weight / max_weight · value| must stay below it
SECAGG_LEVELS = 2 ** 22  # Flower's default quantisation


def secagg_max_weight(config: FederatedConfig) -> float:
    """The largest weight a client can send (its example count; 1 under client-level DP): the
    tightest bound keeps weight / max_weight near 1, so quantisation costs least precision."""
    return 1.0 if config.client_dp else float(config.num_items)


def secagg_tolerance(config: FederatedConfig) -> float:
    """Largest difference SecAgg+'s quantisation can make to one aggregated value: each client's
    weighted value is rounded to a step of 2·range/levels, and divided back by its weight share."""
    step = 2 * SECAGG_CLIPPING_RANGE / SECAGG_LEVELS
    return config.num_clients * step * secagg_max_weight(config) / (config.num_clients if config.client_dp else
                                                                  config.num_items)


@functools.lru_cache(maxsize=4)
def _names(config: FederatedConfig) -> tuple[str, ...]:
    """The trainable set's names in the order the arrays travel (once per process and setting)."""
    from ..models.loading import load_pipeline

    return tuple(initial_parameters(config, load_pipeline(base=config.base)))


def secagg_client_app():
    import numpy as np
    import torch
    from flwr.client import NumPyClient
    from flwr.client.mod import fixedclipping_mod, secaggplus_mod
    from flwr.clientapp import ClientApp

    def clip_when_asked(message, context, call_next):
        if "clipping_norm" in message.content.config_records.get("fitins.config", {}):
            return fixedclipping_mod(message, context, call_next)
        return call_next(message, context)

    class Client(NumPyClient):
        def __init__(self, partition_id: int):
            self.partition_id = partition_id

        def fit(self, parameters, config):
            settings = FederatedConfig.from_run_config(config)
            names = _names(settings)
            initial = {name: torch.from_numpy(np.array(value)) for name, value in zip(names, parameters)}
            trained, metrics = train_round(config=settings, client=self.partition_id,
                                           round_number=int(config["server-round"]), initial=initial)
            weight = 1 if settings.client_dp else int(metrics["num-examples"])  # DP: equal weights
            return [trained[name].numpy() for name in names], weight, {}

    def client_fn(context):
        return Client(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod, clip_when_asked])


def secagg_strategy(*, config: FederatedConfig, initial: list, fit_config, evaluate, done: int = 0):
    """The SecAgg+ path's legacy strategy: Flower's FedAvg over every configured client, under client-level
    DP inside Flower's DP wrapper with privdiff's two changes (`client_dp.legacy_client_dp_strategy`: noise
    from the OS, a round short of a client refused). A round that ends with no aggregate (SecAgg+ halted:
    too few clients left to unmask; or no clients) is refused before `evaluate` could save the unchanged
    model as that round. `done`: rounds a resumed run had already done."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAvg

    class RoundCheckingFedAvg(FedAvg):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.aggregated: set[int] = set()

        def aggregate_fit(self, server_round, results, failures):
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            if parameters is not None:
                self.aggregated.add(server_round)
            return parameters, metrics

        def evaluate(self, server_round, parameters):
            # Flower's workflow evaluates after every round, aggregated or not (round 0: the start).
            if server_round > 0 and server_round not in self.aggregated:
                raise RuntimeError(f"round {server_round + done}: SecAgg+ produced no aggregate (a client dropped "
                                   "out or failed; Flower's log says which stage): the round is not released. "
                                   "Resume when every client is back.")
            return super().evaluate(server_round, parameters)

    strategy = RoundCheckingFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=config.num_clients,
                                   min_available_clients=config.num_clients, on_fit_config_fn=fit_config,
                                   evaluate_fn=evaluate, initial_parameters=ndarrays_to_parameters(initial))
    if not config.client_dp:
        return strategy
    from .client_dp import legacy_client_dp_strategy

    return legacy_client_dp_strategy(strategy, config=config, round_offset=done)


def secagg_workflow(config: FederatedConfig):
    """Flower's SecAgg+ workflow as privdiff runs it: every client shares with every other, n - 1 of them
    (at least 2) unmask a dropped one."""
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(num_shares=config.num_clients, reconstruction_threshold=max(2, config.num_clients - 1),
                              clipping_range=SECAGG_CLIPPING_RANGE, quantization_range=SECAGG_LEVELS,
                              max_weight=secagg_max_weight(config))


def run_secure_aggregation(*, grid, context, config: FederatedConfig, out: str | Path) -> None:
    """The ServerApp's work for a run with `secure-aggregation`: FedAvg through Flower's SecAgg+
    workflow, with the same checkpoints, resume and held-out loss as the plain app."""
    import torch
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow

    run = ServerRun(config=config, out=Path(out), label="privdiff fed, SecAgg+")
    done, names = run.done, list(run.parameters)
    if done >= config.rounds:
        return
    clock = {"started": time.perf_counter()}

    def fit_config(server_round: int) -> dict:
        clock["started"] = time.perf_counter()
        return {**config.to_run_config(), "server-round": server_round + done}

    def evaluate(server_round: int, arrays, _config):
        # After the unmasked aggregate (and the DP noise, when on). The server never sees a
        # client's own model, so there are no per-client reports.
        parameters = {name: torch.from_numpy(value.copy()).to(run.parameters[name].dtype)
                      for name, value in zip(names, arrays)}
        loss = run.finish_round(round_number=server_round + done, parameters=parameters,
                                wall_seconds=time.perf_counter() - clock["started"],
                                extra={"secure_aggregation": "SecAgg+ (Flower)"})
        return loss, {}

    strategy = secagg_strategy(config=config, initial=[run.start[n].numpy() for n in names], fit_config=fit_config,
                               evaluate=evaluate, done=done)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.rounds - done), strategy=strategy)
    DefaultWorkflow(fit_workflow=secagg_workflow(config))(grid, legacy)
