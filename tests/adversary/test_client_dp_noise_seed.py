"""Federated client-level DP, attacked by someone who knows a seed set in the server's process.

Flower's DP wrappers draw the server's Gaussian noise from numpy's global generator (`np.random.normal`
in `flwr/supercore/differential_privacy.py`, `add_gaussian_noise_inplace`, called by the Message-API
wrapper's `_add_noise_to_aggregated_arrays` and the legacy wrapper's `add_gaussian_noise_to_params`).
privdiff never seeds that generator, but anything in the server's process may: diffusers' and
transformers' `set_seed`, a user's own seed. The adversary has privdiff's code, every setting and any
seed a person types: they seed the same generators, replay the draws in the wrapper's order, subtract
them from the released global model and read the clients' clipped mean exactly. With the noise drawn
from the OS (`federated.client_dp.add_private_noise`) the replay removes nothing: what is left still
carries noise of the recorded size z·C/n.

Both server paths are attacked where their noise is added: the plain ServerApp's strategy as
`federated.apps.train_strategy` builds it, through the `aggregate_train` that Flower's `Strategy.start`
calls each round, and the SecAgg+ path's as `federated.secure.secagg_strategy` builds it, through the
`aggregate_fit` that Flower's `SecAggPlusWorkflow` calls with the unmasked mean.
"""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="federated diffusion needs Flower: pip install 'privdiff[federated]'")

from privdiff.federated.fedavg import FederatedConfig  # noqa: E402

SEED = 1234  # typed by a person, so public
CONFIG = FederatedConfig(num_items=48, heldout_items=16, num_clients=3, rounds=1, client_noise_multiplier=1.0,
                         client_clip_norm=1.0)
STD = CONFIG.client_noise_multiplier * CONFIG.client_clip_norm / CONFIG.num_clients  # Flower's z·C/n
SHAPES = {"down.attn.weight": (16, 16), "down.attn.bias": (16,), "up.attn.weight": (24, 12)}


def _client_models():
    """Each client's clipped model (start 0, update of norm < C), in partition order."""
    rng = np.random.default_rng(7)
    models = []
    for _ in range(CONFIG.num_clients):
        update = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
        norm = np.sqrt(sum(float((value ** 2).sum()) for value in update.values()))
        models.append({name: value * (0.9 * CONFIG.client_clip_norm / norm) for name, value in update.items()})
    return models


def _seed_everything(seed: int) -> None:
    """What diffusers' and transformers' `set_seed` do: Python's, numpy's and torch's generators."""
    from diffusers.training_utils import set_seed

    set_seed(seed)
    assert random.random() == random.Random(seed).random()  # it did seed them


def _replayed_noise(seed: int, shapes, dtypes, *, source: str):
    """The adversary's replay of the server's draws from the public seed, in the wrapper's order."""
    if source == "numpy":  # Flower's add_gaussian_noise_inplace
        np.random.seed(seed)
        return [np.random.normal(0, STD, shape).astype(dtype) for shape, dtype in zip(shapes, dtypes)]
    torch.manual_seed(seed)  # torch's default generator, the other one set_seed seeds
    return [(torch.randn(shape, dtype=torch.float64) * STD).numpy().astype(dtype)
            for shape, dtype in zip(shapes, dtypes)]


def _attack(released: list, mean: list, *, source: str) -> float:
    """RMS of what is left after subtracting the replayed noise and the clients' true mean: 0 (up to
    float32 rounding) when the replay removed the noise."""
    noise = _replayed_noise(SEED, [a.shape for a in released], [a.dtype for a in released], source=source)
    left = np.concatenate([(r.astype(np.float64) - n - m).ravel() for r, n, m in zip(released, noise, mean)])
    return float(np.sqrt((left ** 2).mean()))


def _check_noise_survives(released: list, mean: list) -> None:
    spread = np.concatenate([(r.astype(np.float64) - m).ravel() for r, m in zip(released, mean)])
    rms = float(np.sqrt((spread ** 2).mean()))
    assert 0.85 * STD < rms < 1.15 * STD, f"the released model's noise has RMS {rms:.4f}, not z·C/n = {STD:.4f}"
    for source in ("numpy", "torch"):
        left = _attack(released, mean, source=source)
        # Independent noise left: RMS √2·STD; a successful replay leaves float32 rounding (~1e-8).
        assert left > 0.5 * STD, (f"replaying {source}'s generator from the public seed {SEED} removed the DP "
                                  f"noise (RMS {left:.2e} left): the clients' mean is exposed")


@pytest.fixture
def task_identity():
    """Flower's runtime sets these before a Message can be made; restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_a_seed_set_in_the_server_process_does_not_let_anyone_remove_the_client_level_noise(task_identity):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from privdiff.federated.apps import train_strategy

    models = _client_models()

    def reply(client):
        sent = Message(RecordDict(), dst_node_id=client + 2, message_type="train")
        content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in models[client].items()}),
                              "metrics": MetricRecord({"num-examples": 8 + client, "local-seconds": 1.0,
                                                       "partition-id": client, "dp-weight": 1.0})})
        return Message(content, reply_to=sent)

    inner, strategy = train_strategy(config=CONFIG, done=0)  # what the ServerApp's main runs
    assert strategy is not inner  # client-level DP: Flower's wrapper around privdiff's FedAvg
    inner.round_started = 0.0  # set by configure_train, which needs a live grid
    replies = [reply(client) for client in range(CONFIG.num_clients)]
    _seed_everything(SEED)  # e.g. a library's set_seed while the server loads or evaluates its model
    arrays, _ = strategy.aggregate_train(1, replies)
    released = [value.numpy() for value in arrays.to_torch_state_dict().values()]
    mean = [np.mean([m[name] for m in models], axis=0, dtype=np.float64) for name in arrays.keys()]
    _check_noise_survives(released, mean)


def test_a_seed_set_in_the_server_process_does_not_let_anyone_remove_the_noise_under_secagg_plus():
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from privdiff.federated.secure import secagg_strategy

    models = _client_models()
    config = replace(CONFIG, secure_aggregation=True)
    strategy = secagg_strategy(config=config, initial=[np.zeros(shape, np.float32) for shape in SHAPES.values()],
                               fit_config=lambda server_round: {}, evaluate=None)
    # SecAggPlusWorkflow hands the strategy one result per client that sent its masked vector, each
    # carrying the unmasked mean (secaggplus_workflow.py, unmask_stage).
    mean = [np.mean([m[name] for m in models], axis=0, dtype=np.float64) for name in SHAPES]
    unmasked = ndarrays_to_parameters([value.astype(np.float32) for value in mean])
    results = [(None, FitRes(status=Status(code=Code.OK, message=""), parameters=unmasked, num_examples=1,
                             metrics={})) for _ in range(config.num_clients)]
    _seed_everything(SEED)
    aggregated, _ = strategy.aggregate_fit(1, results, [])
    _check_noise_survives(parameters_to_ndarrays(aggregated), mean)
