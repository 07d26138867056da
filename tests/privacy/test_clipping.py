"""privdiff's per-sample clipping equals a per-sample autograd loop, per sample and per subject."""

import pytest
import torch
from torch import nn

from privdiff.privacy.clipping import GradSampleClipper


class Block(nn.Module):
    """Every layer kind the fast path supports, on [B, C, H, W] and [B, T, C] activations."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.proj_in = nn.Conv2d(4, 6, 1)
        self.ln = nn.LayerNorm(6)
        self.q = nn.Linear(6, 6)
        self.k = nn.Linear(5, 6, bias=False)
        self.v = nn.Linear(5, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x, context):
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, 9, 6]
        h = self.ln(h)
        attn = torch.softmax(self.q(h) @ self.k(context).transpose(1, 2), dim=-1)
        return self.out(attn @ self.v(context) + h)


def _loop_reference(model, inputs, losses_fn, groups, clip):
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for s in range(int(groups.max()) + 1):
        model.zero_grad()
        idx = (groups == s).nonzero().flatten()
        losses_fn(model, *(t[idx] for t in inputs)).sum().backward()
        grads = [p.grad.clone() for p in params]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return params, total, torch.stack(norms)


def _losses(model, x, context):
    return model(x, context).pow(2).mean(dim=(1, 2))


GROUPINGS = {"sample": [0, 1, 2, 3, 4, 5], "subject": [0, 1, 1, 2, 0, 3],
             "blocks": [0, 0, 1, 1, 2, 2]}  # blocks: K rows per unit in order (noise multiplicity)


@pytest.mark.parametrize("strategy", ["auto", "measure", "flops", "ghost", "explicit"])
@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_matches_per_sample_loop(strategy, grouping):
    torch.manual_seed(0)
    model = Block().double()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    context = torch.randn(6, 7, 5, dtype=torch.float64)
    per_subject = grouping != "sample"
    groups = torch.tensor(GROUPINGS[grouping])
    clip = 0.05  # small enough that some units are clipped and the sum is not the plain gradient
    params, expected, expected_norms = _loop_reference(model, (x, context), _losses, groups, clip)

    model.zero_grad()
    clipper = GradSampleClipper(module=model, max_grad_norm=clip, strategy=strategy)
    _losses(model, x, context).sum().backward()
    norms = clipper.clip_and_accumulate(groups=None if not per_subject else groups)
    assert torch.allclose(norms.double(), expected_norms, rtol=1e-5)
    assert (expected_norms > clip).any(), "some units must be clipped for the test to mean anything"
    for p, e in zip(params, expected):
        got = clipper.summed_grad[p]
        assert torch.allclose(got, e, rtol=1e-5, atol=1e-12), (p.shape, (got - e).abs().max())


def test_unet_attention_parameters_match_a_loop():
    from privdiff.models.tiny import TinySpec, tiny_unet

    unet = tiny_unet(TinySpec(), seed=0).double()
    unet.requires_grad_(False)
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for sub in ("to_q", "to_k", "to_v", "to_out.0"):
                unet.get_submodule(f"{name}.{sub}").requires_grad_(True)
    torch.manual_seed(1)
    z = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    context = torch.randn(3, 77, 32, dtype=torch.float64)
    t = torch.tensor([10, 500, 900])

    def losses(model, z, context, t):
        return model(z, t, context).sample.pow(2).mean(dim=(1, 2, 3))

    params, expected, expected_norms = _loop_reference(unet, (z, context, t), losses, torch.arange(3), 1e-3)
    assert (expected_norms > 1e-3).any()
    unet.zero_grad()
    clipper = GradSampleClipper(module=unet, max_grad_norm=1e-3)
    losses(unet, z, context, t).sum().backward()
    norms = clipper.clip_and_accumulate()
    assert torch.allclose(norms.double(), expected_norms, rtol=1e-5)
    for p, e in zip(params, expected):
        assert torch.allclose(clipper.summed_grad[p], e, rtol=1e-5, atol=1e-15)


def test_unsupported_trainable_layer_is_named():
    model = nn.Sequential(nn.Identity(), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="'1' \\(Conv2d\\) has no fast per-sample clipping.*backend='opacus'"):
        GradSampleClipper(module=model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="'0' \\(Embedding\\)"):
        GradSampleClipper(module=nn.Sequential(nn.Embedding(3, 2)), max_grad_norm=1.0)


@pytest.mark.parametrize("strategy", ["ghost", "explicit"])
def test_strided_padded_convolution_matches_a_loop(strategy):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4),
                          nn.Conv2d(4, 2, 3, padding=2, dilation=2)).double()
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    groups = torch.tensor([0, 1, 0, 2])

    def losses(model, x):
        return model(x).pow(2).mean(dim=(1, 2, 3))

    params, expected, expected_norms = _loop_reference(model, (x,), losses, groups, 0.05)
    assert (expected_norms > 0.05).any()
    model.zero_grad()
    clipper = GradSampleClipper(module=model, max_grad_norm=0.05, strategy=strategy)
    losses(model, x).sum().backward()
    norms = clipper.clip_and_accumulate(groups=groups)
    assert torch.allclose(norms.double(), expected_norms, rtol=1e-5)
    for p, e in zip(params, expected):
        assert torch.allclose(clipper.summed_grad[p], e, rtol=1e-5, atol=1e-12)


def test_bad_settings():
    with pytest.raises(ValueError, match="max_grad_norm"):
        GradSampleClipper(module=nn.Linear(2, 2), max_grad_norm=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradSampleClipper(module=nn.Linear(2, 2).requires_grad_(False), max_grad_norm=1.0)


def test_matches_opacus_clipped_gradient():
    """The reference backend: opacus' hooks and DPOptimizer (noise off) give the same clipped sum."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(2)
    model = Block().double()
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    context = torch.randn(5, 7, 5, dtype=torch.float64)
    clip = 0.05

    reference = GradSampleModule(Block().double())
    reference.load_state_dict({f"_module.{k}": v for k, v in model.state_dict().items()})
    optimizer = DPOptimizer(torch.optim.SGD(reference.parameters(), lr=0.0), noise_multiplier=0.0,
                            max_grad_norm=clip, expected_batch_size=5)
    _losses(reference, x, context).sum().backward()
    optimizer.pre_step()

    clipper = GradSampleClipper(module=model, max_grad_norm=clip)
    _losses(model, x, context).sum().backward()
    clipper.clip_and_accumulate()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        expected = theirs.grad * 5  # opacus divides by the expected batch size
        assert torch.allclose(clipper.summed_grad[ours], expected, rtol=1e-5, atol=1e-12), name


