"""Client-level DP as the privdiff ServerApp runs it: Flower's fixed-clipping wrappers (clients clip
their update to C, the server averages and adds N(0, (z·C/n)²)), with two changes.

The noise comes from a generator seeded from the OS for every draw. Flower's wrappers draw it from
numpy's global generator (`np.random.normal` in `flwr/supercore/differential_privacy.py`,
`add_gaussian_noise_inplace`), which anything in the server's process may seed: diffusers' or
transformers' `set_seed`, a seed a person types. Whoever knows that seed replays the draws, subtracts
them from the released model and has the clients' clipped mean exactly (`tests/adversary/
test_client_dp_noise_seed.py`). Only the noise draw is replaced; Flower's wrapper still validates the
replies, and Flower's FedAvg still aggregates them.

A round short of a client is refused: the noise is calibrated for all n configured clients, so a mean
of fewer would leak more than the record says.
"""

from __future__ import annotations

from .fedavg import FederatedConfig


def add_private_noise(arrays, *, std: float, generator=None) -> None:
    """Flower's `add_gaussian_noise_inplace` (N(0, std²) added to every value, in place), drawn from a
    torch generator seeded from the OS: no seed set in this process, numpy's or torch's, replays it.
    `generator`: a seeded one instead, for an audit's repeatable runs only (never a release)."""
    import torch

    from ..privacy.dp_sgd import secure_generator

    generator = secure_generator() if generator is None else generator
    for array in arrays:
        noise = torch.randn(tuple(array.shape), generator=generator, dtype=torch.float64).mul_(std)
        array += noise.numpy().astype(array.dtype)


def refuse_missing_clients(*, replied: int, required: int, round_number: int) -> None:
    """Under client-level DP every configured client must be in the round's mean: Flower's wrappers add
    noise of sd z·C/n (n configured) to the mean of whatever arrived, so with fewer the noise on their
    sum falls below z·C while the record still says z. Such a round is refused."""
    if required and replied < required:
        raise RuntimeError(f"round {round_number}: {replied} of {required} clients replied. Under client-level DP "
                           "the noise is calibrated for all of them, so a mean of fewer would leak more than the "
                           "record says: the round is not released. Resume when every client is back.")


def client_dp_strategy(strategy, *, config: FederatedConfig, num_clients: int | None = None, audit_generator=None):
    """Flower's `DifferentialPrivacyClientSideFixedClipping` (Message API) around `strategy`, for the
    plain ServerApp, drawing its noise with `add_private_noise`. `num_clients`: the clients each round's
    noise is calibrated for (default `config.num_clients`); `audit_generator`: a seeded torch.Generator
    for the canary audit's repeatable noise (`pipelines.federated_canary`), never for a release."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
    from flwr.supercore.differential_privacy import compute_stdv

    if not callable(getattr(DifferentialPrivacyClientSideFixedClipping, "_add_noise_to_aggregated_arrays", None)):
        raise RuntimeError("this Flower's DifferentialPrivacyClientSideFixedClipping has no "
                           "_add_noise_to_aggregated_arrays, where privdiff draws the noise from the OS: install "
                           "the Flower privdiff supports (pip install 'privdiff[federated]').")

    class OsNoiseClientSideFixedClipping(DifferentialPrivacyClientSideFixedClipping):
        def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
            arrays = aggregated_arrays.to_numpy_ndarrays()
            add_private_noise(arrays, std=compute_stdv(self.noise_multiplier, self.clipping_norm,
                                                       self.num_sampled_clients), generator=audit_generator)
            return ArrayRecord({name: Array(np.asarray(value))
                                for name, value in zip(aggregated_arrays.keys(), arrays, strict=True)})

    return OsNoiseClientSideFixedClipping(strategy, noise_multiplier=config.client_noise_multiplier,
                                          clipping_norm=config.client_clip_norm,
                                          num_sampled_clients=num_clients or config.num_clients)


def legacy_client_dp_strategy(strategy, *, config: FederatedConfig, round_offset: int = 0):
    """Flower's legacy `DifferentialPrivacyClientSideFixedClipping` around the legacy `strategy`, for the
    SecAgg+ path (`SecAggPlusWorkflow` hands it the unmasked mean of the clients whose masked vectors
    arrived): a round short of a client, or with a client's failure, is refused rather than noised for
    n (Flower's wrapper only warns on the first and returns nothing on the second); the noise is drawn
    with `add_private_noise`. `round_offset`: rounds a resumed run had already done (for messages)."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
    from flwr.supercore.differential_privacy import compute_stdv

    class OsNoiseLegacyClientSideFixedClipping(DifferentialPrivacyClientSideFixedClipping):
        def aggregate_fit(self, server_round, results, failures):
            round_number = server_round + round_offset
            refuse_missing_clients(replied=len(results), required=self.num_sampled_clients,
                                   round_number=round_number)
            if failures:
                raise RuntimeError(f"round {round_number}: {len(failures)} error(s) from clients during SecAgg+. "
                                   "Under client-level DP a round is released only when every client took part "
                                   "in every stage: the round is not released. Resume when every client is back.")
            aggregated, metrics = self.strategy.aggregate_fit(server_round, results, failures)
            if aggregated is not None:
                arrays = parameters_to_ndarrays(aggregated)
                add_private_noise(arrays, std=compute_stdv(self.noise_multiplier, self.clipping_norm,
                                                           self.num_sampled_clients))
                aggregated = ndarrays_to_parameters(arrays)
            return aggregated, metrics

    return OsNoiseLegacyClientSideFixedClipping(strategy, noise_multiplier=config.client_noise_multiplier,
                                                clipping_norm=config.client_clip_norm,
                                                num_sampled_clients=config.num_clients)
