"""The stop button and reruns on every training node, in a real ComfyUI driven through /prompt,
/interrupt, /history and the websocket, as the frontend drives it.

- Stop during training leaves a checkpoint (even before the first periodic one); queueing again with
  resume on ends where an unbroken run ends: the same steps, σ and ε (the nodes draw their noise from
  the OS, so the bytes differ).
- Queueing a finished name again without resume is refused before any training, saying what to do,
  and the trained file is kept as it was.
- Results reach the screen: the privacy report's text is in the node's UI output.
"""

import time

import pytest

from comfy_server import Listener, execution_error, status_messages

pytestmark = pytest.mark.comfyui

TINY = {"1": {"class_type": "PrivDiffTinyLoader", "inputs": {}}}
BASE = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]}


def _dataset(name, num_items):
    return {"class_type": "PrivDiffProceduralDataset",
            "inputs": {"name": name, "num_items": num_items, "resolution": 64, "seed": 0}}


def _dp_ldm(name, resume):
    return {"2": _dataset("shapes", 16), "3": {"class_type": "PrivDiffDPLDMTrain", "inputs": {
        **BASE, "dataset": ["2", 0], "name": name, "epsilon": 8.0, "trainable": "attention", "epochs": 3.0,
        "batch_size": 4, "learning_rate": 0.003, "clip_norm": 0.1, "lora_rank": 4, "seed": 0, "resume": resume,
        "num_samples": 0}}}


def _ti(node, name, resume, **method):
    return {"2": _dataset("style", 6), "3": {"class_type": node, "inputs": {
        **BASE, "dataset": ["2", 0], "name": name, "init_word": "circle", "num_vectors": 1,
        "template": "a picture in the style of {token}", "epsilon": 2.0, "learning_rate": 0.005, "seed": 0,
        "resume": resume, **method}}}


GRAPHS = {
    "dp-ldm": (lambda name, resume: _dp_ldm(name, resume), "loras"),
    "dpagg-ti": (lambda name, resume: _ti("PrivDiffDPAggTITrain", name, resume, steps=10, clip_norm=0.5),
                 "embeddings"),
    "dpsgd-ti": (lambda name, resume: _ti("PrivDiffDPSGDTITrain", name, resume, epochs=5.0, batch_size=2,
                                          clip_norm=0.01), "embeddings"),
}


def _with_report(graph):
    artifact = ["3", 1] if graph["3"]["class_type"] == "PrivDiffDPLDMTrain" else ["3", 0]
    return {**TINY, **graph, "4": {"class_type": "PrivDiffPrivacyReport", "inputs": {"artifact": artifact}}}


def _stop_at(comfy_server, prompt: dict, *, node: str, line: str) -> None:
    """Queue `prompt`, press stop when `node` shows a progress line starting with `line`, and check
    that ComfyUI reports the run as interrupted."""
    listener = Listener(comfy_server)
    try:
        prompt_id = comfy_server.queue(prompt, client_id=listener.client_id)
        listener.wait_for(lambda m: m[1] == "text" and m[2][0] == node and m[2][1].startswith(line))
        assert comfy_server.post("/interrupt")[0] == 200
        entry = comfy_server.wait(prompt_id, timeout=300)
    finally:
        listener.close()
    assert "execution_interrupted" in status_messages(entry), execution_error(entry)


def _record(path):
    from privdiff.privacy.record import read_record

    return read_record(path)


@pytest.mark.parametrize("method", list(GRAPHS))
def test_stop_keeps_a_checkpoint_and_resume_ends_where_an_unbroken_run_ends(comfy_server, method):
    from privdiff.training.checkpoint import load_checkpoint

    graph, kind = GRAPHS[method]
    name = f"stop-{method}"
    # The first training step's line on the node: stop there, before any periodic checkpoint.
    _stop_at(comfy_server, {**TINY, **graph(name, False)}, node="3", line="step 1/")
    run = comfy_server.base / "output" / "privdiff" / name
    checkpoints = list(run.rglob("checkpoint*.safetensors"))
    assert len(checkpoints) == 1, f"the stop left no checkpoint in {run}"
    stopped_at = load_checkpoint(folder=checkpoints[0].parent, kind=method, fingerprint=None).state["step"]
    assert stopped_at >= 1
    released = comfy_server.base / "models" / kind / f"{name}.safetensors"
    assert not released.exists()

    resumed = comfy_server.run(_with_report(graph(name, True)), timeout=900)
    comfy_server.run({**TINY, **graph(f"{name}-unbroken", False)}, timeout=900)
    record, unbroken = _record(released), _record(released.with_name(f"{name}-unbroken.safetensors"))
    assert (record.steps, record.noise_multiplier, record.sample_rate) == \
        (unbroken.steps, unbroken.noise_multiplier, unbroken.sample_rate)
    assert record.epsilon == pytest.approx(unbroken.epsilon, rel=1e-9)
    assert not checkpoints[0].exists(), "by-products outside ε are deleted when a run ends"
    report = resumed["outputs"]["4"]["text"][0]  # the report node's text, as the frontend receives it
    assert f"{name}.safetensors" in report and "ε" in report


@pytest.mark.parametrize("method", list(GRAPHS))
def test_a_finished_name_is_refused_before_training_and_its_file_kept(comfy_server, method):
    graph, kind = GRAPHS[method]
    name = f"rerun-{method}"
    comfy_server.run({**TINY, **graph(name, False)}, timeout=900)
    released = comfy_server.base / "models" / kind / f"{name}.safetensors"
    before = released.read_bytes()
    listener = Listener(comfy_server)
    try:
        started = time.monotonic()
        # Another setting under the same name (an unchanged graph would come from ComfyUI's cache).
        again = graph(name, False)
        again["3"]["inputs"]["learning_rate"] *= 2
        entry = comfy_server.wait(comfy_server.queue({**TINY, **again}, client_id=listener.client_id))
        took = time.monotonic() - started
    finally:
        listener.close()
    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert "belongs to an earlier run" in error and "resume" in error and "another name" in error, error
    assert not [t for t in listener.texts("3") if t.startswith("step ")], "it trained before refusing"
    assert took < 60, f"refused after {took:.0f} s"
    assert released.read_bytes() == before


def _split(name, *, epochs=2):
    settings = {"mode": "hardened", "snr_bound": 0.01, "sigma_label": 1.0, "sigma_hint": 0.0, "draws_per_image": 1,
                "epochs": epochs, "batch_size": 2, "seed": 0}
    return {"2": _dataset("circles", 8),
            "3": {"class_type": "PrivDiffSplitServer",
                  "inputs": {**BASE, "name": name, "learning_rate": 1e-4, "checkpoint_every": 1000, "seed": 0}},
            "4": {"class_type": "PrivDiffSplitClientTrain",
                  "inputs": {**BASE, "dataset": ["2", 0], "server": ["3", 0], "name": name, **settings,
                             "stop_server": True}}}


def test_split_client_stop_then_queue_again_trains_each_batch_once(comfy_server):
    """The split job lives on the server: a stopped client leaves it running with what it trained, and
    the same graph queued again sends the rest; the server trains no batch twice."""
    _stop_at(comfy_server, {**TINY, **_split("stop-split")}, node="4", line="batch 1/")
    released = comfy_server.base / "models" / "controlnet" / "stop-split.safetensors"
    assert not released.exists()
    comfy_server.run({**TINY, **_split("stop-split")}, timeout=900)  # the stopped client node runs again
    assert _record(released).steps == 8  # 2 epochs x 8 images / batch 2: every batch trained exactly once
