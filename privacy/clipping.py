"""Per-sample gradient clipping without keeping every per-sample gradient of the whole model.

DP-SGD needs, for each privacy unit (a sample, or a subject's samples together), the norm of its
gradient over all trainable parameters, then the sum of the gradients each scaled by
min(1, C / norm). For a linear map y = x W^T applied to T tokens, unit u's weight gradient is
G_u^T X_u (G: output gradients, X: inputs, a unit's rows' tokens stacked). Each layer takes one of:
- `explicit`: form the per-unit gradients G_u^T X_u [U, d_out, d_in] as soon as the layer's output
  gradient arrives in the backward pass, take their norms, keep them, and free X and G; the
  clipped sum is then a weighted sum over units. The same matrix products as non-private
  training's weight gradient, done once; held memory U · d_in · d_out.
- `ghost`: the norm as <X_u X_u^T, G_u G_u^T> (cost U (KT)^2 (d_in + d_out)), never forming the
  gradient; X and G are kept and the clipped sum is one GEMM over all tokens, (c * G)^T X. Held
  memory B · T · (d_in + d_out): the choice for layers whose weight is large next to their tokens
  (deep UNet levels, cross-attention keys and values over 77 context tokens).
Each layer's choice is made once per shape: among the options whose held memory is at most twice
the leaner one's, the faster, measured on the layer's own tensors on a GPU (`auto`) or counted in
FLOPs on the CPU (deterministic). Products run in the activations' dtype (bf16 on a GPU, with fp32
accumulation inside the matrix products); norms, the clipped sum and the noise are fp32.

A convolution is the same linear map on unfolded patches (tokens = output positions, d_in =
channels * kernel area), which covers the `full` trainable set. Norm layers (LayerNorm, GroupNorm)
and layers with their own `per_sample_gradients` have small per-sample gradients, formed outright.

The backward pass: `backward(loss, groups=...)` runs autograd only as far as the trainable layers'
outputs (through an identity "tap" after each, tied to one anchor tensor), so autograd never forms
the unclipped weight gradients, and each layer's work happens as its output gradient arrives.
A plain `loss.backward()` also works: the layers' inputs and output gradients are then kept and
the work is done in `clip_and_accumulate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)
STRATEGIES = ("auto", "measure", "flops", "ghost", "explicit")
_MEMORY_SLACK = 2.0  # a faster option may hold up to this much more memory than the leaner one


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


def _explicit(layer: nn.Module) -> bool:
    """Layers whose per-sample gradients are small enough to form outright."""
    return isinstance(layer, (nn.LayerNorm, nn.GroupNorm)) or hasattr(layer, "per_sample_gradients")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Units:
    """Which rows of a micro-batch make up each privacy unit, in the forms the layers need."""

    def __init__(self, groups: torch.Tensor | None, batch: int, device: torch.device):
        groups = torch.arange(batch) if groups is None else groups.to(torch.long).cpu()
        if len(groups) != batch:
            raise ValueError(f"groups has {len(groups)} entries for a batch of {batch} rows.")
        self.groups = groups
        self.batch = batch
        self.count = int(groups.max()) + 1 if batch else 0
        counts = torch.bincount(groups, minlength=self.count) if batch else torch.zeros(0, dtype=torch.long)
        # Rows ordered unit by unit, each unit the same size K: tokens of a unit are one reshape away.
        rows = int(counts[0]) if self.count else 0
        uniform = self.count > 0 and bool((counts == rows).all())
        self.rows_per_unit = rows if uniform and torch.equal(
            groups, torch.arange(self.count).repeat_interleave(rows)) else None
        self.device_groups = groups.to(device, non_blocking=True)

    def stacked(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> [U, K*T, F] for units of K consecutive rows."""
        return t.reshape(self.count, -1, t.shape[-1])

    def per_unit(self, per_row: torch.Tensor) -> torch.Tensor:
        """Sum a [B, ...] tensor over each unit's rows: [U, ...]."""
        if self.rows_per_unit == 1:
            return per_row
        if self.rows_per_unit is not None:
            return per_row.reshape(self.count, self.rows_per_unit, *per_row.shape[1:]).sum(1)
        out = torch.zeros(self.count, *per_row.shape[1:], dtype=per_row.dtype, device=per_row.device)
        return out.index_add_(0, self.device_groups, per_row)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    clip_group: int
    inputs: torch.Tensor | None = None
    grad_outputs: torch.Tensor | None = None
    sq_norms: torch.Tensor | None = None  # [U], this layer's share of each unit's squared norm
    per_unit: dict = field(default_factory=dict)  # param -> [U, ...] per-unit gradients (explicit)
    plans: dict = field(default_factory=dict)  # shape key -> "explicit" | "ghost"
    unused: bool = False  # ran, but the loss does not depend on its output: a zero gradient

    def clear(self) -> None:
        self.inputs = self.grad_outputs = self.sq_norms = None
        self.per_unit = {}
        self.unused = False


