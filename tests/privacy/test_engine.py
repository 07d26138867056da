import pytest
import torch
from torch import nn

from privdiff.privacy.engine import DPConfig, DPSGDEngine, PrivacyBudgetExceeded


def _problem(n=12, seed=0):
    torch.manual_seed(seed)
    x, y = torch.randn(n, 4), torch.randn(n, 2)
    model = nn.Linear(4, 2)

    def per_sample_loss(indices):
        return (model(x[indices]) - y[indices]).pow(2).sum(dim=1)

    return model, per_sample_loss, x, y


def test_micro_batches_give_the_clipped_full_batch_average():
    model, loss_fn, x, y = _problem()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = DPConfig(delta=1e-5, max_grad_norm=0.5, sample_rate=1.0, steps=1, noise_multiplier=0.0,
                      physical_batch_size=5)
    engine = DPSGDEngine(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config,
                         num_examples=12, generator=torch.Generator().manual_seed(0))
    engine.step(loss_fn)
    # Reference: per-example gradients by autograd, clipped, averaged over q * N = 12.
    reference = nn.Linear(4, 2)
    reference.load_state_dict(start)
    total = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(12):
        reference.zero_grad()
        (reference(x[i:i + 1]) - y[i:i + 1]).pow(2).sum().backward()
        grads = [p.grad for p in reference.parameters()]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        total = [t + g * min(1.0, 0.5 / (float(norm) + 1e-6)) for t, g in zip(total, grads)]
    for p, s, t in zip(model.parameters(), reference.parameters(), total):
        assert torch.allclose(p.detach(), s.detach() - t / 12, rtol=1e-5, atol=1e-7)


def test_budget_guard_stops_before_the_target_is_passed():
    model, loss_fn, *_ = _problem(n=100)
    config = DPConfig(delta=1e-5, max_grad_norm=1.0, sample_rate=0.1, steps=20, target_epsilon=2.0)
    engine = DPSGDEngine(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config,
                         num_examples=100, generator=torch.Generator().manual_seed(1))
    assert engine.planned_epsilon() <= 2.0
    for _ in range(20):
        info = engine.step(loss_fn)
        assert info["epsilon"] <= 2.0
    with pytest.raises(PrivacyBudgetExceeded, match="past the target"):
        for _ in range(50):
            engine.step(loss_fn)
    assert engine.accountant.epsilon(delta=1e-5) <= 2.0


def test_empty_batches_take_a_noise_only_step():
    model, loss_fn, *_ = _problem(n=200)
    before = [p.detach().clone() for p in model.parameters()]
    config = DPConfig(delta=1e-5, max_grad_norm=1.0, sample_rate=1e-4, steps=1, noise_multiplier=1.0)
    engine = DPSGDEngine(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config,
                         num_examples=200, generator=torch.Generator().manual_seed(0))
    info = engine.step(loss_fn)
    assert info["batch_units"] == 0 and info["loss"] is None
    assert engine.accountant.total_steps == 1
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_subjects_are_clipped_whole_across_micro_batches():
    model, loss_fn, x, y = _problem(n=8)
    subjects = ["a", "a", "a", "b", "c", "c", "d", "d"]
    config = DPConfig(delta=1e-5, max_grad_norm=1e6, sample_rate=1.0, steps=1, noise_multiplier=0.0,
                      privacy_unit="subject", max_examples_per_subject=3, physical_batch_size=1)
    seen = []
    engine = DPSGDEngine(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config,
                         num_examples=8, subjects=subjects, generator=torch.Generator().manual_seed(0))

    def recording_loss(indices):
        seen.append(sorted({subjects[i] for i in indices.tolist()}))
        return loss_fn(indices)

    engine.step(recording_loss)
    assert all(len(s) == 1 for s in seen) and len(seen) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=1.0, noise_multiplier=1.0), "exactly one"),
        (dict(noise_multiplier=1.0, delta=1.0), "delta"),
        (dict(noise_multiplier=1.0, privacy_unit="person"), "privacy_unit"),
    ],
)
def test_config_errors(kwargs, message):
    base = dict(delta=1e-5, max_grad_norm=1.0, sample_rate=0.1, steps=10)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DPConfig(**base)


def test_delta_must_be_below_one_over_n():
    model, *_ = _problem(n=10)
    config = DPConfig(delta=0.2, max_grad_norm=1.0, sample_rate=0.5, steps=1, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="delta"):
        DPSGDEngine(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config,
                    num_examples=10)
