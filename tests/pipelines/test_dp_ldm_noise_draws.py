"""DP-LDM noise multiplicity (`noise_draws` K, DPDM): each example's loss is the mean over K (t, noise)
draws, clipped once; the privacy record is that of K = 1."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.pipelines.dp_ldm import BYPRODUCTS, DPLDMConfig, train_dp_ldm
from privdiff.training.fine_tune import FineTuneRun
from privdiff.privacy.record import read_record

QUICK = {"batch_size": 4, "physical_batch_size": 4, "epochs": 1.0, "secure_noise": False, "num_samples": 0,
         "clip_norm": 0.1, "learning_rate": 1e-3, "epsilon": 8.0}


def _base(dtype=torch.float32):
    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def _without(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Short runs on 16 shapes (4 steps, or 2 for half an epoch), each trained once for the module."""
    done = {}

    def run(draws: int, epochs: float = 1.0):
        if (draws, epochs) not in done:
            out = tmp_path_factory.mktemp(f"k{draws}") / "run"
            done[draws, epochs] = train_dp_ldm(base=_base(), data="shapes", out=out,
                                               config=DPLDMConfig(noise_draws=draws, **{**QUICK, "epochs": epochs}, num_items=16))
        return done[draws, epochs]

    return run


def test_privacy_record_is_the_same_for_one_and_four_draws(runs):
    one, four = (read_record(runs(k, 0.5).files["diffusers"]) for k in (1, 4))
    assert one.mechanism == "dp-sgd" and one.epsilon <= 8.0
    # ε, δ, σ, C, q, steps, N, unit, accountant, adjacency; and of extra all but the setting itself
    assert _without(dataclasses.asdict(one), "extra") == _without(dataclasses.asdict(four), "extra")
    assert _without(one.extra, "dp_ldm") == _without(four.extra, "dp_ldm")
    assert _without(one.extra["dp_ldm"], "noise_draws") == _without(four.extra["dp_ldm"], "noise_draws")
    assert one.extra["dp_ldm"]["noise_draws"] == 1 and four.extra["dp_ldm"]["noise_draws"] == 4
    assert one.steps == 2 and one.sample_rate == 0.25
    a, b = load_file(str(runs(1, 0.5).files["diffusers"])), load_file(str(runs(4, 0.5).files["diffusers"]))
    assert any(not torch.equal(a[k], b[k]) for k in a), "four draws per example trained the same weights as one"


def test_a_two_draw_run_completes_and_its_record_says_so(runs):
    result = runs(2)
    assert result.figures["steps_done"] == result.figures["total_steps"] == 4 and not result.stopped
    for path in result.files.values():
        assert read_record(path).extra["dp_ldm"]["noise_draws"] == 2
    assert any(v.abs().sum() > 0 for v in load_file(str(result.files["diffusers"])).values())
    assert not (result.out / BYPRODUCTS).exists()


def test_a_stopped_two_draw_run_resumes_to_the_uninterrupted_weights(runs, tmp_path):
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] == 2

    config = DPLDMConfig(noise_draws=2, **QUICK)
    stopped = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "run", config=dataclasses.replace(config, num_items=16),
                           should_stop=stop_after_two)
    assert stopped.stopped and stopped.figures["steps_done"] == 2
    with pytest.raises(ValueError, match="noise_draws"):  # the draws are part of the run's settings
        train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "run", resume=True,
                     config=DPLDMConfig(noise_draws=4, **QUICK, num_items=16))
    resumed = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "run", config=dataclasses.replace(config, num_items=16),
                           resume=True)
    a, b = load_file(str(runs(2).files["diffusers"])), load_file(str(resumed.files["diffusers"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _clipper_view(*, physical: int, bound: float, draws: int, examples: torch.Tensor):
    """One fp64 DP step on a fixed batch: what the clipper measured and summed, and each draw's own
    gradient (autograd, one draw at a time) on the same seeded draws."""
    from privdiff.data import load_dataset

    pipe = _base(torch.float64)
    dataset = load_dataset(data="shapes", resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor, seed=0,
                           num_items=8)
    run = FineTuneRun(pipeline=pipe, dataset=dataset, num_examples=8, config=DPLDMConfig(
        **{**QUICK, "physical_batch_size": physical, "batch_size": 2, "clip_norm": bound}, noise_draws=draws,
        accountant="rdp"))  # σ plays no part here; RDP calibrates in a fraction of PRV's time
    run.engine.sampler.sample = lambda: (examples, torch.arange(len(examples)))  # a fixed Poisson batch
    params = run.parameters
    assert params and all(p.dtype == torch.float64 for p in params)

    # Replay the trainer's seeded draws micro-batch by micro-batch, as the engine will make them.
    state = run.train_generator.get_state()
    per_draw = []  # [example][draw] -> flat gradient
    per_chunk = physical // draws
    for start in range(0, len(examples), per_chunk):
        chunk = examples[start:start + per_chunk]
        losses = run.per_sample_loss(chunk.repeat_interleave(draws))
        assert losses.shape == (len(chunk) * draws,)
        for e in range(len(chunk)):
            per_draw.append([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                losses[e * draws + j], params, retain_graph=True)]) for j in range(draws)])
    run.train_generator.set_state(state)

    clipper, seen = run.engine.clipper, {"norms": []}
    clip = clipper.clip_and_accumulate

    def spy(**kwargs):
        seen["norms"].append(clip(**kwargs))
        seen["summed"] = torch.cat([clipper.summed_grad[p].reshape(-1).clone() for p in params])
        return seen["norms"][-1]

    clipper.clip_and_accumulate = spy
    run.train_step()
    return seen["summed"], torch.cat(seen["norms"]).double(), per_draw


