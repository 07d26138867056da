"""Per-sample gradient clipping without materialising every per-sample gradient.

DP-SGD needs, for each sample (or each subject), the norm of its gradient over all trainable
parameters, then the sum of the gradients each scaled by min(1, C / norm). For a linear map
y = x W^T applied to T tokens, sample i's weight gradient is G_i^T X_i (G: output gradients, X: inputs).
Its squared norm can be had two ways:
- explicitly: form G_i^T X_i (cost T * d_in * d_out per sample), then its norm;
- as a "ghost norm": <X_i X_i^T, G_i G_i^T> (cost T^2 * (d_in + d_out)), never forming the gradient.
Each layer takes the cheaper one. The clipped sum is then one GEMM per layer over all samples' tokens,
(c * G)^T X, so no per-sample gradient is ever kept. A convolution is the same linear map applied to
unfolded patches (tokens = output positions, d_in = channels * kernel area), which covers the `full`
trainable set. Norm layers (LayerNorm, GroupNorm) have per-sample gradients of only C numbers,
which are formed explicitly.

A subject's gradient is the sum of its samples' gradients: treating a subject's samples' tokens as
one long sequence gives its norm and clipped sum with the same formulas (privacy unit `subject`).

This module is pure torch: hooks capture each trainable layer's input in the forward pass and its
output gradient in the backward pass of the summed per-sample losses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)


def _is_supported_conv(module: nn.Module) -> bool:
    """Ungrouped, zero-padded convolutions with numeric padding: linear maps over unfolded patches."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _is_pointwise_conv(module: nn.Conv2d) -> bool:
    return module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0) \
        and module.dilation == (1, 1)


def _tokens(x: torch.Tensor, module: nn.Module, *, is_input: bool = False) -> torch.Tensor:
    """Inputs or output gradients as [B, T, features] (a convolution's inputs as unfolded patches)."""
    if isinstance(module, nn.Conv2d):
        if is_input and not _is_pointwise_conv(module):
            x = torch.nn.functional.unfold(x, module.kernel_size, dilation=module.dilation,
                                           padding=module.padding, stride=module.stride)
        return x.flatten(2).transpose(1, 2)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


@dataclass
class _Capture:
    inputs: torch.Tensor | None = None
    output: torch.Tensor | None = None  # kept until `backward` asks autograd for its gradient
    grad_outputs: torch.Tensor | None = None