def test_a_layer_called_twice_is_refused():
    layer = nn.Linear(3, 3)
    clipper = GradSampleClipper(module=layer, max_grad_norm=1.0)
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="called twice"):
        layer(layer(x))


@pytest.mark.parametrize("strategy", ["auto", "measure", "ghost", "explicit"])
@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("live", [True, False])
def test_backward_to_layer_outputs_gives_the_same_clipped_sum_and_leaves_grad_alone(grouping, strategy, live):
    """backward(groups=...) does each layer's work as its gradient arrives (live); without groups the
    tensors wait for clip_and_accumulate. Either way the sum is the loop's and no .grad is formed."""
    torch.manual_seed(1)
    model = Block().double()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    context = torch.randn(6, 7, 5, dtype=torch.float64)
    groups = torch.tensor(GROUPINGS[grouping])
    params, expected, _ = _loop_reference(model, (x, context), _losses, groups, 0.05)
    model.zero_grad(set_to_none=True)
    clipper = GradSampleClipper(module=model, max_grad_norm=0.05, strategy=strategy)
    clipper.backward(_losses(model, x, context).sum(), groups=groups if live else None)
    if live:  # only the ghost layers still hold their tensors
        held = [s.name for s in clipper.layers.values() if s.inputs is not None]
        assert all(clipper.plans()[name] == ["ghost"] for name in held), held
    clipper.clip_and_accumulate(groups=groups)
    for p, e in zip(params, expected):
        assert p.grad is None  # autograd's unclipped weight gradient is never formed
        assert torch.allclose(clipper.summed_grad[p], e, rtol=1e-5, atol=1e-12)


