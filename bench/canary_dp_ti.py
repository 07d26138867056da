"""How tight is the canary audit on the real DP-SGD Textual Inversion run? privdiff-tiny, vs the Gaussian reference.

    python bench/canary_dp_ti.py                        # ε = 2, 4, 8; full and half batches; 32 and 1 vectors; 5 seeds
    python bench/canary_dp_ti.py --seeds 0 --epsilons 2 --vectors 32 --out /tmp/canary_dp_ti.json

Each audit runs `pipelines.canary_audit.audit_dpsgd_ti`: DP-SGD TI's own run (`DPSGDTIRun`, as
`train_dpsgd_ti` steps it) on privdiff-tiny (16 "style" items, C = 0.01, 4 epochs, δ = 1e-5) with
1,000 gradient canaries of norm 10·C in the new token rows, each included with probability 1/2, scored
per step on the engine's noisy clipped gradient of the rows (likelihood-ratio scores, 99% confidence).
The rows hold k·64 numbers for k vectors: with 32 vectors (2,048 >= 1,000) the canaries' directions
are orthonormal; with 1 vector (64 numbers, the usual TI setting on this model) each score also carries
the other canaries' signal (about sqrt(500 / 64) = 3 canaries' worth per step), which costs power, not
soundness. Two samplings: full batches (q = 1, 4 steps: Gaussian composition, so "fdp" against μ-GDP
is sound) and half batches (q = 0.5, 8 steps: Poisson-subsampled, so the sound one is "fdp-eps-delta").
All three bounds of every audit are kept. The baseline, measured in the same run: the exact (ε, δ)-DP
Gaussian mechanism audited with the same m, seeds and bound (`gaussian_reference_audit`); `x gauss` is
the TI median bound over the baseline's. `noise/4` is the median bound with the engine's noise cut to a
quarter while the accountant still records the full σ (a broken mechanism: above ε means caught).
Seeded DP noise; one torch thread. Medians over seeds: a comparison of bounds, not the bound of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from canary_dp_ldm import CONFIDENCE, DELTA, by_bound, noise_scaled  # run as a script: bench/ is on the path

ITEMS = 16
SAMPLINGS = {"full": {"batch_size": ITEMS, "sound": "fdp"},
             "half": {"batch_size": ITEMS // 2, "sound": "fdp-eps-delta"}}


def audit(*, epsilon: float, batch_size: int, vectors: int, epochs: float, canaries: int, seed: int,
          noise_scale: float = 1.0):
    from privdiff.pipelines.canary_audit import audit_dpsgd_ti
    from privdiff.pipelines.dp_ti import DPSGDTIConfig

    config = DPSGDTIConfig(token="<audit>", init_word="circle", num_vectors=vectors, epsilon=epsilon, delta=DELTA,
                           epochs=epochs, batch_size=batch_size, num_items=ITEMS, clip_norm=0.01,
                           learning_rate=5e-3, seed=seed, secure_noise=False)
    with noise_scaled(noise_scale) if noise_scale != 1.0 else contextlib.nullcontext():
        return audit_dpsgd_ti(base="tiny", data="style", config=config, num_canaries=canaries, confidence=CONFIDENCE)


def _row(*, sampling: str, vectors: int, epsilon: float, results, broken, gaussian) -> dict:
    first = results[0].settings
    return {"sampling": sampling, "vectors": vectors, "canary_dim": first["canary_dim"], "epsilon": epsilon,
            "sample_rate": first["sample_rate"], "steps": first["steps"], "noise_multiplier": first["noise_multiplier"],
            "sound_bound": SAMPLINGS[sampling]["sound"],
            "recorded_epsilon": [r.audit.recorded_epsilon for r in results],
            "by_bound": by_bound(epsilon=epsilon, results=results, broken=broken, gaussian=gaussian)}


def main(argv=None) -> int:
    import torch

    from privdiff.privacy.canary import AUDIT_LABEL, gaussian_reference_audit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--samplings", nargs="+", default=list(SAMPLINGS), choices=list(SAMPLINGS))
    parser.add_argument("--vectors", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_canary_dp_ti.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    start = time.perf_counter()
    rows = []
    print(f"{'batch':>5} {'vecs':>4} {'eps':>4} {'steps':>5} {'sigma':>6} {'bound':>13} {'median':>7} {'min':>6} "
          f"{'max':>6} {'ratio':>6} {'gauss':>6} {'x gauss':>7} {'noise/4':>8}", flush=True)
    for sampling in args.samplings:
        batch = SAMPLINGS[sampling]["batch_size"]
        for vectors in args.vectors:
            for eps in args.epsilons:
                common = dict(epsilon=eps, batch_size=batch, vectors=vectors, epochs=args.epochs,
                              canaries=args.canaries)
                results = [audit(**common, seed=s) for s in args.seeds]
                broken = [audit(**common, seed=s, noise_scale=0.25) for s in args.seeds]
                gaussian = [gaussian_reference_audit(epsilon=eps, delta=DELTA, num_canaries=args.canaries,
                                                     confidence=CONFIDENCE, seed=s) for s in args.seeds]
                row = _row(sampling=sampling, vectors=vectors, epsilon=eps, results=results, broken=broken,
                           gaussian=gaussian)
                for name, r in row["by_bound"].items():
                    mark = "*" if name == row["sound_bound"] else " "
                    gain = f"{r['over_gaussian']:>7.2f}" if r["over_gaussian"] is not None else f"{'-':>7}"
                    print(f"{batch:>5} {vectors:>4} {eps:>4g} {row['steps']:>5} {row['noise_multiplier']:>6.3f} "
                          f"{name + mark:>13} {r['median_bound']:>7.3f} {min(r['bounds']):>6.3f} "
                          f"{max(r['bounds']):>6.3f} {r['ratio']:>6.3f} {r['gaussian_median_bound']:>6.3f} {gain} "
                          f"{r['median_bound_noise_quartered']:>8.3f}", flush=True)
                rows.append(row)
    seconds = time.perf_counter() - start
    print(f"* the bound sound for that sampling; {seconds:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "mechanism": "dp-sgd textual inversion (privdiff-tiny, the real DPSGDTIRun and DP-SGD engine) with gradient "
                     "canaries in the new token rows", "base": "privdiff-tiny", "data": f"style, {ITEMS} items",
        "clip_norm": 0.01, "epochs": args.epochs, "num_canaries": args.canaries, "canary_norm": 10.0, "delta": DELTA,
        "confidence": CONFIDENCE, "seeds": args.seeds, "score": "likelihood-ratio",
        "baseline": "gaussian_reference_audit (exact (epsilon, delta)-DP Gaussian), same m, seeds and bound",
        "label": AUDIT_LABEL, "rows": rows, "seconds": round(seconds, 1), "torch_threads": 1,
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
