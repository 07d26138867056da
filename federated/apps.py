"""The Flower apps of federated diffusion: the ClientApp (one client's local training per round), the
ServerApp (FedAvg, or FedProx, with client-level DP or SecAgg+ when asked, the global model written
after every round; both take their settings from the run config) and `simulate`, which runs them in
Flower's simulation runtime through `flwr run` (see `simulation`). The settings, data, partitions,
records and state they share are in `fedavg`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from ..console import get_logger
from .fedavg import (BYPRODUCTS, FederatedConfig, _Subset, check_request, check_resumable, client_partition,
                     heldout_loss, initial_parameters, last_round, load_data, load_parameters, load_state,
                     plot_rounds, quiet_telemetry, round_record, save_round, write_state)


_LOADED_BASE: dict = {}


def _round_pipeline(base):
    """The base model for a round: loaded once per process (a client's process serves every round),
    then a fresh copy per round, since a round changes its trainable set in place."""
    import copy

    from ..models.loading import load_pipeline

    if base not in _LOADED_BASE:
        _LOADED_BASE.clear()  # one base per process
        _LOADED_BASE[base] = load_pipeline(base=base)
    return copy.deepcopy(_LOADED_BASE[base])


def train_round(*, config: FederatedConfig, client: int, round_number: int, initial: dict,
                proximal_mu: float | None = None) -> tuple[dict, dict]:
    """One client's local training in one round, from the global set `initial`: its trained set and
    what it reports (example count, steps, time; its loss only when no DP is on). `proximal_mu`:
    FedProx's mu from the server's message (default: `config.proximal_mu`)."""
    import torch

    from ..training.fine_tune import train_in_memory

    torch.set_num_threads(1)  # one core per client: the simulation runs clients side by side
    pipeline = _round_pipeline(config.base)
    dataset = load_data(config, resolution=pipeline.unet.config.sample_size * pipeline.vae_scale_factor)
    subset = _Subset(dataset, client_partition(config, dataset).indices[client])
    started = time.perf_counter()
    local = config.local_config(client=client, round_number=round_number, num_examples=len(subset),
                                proximal_mu=proximal_mu)
    result = train_in_memory(pipeline=pipeline, dataset=subset, config=local, initial=initial)
    # Under local DP, the ε reported is this client's total so far: its rounds compose.
    spent = config.local_plan(num_examples=len(subset)).epsilon(rounds=round_number, config=config)
    # partition-id orders the replies (never averaged: see `round_metrics`); dp-weight weighs every
    # client equally under client-level DP. local-epsilon only when there is local DP.
    metrics = {"num-examples": result.num_examples, "local-steps": result.steps, "partition-id": client,
               "local-seconds": time.perf_counter() - started, "dp-weight": 1.0}
    if spent is not None:
        metrics["local-epsilon"] = spent
    if config.local_epsilon is None and not config.client_dp and result.mean_loss is not None:
        # A loss on private data is outside any DP guarantee: it is reported only by non-private runs.
        metrics["train-loss"] = result.mean_loss
    return result.parameters, metrics


def client_app():
    """A Flower ClientApp: trains its partition from the round's global set, replies with its set
    and its example count (FedAvg's weight). A run whose config asks for secure aggregation is served
    by the SecAgg+ client of `secure` (Flower ships SecAgg+ in its legacy API only)."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    secure = []  # the SecAgg+ client, built on first use

    def plain(message: Message, context: Context) -> Message:
        import torch  # noqa: F401  (Flower's to_torch_state_dict needs torch imported first)

        config = FederatedConfig.from_run_config(context.run_config or message.content["config"])
        sent = message.content["config"]
        parameters, metrics = train_round(config=config, client=int(context.node_config["partition-id"]),
                                          round_number=int(sent["server-round"]),
                                          initial=message.content["arrays"].to_torch_state_dict(),
                                          proximal_mu=float(sent["proximal-mu"]) if "proximal-mu" in sent else 0.0)
        return Message(RecordDict({"arrays": ArrayRecord(parameters), "metrics": MetricRecord(metrics)}),
                       reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if context.run_config and FederatedConfig.from_run_config(context.run_config).secure_aggregation:
            if not secure:
                from .secure import secagg_client_app

                secure.append(secagg_client_app())
            return secure[0](message, context)
        return _clip_when_asked(message, context, plain)

    return app


def _clip_when_asked(message, context, call_next):
    """Flower's `fixedclipping_mod` when the server asked for clipping (client-level DP on), else nothing."""
    from flwr.clientapp.mod import fixedclipping_mod

    if "clipping_norm" in message.content["config"]:
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)


def _strategy_class(*, proximal: bool = False):
    """FedAvg, or Flower's FedProx (which sends "proximal-mu" to the clients) when `proximal`."""
    from flwr.serverapp.strategy import FedAvg, FedProx

    class CheckpointingFedAvg(FedProx if proximal else FedAvg):
        """FedAvg that counts rounds from where a resumed run left off and keeps each round's client
        reports and wall time for the checkpoint, which is written after the round's final model
        exists (after Flower's DP noise, when that is on)."""

        def __init__(self, *, round_offset: int, required_replies: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.round_offset, self.required_replies = round_offset, required_replies
            self.reports: dict[int, dict] = {}

        def configure_train(self, server_round, arrays, config, grid):
            self.round_started = time.perf_counter()
            return super().configure_train(server_round + self.round_offset, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            # In partition order, not arrival order: float sums then do not depend on which client
            # finished first, so a resumed run ends exactly where a straight one does.
            replies = sorted(replies, key=lambda r: r.content["metrics"]["partition-id"] if r.has_content() else -1)
            check_replies(replies, required=self.required_replies, round_number=server_round + self.round_offset)
            arrays, metrics = super().aggregate_train(server_round + self.round_offset, replies)
            self.reports[server_round + self.round_offset] = {
                "clients": [{k: float(v) for k, v in r.content["metrics"].items()} for r in replies if r.has_content()],
                "wall_seconds": time.perf_counter() - self.round_started}
            return arrays, metrics

    return CheckpointingFedAvg


def check_replies(replies, *, required: int, round_number: int) -> None:
    """Under client-level DP every client must reply. Flower's DP wrapper adds noise of sd z·C/n to the
    mean of the replies, n being the clients it was configured for, and averages whatever arrived: if a
    client's reply times out, the mean is over fewer, so the noise on their sum falls below z·C while
    the record still says z (found by the client-level canary audit). Such a round is refused
    (`client_dp.refuse_missing_clients`)."""
    from .client_dp import refuse_missing_clients

    refuse_missing_clients(replied=sum(1 for reply in replies if reply.has_content()), required=required,
                           round_number=round_number)


class ServerRun:
    """What every privdiff ServerApp does around Flower's strategy: load the base model and the held-out
    data, find where a resumed run starts, and after each round checkpoint the global set, measure
    its held-out loss and report progress."""

    def __init__(self, *, config: FederatedConfig, out: Path, label: str = "privdiff fed"):
        from safetensors.torch import load_file

        from ..models.loading import load_pipeline

        self.config, self.out, self.label = config, Path(out), label
        self.pipeline = load_pipeline(base=config.base)
        self.parameters = initial_parameters(config, self.pipeline)  # names, order and dtypes of the set
        self.dataset = load_data(config, resolution=self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor)
        self.partition_sizes = client_partition(config, self.dataset).sizes
        self.done = last_round(self.out)  # rounds a previous run completed
        if self.done:
            check_resumable(out=self.out, config=config)
            saved = load_file(str(self.out / f"global-round-{self.done}.safetensors"))
            # In the set's own order (safetensors sorts names): Flower's clipping mod pairs arrays by position.
            self.start = {name: saved[name] for name in self.parameters}
        else:
            self.start = self.parameters

    def finish_round(self, *, round_number: int, parameters: dict, clients: list[dict] | None = None,
                     wall_seconds: float | None = None, extra: dict | None = None) -> float:
        """Round 0 is the starting model (measured, not saved); later rounds are saved first, with
        their record; the held-out loss and the clients' reports go to the by-products."""
        config = self.config
        state = load_state(self.out)
        if round_number > 0:
            save_round(out=self.out, round_number=round_number, parameters=parameters,
                       record=round_record(config=config, rounds=round_number, partition_sizes=self.partition_sizes))
            state.setdefault("rounds", {})[str(round_number)] = {"clients": clients or [], "wall_seconds": wall_seconds}
        load_parameters(self.pipeline, parameters)
        loss = heldout_loss(pipeline=self.pipeline, dataset=self.dataset, config=config)
        state.setdefault("heldout_loss", {})[str(round_number)] = loss
        state.update(extra or {})
        state.pop("last_round", None)  # the files say it
        write_state(self.out, state)
        return loss


def server_app():
    """A Flower ServerApp running `rounds` rounds of FedAvg (FedProx with `proximal-mu`, client-level DP
    when asked, SecAgg+ with `secure-aggregation`), its settings and `out` from the run config,
    resuming from `out` if a previous run left rounds there; the held-out loss is measured after
    every round."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = FederatedConfig.from_run_config(context.run_config)
        out = Path(context.run_config["out"])
        if config.secure_aggregation:
            from .secure import run_secure_aggregation

            run_secure_aggregation(grid=grid, context=context, config=config, out=out)
            return
        run = ServerRun(config=config, out=out)
        done = run.done
        if done >= config.rounds:
            return
        inner, strategy = train_strategy(config=config, done=done)

        def evaluate(server_round: int, arrays: ArrayRecord):
            # Called after each round with its final global model (noised, under client-level DP).
            report = inner.reports.pop(server_round + done, {"clients": [], "wall_seconds": None})
            loss = run.finish_round(round_number=server_round + done, parameters=arrays.to_torch_state_dict(),
                                    clients=report["clients"], wall_seconds=report["wall_seconds"])
            return MetricRecord({"heldout-loss": loss})

        strategy.start(grid=grid, initial_arrays=ArrayRecord(run.start), num_rounds=config.rounds - done,
                       timeout=3600, train_config=ConfigRecord(config.to_run_config()), evaluate_fn=evaluate)

    return app


def train_strategy(*, config: FederatedConfig, done: int = 0):
    """The ServerApp's strategies: (inner, outer). The inner one is FedAvg (FedProx with
    `proximal-mu`) over every configured client, counting rounds from `done` and keeping each round's
    reports; the outer one is the inner one or, under client-level DP, Flower's DP wrapper around it
    with its noise drawn from the OS (`client_dp.client_dp_strategy`)."""
    extra = {"proximal_mu": config.proximal_mu} if config.proximal_mu else {}
    inner = _strategy_class(proximal=bool(config.proximal_mu))(
        round_offset=done, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=config.num_clients,
        min_available_nodes=config.num_clients, weighted_by_key="dp-weight" if config.client_dp else "num-examples",
        train_metrics_aggr_fn=round_metrics, required_replies=config.num_clients if config.client_dp else 0,
        **extra)
    if not config.client_dp:
        return inner, inner
    from .client_dp import client_dp_strategy

    return inner, client_dp_strategy(inner, config=config)


def round_metrics(records, weighting_key: str):
    """What a round's client reports mean together (for Flower's round summary): examples in all,
    the slowest client's seconds, the most local ε any client has spent, the mean training loss of a
    non-private run. Identifiers and weights (partition-id, dp-weight) are not averaged."""
    from flwr.app import MetricRecord

    reports = [next(iter(record.metric_records.values())) for record in records]
    summary = {"num-examples": sum(r["num-examples"] for r in reports),
               "local-seconds-max": max(r["local-seconds"] for r in reports)}
    spent = [r["local-epsilon"] for r in reports if "local-epsilon" in r]
    if spent:
        summary["local-epsilon-max"] = max(spent)
    losses = [(r["train-loss"], r["num-examples"]) for r in reports if "train-loss" in r]
    if losses:
        summary["train-loss"] = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    return MetricRecord(summary)


def simulate(*, config: FederatedConfig, out: str | Path, verbose: bool = False, keep_byproducts: bool = False,
             log=None) -> dict:
    """Run (or resume) a federated run in Flower's simulation runtime (`flwr run` against a simulation
    SuperLink started for it: one SuperNode per client, one CPU each). One line per finished round;
    Flower's own streamed log only with `verbose`. Returns the run state (held-out loss per round,
    clients' reports); those by-products (with their plot and Flower's log) stay in
    `out`/byproducts-not-covered-by-dp only with `keep_byproducts`."""
    import shutil

    from .simulation import APP, simulation_superlink

    quiet_telemetry()
    log = log or get_logger("federated").warning
    out = Path(out).resolve()  # the run's processes start elsewhere
    flower_log = out / BYPRODUCTS / "flower.log"
    # The SuperLink starts while the request is checked (it holds nothing of the run until `flwr run`).
    with simulation_superlink(num_clients=config.num_clients, verbose=verbose) as link:
        check_request(config)
        if last_round(out):
            check_resumable(out=out, config=config)
        warning = config.few_clients_warning()
        if warning:
            log(f"warning: {warning}")
        (out / BYPRODUCTS).mkdir(parents=True, exist_ok=True)
        reported = [last_round(out)]

        def report_rounds() -> bool:
            """Print each newly finished round (its held-out loss is in the state, written after its
            model); True once the last round is."""
            measured = [int(r) for r in load_state(out).get("heldout_loss", {})]
            done = min(last_round(out), max(measured, default=0))
            for round_number in range(reported[0] + 1, done + 1):
                get_logger("federated").info(round_line(config=config, out=out, round_number=round_number))
            reported[0] = max(reported[0], done)
            return done >= config.rounds

        code = link.run(app=APP, run_config={**config.to_run_config(), "out": str(out)},
                        log=flower_log, echo=functools.partial(_echo, verbose=verbose), finished=report_rounds)
    report_rounds()
    if code != 0 or last_round(out) < config.rounds:
        raise RuntimeError(f"the federated simulation stopped after round {last_round(out)} of {config.rounds} "
                           f"(flwr run exit code {code}); rerun the same command to resume. The end of Flower's "
                           f"log ({flower_log}, kept):\n{link.log_tail(flower_log)}")
    state = load_state(out)
    if keep_byproducts:
        plot_rounds(out=out, state=state)
    else:
        shutil.rmtree(out / BYPRODUCTS, ignore_errors=True)
    return state


def _echo(line: str, *, verbose: bool) -> None:
    """A line of Flower's streamed log: every one with `verbose`, otherwise only its errors."""
    if verbose:
        get_logger("flower").info(line)
    elif line.lstrip().startswith("ERROR"):
        get_logger("flower").error(line)


def round_line(*, config: FederatedConfig, out: Path, round_number: int) -> str:
    """The one console line of a finished round: its held-out loss and the client-level ε spent."""
    loss = load_state(out).get("heldout_loss", {}).get(str(round_number))
    eps = config.client_level_epsilon(rounds=round_number)
    return (f"[privdiff fed] round {round_number}/{config.rounds}"
            + (f": held-out loss {loss:.4f}" if loss is not None else "")
            + (f", client-level ε {eps:.3g}" if eps is not None else ""))
