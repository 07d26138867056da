"""FedProx's proximal term in the DP-LDM trainer: (mu/2)·||w - w_start||², whose gradient mu·(w - w_start)
is public (no private data in it), so under DP it is added after the noise and ε does not change."""

import pytest
import torch

from privdiff.data import procedural_dataset
from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.training.fine_tune import DPLDMConfig, FineTuneRun, train_in_memory

QUICK = {"batch_size": 4, "physical_batch_size": 4, "epochs": 2.0, "secure_noise": False, "num_samples": 0,
         "clip_norm": 0.1, "learning_rate": 3e-3}


def _base():
    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _drift(*, mu: float, epsilon: float | None) -> tuple[float, float | None]:
    torch.manual_seed(0)
    dataset = procedural_dataset(name="shapes", num_items=16, resolution=32)
    pipe = _base()
    start = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    result = train_in_memory(pipeline=pipe, dataset=dataset,
                             config=DPLDMConfig(proximal_mu=mu, epsilon=epsilon, **QUICK))
    drift = sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in pipe.unet.named_parameters()) ** 0.5
    return drift, result.epsilon


@pytest.mark.parametrize("epsilon", [None, 8.0])
def test_a_strong_proximal_term_keeps_the_set_near_where_it_started_at_the_same_epsilon(epsilon):
    free, eps_free = _drift(mu=0.0, epsilon=epsilon)
    held, eps_held = _drift(mu=1000.0, epsilon=epsilon)
    assert free > 0 and held < 0.5 * free, (free, held)
    assert eps_free == eps_held  # post-processing: the same record


def test_the_proximal_gradient_is_mu_times_the_distance_from_the_anchor():
    dataset = procedural_dataset(name="shapes", num_items=8, resolution=32)
    run = FineTuneRun(pipeline=_base(), dataset=dataset, config=DPLDMConfig(proximal_mu=0.5, epsilon=None, **QUICK),
               num_examples=8)
    with torch.no_grad():
        for p in run.parameters:
            p.add_(1.0)  # one unit from the anchor in every coordinate
    run.parameters[0].grad = torch.full_like(run.parameters[0], 2.0)  # a data gradient already there
    run._add_proximal_gradient()
    assert torch.allclose(run.parameters[0].grad, torch.full_like(run.parameters[0], 2.5))
    assert all(torch.allclose(p.grad, torch.full_like(p, 0.5)) for p in run.parameters[1:])


def test_a_negative_or_infinite_mu_is_refused():
    for mu in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="proximal_mu"):
            DPLDMConfig(proximal_mu=mu)
