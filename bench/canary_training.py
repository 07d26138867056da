"""How tight is the canary audit on a real DP trainer (DP-LDM or DP-SGD TI)? privdiff-tiny, vs the Gaussian reference.

    python bench/canary_training.py --method dp-ldm     # ε = 1, 2, 4, 8; full and half batches; 5 seeds (~16 min)
    python bench/canary_training.py --method dpsgd-ti   # ε = 2, 4, 8; full and half batches; 32 and 1 vectors; 5 seeds
    python bench/canary_training.py --method dp-ldm --seeds 0 --epsilons 2 --out /tmp/canary_dp_ldm.json
    python bench/canary_training.py --method dpsgd-ti --seeds 0 --epsilons 2 --vectors 32 --out /tmp/canary_dp_ti.json

Each audit runs the method's own training run with 1,000 gradient canaries of norm 10·C, each included
with probability 1/2, scored per step on the engine's noisy clipped gradient (likelihood-ratio scores,
99% confidence; C = 0.01, 4 epochs, δ = 1e-5):
- dp-ldm: `pipelines.canary_audit.audit_dp_ldm`, DP-LDM's `FineTuneRun` (attention set, 64 "shapes" items).
- dpsgd-ti: `pipelines.canary_audit.audit_dpsgd_ti`, DP-SGD TI's `DPSGDTIRun` as `train_dpsgd_ti` steps it
  (16 "style" items), the canaries in the new token rows. The rows hold k·64 numbers for k vectors: with
  32 vectors (2,048 >= 1,000) the canaries' directions are orthonormal; with 1 vector (64 numbers, the
  usual TI setting on this model) each score also carries the other canaries' signal (about
  sqrt(500 / 64) = 3 canaries' worth per step), which costs power, not soundness.
Two samplings: full batches (q = 1, 4 steps: a composition of Gaussians, so the f-DP bound against
μ-GDP, "fdp", is sound) and half batches (q = 0.5, 8 steps: Poisson-subsampled, not GDP, so the sound
one is "fdp-eps-delta"). All three bounds of every audit are kept, and the Gaussian fit of the
canaries' summed projections ("gaussian-fit", an estimate under the model that they are Gaussian; see
`privacy.canary.gaussian_fit_mu_bound`). The baseline, measured in the same run: the exact (ε, δ)-DP
Gaussian mechanism audited with the same m, seeds and bound (`gaussian_reference_audit`); `x gauss` is
the method's median bound over the baseline's. `noise/4` is the median bound of the same audit with the
engine's noise cut to a quarter while the accountant still records the full σ (a broken mechanism:
above ε means caught). Seeded DP noise; one torch thread (tiny matrices: on a shared 2-core machine the
thread pool's hand-offs, not the arithmetic, set the time). Medians over seeds: a comparison of bounds,
not the bound of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DELTA = 1e-5
CONFIDENCE = 0.99
CLIP_NORM = 0.01
# The three tests, and the Gaussian fit beside them (an estimate under a model, not a sound test).
BOUND_FIELDS = {"eps-delta": "epsilon_lower_bound_eps_delta", "fdp": "epsilon_lower_bound_fdp",
                "fdp-eps-delta": "epsilon_lower_bound_fdp_eps_delta", "gaussian-fit": "epsilon_estimate_gaussian_fit"}
# Batch size = the method's items // divisor.
SAMPLINGS = {"full": {"divisor": 1, "sound": "fdp"}, "half": {"divisor": 2, "sound": "fdp-eps-delta"}}


def _audit_dp_ldm(*, data: str, items: int, epsilon: float, batch_size: int, epochs: float, canaries: int, seed: int):
    from privdiff.pipelines.canary_audit import audit_dp_ldm
    from privdiff.training.fine_tune import DPLDMConfig

    config = DPLDMConfig(epsilon=epsilon, delta=DELTA, epochs=epochs, batch_size=batch_size,
                         num_items=items, physical_batch_size=64, clip_norm=CLIP_NORM, learning_rate=1e-4,
                         seed=seed, secure_noise=False, num_samples=0)
    return audit_dp_ldm(base="tiny", data=data, config=config, num_canaries=canaries, confidence=CONFIDENCE)


def _audit_dpsgd_ti(*, data: str, items: int, epsilon: float, batch_size: int, vectors: int, epochs: float,
                    canaries: int, seed: int):
    from privdiff.pipelines.canary_audit import audit_dpsgd_ti
    from privdiff.pipelines.dp_ti import DPSGDTIConfig

    config = DPSGDTIConfig(token="<audit>", init_word="circle", num_vectors=vectors, epsilon=epsilon, delta=DELTA,
                           epochs=epochs, batch_size=batch_size, num_items=items, clip_norm=CLIP_NORM,
                           learning_rate=5e-3, seed=seed, secure_noise=False)
    return audit_dpsgd_ti(base="tiny", data=data, config=config, num_canaries=canaries, confidence=CONFIDENCE)


@dataclass(frozen=True)
class Method:
    """What differs between the audited trainers; the loop, the table and the JSON are shared."""

    audit: Callable  # one audit: keyword-only settings -> CanaryAuditResult
    data: str
    items: int
    epsilons: tuple[float, ...]
    vectors: tuple[int, ...]  # TI's vector counts, one table block each; empty: the method has no token vectors
    out: str
    mechanism: str


METHODS = {
    "dp-ldm": Method(audit=_audit_dp_ldm, data="shapes", items=64, epsilons=(1.0, 2.0, 4.0, 8.0), vectors=(),
                     out="cpu_canary_dp_ldm.json",
                     mechanism="dp-ldm (privdiff-tiny, attention set, the real FineTuneRun and DP-SGD engine) with "
                               "gradient canaries"),
    "dpsgd-ti": Method(audit=_audit_dpsgd_ti, data="style", items=16, epsilons=(2.0, 4.0, 8.0), vectors=(32, 1),
                       out="cpu_canary_dp_ti.json",
                       mechanism="dp-sgd textual inversion (privdiff-tiny, the real DPSGDTIRun and DP-SGD engine) "
                                 "with gradient canaries in the new token rows"),
}


@contextlib.contextmanager
def noise_scaled(scale: float):
    """The engine's noise times `scale` while its accountant records the full σ: a broken mechanism."""
    import privdiff.privacy.engine as engine

    real = engine.noisy_average
    engine.noisy_average = lambda **kw: real(**{**kw, "noise_multiplier": kw["noise_multiplier"] * scale})
    try:
        yield
    finally:
        engine.noisy_average = real