class _Tap(torch.autograd.Function):
    """Identity on a trainable layer's output whose backward hands the output gradient to the clipper.

    Its second input, the clipper's anchor, puts every tap on a path to one tensor, so
    `autograd.grad(loss, anchor)` runs the backward through all taps but never forms the trainable
    weights' own gradients.
    """

    @staticmethod
    def forward(ctx, output, anchor, receive):
        ctx.receive = receive
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.receive(grad)
        return grad, None, None


class GradSampleClipper:
    """Hooks on the trainable layers of `module`; after `backward`, clip per unit and sum.

    Usage, per physical batch:
        clipper = GradSampleClipper(module=unet, max_grad_norm=C)
        losses = per_sample_loss(unet(...))              # shape [B]
        clipper.backward(losses.sum(), groups=groups)    # or losses.sum().backward(), which also fills .grad
        norms = clipper.clip_and_accumulate(groups=groups)   # adds sum_u c_u g_u into .summed_grad
    Trainable layers must be Linear, ungrouped zero-padded Conv2d, LayerNorm or GroupNorm: every
    parameter of an SD-class UNet, and LoRA adapters.
    """

    def __init__(self, *, module: nn.Module, max_grad_norm: float, strategy: str = "auto",
                 budget_shares: Mapping[str, float] | None = None):
        """`strategy`: `auto` (measured on a GPU, FLOPs on the CPU), `measure`, `flops`, or one
        option for every layer (`ghost`, `explicit`). `budget_shares` ({layer-name prefix: share})
        clips groups of layers separately: the layers under a prefix get C·sqrt(share), the rest
        C·sqrt(1 - sum of shares). Each unit's whole gradient still has norm at most C (group-wise
        clipping), so the noise and ε are unchanged; it keeps a small group (a few token rows)
        from being crowded out of the clip by a large one."""
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be positive.")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} must be one of {', '.join(STRATEGIES)}.")
        self.max_grad_norm = float(max_grad_norm)
        self.strategy = strategy
        self.layers: dict[str, _Layer] = {}
        self._handles = []
        names = []
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
            names.append(name)
        if not names:
            raise ValueError("the module has no trainable parameters: nothing to clip.")
        clip_group, self._group_norms = _clip_groups(layer_names=names, max_grad_norm=self.max_grad_norm,
                                                     budget_shares=dict(budget_shares or {}))
        for name in names:
            layer = module.get_submodule(name)
            state = self.layers[name] = _Layer(name=name, module=layer, clip_group=clip_group[name])
            self._handles.append(layer.register_forward_hook(self._forward_hook(state)))
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._live_units: _Units | None = None  # set by backward(): layers do their work as gradients arrive
        self.summed_grad: dict[torch.nn.Parameter, torch.Tensor] = {}

    # ---- capture -----------------------------------------------------------------------------

    def _anchor(self, device: torch.device) -> torch.Tensor:
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self._anchors[device]

    def _forward_hook(self, state: _Layer):
        def receive(grad):
            state.grad_outputs = grad.detach()
            if self._live_units is not None:
                self._process(state, self._live_units)

        def hook(layer, inputs, output):
            if not torch.is_grad_enabled():
                return None
            if state.inputs is not None and state.grad_outputs is None:
                # A shared layer's per-sample gradient mixes several calls: not supported here.
                raise RuntimeError(
                    f"layer {state.name!r} was called twice in one forward pass; fast clipping needs each "
                    "trainable layer used once per pass (use the opacus backend for weight sharing)."
                )
            state.clear()
            state.inputs = inputs[0].detach()
            return _Tap.apply(output, self._anchor(output.device), receive)

        return hook

    def backward(self, loss: torch.Tensor, *, groups: torch.Tensor | None = None) -> None:
        """Backpropagate `loss` only as far as the trainable layers' outputs.

        Clipping needs each layer's input and output gradient, never autograd's summed weight
        gradient, so that product is skipped and every .grad is left untouched. `groups` (each
        row's privacy unit 0..U-1) lets each layer reduce its tensors to per-unit norms as soon as
        its gradient arrives, freeing them during the backward pass; without it the tensors are
        kept until `clip_and_accumulate` names the units.
        """
        ran = [s for s in self.layers.values() if s.inputs is not None]
        if not ran:
            raise RuntimeError("no trainable layer ran in the forward pass: nothing to backpropagate to.")
        batch = ran[0].inputs.shape[0]
        live = None if groups is None else _Units(groups, batch, ran[0].inputs.device)
        self._live_units = live
        try:
            torch.autograd.grad(loss, list(self._anchors.values()), allow_unused=True)
        finally:
            self._live_units = None
        for state in ran:
            if state.grad_outputs is None and state.sq_norms is None:  # the loss does not use this layer
                state.unused = True
                if live is not None:
                    self._process(state, live)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- per-layer work ----------------------------------------------------------------------

    def _process(self, state: _Layer, units: _Units) -> None:
        """Reduce the layer's input and output gradient to per-unit squared norms (and, for the
        `explicit` option, per-unit gradients), freeing what the clipped sum does not need."""
        layer, x, g = state.module, state.inputs, state.grad_outputs
        acc = _accumulation_dtype(next(p for p in layer.parameters(recurse=False) if p.requires_grad).dtype)
        if state.unused:
            state.sq_norms = torch.zeros(units.count, dtype=acc, device=x.device)
            state.per_unit, state.inputs = {}, None
            return
        with torch.profiler.record_function("privdiff.clip.norms"):
            if _explicit(layer):
                grads = _per_sample_grads(layer, x, g)
                state.per_unit = {p: units.per_unit(v.reshape(units.batch, -1)) for p, v in grads.items()}
                state.sq_norms = sum(_sq(v, acc) for v in state.per_unit.values())
                state.inputs = state.grad_outputs = None
                return
            xt, gt = _tokens(x, layer, is_input=True), _tokens(g, layer)
            plan = self._plan(state, xt, gt, units)
            weight_trainable = layer.weight.requires_grad
            bias_trainable = layer.bias is not None and layer.bias.requires_grad
            terms, per_unit = [], {}
            if bias_trainable:
                bias = units.per_unit(gt.sum(1, dtype=acc))
                per_unit[layer.bias] = bias
                terms.append(_sq(bias, acc))
            if weight_trainable:
                if plan == "explicit":
                    weight = _per_unit_weight_grads(xt, gt, units)
                    per_unit[layer.weight] = weight
                    terms.append(_sq(weight, acc))
                else:
                    terms.append(_ghost_sq_norms(xt, gt, units, acc))
            state.sq_norms = terms[0] if len(terms) == 1 else terms[0] + terms[1]
            state.per_unit = per_unit
            if plan == "explicit" or not weight_trainable:
                state.inputs = state.grad_outputs = None

    def _plan(self, state: _Layer, xt: torch.Tensor, gt: torch.Tensor, units: _Units) -> str:
        key = (tuple(xt.shape), tuple(gt.shape), units.rows_per_unit, units.count)
        if key not in state.plans:
            fixed = self.strategy in ("ghost", "explicit")
            state.plans[key] = self.strategy if fixed else self._choose(xt, gt, units)
        return state.plans[key]

    def _choose(self, xt: torch.Tensor, gt: torch.Tensor, units: _Units) -> str:
        batch, tokens, d_in = xt.shape
        d_out = gt.shape[-1]
        held = {"explicit": units.count * d_in * d_out, "ghost": batch * tokens * (d_in + d_out)}
        lean = min(held.values())
        options = [o for o in ("explicit", "ghost") if held[o] <= _MEMORY_SLACK * lean]
        if len(options) == 1:
            return options[0]
        measure = self.strategy == "measure" or (self.strategy == "auto" and xt.device.type == "cuda")
        if measure:
            cost = {o: _time(lambda o=o: _option_work(o, xt, gt, units), xt.device) for o in options}
        else:
            unit_tokens = batch * tokens / max(units.count, 1)
            gemm = batch * tokens * d_in * d_out
            cost = {"explicit": gemm + units.count * d_in * d_out,
                    "ghost": units.count * unit_tokens ** 2 * (d_in + d_out) + gemm}
        return min(options, key=cost.get)

    def plans(self) -> dict[str, list[str]]:
        """Each layer's chosen option(s), for profiles and tests."""
        return {name: sorted(set(s.plans.values())) for name, s in self.layers.items() if s.plans}

    # ---- the step ----------------------------------------------------------------------------

    def clip_and_accumulate(self, *, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Clip each unit's gradient to max_grad_norm and add the sum to `summed_grad`.

        `groups` maps each row of the batch to a privacy unit 0..U-1 (a subject); None means every
        row is its own unit. Returns the unclipped per-unit norms (on the model's device: reading
        them is the caller's host sync, not the step's).
        """
        states = list(self.layers.values())
        missing = [s.name for s in states
                   if s.sq_norms is None and (s.inputs is None or (s.grad_outputs is None and not s.unused))]
        if missing:
            raise RuntimeError(f"no forward/backward pass captured for {missing[:3]}...: call backward first.")
        pending = [s for s in states if s.sq_norms is None]
        ref = pending[0].inputs if pending else None
        device = ref.device if ref is not None else states[0].sq_norms.device
        if pending:  # a plain loss.backward(): do the layers' work now
            units = _Units(groups, ref.shape[0], device)
            for state in pending:
                self._process(state, units)
        count = states[0].sq_norms.shape[0]
        if not pending:  # the layers did their work in backward(); the same units, named again here
            units = _Units(groups, count if groups is None else len(groups), device)
        if units.count != count:
            raise ValueError(f"groups name {units.count} units, the backward pass was given {count}.")

        with torch.profiler.record_function("privdiff.clip.sum"):
            acc = states[0].sq_norms.dtype
            sq_norms = torch.stack([
                torch.stack([s.sq_norms.to(device, acc) for s in states if s.clip_group == k]).sum(0)
                for k in range(len(self._group_norms))
            ])
            bounds = torch.tensor(self._group_norms, dtype=acc, device=device)[:, None]
            factors = (bounds / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)  # [clip groups, units]
            cast = {}  # (clip group, dtype, per row?) -> factors, cast once per step

            def scale(k, dtype, rows=False):
                if (k, dtype, rows) not in cast:
                    c = factors[k][units.device_groups] if rows else factors[k]
                    cast[(k, dtype, rows)] = c.to(dtype)
                return cast[(k, dtype, rows)]

            for state in states:
                k = state.clip_group
                for param, per_unit in state.per_unit.items():
                    flat = per_unit.reshape(count, -1)
                    summed = torch.mv(flat.T, scale(k, flat.dtype)) if count else flat.sum(0)
                    self._add(param, summed.reshape(param.shape))
                if state.inputs is not None:  # ghost: one GEMM over every token, scaled per row
                    layer = state.module
                    x = _tokens(state.inputs, layer, is_input=True)
                    g = _tokens(state.grad_outputs, layer)
                    row_factor = scale(k, g.dtype, rows=True)
                    scaled = g * row_factor[:, None, None]
                    weight = scaled.reshape(-1, scaled.shape[-1]).T @ x.reshape(-1, x.shape[-1])
                    self._add(layer.weight, weight.reshape(layer.weight.shape))
                state.clear()
        return sq_norms.sum(0).sqrt().float()

    def _add(self, param: nn.Parameter, value: torch.Tensor) -> None:
        if param in self.summed_grad:
            self.summed_grad[param] += value
        else:  # the clipped sum stays in fp32 (fp64 for fp64)
            self.summed_grad[param] = value.to(_accumulation_dtype(param.dtype), copy=True)

    def reset(self) -> None:
        self.summed_grad.clear()


# ---- the products ------------------------------------------------------------------------------

def _sq(per_unit: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Squared norm of each unit's slice, accumulated in `acc` without an upcast copy."""
    return torch.linalg.vector_norm(per_unit.reshape(per_unit.shape[0], -1), dim=1, dtype=acc).pow(2)


def _per_unit_weight_grads(xt: torch.Tensor, gt: torch.Tensor, units: _Units) -> torch.Tensor:
    """[U, d_out, d_in]: each unit's weight gradient G_u^T X_u."""
    if units.rows_per_unit is not None:
        return torch.bmm(units.stacked(gt).transpose(1, 2), units.stacked(xt))
    return units.per_unit(torch.bmm(gt.transpose(1, 2), xt))


def _ghost_sq_norms(xt: torch.Tensor, gt: torch.Tensor, units: _Units, acc: torch.dtype) -> torch.Tensor:
    """<X_u X_u^T, G_u G_u^T> per unit, never forming G_u^T X_u."""
    if units.rows_per_unit is not None:
        xs, gs = units.stacked(xt), units.stacked(gt)
        return (torch.bmm(xs, xs.transpose(1, 2)) * torch.bmm(gs, gs.transpose(1, 2))).sum(dim=(1, 2), dtype=acc)
    out = torch.zeros(units.count, dtype=acc, device=xt.device)
    for u in range(units.count):
        rows = (units.groups == u).nonzero().flatten().to(xt.device)
        xu, gu = xt[rows].reshape(-1, xt.shape[-1]), gt[rows].reshape(-1, gt.shape[-1])
        out[u] = ((xu @ xu.T) * (gu @ gu.T)).sum(dtype=acc)
    return out


def _option_work(option: str, xt, gt, units: _Units) -> None:
    """One layer's whole clipping work under `option` (norms and the clipped sum), for timing."""
    acc = _accumulation_dtype(xt.dtype)
    c = torch.ones(units.count, dtype=xt.dtype, device=xt.device)
    if option == "explicit":
        weight = _per_unit_weight_grads(xt, gt, units)
        _sq(weight, acc)
        torch.mv(weight.reshape(units.count, -1).T, c)
    else:
        _ghost_sq_norms(xt, gt, units, acc)
        scaled = gt * c[units.device_groups][:, None, None]
        scaled.reshape(-1, gt.shape[-1]).T @ xt.reshape(-1, xt.shape[-1])


def _time(work, device: torch.device, repeats: int = 3) -> float:
    """Median time of `work` in seconds (one untimed warm-up); CUDA events on a GPU."""
    import time

    work()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            work()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def _per_sample_grads(layer, x, g) -> dict:
    """Per-sample gradients [B, ...] of a norm layer's weight and bias, or a custom layer's own."""
    if hasattr(layer, "per_sample_gradients"):
        return layer.per_sample_gradients(x, g)
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
