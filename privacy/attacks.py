"""What an honest-but-curious split-learning server reconstructs from the traffic it receives.

The server knows every public weight (the VAE, the UNet's `conv_in`, the noise schedule) and may link
an image's messages across epochs. From one message it recovers
- z_t: sent as is (hardened), or as conv_in(z_t) (paper), which is linear and inverted by least squares;
- z_0 = (z_t - sqrt(1 - ab_t)·label) / sqrt(ab_t): exact in paper mode (label = ε); with the hardened
  label ε + σ·n its error has variance σ²(1 - ab_t)/ab_t = σ²/SNR_t, which the SNR bound keeps large;
- the hint latent: inverse_symsigmoid(h) - z_t (plus the client's σ_hint noise, if any).
Across epochs, the estimates of one image are averaged with inverse-variance weights (SNR_t/σ²), the
best linear combination. Scores are PSNR against the VAE's own reconstruction D(E(x)) of the private
image, next to the PSNR of guessing the dataset's mean image.
"""

from __future__ import annotations

import math

import torch


def symsigmoid(x: torch.Tensor) -> torch.Tensor:
    """The split client's privacy activation: |x|·(2·sigmoid(x) - 1), odd and strictly increasing."""
    return x.abs() * (2 * torch.sigmoid(x) - 1)


def inverse_symsigmoid(y: torch.Tensor, *, iterations: int = 60) -> torch.Tensor:
    """x with symsigmoid(x) = y, by bisection (float64)."""
    y = y.double()
    magnitude = y.abs()
    low, high = torch.zeros_like(magnitude), magnitude + 2.0  # symsigmoid(m + 2) > m for m >= 0
    for _ in range(iterations):
        middle = (low + high) / 2
        too_small = symsigmoid(middle) < magnitude
        low, high = torch.where(too_small, middle, low), torch.where(too_small, high, middle)
    return torch.sign(y) * (low + high) / 2


def invert_conv_in(*, conv_in: torch.nn.Conv2d, output: torch.Tensor, iterations: int = 200) -> torch.Tensor:
    """The z with conv_in(z) closest to `output` (least squares, by conjugate gradients on the normal
    equations; conv_in is linear, maps 4 channels to hundreds, so the solution is unique)."""
    weight, bias = conv_in.weight.double(), conv_in.bias.double() if conv_in.bias is not None else None
    padding, stride = conv_in.padding, conv_in.stride
    target = output.double() - (bias.view(1, -1, 1, 1) if bias is not None else 0)

    def forward(z):
        return torch.nn.functional.conv2d(z, weight, stride=stride, padding=padding)

    def adjoint(y):
        return torch.nn.functional.conv_transpose2d(y, weight, stride=stride, padding=padding)

    shape = (output.shape[0], weight.shape[1], output.shape[2] * stride[0], output.shape[3] * stride[1])
    z = torch.zeros(shape, dtype=torch.float64)
    residual = adjoint(target) - adjoint(forward(z))
    direction = residual.clone()
    rs = (residual * residual).sum()
    for _ in range(iterations):
        a_dir = adjoint(forward(direction))
        alpha = rs / (direction * a_dir).sum()
        z = z + alpha * direction
        residual = residual - alpha * a_dir
        rs_new = (residual * residual).sum()
        if rs_new.sqrt() < 1e-10:
            break
        direction = residual + (rs_new / rs) * direction
        rs = rs_new
    return z


def signal_to_noise(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR_t = ab_t / (1 - ab_t) of each timestep."""
    return alphas_cumprod / (1 - alphas_cumprod)


def estimate_z0(*, z_t: torch.Tensor, label: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ab = alphas_cumprod.double()[t.long()].view(-1, 1, 1, 1)
    return (z_t.double() - (1 - ab).sqrt() * label.double()) / ab.sqrt()


def link_epochs(*, estimates: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """Inverse-variance weighted mean of one image set's estimates over epochs ([N, ...] each;
    weights [N] each, proportional to 1/variance)."""
    total = sum(w.double().view(-1, *([1] * (e.dim() - 1))) * e.double() for e, w in zip(estimates, weights))
    norm = sum(w.double().view(-1, *([1] * (estimates[0].dim() - 1))) for w in weights)
    return total / norm


def psnr(*, estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (mean over the batch of per-image PSNRs)."""
    mse = (estimate.double().clamp(0, 1) - reference.double().clamp(0, 1)).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp(min=1e-12))).mean())


def mean_image_psnr(*, reference: torch.Tensor) -> float:
    """The PSNR of guessing every image as the set's mean image: the floor an attack must beat."""
    return psnr(estimate=reference.double().mean(0, keepdim=True).expand_as(reference), reference=reference)


def label_noise_z0_error_std(*, sigma_label: float, snr: float) -> float:
    """Standard deviation of one message's z_0 estimate error per latent value: σ/sqrt(SNR_t)."""
    return sigma_label / math.sqrt(snr)
