"""[14] The canary audit node in a real ComfyUI: a DP-LDM run on privdiff-tiny with canaries, its bound
shown on the node next to the recorded ε, and nothing of the run left in the output folder; several runs
audited as one set, with planned guesses, named run by run in the node's progress text."""

import re

import pytest
from comfy_server import Listener, execution_error

from privdiff.privacy.canary import planned_guesses

pytestmark = pytest.mark.comfyui

TINY = {
    "1": {"class_type": "PrivDiffTinyLoader", "inputs": {}},
    "2": {"class_type": "PrivDiffProceduralDataset",
          "inputs": {"name": "shapes", "num_items": 16, "resolution": 64, "seed": 0}},
}
AUDIT = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "epsilon": 8.0,
         "trainable": "attention", "epochs": 2.0, "batch_size": 16, "learning_rate": 1e-4, "clip_norm": 0.01,
         "num_canaries": 256, "delta": 1e-5, "seed": 0}


def test_the_canary_audit_node_shows_the_bound_next_to_the_recorded_epsilon(comfy_server):
    before = {p for p in comfy_server.base.rglob("*") if p.is_file()}
    entry = comfy_server.run({**TINY, "3": {"class_type": "PrivDiffCanaryAudit", "inputs": AUDIT}})  # no runs, guesses
    report = entry["outputs"]["3"]["text"][0]
    bound, recorded = report.splitlines()[:2]
    assert bound.startswith("audited lower bound: ε >= ") and "99% confidence" in bound and "256 canaries" in bound
    assert recorded.startswith("recorded ε: 7.9") and "EXCEEDED" not in recorded
    made = {p for p in comfy_server.base.rglob("*") if p.is_file()} - before
    assert not [p for p in made if p.suffix in (".safetensors", ".json") and "output" in p.parts], made


def test_several_runs_with_planned_guesses_are_audited_as_one_set(comfy_server):
    listener = Listener(comfy_server)
    try:
        entry = comfy_server.wait(comfy_server.queue(
            {**TINY, "3": {"class_type": "PrivDiffCanaryAudit", "inputs": {**AUDIT, "runs": 2, "guesses": "planned"}}},
            client_id=listener.client_id))
    finally:
        listener.close()
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    bound, recorded = entry["outputs"]["3"]["text"][0].splitlines()[:2]
    assert "2 runs × 256 canaries" in bound and "guesses (planned)" in bound, bound  # pooled
    audited = float(re.search(r"ε >= ([-\d.e+]+)", bound).group(1))
    claimed = float(re.search(r"recorded ε: ([-\d.e+]+)", recorded).group(1))
    # planned: the one guess pair fixed from the recorded ε and the 512 canaries (the run's fdp test, full batches)
    [(plus, minus)] = planned_guesses(num_canaries=512, epsilon=claimed, delta=1e-5, bound="fdp")
    assert re.search(rf"\d+ of {plus + minus} guesses \(planned\) right", bound), (bound, plus, minus)
    assert 0 <= audited <= claimed and "EXCEEDED" not in recorded, (bound, recorded)
    # Each training step's line names its run, in order: both runs' steps, run 1's first.
    runs = [re.search(r" · run (\d)/2 · ", t).group(1) for t in listener.texts("3") if t.startswith("step ")]
    assert runs == sorted(runs) and set(runs) == {"1", "2"}, listener.texts("3")


def test_too_many_pooled_canaries_are_refused_before_the_first_run(comfy_server):
    # One run of 32 canaries at δ = 0.01 is auditable (2·32·δ = 0.64); two runs pooled are not (1.28).
    listener = Listener(comfy_server)
    try:
        entry = comfy_server.wait(comfy_server.queue(
            {**TINY, "3": {"class_type": "PrivDiffCanaryAudit",
                           "inputs": {**AUDIT, "num_canaries": 32, "delta": 0.01, "runs": 2}}},
            client_id=listener.client_id))
    finally:
        listener.close()
    assert entry["status"]["status_str"] == "error"
    assert "2 runs of 32 canaries" in execution_error(entry) and "at most 50 canaries in all" in execution_error(entry), \
        execution_error(entry)
    assert not [t for t in listener.texts("3") if t.startswith("step ")], "it trained before refusing"


def test_the_node_offers_the_command_lines_guesses(comfy_server):
    """One vocabulary: the node's guesses are `privdiff audit canary --guesses`'s, with its default."""
    from privdiff.cli.parser import build_parser

    canary = build_parser()._subparsers._group_actions[0].choices["audit"]
    canary = canary._subparsers._group_actions[0].choices["canary"]
    flag = next(a for a in canary._actions if "--guesses" in a.option_strings)
    options = comfy_server.get("/object_info")["PrivDiffCanaryAudit"]["input"]["optional"]
    assert options["guesses"][1]["options"] == flag.choices and options["guesses"][1]["default"] == flag.default
    assert options["runs"][1]["default"] == 1 and options["runs"][1]["min"] == 1
