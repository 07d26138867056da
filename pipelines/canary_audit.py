"""Canary audit of DP-LDM: an empirical lower bound on ε from one run of the real fine-tune.

m canary units join the run's N data units (`FineTuneRun(extra_units=...)`), each included with
probability 1/2 (Steinke, Nasr, Jagielski 2023; the bound is `privacy.canary`'s). Canary i's loss is
linear in the trainable Linear layers' weights: in each layer its row's input is a fixed vector x_il
(on the first token) and its loss the dot product of that token's output with a fixed g_il, so its
gradient is g_il x_il^T (and g_il for a trainable bias) whatever the weights are: `canary_norm`·C
along the unit direction u_i they make, far outside the clip ball, so a correct engine cuts it to
C·u_i. An excluded canary's loss is 0: it stays a unit with zero gradient, so the public unit count
N + m, and the noisy average's denominator q·(N + m), are the same in both worlds. Canary rows share
the data rows' forward pass (fast clipping needs each layer called once per pass); their outputs are
cut from the graph after every trainable layer, so no canary gradient depends on the weights.

Each step the engine's noisy clipped average is read between the noise and the optimizer (AdamW's
update is not the gradient), turned back into the noisy sum in units of C, projected on every u_i and
scored (`privacy.canary.step_score`); the scores add up over the run. The bound is compared with the
run's accountant ε for its σ, q, steps and δ. Canaries and scores are by-products of an audit run:
nothing of it is released; `write_canary_audit` writes a JSON record labelled as an audit, and a chart.

DP-SGD Textual Inversion (`audit_dpsgd_ti`) is audited the same way through its own run
(`pipelines.dp_ti.DPSGDTIRun(extra_units=...)`): its only trainable weights are the new token rows
(`TrainableRows`, in both encoders for SDXL), so canary i's loss is linear in their output at the
placeholders' positions, a fixed gradient of norm `canary_norm`·C along u_i over all the rows
(`RowCanaries`). The rows hold k·d numbers (d = 768 on SD1.5, 32 on privdiff-tiny): u_i are
orthonormal only when k·d >= m; otherwise each score also carries the other canaries' signal, about
sqrt(m / (k·d)) of one canary's per step, and the audit loses power (never soundness).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, public_name
from ..privacy.canary import (
    BOUNDS,
    SCORES,
    CanaryAudit,
    audit_scores,
    audit_streams,
    canary_directions,
    canary_inclusion,
    default_guesses,
    gaussian_reference_audit,
    pool_runs,
    run_seeds,
    step_score,
    torch_generator,
)
from ..privacy.record import atomic_target
from ..training.fine_tune import DPLDMConfig, FineTuneRun, validate_dataset
from ..training.result import Progress
from .dp_ti import DPSGDTIConfig

AUDIT_FILE = "canary-audit.json"
AUDIT_CHART = "canary-audit.png"
AUDIT_DELTA = 1e-5  # δ when the config leaves it to N: the audit needs 2·m·δ <= 1


@public_name
class AuditStopped(RuntimeError, UserError):
    """The audit's run was stopped before its last step."""


