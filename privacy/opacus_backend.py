"""The reference backend: opacus' per-sample gradient hooks, clipped and summed like privdiff's own.

opacus' `GradSampleModule` materialises every per-sample gradient (`param.grad_sample`, [B, ...]).
From them this backend forms each privacy unit's gradient (a subject's samples summed), its norm
over all trainable parameters, and the clipped sum. It has the same interface as
`GradSampleClipper`, so the engine can run either; it supports every layer opacus does (weight
sharing too), at the memory cost of B full gradients.
"""

from __future__ import annotations

import torch
from torch import nn


def _register_custom_layers(module: nn.Module) -> None:
    """Teach opacus the per-sample gradients of layers that provide `per_sample_gradients(inputs,
    grad_outputs)` themselves (privdiff's trainable token rows), once per layer class."""
    from .accounting import opacus_without_root_handler

    opacus_without_root_handler()
    from opacus import GradSampleModule
    from opacus.grad_sample import register_grad_sampler

    for layer in module.modules():
        cls = type(layer)
        if hasattr(cls, "per_sample_gradients") and cls not in GradSampleModule.GRAD_SAMPLERS:
            register_grad_sampler(cls)(lambda layer, activations, backprops:
                                       layer.per_sample_gradients(activations[0], backprops))


class OpacusClipper:
    """Per-sample clipping through opacus' hooks (`GradSampleModule`, hooks mode)."""

    def __init__(self, *, module: nn.Module, max_grad_norm: float):
        from .accounting import opacus_without_root_handler

        opacus_without_root_handler()
        from opacus import GradSampleModule

        _register_custom_layers(module)
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be positive.")
        self.max_grad_norm = float(max_grad_norm)
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        module.train()  # opacus records activations only in training mode
        if not self.parameters:
            raise ValueError("the module has no trainable parameters: nothing to clip.")
        # The hooks sit on the submodules, so the caller keeps calling its own module; the wrapper
        # is kept only to remove them. loss_reduction="sum": the caller back-propagates a sum.
        self._wrapper = GradSampleModule(module, batch_first=True, loss_reduction="sum", strict=True)
        self.summed_grad: dict[torch.nn.Parameter, torch.Tensor] = {}

    def backward(self, loss: torch.Tensor, *, groups: torch.Tensor | None = None) -> None:
        loss.backward()  # opacus' hooks form the per-sample gradients during a full backward

    def clip_and_accumulate(self, *, groups: torch.Tensor | None = None) -> torch.Tensor:
        samples = [p.grad_sample for p in self.parameters]
        if any(s is None for s in samples):
            raise RuntimeError("opacus captured no per-sample gradient: call backward first.")
        batch = samples[0].shape[0]
        groups = torch.arange(batch) if groups is None else groups.to(torch.long).cpu()
        num_groups = int(groups.max()) + 1 if len(groups) else 0
        per_unit = []
        for sample in samples:
            flat = sample.reshape(batch, -1)
            unit = torch.zeros(num_groups, flat.shape[1], dtype=flat.dtype, device=flat.device)
            unit.index_add_(0, groups.to(flat.device), flat)
            per_unit.append(unit)
        norms = torch.sqrt(sum(u.double().pow(2).sum(1).cpu() for u in per_unit))
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for param, unit in zip(self.parameters, per_unit):
            clipped = (factors.to(unit.device, unit.dtype)[:, None] * unit).sum(0).reshape(param.shape)
            if param in self.summed_grad:
                self.summed_grad[param] += clipped.to(param.dtype)
            else:
                self.summed_grad[param] = clipped.to(param.dtype)
            param.grad_sample = None
        return norms.float()

    def reset(self) -> None:
        self.summed_grad.clear()

    def remove(self) -> None:
        self._wrapper._close()