def by_bound(*, epsilon: float, results, broken, gaussian) -> dict:
    """Each bound's medians over the seeds: the audits, the broken runs and the Gaussian reference."""
    summary = {}
    for name, field in BOUND_FIELDS.items():
        bounds = [getattr(r.audit, field) for r in results]
        reference = statistics.median(getattr(a, field) for a in gaussian)
        summary[name] = {
            "bounds": bounds, "median_bound": statistics.median(bounds), "ratio": statistics.median(bounds) / epsilon,
            "gaussian_median_bound": reference,
            "over_gaussian": statistics.median(bounds) / reference if reference > 0 else None,
            "median_bound_noise_quartered": statistics.median(getattr(r.audit, field) for r in broken)}
    return summary


def _row(*, sampling: str, variant: dict, epsilon: float, results, broken, gaussian) -> dict:
    first = results[0].settings
    # TI rows also name the canary's dimension (k·64 numbers for k vectors).
    shape = {**variant, "canary_dim": first["canary_dim"]} if variant else {}
    return {"sampling": sampling, **shape, "epsilon": epsilon, "sample_rate": first["sample_rate"],
            "steps": first["steps"], "noise_multiplier": first["noise_multiplier"],
            "sound_bound": SAMPLINGS[sampling]["sound"],
            "recorded_epsilon": [r.audit.recorded_epsilon for r in results],
            "by_bound": by_bound(epsilon=epsilon, results=results, broken=broken, gaussian=gaussian)}