@dataclass(frozen=True)
class CanaryAuditResult:
    """One canary audit: the bound (with the ε it is compared to), the audited run's settings, and the
    canaries' scores and inclusion (None for the Gaussian reference), for the chart only."""

    audit: CanaryAudit
    settings: dict
    scores: np.ndarray | None = None
    included: np.ndarray | None = None

    def summary_lines(self) -> list[str]:
        a = self.audit
        canaries = f"{a.runs} runs × {a.num_canaries // a.runs}" if a.runs > 1 else f"{a.num_canaries}"
        planned = " (planned)" if self.settings.get("guesses") == "planned" else ""
        return [f"audited lower bound: ε >= {a.epsilon_lower_bound:.3g} at {a.confidence:.0%} confidence ({a.bound} "
                f"test; {canaries} canaries, {a.correct} of {a.num_guesses} guesses{planned} right)",
                f"recorded ε: {a.recorded_epsilon:.3g} at δ = {a.delta:.3g} (what the audited {a.mechanism} run "
                "claims)"
                + ("  <- EXCEEDED: the mechanism leaks more than it records" if a.exceeds_recorded else "")] \
            + self._gaussian_fit_lines() + self._shared_dimensions_lines()

    def _gaussian_fit_lines(self) -> list[str]:
        a = self.audit
        if a.epsilon_estimate_gaussian_fit is None:
            return []
        return [f"Gaussian fit of the scores: ε >= {a.epsilon_estimate_gaussian_fit:.3g} at {a.confidence:.0%} "
                f"confidence if the scores are Gaussian (μ >= {a.gaussian_fit_mu_lower_bound:.3g}; an estimate under "
                "that model, tighter than the test above but not sound for every mechanism)"
                + ("  <- above the recorded ε: confirm with more runs or canaries" if a.fit_exceeds_recorded else "")]

    def _shared_dimensions_lines(self) -> list[str]:
        # A low bound from canaries crowded into few dimensions says little: tell the reader, and the fix.
        dim, m = self.settings.get("canary_dim"), self.audit.num_canaries
        if dim is None or dim >= m:
            return []
        return [f"note: {m} canaries share {dim} trainable numbers, so each score also carries the others' signal "
                f"(about {(m / 2 / dim) ** 0.5:.2g} canaries' worth per step) and the audit has little power; audit "
                f"with at least {m} trainable numbers (more vectors, or fewer canaries) for a useful bound"]


class _GradientCanaries:
    """What every kind of gradient canary shares: its settings, checked, and its per-step score.

    `included`: each canary's inclusion (the audit's secret S); `generator` draws their directions.
    A subclass plants the gradients (`attach`, `per_sample_loss`) and projects the engine's noisy
    average on their directions (`_projection`, a sum in units of the clipped norm's scale).
    """

    def __init__(self, *, included: np.ndarray, canary_norm: float, generator: torch.Generator,
                 score: str = "likelihood-ratio"):
        if not canary_norm > 1:
            raise ValueError(f"canary_norm={canary_norm} must exceed 1 (a multiple of C) so that clipping matters; "
                             "e.g. 10.")
        if score not in SCORES:
            raise ValueError(f"score={score!r} must be one of {', '.join(SCORES)}.")
        self.included = np.asarray(included, dtype=bool)
        self.count = len(self.included)
        self.canary_norm, self.score, self._generator = float(canary_norm), score, generator
        self.scores = torch.zeros(self.count, dtype=torch.float64)
        self.sums = torch.zeros(self.count, dtype=torch.float64)  # the projections themselves, for the Gaussian fit
        self._batch = None  # (canary row mask, canary ids) while a forward pass is under way
        self._terms: list[torch.Tensor] = []

    def per_sample_loss(self, indices: torch.Tensor, *, data_loss: Callable) -> torch.Tensor:
        """Each row's loss: a data row's from `data_loss`, a canary row's the planted linear term. A data
        row's inputs stand in for a canary's, so every trainable layer sees the canary's own input and its
        output is cut from the rest of the model (the subclass's hooks)."""
        is_canary = indices >= self.num_data
        ids = (indices - self.num_data).clamp(min=0)
        stand_in = torch.where(is_canary, torch.zeros_like(indices), indices)
        device = self._batch_device()
        self._batch = (is_canary, ids) if device is None else (is_canary.to(device), ids.to(device))
        self._terms = []
        try:
            data = None if bool(is_canary.all()) and self._run_alone(len(indices)) else data_loss(stand_in)
        finally:
            self._batch = None
        canary, self._terms = torch.stack(self._terms).sum(0), []
        if data is None:
            return canary
        return torch.where(is_canary.to(data.device), canary.to(data.device, data.dtype), data)

    def _score(self, projection: torch.Tensor) -> None:
        engine = self.run.engine
        projection = projection * (engine.sampler.expected_batch_units / engine.config.max_grad_norm)
        self.sums += projection.to(self.sums)
        self.scores += step_score(projection=projection, noise_multiplier=engine.noise_multiplier,
                                  sample_rate=engine.config.sample_rate, score=self.score)