class GradSampleClipper:
    """Hooks on the trainable layers of `module`; after `backward`, clip per sample and sum.

    Usage, per physical batch:
        clipper = GradSampleClipper(module=unet, max_grad_norm=C)
        losses = per_sample_loss(unet(...))          # shape [B]
        clipper.backward(losses.sum())               # or losses.sum().backward(), which also fills .grad
        norms = clipper.clip_and_accumulate(groups=None)   # adds sum_i c_i g_i into .summed_grad
    Trainable layers must be Linear, ungrouped zero-padded Conv2d, LayerNorm or GroupNorm: every
    parameter of an SD-class UNet, and LoRA adapters.
    """

    def __init__(self, *, module: nn.Module, max_grad_norm: float, strategy: str = "auto",
                 budget_shares: Mapping[str, float] | None = None):
        """`budget_shares` ({layer-name prefix: share}) clips groups of layers separately: the layers
        under a prefix get C·sqrt(share), the rest C·sqrt(1 - sum of shares). Each unit's whole
        gradient still has norm at most C (group-wise clipping), so the noise and ε are unchanged;
        it keeps a small group (a few token rows) from being crowded out of the clip by a large one."""
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be positive.")
        if strategy not in ("auto", "ghost", "explicit"):
            raise ValueError(f"strategy={strategy!r} must be 'auto', 'ghost' or 'explicit'.")
        self.max_grad_norm = float(max_grad_norm)
        self.strategy = strategy
        self.layers: dict[str, nn.Module] = {}
        self._captures: dict[str, _Capture] = {}
        self._handles = []
        for name, layer in module.named_modules():
            params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            custom = hasattr(layer, "per_sample_gradients")
            if not custom and (not isinstance(layer, SUPPORTED)
                               or (isinstance(layer, nn.Conv2d) and not _is_supported_conv(layer))):
                raise ValueError(
                    f"trainable layer {name!r} ({type(layer).__name__}) has no fast per-sample clipping; "
                    "freeze it, or use the opacus backend (backend='opacus')."
                )
            self.layers[name] = layer
            self._captures[name] = _Capture()
            self._handles.append(layer.register_forward_hook(self._forward_hook(name)))
        if not self.layers:
            raise ValueError("the module has no trainable parameters: nothing to clip.")
        self._clip_group, self._group_norms = _clip_groups(layer_names=list(self.layers),
                                                           max_grad_norm=self.max_grad_norm,
                                                           budget_shares=dict(budget_shares or {}))
        self.summed_grad: dict[torch.nn.Parameter, torch.Tensor] = {}

    def _forward_hook(self, name: str):
        capture = self._captures[name]

        def hook(layer, inputs, output):
            if not torch.is_grad_enabled():
                return
            if capture.inputs is not None and capture.grad_outputs is None:
                # A shared layer's per-sample gradient mixes several calls: not supported here.
                raise RuntimeError(
                    f"layer {name!r} was called twice in one forward pass; fast clipping needs each trainable "
                    "layer used once per pass (use the opacus backend for weight sharing)."
                )
            capture.inputs = inputs[0].detach()
            capture.output = output
            capture.grad_outputs = None

            def grad_hook(grad):
                capture.grad_outputs = grad.detach()

            output.register_hook(grad_hook)

        return hook

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` only as far as the trainable layers' outputs.

        Clipping needs each layer's input and output gradient, never autograd's summed weight
        gradient, so asking for the output gradients alone skips one weight-gradient product per
        layer (and leaves every .grad untouched).
        """
        names = [n for n, c in self._captures.items() if c.output is not None]
        if not names:
            raise RuntimeError("no trainable layer ran in the forward pass: nothing to backpropagate to.")
        outputs = [self._captures[n].output for n in names]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        for name, output, grad in zip(names, outputs, grads):
            capture = self._captures[name]
            capture.grad_outputs = torch.zeros_like(output) if grad is None else grad.detach()
            capture.output = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- per-layer pieces -------------------------------------------------------------------

    def _norm_layer_grads(self, layer, x, g):
        """Per-sample gradients [B, ...] of a LayerNorm/GroupNorm's weight and bias."""
        if isinstance(layer, nn.LayerNorm):
            normalized = torch.nn.functional.layer_norm(x, layer.normalized_shape, eps=layer.eps)
            dims = tuple(range(1, x.dim() - len(layer.normalized_shape)))
        else:
            normalized = torch.nn.functional.group_norm(x, layer.num_groups, eps=layer.eps)
            dims = tuple(range(2, x.dim()))
        if isinstance(layer, nn.GroupNorm):
            weight = (g * normalized).sum(dim=dims)
            bias = g.sum(dim=dims)
        else:
            weight = (g * normalized).sum(dim=dims) if dims else g * normalized
            bias = g.sum(dim=dims) if dims else g
        grads = {}
        if layer.weight is not None and layer.weight.requires_grad:
            grads[layer.weight] = weight
        if layer.bias is not None and layer.bias.requires_grad:
            grads[layer.bias] = bias
        return grads

    def _explicit_grads(self, layer, x, g):
        if hasattr(layer, "per_sample_gradients"):
            return layer.per_sample_gradients(x, g)
        return self._norm_layer_grads(layer, x, g)

    def _use_ghost(self, tokens: int, d_in: int, d_out: int) -> bool:
        if self.strategy != "auto":
            return self.strategy == "ghost"
        return tokens * tokens * (d_in + d_out) < tokens * d_in * d_out

    def _linear_sq_norms(self, layer, x, g, groups, num_groups):
        """Per-group squared gradient norms of a Linear (or 1x1 conv) weight and bias."""
        weight_trainable = layer.weight.requires_grad
        bias_trainable = layer.bias is not None and layer.bias.requires_grad
        if num_groups == x.shape[0] and torch.equal(groups, torch.arange(num_groups)):
            # One unit per sample: every sample at once, as batched matrix products.
            sq = torch.zeros(num_groups, dtype=torch.float64, device=x.device)
            if weight_trainable:
                if self._use_ghost(x.shape[1], x.shape[2], g.shape[2]):
                    sq += (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2)).double()
                else:
                    sq += torch.bmm(g.transpose(1, 2), x).pow(2).sum(dim=(1, 2)).double()
            if bias_trainable:
                sq += g.sum(1).pow(2).sum(1).double()
            return sq
        xs, gs = _group_tokens(x, groups, num_groups), _group_tokens(g, groups, num_groups)
        sq = torch.zeros(num_groups, dtype=torch.float64, device=x.device)
        for s, (xg, gg) in enumerate(zip(xs, gs)):
            if weight_trainable:
                if self._use_ghost(xg.shape[0], xg.shape[1], gg.shape[1]):
                    sq[s] += ((xg @ xg.T) * (gg @ gg.T)).sum().double()
                else:
                    sq[s] += (gg.T @ xg).pow(2).sum().double()
            if bias_trainable:
                sq[s] += gg.sum(0).pow(2).sum().double()
        return sq

    # ---- the step ----------------------------------------------------------------------------

    def clip_and_accumulate(self, *, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Clip each sample's (or group's) gradient to max_grad_norm and add the sum to `summed_grad`.

        `groups` maps each sample of the batch to a privacy unit 0..S-1 (a subject); None means
        every sample is its own unit. Returns the unclipped per-unit norms.
        """
        captured = {n: c for n, c in self._captures.items() if c.inputs is not None and c.grad_outputs is not None}
        if len(captured) != len(self.layers):
            missing = sorted(set(self.layers) - set(captured))
            raise RuntimeError(f"no forward/backward pass captured for {missing[:3]}...: call backward first.")
        batch = next(iter(captured.values())).inputs.shape[0]
        if groups is None:
            groups = torch.arange(batch)
        groups = groups.to(torch.long).cpu()
        num_groups = int(groups.max()) + 1 if len(groups) else 0

        # Norms stay on the model's device until the end: one host sync per step, not one per layer.
        device = next(iter(captured.values())).inputs.device
        # One row of squared norms per clip group (a single row unless budget_shares split C).
        sq_norms = torch.zeros(len(self._group_norms), num_groups, dtype=torch.float64, device=device)
        norm_layer_grads = {}
        for name, layer in self.layers.items():
            capture = self._captures[name]
            k = self._clip_group[name]
            if _explicit(layer):
                per_sample = self._explicit_grads(layer, capture.inputs, capture.grad_outputs)
                for param, grads in per_sample.items():
                    flat = grads.reshape(batch, -1)
                    per_group = torch.zeros(num_groups, flat.shape[1], dtype=flat.dtype, device=flat.device)
                    per_group.index_add_(0, groups.to(flat.device), flat)
                    sq_norms[k] += per_group.pow(2).sum(1).double().to(device)
                    norm_layer_grads[param] = per_group
            else:
                x, g = _tokens(capture.inputs, layer, is_input=True), _tokens(capture.grad_outputs, layer)
                sq_norms[k] += self._linear_sq_norms(layer, x, g, groups, num_groups).to(device)

        bounds = torch.tensor(self._group_norms, dtype=torch.float64, device=device)[:, None]
        factors = (bounds / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)  # [clip groups, units]
        per_sample_factor = factors[:, groups.to(device)]

        for name, layer in self.layers.items():
            capture = self._captures[name]
            k = self._clip_group[name]
            if _explicit(layer):
                for param in layer.parameters(recurse=False):
                    if param in norm_layer_grads:
                        per_group = norm_layer_grads[param]
                        clipped = (factors[k].to(per_group.device, per_group.dtype)[:, None] * per_group).sum(0)
                        self._add(param, clipped.reshape(param.shape))
                continue
            x, g = _tokens(capture.inputs, layer, is_input=True), _tokens(capture.grad_outputs, layer)
            scaled = g * per_sample_factor[k].to(g.device, g.dtype)[:, None, None]
            if layer.weight.requires_grad:
                weight = scaled.reshape(-1, scaled.shape[-1]).T @ x.reshape(-1, x.shape[-1])
                self._add(layer.weight, weight.reshape(layer.weight.shape))
            if layer.bias is not None and layer.bias.requires_grad:
                self._add(layer.bias, scaled.sum(dim=(0, 1)))
        for capture in self._captures.values():
            capture.inputs = capture.output = capture.grad_outputs = None
        return sq_norms.sum(0).sqrt().float().cpu()

    def _add(self, param: nn.Parameter, value: torch.Tensor) -> None:
        value = value.to(param.dtype)
        if param in self.summed_grad:
            self.summed_grad[param] += value
        else:
            self.summed_grad[param] = value.clone()

    def reset(self) -> None:
        self.summed_grad.clear()


def _clip_groups(*, layer_names: list[str], max_grad_norm: float,
                 budget_shares: dict[str, float]) -> tuple[dict[str, int], list[float]]:
    """Each layer's clip group and each group's bound; the squares of the bounds add up to C²."""
    total = sum(budget_shares.values())
    if any(not 0 < share < 1 for share in budget_shares.values()) or total > 1 + 1e-12:
        raise ValueError(f"budget_shares={budget_shares} must be fractions in (0, 1) that add up to at most 1.")
    group, bounds = {}, []
    for k, (prefix, share) in enumerate(budget_shares.items()):
        matched = [n for n in layer_names if n.startswith(prefix)]
        if not matched:
            raise ValueError(f"budget_shares: no trainable layer's name starts with {prefix!r}.")
        group.update({n: k for n in matched if n not in group})
        bounds.append(max_grad_norm * math.sqrt(share))
    rest = [n for n in layer_names if n not in group]
    if rest:
        if total >= 1 - 1e-12:
            raise ValueError(f"budget_shares leave no clipping budget for {rest[0]!r} and the other layers "
                             "outside their prefixes; give shares that add up to less than 1.")
        group.update({n: len(bounds) for n in rest})
        bounds.append(max_grad_norm * math.sqrt(1 - total))
    return group, bounds


def _explicit(layer: nn.Module) -> bool:
    """Layers whose per-sample gradients are small enough to form outright."""
    return isinstance(layer, (nn.LayerNorm, nn.GroupNorm)) or hasattr(layer, "per_sample_gradients")


def _group_tokens(t: torch.Tensor, groups: torch.Tensor, num_groups: int) -> list[torch.Tensor]:
    """Per group, the tokens of all its samples as one [T_total, features] matrix."""
    if num_groups == t.shape[0] and torch.equal(groups, torch.arange(num_groups)):
        return list(t)
    return [t[(groups == s).to(t.device)].reshape(-1, t.shape[-1]) for s in range(num_groups)]