@pytest.mark.parametrize("physical", [4, 8], ids=["one-example-per-micro-batch", "both-in-one-micro-batch"])
def test_the_clipper_sees_each_examples_mean_over_its_draws(physical):
    """fp64: the per-example gradient clipped is the mean of its K draws' gradients (each computed on
    its own by autograd), and the clip scales that mean, not each draw."""
    draws, examples = 4, torch.tensor([2, 5])

    summed, norms, per_draw = _clipper_view(physical=physical, bound=1e6, draws=draws, examples=examples)  # no clip
    means = [torch.stack(g).mean(0) for g in per_draw]
    assert torch.allclose(norms, torch.stack([m.norm() for m in means]), rtol=1e-6)  # each example's mean gradient
    expected = torch.stack(means).sum(0)
    assert (summed - expected).norm() <= 1e-6 * expected.norm()

    bound = 1e-4
    summed, norms, per_draw = _clipper_view(physical=physical, bound=bound, draws=draws, examples=examples)
    means = [torch.stack(g).mean(0) for g in per_draw]
    assert torch.allclose(norms, torch.stack([m.norm() for m in means]), rtol=1e-6)
    assert all(m.norm() > 10 * bound for m in means), "the bound must clip for this check"
    clipped_means = sum(m * (bound / (m.norm() + 1e-6)) for m in means)
    assert (summed - clipped_means).norm() <= 1e-6 * clipped_means.norm()
    clipped_draws = sum(torch.stack([g * min(1.0, bound / (float(g.norm()) + 1e-6)) for g in gs]).mean(0)
                        for gs in per_draw)
    assert (summed - clipped_draws).norm() > 1e-3 * clipped_draws.norm(), "clipping each draw would look the same"


@pytest.mark.parametrize(("value", "says"), [("0", "noise_draws"), ("-1", "noise_draws"), ("1.5", "invalid int"),
                                             ("two", "invalid int"), ("5", "physical_batch_size")])
def test_cli_refuses_a_bad_noise_draws_in_one_line(value, says, tmp_path, monkeypatch, capsys):
    from privdiff.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["train", "dp-ldm", "--data", "digits", "--num-items", "40", "--out", "run", "--physical-batch-size", "4",
            "--noise-draws", value]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses a value that is not a whole number
        code = exit_.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("privdiff train dp-ldm: error: ") and says in lines[0], lines[0]
    assert not list(tmp_path.iterdir())


def test_config_checks_noise_draws():
    assert DPLDMConfig().noise_draws == 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="noise_draws"):
            DPLDMConfig(noise_draws=bad)
    with pytest.raises(ValueError, match="physical_batch_size"):
        DPLDMConfig(noise_draws=17)  # above the default micro-batch of 16


@pytest.mark.parametrize("backend", ["privdiff", "opacus"])
@pytest.mark.parametrize("bound", [1e6, 0.05], ids=["unclipped", "clipped"])
def test_both_clipping_backends_clip_the_mean_over_draws(backend, bound):
    """The engine's rows-per-example grouping, on a linear model: each example's K rows (a fresh
    noise per row) are one clipped unit whose gradient is their mean, in whichever backend; fp64."""
    from torch import nn

    from privdiff.privacy.engine import DPConfig, DPSGDEngine

    torch.manual_seed(0)
    x, draws = torch.randn(6, 5, dtype=torch.float64), 3
    model = nn.Linear(5, 2).double()
    start = [p.detach().clone() for p in model.parameters()]
    noises = torch.randn(6 * draws, 2, dtype=torch.float64)  # row r of a step gets noises[r]

    def per_row_loss(indices):
        assert torch.equal(indices, torch.arange(6).repeat_interleave(draws))  # each example K times in a row
        return (model(x[indices]) - noises[:len(indices)]).pow(2).sum(1)

    engine = DPSGDEngine(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), num_examples=6,
                         config=DPConfig(delta=1e-3, max_grad_norm=bound, sample_rate=1.0, steps=1, noise_multiplier=0.0,
                                         physical_batch_size=18, draws_per_example=draws, backend=backend),
                         generator=torch.Generator().manual_seed(0))
    engine.step(per_row_loss)
    total = [torch.zeros_like(p) for p in start]
    for i in range(6):
        reference = nn.Linear(5, 2).double()
        with torch.no_grad():
            for p, s in zip(reference.parameters(), start):
                p.copy_(s)
        rows = slice(i * draws, (i + 1) * draws)
        (reference(x[i].expand(draws, 5)) - noises[rows]).pow(2).sum(1).mean().backward()
        grads = [p.grad for p in reference.parameters()]
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        assert norm > 2 * bound or bound > 1e3 * norm  # every example is clipped, or none is
        total = [t + g * min(1.0, bound / (norm + 1e-6)) for t, g in zip(total, grads)]
    for p, s, t in zip(model.parameters(), start, total):
        torch.testing.assert_close(p.detach(), s - t / 6, rtol=1e-6, atol=1e-12)
