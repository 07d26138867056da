"""[14] The canary audit node in a real ComfyUI: a DP-LDM run on privdiff-tiny with canaries, its bound
shown on the node next to the recorded ε, and nothing of the run left in the output folder."""

import pytest

pytestmark = pytest.mark.comfyui


def test_the_canary_audit_node_shows_the_bound_next_to_the_recorded_epsilon(comfy_server):
    before = {p for p in comfy_server.base.rglob("*") if p.is_file()}
    entry = comfy_server.run({
        "1": {"class_type": "PrivDiffTinyLoader", "inputs": {}},
        "2": {"class_type": "PrivDiffProceduralDataset",
              "inputs": {"name": "shapes", "num_items": 16, "resolution": 64, "seed": 0}},
        "3": {"class_type": "PrivDiffCanaryAudit",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "epsilon": 8.0,
                         "trainable": "attention", "epochs": 2.0, "batch_size": 16, "learning_rate": 1e-4,
                         "clip_norm": 0.01, "num_canaries": 256, "delta": 1e-5, "seed": 0}},
    })
    report = entry["outputs"]["3"]["text"][0]
    bound, recorded = report.splitlines()
    assert bound.startswith("audited lower bound: ε >= ") and "99% confidence" in bound and "256 canaries" in bound
    assert recorded.startswith("recorded ε: 7.9") and "EXCEEDED" not in recorded
    made = {p for p in comfy_server.base.rglob("*") if p.is_file()} - before
    assert not [p for p in made if p.suffix in (".safetensors", ".json") and "output" in p.parts], made
