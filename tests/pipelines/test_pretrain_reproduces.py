"""Re-running `privdiff pretrain` with the shipped seed reproduces the shipped analyzer figures.

Slow (about 30 minutes on 2 CPU cores): python -m pytest -m slow tests/pipelines/test_pretrain_reproduces.py
"""

import json

import pytest

from privdiff.models.privdiff_tiny import SHIPPED_DIR
from privdiff.pipelines.evaluation import SamplingConfig, evaluate_quality
from privdiff.pipelines.pretrain import PretrainConfig, pretrain

# Stated tolerance: CPU kernels differ between machines and thread counts, so the weights need not be
# bit-identical elsewhere; every analyzer figure must land within 6 points of the shipped one.
TOLERANCE = 0.06


@pytest.mark.slow
def test_pretrain_with_the_shipped_seed_reproduces_the_shipped_figures(tmp_path):
    from privdiff.models.loading import load_pipeline

    shipped = json.loads((SHIPPED_DIR / "quality.json").read_text())
    config = PretrainConfig(**json.loads((SHIPPED_DIR / "pretrain.json").read_text())["config"])
    result = pretrain(out=tmp_path / "privdiff-tiny", config=config, show_progress=False)
    pipeline = load_pipeline(base=result.out)  # fp16 files, loaded as float32 as users get them
    sampling = SamplingConfig(num_inference_steps=shipped["steps"], guidance_scale=shipped["guidance"],
                              seed=shipped["seed"])
    for set_name, figures in shipped["results"].items():
        report = evaluate_quality(pipeline=pipeline, set_name=set_name, num=shipped["num"], sampling=sampling)
        for metric, expected in figures["generated"].items():
            assert abs(report.metrics[metric] - expected) <= TOLERANCE, (set_name, metric, report.metrics[metric], expected)
