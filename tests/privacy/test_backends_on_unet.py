"""Acceptance 1 of DP-LDM: for every trainable set and both privacy units, privdiff's clipping,
opacus' per-sample hooks and a per-unit autograd loop give the same clipped gradient sum."""

import pytest
import torch

from privdiff.models.tiny import TinySpec, tiny_unet
from privdiff.training.trainable import TRAINABLE_SETS, select_trainable
from privdiff.privacy.clipping import GradSampleClipper
from privdiff.privacy.opacus_backend import OpacusClipper

CLIP = 1e-3  # below the tiny UNet's per-sample norms, so clipping is active


def _inputs():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(4, 4, 4, 4, generator=generator, dtype=torch.float64)
    context = torch.randn(4, 77, 32, generator=generator, dtype=torch.float64)
    t = torch.tensor([10, 300, 600, 900])
    return z, context, t


def _losses(unet, z, context, t):
    return unet(z, t, context).sample.pow(2).mean(dim=(1, 2, 3))


def _unet(trainable):
    unet = tiny_unet(TinySpec(), seed=0).double()
    chosen = select_trainable(unet=unet, trainable=trainable, ablation_blocks=0)
    unet.double()  # LoRA adapters are created in float32
    if trainable == "lora":  # B starts at zero; give it values so every adapter has a gradient path
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return unet, chosen


def _loop(unet, inputs, groups):
    params = [p for p in unet.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for unit in range(int(groups.max()) + 1):
        unet.zero_grad()
        idx = (groups == unit).nonzero().flatten()
        _losses(unet, *(x[idx] for x in inputs)).sum().backward()
        grads = [p.grad.clone() for p in params]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        total = [s + min(1.0, CLIP / (float(norm) + 1e-6)) * g for s, g in zip(total, grads)]
    unet.zero_grad()
    return params, total, torch.stack(norms)


def _backend(cls, unet, inputs, groups):
    clipper = cls(module=unet, max_grad_norm=CLIP)
    _losses(unet, *inputs).sum().backward()
    norms = clipper.clip_and_accumulate(groups=groups)
    clipper.remove()
    unet.zero_grad()
    return clipper.summed_grad, norms


@pytest.mark.parametrize("privacy_unit", ["example", "subject"])
@pytest.mark.parametrize("trainable", TRAINABLE_SETS)
def test_privdiff_opacus_and_loop_agree(trainable, privacy_unit):
    unet, chosen = _unet(trainable)
    inputs = _inputs()
    groups = torch.arange(4) if privacy_unit == "example" else torch.tensor([0, 1, 0, 1])
    params, expected, expected_norms = _loop(unet, inputs, groups)
    assert (expected_norms > CLIP).all(), "clipping must be active for the comparison to mean anything"
    ours, our_norms = _backend(GradSampleClipper, unet, inputs, groups)
    theirs, their_norms = _backend(OpacusClipper, unet, inputs, groups)
    assert len(params) == len(chosen.parameter_names)
    assert torch.allclose(our_norms.double(), expected_norms, rtol=1e-5)
    assert torch.allclose(their_norms.double(), expected_norms, rtol=1e-5)
    for param, reference in zip(params, expected):
        scale = reference.abs().max().clamp_min(1e-30)
        assert (ours[param] - reference).abs().max() / scale <= 1e-5
        assert (theirs[param] - reference).abs().max() / scale <= 1e-5