class LinearCanaries(_GradientCanaries):
    """m gradient canaries for a `FineTuneRun` (its `extra_units`), scored each step.

    `included`: each canary's inclusion (the audit's secret S); `generator` draws their directions.
    """

    def attach(self, *, run: FineTuneRun) -> None:
        if run.config.backend != "privdiff" or run.config.conditioning_words:
            raise ValueError("canaries need the privdiff backend and no conditioning_words: a canary lives in the "
                             "UNet's trainable Linear layers, clipped as one group.")
        self.run, self.num_data = run, run.num_examples
        trained = [(name, module) for name, module in run.model.named_modules()
                   if any(p.requires_grad for p in module.parameters(recurse=False))]
        self.layers = [module for _, module in trained
                       if isinstance(module, torch.nn.Linear) and module.weight.requires_grad]
        if not self.layers:
            raise ValueError("the trainable set has no Linear layer to carry the canaries.")
        m = self.count
        draw = dict(generator=self._generator, dtype=torch.float64)
        xs = [torch.randn(m, layer.in_features, **draw) for layer in self.layers]
        gs = [torch.randn(m, layer.out_features, **draw) for layer in self.layers]
        # |g x^T|² = |g|²|x|², and a trainable bias adds |g|²: the norm of each canary's whole direction.
        sq = sum(g.pow(2).sum(1) * (x.pow(2).sum(1) + _bias_trains(layer))
                 for layer, x, g in zip(self.layers, xs, gs))
        self.unit_g = [g / sq.sqrt()[:, None] for g in gs]  # u_i's blocks: unit_g x^T (and unit_g for the bias)
        self.xs = xs
        planted = run.config.clip_norm * self.canary_norm * torch.from_numpy(self.included).double()
        device = run.device
        self._planted_g = [(g * planted[:, None]).to(device, torch.float32) for g in self.unit_g]
        self._planted_x = [x.to(device, torch.float32) for x in xs]
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._plant_input(i))
        for _, module in trained:
            layer_index = next((i for i, layer in enumerate(self.layers) if layer is module), None)
            module.register_forward_hook(self._cut_output(layer_index))
        shortcut = [(module, _stand_in(module, device=device)) for _, module in trained]
        self._shortcut = shortcut if all(make is not None for _, make in shortcut) else None

    def _batch_device(self):
        return self.run.device

    def _run_alone(self, rows: int) -> bool:
        """Canaries alone: each trainable layer runs once on a small stand-in input (a canary's gradient
        is the same), not the whole UNet: most of the run's micro-batches are these. False: unknown layer."""
        if self._shortcut is None:
            return False
        for module, make_input in self._shortcut:
            module(make_input(rows))
        return True

    def _plant_input(self, i: int):
        def hook(layer, args):
            if self._batch is None or not torch.is_grad_enabled():
                return None
            mask, ids = self._batch
            x = args[0]
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            planted = torch.zeros_like(flat)
            planted[:, 0, :] = self._planted_x[i][ids].to(x.dtype)
            return (torch.where(mask[:, None, None], planted, flat).reshape(x.shape), *args[1:])

        return hook

    def _cut_output(self, i: int | None):
        def hook(layer, args, output):
            if self._batch is None or not torch.is_grad_enabled():
                return None
            mask, ids = self._batch
            if i is not None:  # the canary's loss term: linear in this layer's weight (and bias)
                first = output.reshape(output.shape[0], -1, output.shape[-1])[:, 0, :]
                weight = self._planted_g[i][ids] * mask[:, None]
                self._terms.append((first.float() * weight).sum(-1))
            return torch.where(mask.view(-1, *[1] * (output.dim() - 1)), output.detach(), output)

        return hook

    def read_noisy_average(self) -> None:
        """Project the engine's noisy average on every u_i, as a sum in units of C, and score it."""
        projection = torch.zeros(self.count, dtype=torch.float64)
        with torch.no_grad():
            for layer, x, g in zip(self.layers, self.xs, self.unit_g):
                projection += ((g @ layer.weight.grad.double().cpu()) * x).sum(1)
                if _bias_trains(layer):
                    projection += g @ layer.bias.grad.double().cpu()
        self._score(projection)