def test_group_wise_clipping_matches_a_loop_and_bounds_each_unit_by_c():
    torch.manual_seed(2)
    model = Block().double()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    context = torch.randn(6, 7, 5, dtype=torch.float64)
    clip, shares = 0.05, {"q": 0.3, "k": 0.2}  # q and k each clipped alone; the other layers share the rest
    params = dict(model.named_parameters())
    groups = [("q", shares["q"]), ("k", shares["k"]), (None, 1 - sum(shares.values()))]
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    clipped_any = False
    for i in range(6):
        model.zero_grad()
        _losses(model, x[i:i + 1], context[i:i + 1]).sum().backward()
        clipped_norm_sq = 0.0
        for layer, share in groups:
            owner = [n.split(".")[0] for n in params]
            names = [n for n, o in zip(params, owner) if (o == layer if layer else o not in shares)]
            norm = float(torch.sqrt(sum(params[n].grad.pow(2).sum() for n in names)))
            factor = min(1.0, clip * share ** 0.5 / (norm + 1e-6))
            clipped_any |= factor < 1
            clipped_norm_sq += (factor * norm) ** 2
            for n in names:
                expected[n] += factor * params[n].grad
        assert clipped_norm_sq ** 0.5 <= clip * (1 + 1e-9)  # the whole unit stays within C
    assert clipped_any
    model.zero_grad(set_to_none=True)
    clipper = GradSampleClipper(module=model, max_grad_norm=clip, budget_shares=shares)
    clipper.backward(_losses(model, x, context).sum())
    clipper.clip_and_accumulate()
    for n, p in params.items():
        assert torch.allclose(clipper.summed_grad[p], expected[n], rtol=1e-5, atol=1e-12), n


def test_group_wise_clipping_refuses_bad_shares():
    model = Block()
    with pytest.raises(ValueError, match="no trainable layer"):
        GradSampleClipper(module=model, max_grad_norm=1.0, budget_shares={"nothing": 0.5})
    with pytest.raises(ValueError, match="add up"):
        GradSampleClipper(module=model, max_grad_norm=1.0, budget_shares={"q": 0.7, "k": 0.6})
    with pytest.raises(ValueError, match="no clipping budget"):
        GradSampleClipper(module=model, max_grad_norm=1.0, budget_shares={"q": 0.5, "k": 0.5})


def test_layers_pick_explicit_or_ghost_by_held_memory_and_cost():
    """explicit (per-unit gradients kept) where the weight is small next to the tokens, ghost where
    it is large (cross-attention keys over few context tokens)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"wide": nn.Linear(4, 4), "deep": nn.Linear(64, 64)})
    clipper = GradSampleClipper(module=model, max_grad_norm=1.0, strategy="flops")
    many_tokens, few_tokens = torch.randn(8, 256, 4), torch.randn(8, 3, 64)
    loss = model["wide"](many_tokens).pow(2).mean(dim=(1, 2)) + model["deep"](few_tokens).pow(2).mean(dim=(1, 2))
    clipper.backward(loss.sum(), groups=torch.arange(8))
    clipper.clip_and_accumulate(groups=torch.arange(8))
    assert clipper.plans() == {"wide": ["explicit"], "deep": ["ghost"]}


def test_bf16_products_with_fp32_sum_stay_close_to_fp64():
    torch.manual_seed(4)
    model = Block().double()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    context = torch.randn(6, 7, 5, dtype=torch.float64)
    groups = torch.tensor(GROUPINGS["blocks"])
    params, expected, _ = _loop_reference(model, (x, context), _losses, groups, 0.05)
    low = Block().bfloat16()
    low.load_state_dict(model.state_dict())
    clipper = GradSampleClipper(module=low, max_grad_norm=0.05)
    clipper.backward(_losses(low, x.bfloat16(), context.bfloat16()).float().sum(), groups=groups)
    clipper.clip_and_accumulate(groups=groups)
    for p, e in zip(low.parameters(), expected):
        got = clipper.summed_grad[p]
        assert got.dtype == torch.float32  # the clipped sum is kept in fp32
        assert torch.allclose(got.double(), e, rtol=0.05, atol=0.02 * float(e.abs().max())), (p.shape,)