def _defaults(field: str) -> str:
    return "default: " + "; ".join(f"{getattr(m, field) or 'none'} ({name})" for name, m in METHODS.items())


def main(argv=None) -> int:
    import torch

    from privdiff.privacy.canary import AUDIT_LABEL, gaussian_reference_audit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=list(METHODS))
    parser.add_argument("--epsilons", type=float, nargs="+", help=_defaults("epsilons"))
    parser.add_argument("--samplings", nargs="+", default=list(SAMPLINGS), choices=list(SAMPLINGS))
    parser.add_argument("--vectors", type=int, nargs="+", help=_defaults("vectors"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--out", type=Path, help=_defaults("out") + " (in bench/results)")
    args = parser.parse_args(argv)
    method = METHODS[args.method]
    if args.vectors and not method.vectors:
        parser.error(f"--vectors is for --method dpsgd-ti; {args.method} has no token vectors: drop it")
    epsilons = args.epsilons or list(method.epsilons)
    # One variant per TI vector count; DP-LDM has one, with no extra settings.
    variants = [{"vectors": k} for k in args.vectors or method.vectors] or [{}]
    out = args.out or Path(__file__).parent / "results" / method.out
    torch.set_num_threads(1)

    start = time.perf_counter()
    rows = []
    print(f"{'batch':>5}{' vecs' if method.vectors else ''} {'eps':>4} {'steps':>5} {'sigma':>6} {'bound':>13} "
          f"{'median':>7} {'min':>6} {'max':>6} {'ratio':>6} {'gauss':>6} {'x gauss':>7} {'noise/4':>8}", flush=True)
    for sampling in args.samplings:
        batch = method.items // SAMPLINGS[sampling]["divisor"]
        for variant in variants:
            columns = "".join(f" {k:>4}" for k in variant.values())
            for eps in epsilons:
                common = dict(data=method.data, items=method.items, epsilon=eps, batch_size=batch,
                              epochs=args.epochs, canaries=args.canaries, **variant)
                results = [method.audit(**common, seed=s) for s in args.seeds]
                with noise_scaled(0.25):
                    broken = [method.audit(**common, seed=s) for s in args.seeds]
                gaussian = [gaussian_reference_audit(epsilon=eps, delta=DELTA, num_canaries=args.canaries,
                                                     confidence=CONFIDENCE, seed=s) for s in args.seeds]
                row = _row(sampling=sampling, variant=variant, epsilon=eps, results=results, broken=broken,
                           gaussian=gaussian)
                for name, r in row["by_bound"].items():
                    mark = "*" if name == row["sound_bound"] else " "
                    gain = f"{r['over_gaussian']:>7.2f}" if r["over_gaussian"] is not None else f"{'-':>7}"
                    print(f"{batch:>5}{columns} {eps:>4g} {row['steps']:>5} {row['noise_multiplier']:>6.3f} "
                          f"{name + mark:>13} {r['median_bound']:>7.3f} {min(r['bounds']):>6.3f} "
                          f"{max(r['bounds']):>6.3f} {r['ratio']:>6.3f} {r['gaussian_median_bound']:>6.3f} {gain} "
                          f"{r['median_bound_noise_quartered']:>8.3f}", flush=True)
                rows.append(row)
    seconds = time.perf_counter() - start
    print(f"* the bound sound for that sampling; {seconds:.0f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "mechanism": method.mechanism, "base": "privdiff-tiny", "data": f"{method.data}, {method.items} items",
        "clip_norm": CLIP_NORM, "epochs": args.epochs, "num_canaries": args.canaries, "canary_norm": 10.0,
        "delta": DELTA, "confidence": CONFIDENCE, "seeds": args.seeds, "score": "likelihood-ratio",
        "baseline": "gaussian_reference_audit (exact (epsilon, delta)-DP Gaussian), same m, seeds and bound",
        "label": AUDIT_LABEL, "rows": rows, "seconds": round(seconds, 1), "torch_threads": 1,
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