def _stand_in(module, *, device) -> Callable[[int], torch.Tensor] | None:
    """A zero input of the smallest shape `module` takes, for a batch of canary rows (None: unknown layer)."""
    nn = torch.nn
    dtype = next(module.parameters(recurse=False)).dtype
    if isinstance(module, nn.Linear):
        shape = (1, module.in_features)
    elif isinstance(module, nn.LayerNorm):
        shape = (1, *module.normalized_shape)
    elif isinstance(module, nn.GroupNorm):
        shape = (module.num_channels, 1, 1)
    elif isinstance(module, nn.Conv2d):
        shape = (module.in_channels, *module.kernel_size)
    else:
        return None
    return lambda rows: torch.zeros(rows, *shape, device=device, dtype=dtype)


def _bias_trains(layer) -> float:
    return float(layer.bias is not None and layer.bias.requires_grad)


class RowCanaries(_GradientCanaries):
    """m gradient canaries in the new token rows of a DP-SGD TI run (`DPSGDTIRun(extra_units=...)`).

    Canary i's loss is sum_r <g_ir, out[p_r]> / (times row r's id occurs) over the `TrainableRows`
    output at the positions p_r holding placeholder r, so its per-sample gradient of rows[r] is g_ir
    whatever the rows hold; the g_ir of all encoders together are `canary_norm`·C·u_i. A canary row's
    output of the rows layer is cut from the rest of the text encoder, so nothing else of the model
    reaches its gradient. `included`: each canary's inclusion (the audit's secret S).
    """

    def attach(self, *, run) -> None:
        self.run, self.num_data = run, len(run.latents)
        self.layers = list(run.placeholders.rows)  # TrainableRows, one per text encoder
        for layer, ids in zip(self.layers, run.prompt_ids):
            seen = layer.lookup[ids[0]]
            if len(set(seen[seen >= 0].tolist())) != layer.rows.shape[0]:
                raise ValueError("the template's prompt does not hold every placeholder token (cut at the tokenizer's "
                                 "length?); use a shorter template or fewer vectors.")
        sizes = [layer.rows.numel() for layer in self.layers]
        self.dim = sum(sizes)
        self.directions = canary_directions(num_canaries=self.count, dim=self.dim, generator=self._generator)
        planted = run.engine.config.max_grad_norm * self.canary_norm * torch.from_numpy(self.included).double()
        blocks = torch.split(self.directions * planted[:, None], sizes, dim=1)
        self._planted = [block.reshape(self.count, *layer.rows.shape).to(layer.rows.dtype)
                         for block, layer in zip(blocks, self.layers)]  # [m, k, d]: g_i of each encoder
        for i, layer in enumerate(self.layers):
            layer.register_forward_hook(self._cut_output(i))

    def _batch_device(self):
        return None  # the rows layers sit on the encoders' device: the masks stay where the ids are

    def _run_alone(self, rows: int) -> bool:
        """Canaries alone: the rows layers run on the placeholder ids only, not the encoders and the
        UNet (a canary's gradient is the same); most of an audit's micro-batches are these."""
        for layer in self.layers:
            layer(layer.row_ids[None].expand(rows, -1))
        return True

    def _cut_output(self, i: int):
        def hook(layer, args, output):
            if self._batch is None or not torch.is_grad_enabled():
                return None
            mask, ids = (t.to(output.device) for t in self._batch)
            row = layer.lookup.to(args[0].device)[args[0]]  # [B, T]: the row each position reads, or -1
            hits = torch.nn.functional.one_hot(row.clamp(min=0), layer.rows.shape[0]) * (row >= 0)[..., None]
            hits = hits.to(output.dtype)  # [B, T, k]
            # Divided by each row's occurrences: a template naming the token twice still plants g_i once.
            weight = self._planted[i].to(output.device)[ids].to(output.dtype) * mask[:, None, None]
            weight = weight / hits.sum(1).clamp(min=1)[..., None]
            self._terms.append((output * torch.einsum("btk,bkd->btd", hits, weight)).sum((1, 2)).float())
            return torch.where(mask[:, None, None], output.detach(), output)

        return hook

    def read_noisy_average(self) -> None:
        """Project the engine's noisy average of the rows on every u_i, as a sum in units of C, and score it."""
        with torch.no_grad():
            grad = torch.cat([layer.rows.grad.double().cpu().reshape(-1) for layer in self.layers])
            self._score(self.directions @ grad)


