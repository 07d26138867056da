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
    weight = conv_in.weight.detach().double()
    bias = conv_in.bias.detach().double() if conv_in.bias is not None else None
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


def ssim(*, estimate: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity of images in [0, 1] ([N, C, H, W]), Wang et al. 2004: Gaussian window
    (11, σ = 1.5), C1 = 0.01², C2 = 0.03², averaged over pixels away from the border, channels and images."""
    x, y = estimate.double().clamp(0, 1), reference.double().clamp(0, 1)
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two [N, C, H, W] batches of the same shape, not {tuple(x.shape)} and {tuple(y.shape)}.")
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[1], 1, window, window)

    def blur(v):
        return torch.nn.functional.conv2d(v, kernel, groups=x.shape[1])  # 'valid': no padded border

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    index = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(index.mean())


def latent_error(*, estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """Latent-space score: the estimate's mean squared error over the latents' own variance around the
    set's mean (1.0 is what guessing the mean latent gets; 0 is exact)."""
    reference = reference.double()
    spread = (reference - reference.mean(0, keepdim=True)).pow(2).mean()
    return float((estimate.double() - reference).pow(2).mean() / spread)


def denoiser_estimate(*, unet, z0_estimate: torch.Tensor, error_variance: torch.Tensor,
                      alphas_cumprod: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The public diffusion model as the attacker's prior: an estimate z0 + e, e ~ N(0, v), is a
    noised latent at SNR 1/v after scaling by 1/sqrt(1 + v); the model's own x0-prediction there is
    its posterior mean of z_0 (the MMSE estimate under its prior). `error_variance` is v per image."""
    v = error_variance.double().view(-1)
    snr = signal_to_noise(alphas_cumprod.double())
    # The timestep whose SNR is closest to 1/v (the noisiest one when v exceeds every timestep's).
    t = (snr.log()[None, :] - (1 / v).log()[:, None]).abs().argmin(1)
    ab = alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    z_t = z0_estimate.double() / (1 + v.view(-1, 1, 1, 1)).sqrt()
    with torch.no_grad():
        eps = unet(z_t.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype)).sample.double()
    return (z_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def total_variation_inversion(*, encode, z0_estimate: torch.Tensor, error_variance: torch.Tensor,
                              start: torch.Tensor, tv_weight: float, steps: int = 150, lr: float = 0.05) -> torch.Tensor:
    """Optimisation-based inversion: the image x in [0, 1] whose latent E(x) best explains the
    estimate (Gaussian likelihood with variance v per image) under a total-variation prior, which
    suits images made of flat regions. `encode` maps [N, 3, H, W] in [0, 1] to scaled latents;
    `start` is the initial image. Returns the images."""
    param = torch.logit(start.double().clamp(1e-3, 1 - 1e-3)).float().requires_grad_(True)
    optimizer = torch.optim.Adam([param], lr=lr)
    target, weight = z0_estimate.float(), (1 / error_variance.float()).view(-1, 1, 1, 1)
    for _ in range(steps):
        x = torch.sigmoid(param)
        fit = (weight * (encode(x) - target).pow(2)).sum() / 2
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().sum() + (x[..., :, 1:] - x[..., :, :-1]).abs().sum()
        loss = fit + tv_weight * tv
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.sigmoid(param).detach()


def hint_regions(*, hint_images: torch.Tensor, latent_size: tuple[int, int], edge_threshold: float = 0.5) -> torch.Tensor:
    """The regions a hint outlines, on the latent grid: connected components of a hint image's
    non-edge pixels ([N, 3, H, W] in [0, 1]; edges are bright, as in canny or outline hints). Each
    latent cell takes the label most of its pixels have; cells made only of edge pixels get -1."""
    edges = hint_images.double().mean(1) > edge_threshold
    n, height, width = edges.shape
    big = height * width + 1
    labels = torch.where(edges, torch.full_like(edges, big, dtype=torch.long),
                         torch.arange(height * width).view(1, height, width).expand(n, -1, -1))
    while True:  # every non-edge pixel takes the smallest label among itself and its 4 neighbours
        padded = torch.nn.functional.pad(labels.double(), (1, 1, 1, 1), value=big).long()
        neighbours = torch.stack([padded[:, 1:-1, 1:-1], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1],
                                  padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]).min(0).values
        updated = torch.where(edges, labels, neighbours)
        if torch.equal(updated, labels):
            break
        labels = updated
    lh, lw = latent_size
    cells = labels.view(n, lh, height // lh, lw, width // lw).permute(0, 1, 3, 2, 4).reshape(n, lh, lw, -1)
    out = torch.full((n, lh, lw), -1, dtype=torch.long)
    for index in range(n):
        for y in range(lh):
            for x in range(lw):
                values = cells[index, y, x][cells[index, y, x] != big]
                if len(values):
                    out[index, y, x] = values.mode().values
    return out


def region_average(*, estimate: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Replace each latent cell's estimate by the mean over its hint region (cells labelled -1 keep
    theirs): flat regions pool the evidence of all their cells, so noise shrinks with their area."""
    out = estimate.double().clone()
    for index in range(len(estimate)):
        for label in regions[index].unique():
            if label < 0:
                continue
            mask = regions[index] == label
            out[index][:, mask] = estimate[index].double()[:, mask].mean(1, keepdim=True)
    return out
