"""On a GPU: the measured per-layer choice, bf16 products and the live backward still give the
per-unit loop's clipped sum (fp32 to 1e-4; bf16 to 10% of a loop that sums in bf16). Run with -m gpu."""

import pytest
import torch

from privdiff.training.trainable import TRAINABLE_SETS
from privdiff.privacy.clipping import GradSampleClipper

from .test_backends_on_unet import CLIP, _inputs, _losses, _loop, _unet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grouping", ["example", "blocks"])
@pytest.mark.parametrize("trainable", TRAINABLE_SETS)
def test_gpu_clipping_matches_the_loop(trainable, grouping, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    unet, _ = _unet(trainable)
    unet = unet.to("cuda", dtype)
    z, context, t = _inputs()
    inputs = (z.to("cuda", dtype), context.to("cuda", dtype), t.to("cuda"))
    groups = torch.arange(4) if grouping == "example" else torch.tensor([0, 0, 1, 1])
    params, expected, expected_norms = _loop(unet, inputs, groups.to("cuda"))  # the same model, same dtype
    clipper = GradSampleClipper(module=unet, max_grad_norm=CLIP)  # auto: measured on the GPU
    clipper.backward(_losses(unet, *inputs).float().sum(), groups=groups)
    norms = clipper.clip_and_accumulate(groups=groups)
    tolerance = 1e-4 if dtype == torch.float32 else 0.1  # bf16: the loop adds bf16 gradients in bf16
    assert torch.allclose(norms.double(), expected_norms.double(), rtol=tolerance)
    for param, reference in zip(params, expected):
        got, reference = clipper.summed_grad[param].double(), reference.double()
        scale = reference.abs().max().clamp_min(1e-30)
        assert (got - reference).abs().max() / scale <= tolerance