# ------------------------------------------------------------------------------------- the audits


def audit_dp_ldm(*, base, data, config: DPLDMConfig, num_canaries: int = 1000, canary_norm: float = 10.0,
                 confidence: float = 0.99, score: str = "likelihood-ratio", bound: str | None = None,
                 runs: int = 1, guesses: str | None = None, progress: Callable[[Progress], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> CanaryAuditResult:
    """Run DP-LDM's fine-tune (`config`, as a training run would use it) with m canaries and audit it.

    `base`: a pipeline (trained in place: pass a copy you can discard; with `runs` > 1 each run trains
    a copy) or anything `load_pipeline` takes; `data`: a dataset, a folder or a procedural set's name.
    δ is `config.delta`, or 1e-5 when the config leaves it to N. The canaries, their inclusion and the
    run's directions come from `config.seed`; the DP noise from the config's generator (seeded when
    `secure_noise` is off). `bound` (see `privacy.canary.audit_scores`) defaults to the tightest sound
    one for the run. `runs` > 1: the many-run variant, that many independent runs (seeds derived from
    `config.seed`) of m canaries each, audited together (`privacy.canary.pool_runs`). `guesses`:
    "planned" for the one guess pair chosen in advance from the recorded ε (`planned_guesses`), None
    for the grid. `should_stop` is polled after each step: a stop raises `AuditStopped` (a run cut
    short has no bound).
    """
    import copy

    from ..training.inputs import resolve_base, resolve_data

    if guesses not in (None, "planned"):
        raise ValueError(f"guesses={guesses!r} must be None (the grid) or 'planned'.")
    config = _audit_config(config=config, num_canaries=num_canaries, bound=bound, runs=runs)
    dataset = None  # the same items in every run: read once
    each, sums, facts = [], [], {}
    for k, run_seed in enumerate(run_seeds(seed=config.seed, runs=runs), start=1):
        # σ is calibrated once: every run has the same ε, δ, sample rate and steps.
        run_config = replace(config, seed=run_seed, noise_multiplier=facts["run"].engine.noise_multiplier
                             if facts else config.noise_multiplier)
        run_progress = _naming_the_run(progress, run=k, runs=runs)
        inclusion_stream, direction_stream = audit_streams(seed=run_seed, count=2)
        included = canary_inclusion(num_canaries=num_canaries, stream=inclusion_stream)
        canaries = LinearCanaries(included=included, canary_norm=canary_norm, score=score,
                                  generator=torch_generator(stream=direction_stream))  # checked before the model loads
        if dataset is None:
            dataset = resolve_data(base=base, data=data, seed=config.seed, num_items=config.num_items)
        n = validate_dataset(dataset=dataset, config=run_config)
        own = copy.deepcopy(base) if runs > 1 and not isinstance(base, (str, Path)) else base
        run = FineTuneRun(pipeline=resolve_base(own, device=config.device), dataset=dataset, config=run_config,
                          num_examples=n, progress=run_progress, extra_units=canaries)
        while run.step < run.total_steps:
            info = run.train_step()
            if run_progress is not None:
                run_progress(info)
            if should_stop is not None and should_stop() and run.step < run.total_steps:
                raise AuditStopped(f"the canary audit was stopped after step {run.step} of {run.total_steps}; an "
                                   "audit cut short has no bound (nothing was written): run it again to the end.")
        each.append((canaries.scores.numpy(), included))
        sums.append(canaries.sums.numpy())
        facts = {"n": n, "run": run, "layers": len(canaries.layers)}
    run, n = facts["run"], facts["n"]
    scores, included = pool_runs(each)
    grid, bound = _guesses_and_bound(num_canaries=num_canaries * runs, sample_rate=run.sample_rate, bound=bound)
    audit = audit_scores(scores=scores, included=included, delta=run.delta, confidence=confidence,
                         guesses=guesses or grid, recorded_epsilon=run.engine.accountant.epsilon(delta=run.delta),
                         mechanism="dp-ldm", bound=bound, runs=runs, values=np.concatenate(sums))
    settings = {"method": "dp-ldm", "target_epsilon": config.epsilon, "delta": run.delta, "num_items": n,
                "num_canaries": num_canaries, "runs": runs, "guesses": guesses or "grid", "canary_norm": canary_norm,
                "score": score, "sample_rate": run.sample_rate, "steps": run.total_steps,
                "noise_multiplier": run.engine.noise_multiplier,
                "clip_norm": config.clip_norm, "epochs": config.epochs, "batch_size": config.batch_size,
                "learning_rate": config.learning_rate, "trainable": config.trainable, "seed": config.seed,
                "canary_layers": facts["layers"]}
    return CanaryAuditResult(audit=audit, settings=settings, scores=scores, included=included)


def audit_dpsgd_ti(*, base, data, config: DPSGDTIConfig, num_canaries: int = 1000, canary_norm: float = 10.0,
                   seed: int | None = None, confidence: float = 0.99, score: str = "likelihood-ratio",
                   bound: str | None = None, progress: Callable[[Progress], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> CanaryAuditResult:
    """Run DP-SGD Textual Inversion (`config`, as `train_dpsgd_ti` would) with m canaries and audit it.

    The run is `pipelines.dp_ti.DPSGDTIRun`, the trainer's own, stepped as the trainer steps it, with
    the canaries as extra units (`RowCanaries`); nothing is written and the pipeline's token tables
    are put back. `base`, `data`: as `train_dpsgd_ti` takes them. δ is `config.delta`, or 1e-5 when
    the config leaves it to N. `seed` draws the canaries' inclusion and directions (default
    `config.seed`); the DP noise comes from the config (seeded when `secure_noise` is off). An
    excluded canary is a unit with zero gradient (replace-one of a canary by a null unit), which is
    one clipped gradient of difference, the sensitivity add-remove accounting assumes (replace-one
    accounting assumes twice it: the bound is then sound but looser). `bound` (see
    `privacy.canary.audit_scores`) defaults to the tightest sound one for the run. `should_stop` is
    polled after each step: a stop raises `AuditStopped` (a run cut short has no bound).
    """
    from ..training.inputs import resolve_base, resolve_data
    from .dp_ti import DPSGDTIRun, plan_dpsgd_ti
    from .textual_inversion import Placeholders, check_token_and_init_word, placeholder_names

    config = _ti_audit_config(config=config, num_canaries=num_canaries, bound=bound)
    inclusion_stream, direction_stream = audit_streams(seed=config.seed if seed is None else seed, count=2)
    included = canary_inclusion(num_canaries=num_canaries, stream=inclusion_stream)
    canaries = RowCanaries(included=included, canary_norm=canary_norm, score=score,
                           generator=torch_generator(stream=direction_stream))  # checks them before the model loads
    dataset = resolve_data(base=base, data=data, seed=config.seed, num_items=config.num_items)
    n, subjects, units, delta = plan_dpsgd_ti(dataset=dataset, config=config)
    pipeline = resolve_base(base)
    check_token_and_init_word(pipeline=pipeline, token=config.token, num_vectors=config.num_vectors,
                              init_word=config.init_word)
    placeholders = Placeholders(pipeline=pipeline, init_word=config.init_word,
                                names=placeholder_names(token=config.token, num_vectors=config.num_vectors))
    try:
        run = DPSGDTIRun(pipeline=pipeline, placeholders=placeholders, dataset=dataset, config=config, n=n,
                         subjects=subjects, units=units, delta=delta, extra_units=canaries)
        try:
            for step in range(run.steps):
                spent = run.train_step()["epsilon"]
                if progress is not None:
                    progress(Progress(step=step + 1, total=run.steps, epsilon=spent))
                if should_stop is not None and step + 1 < run.steps and should_stop():
                    raise AuditStopped(f"the canary audit was stopped after step {step + 1} of {run.steps}; an audit "
                                       "cut short has no bound (nothing was written): run it again to the end.")
        finally:
            run.engine.clipper.remove()
    finally:
        placeholders.restore()  # the base's own token tables, without the canaries' hooks
    sample_rate = run.engine.config.sample_rate
    guesses, bound = _guesses_and_bound(num_canaries=num_canaries, sample_rate=sample_rate, bound=bound)
    audit = audit_scores(scores=canaries.scores.numpy(), included=included, delta=delta, confidence=confidence,
                         guesses=guesses, recorded_epsilon=run.engine.accountant.epsilon(delta=delta),
                         mechanism="dpsgd-ti", bound=bound, values=canaries.sums.numpy())
    settings = {"method": "dpsgd-ti", "target_epsilon": config.epsilon, "delta": delta, "num_items": n,
                "num_canaries": num_canaries, "canary_norm": canary_norm, "score": score, "sample_rate": sample_rate,
                "steps": run.steps, "noise_multiplier": run.engine.noise_multiplier, "clip_norm": config.clip_norm,
                "epochs": config.epochs, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
                "num_vectors": config.num_vectors, "adjacency": config.adjacency, "seed": config.seed,
                "canary_seed": config.seed if seed is None else seed, "canary_dim": canaries.dim,
                "orthonormal_canaries": canaries.dim >= num_canaries}
    return CanaryAuditResult(audit=audit, settings=settings, scores=canaries.scores.numpy(), included=included)


def _guesses_and_bound(*, num_canaries: int, sample_rate: float, bound: str | None) -> tuple[tuple, str]:
    """The candidate guesses and the bound, both fixed by the run's settings before any score is seen."""
    guesses = default_guesses(num_canaries)
    if sample_rate < 1:  # a canary the sampler skipped looks excluded: one-sided guesses too
        guesses += tuple((plus, 0) for plus, _ in guesses)
    # As audit_dp_sgd: full batches compose Gaussians (GDP, "fdp" is sound); Poisson batches are not GDP.
    return guesses, bound or ("fdp" if sample_rate == 1 else "fdp-eps-delta")


def _naming_the_run(progress: Callable[[Progress], None] | None, *, run: int, runs: int):
    """`progress`, with each report naming its run when there are several."""
    if progress is None or runs == 1:
        return progress
    return lambda info: progress(replace(info, detail=" · ".join(d for d in (info.detail, f"run {run}/{runs}") if d)))


def _check_audit_settings(*, num_canaries: int, bound: str | None, delta: float | None, runs: int = 1) -> float:
    """The audit's δ (1e-5 when the config leaves it to N), after the checks every audit shares; `runs`
    runs of `num_canaries` are audited as one set, checked before the first run starts."""
    if bound is not None and bound not in BOUNDS:
        raise ValueError(f"bound={bound!r} must be one of {', '.join(BOUNDS)}, or None for the tightest sound one.")
    if num_canaries < 32:
        raise ValueError(f"num_canaries={num_canaries} is too few for an audit; use at least 32 (1,000 or more for "
                         "a useful bound).")
    delta = delta if delta is not None else AUDIT_DELTA
    if 2 * num_canaries * runs * delta > 1:
        pooled = f"{runs} runs of {num_canaries}" if runs > 1 else f"{num_canaries}"
        raise ValueError(f"delta={delta} with {pooled} canaries: the audit needs 2·m·δ <= 1; use at most "
                         f"{int(0.5 / delta)} canaries in all (fewer canaries or runs) or a smaller delta.")
    return delta


def _ti_audit_config(*, config: DPSGDTIConfig, num_canaries: int, bound: str | None) -> DPSGDTIConfig:
    """The DP-SGD TI config the audit runs: the same, with δ at most 1/(2m)."""
    if config.privacy_unit != "example":
        raise ValueError("the canary audit runs with privacy_unit='example': each canary is one example, clipped "
                         "alone; audit with that setting (the clipping and noise are the same).")
    delta = _check_audit_settings(num_canaries=num_canaries, bound=bound, delta=config.delta)
    return dataclasses.replace(config, delta=delta)


def _audit_config(*, config: DPLDMConfig, num_canaries: int, bound: str | None, runs: int = 1) -> DPLDMConfig:
    """The config the audit runs: δ at most 1/(2m), no samples or checkpoints (nothing is released)."""
    if config.epsilon is None:
        raise ValueError("the canary audit measures a private run: give epsilon (a non-private run has ε = ∞).")
    if config.backend != "privdiff" or config.conditioning_words or config.privacy_unit != "example":
        raise ValueError("the canary audit runs on the privdiff backend, privacy_unit='example', without "
                         "conditioning_words: each canary is one example in the UNet's Linear layers, clipped as one "
                         "group; audit with those settings (the clipping and noise are the same).")
    delta = _check_audit_settings(num_canaries=num_canaries, bound=bound, delta=config.delta, runs=runs)
    return dataclasses.replace(config, delta=delta, num_samples=0, keep_byproducts=False)


def audit_gaussian(*, epsilon: float, delta: float = AUDIT_DELTA, num_canaries: int = 1000, confidence: float = 0.99,
                   seed: int = 0, runs: int = 1, guesses: str | None = None) -> CanaryAuditResult:
    """The reference: m exactly (ε, δ)-DP Gaussian mechanisms, one per canary (`gaussian_reference_audit`),
    in `runs` pooled runs; `guesses` as for `audit_dp_ldm`."""
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon} must be positive.")
    audit = gaussian_reference_audit(epsilon=epsilon, delta=delta, num_canaries=num_canaries, confidence=confidence,
                                     seed=seed, runs=runs, guesses=guesses)
    return CanaryAuditResult(audit=audit, settings={"method": "gaussian", "target_epsilon": epsilon, "delta": delta,
                                                    "num_canaries": num_canaries, "runs": runs,
                                                    "guesses": guesses or "grid", "seed": seed})


def write_canary_audit(*, result: CanaryAuditResult, out: str | Path) -> Path:
    """`out/canary-audit.json` (the audit's fields and the run's settings, labelled as an audit), and
    `out/canary-audit.png`, the score distributions of included and excluded canaries, when there are scores."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / AUDIT_FILE
    text = json.dumps({"kind": "canary audit", **result.audit.to_dict(), "settings": result.settings},
                      indent=1, default=str) + "\n"
    with atomic_target(path) as partial:  # a reader never sees half a record
        partial.write_text(text, encoding="utf-8")
    if result.scores is not None:
        from ..data.images import save_png

        save_png(_score_chart(result), out / AUDIT_CHART)
    return path


def _score_chart(result: CanaryAuditResult):
    """Histograms of the canaries' scores, included vs excluded: the further apart, the more the run leaks."""
    from ..data.images import line_chart

    scores, included = result.scores, result.included
    lo, hi = np.percentile(scores, [0.5, 99.5])
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    series = {name: np.histogram(np.clip(scores[mask], edges[0], edges[-1]), bins=edges)[0].tolist()
              for name, mask in (("included", included), ("excluded", ~included))}
    a = result.audit
    # The chart's bitmap font has no Greek letters: "eps".
    return line_chart(series, title=f"canary scores ({result.settings['method']} audit), canaries per bin",
                      x_label=f"score from {edges[0]:.3g} to {edges[-1]:.3g}, bin",
                      note=f"audited eps >= {a.epsilon_lower_bound:.3g} vs recorded eps = {a.recorded_epsilon:.3g} "
                           f"({a.confidence:.0%} confidence)")
