import pytest
import torch
from torch import nn

from privdiff.privacy.dp_sgd import PoissonSampler, noisy_average, secure_generator


def test_poisson_batches_have_the_right_rate_and_can_be_empty():
    sampler = PoissonSampler(num_examples=50, sample_rate=0.02, steps=2000, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([len(indices) for indices, _ in sampler], dtype=torch.float)
    assert abs(sizes.mean().item() - 1.0) < 0.1  # q * N = 1
    assert (sizes == 0).any(), "with q*N = 1 some steps are empty (probability 0.98**50 = 36%)"
    assert abs((sizes == 0).float().mean().item() - 0.98**50) < 0.04


def test_same_seed_same_batches():
    a = PoissonSampler(num_examples=30, sample_rate=0.2, steps=5, generator=torch.Generator().manual_seed(3))
    b = PoissonSampler(num_examples=30, sample_rate=0.2, steps=5, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


def test_subject_sampling_caps_examples_per_subject():
    subjects = ["ann"] * 5 + ["bob"] * 2 + ["cy"]
    sampler = PoissonSampler(num_examples=8, sample_rate=1.0, steps=1, generator=torch.Generator().manual_seed(0),
                             subjects=subjects, max_examples_per_subject=2)
    indices, groups = sampler.sample()
    assert sampler.num_units == 3 and sampler.expected_batch_units == 3
    by_group = {int(g): [int(i) for i, gg in zip(indices, groups) if gg == g] for g in groups.unique()}
    assert sorted(len(v) for v in by_group.values()) == [1, 2, 2]
    for members in by_group.values():
        assert len({subjects[i] for i in members}) == 1


def test_subject_unit_needs_every_subject():
    with pytest.raises(ValueError, match="needs a subject id for every example"):
        PoissonSampler(num_examples=2, sample_rate=0.5, steps=1, generator=torch.Generator(), subjects=["a", None])


@pytest.mark.parametrize("bad", [{"sample_rate": 0.0}, {"sample_rate": 1.5}, {"num_examples": 0}])
def test_bad_sampler_settings(bad):
    kwargs = dict(num_examples=10, sample_rate=0.1, steps=1, generator=torch.Generator())
    kwargs.update(bad)
    with pytest.raises(ValueError):
        PoissonSampler(**kwargs)


def test_noisy_average_adds_calibrated_noise_and_divides_by_expected_batch():
    layer = nn.Linear(200, 100)
    params = list(layer.parameters())
    summed = {params[0]: torch.ones_like(params[0])}  # bias absent: as after an empty batch
    noisy_average(summed_grad=summed, parameters=params, noise_multiplier=2.0, max_grad_norm=0.5,
                  expected_batch_units=4.0, generator=torch.Generator().manual_seed(0))
    weight_noise = params[0].grad * 4.0 - 1.0
    assert abs(weight_noise.std().item() - 1.0) < 0.02  # sigma * C = 1
    assert abs(weight_noise.mean().item()) < 0.02
    assert abs((params[1].grad * 4.0).std().item() - 1.0) < 0.2  # noise-only step for the bias


def test_without_noise_the_average_is_exact():
    layer = nn.Linear(3, 2)
    summed = {p: torch.full_like(p, 6.0) for p in layer.parameters()}
    noisy_average(summed_grad=summed, parameters=list(layer.parameters()), noise_multiplier=0.0, max_grad_norm=1.0,
                  expected_batch_units=3.0, generator=torch.Generator())
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in layer.parameters())


def test_secure_generators_differ():
    a, b = secure_generator(), secure_generator()
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
