"""The federated and split-learning nodes in a real ComfyUI server: their child processes start, report
progress, stop with the stop button and resume; their outputs land where ComfyUI's loaders look and
drive ComfyUI's own sampler."""

import time

import pytest

pytestmark = pytest.mark.comfyui

TINY = {"1": {"class_type": "PrivDiffTinyLoader", "inputs": {}}}
BASE = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]}


def _federated(name, **overrides):
    inputs = {**BASE, "name": name, "data": "digits", "num_items": 32, "heldout_items": 16, "num_clients": 2,
              "rounds": 2, "beta": 0.0, "trainable": "attention", "local_epochs": 1.0, "batch_size": 16,
              "learning_rate": 1e-3, "client_noise_multiplier": 1.0, "client_clip_norm": 0.1, "secure_aggregation": False,
              "seed": 0, "resume": False}
    return {"class_type": "PrivDiffFederatedSimulate", "inputs": {**inputs, **overrides}}


def _split_settings(**overrides):
    return {"mode": "hardened", "snr_bound": 0.01, "sigma_label": 1.0, "sigma_hint": 0.0, "draws_per_image": 1,
            "epochs": 2, "batch_size": 4, "seed": 0, **overrides}


def _circles(num_items=8):
    return {"class_type": "PrivDiffProceduralDataset",
            "inputs": {"name": "circles", "num_items": num_items, "resolution": 64, "seed": 0}}


def _processes_named(fragment: str) -> list[str]:
    import subprocess

    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if fragment in line]


def test_federated_node_stops_its_child_resumes_and_releases_a_lora_with_client_level_dp(comfy_server):
    from privdiff.privacy.record import read_record

    run = comfy_server.base / "output" / "privdiff" / "fed-node" / "federation"
    prompt_id = comfy_server.queue({**TINY, "2": _federated("fed-node")})
    deadline = time.monotonic() + 300
    while not (run / "global-round-1.safetensors").is_file():
        assert time.monotonic() < deadline, "no round finished"
        time.sleep(0.2)
    comfy_server.post("/interrupt")
    entry = comfy_server.wait(prompt_id, timeout=120)
    assert "execution_interrupted" in str(entry["status"]["messages"])
    time.sleep(1)
    assert not _processes_named(str(run)), "the simulation outlived the stop button"
    assert not (comfy_server.base / "models" / "loras" / "fed-node.safetensors").exists()

    entry = comfy_server.run({**TINY, "2": _federated("fed-node", resume=True),
                              "3": {"class_type": "LoraLoaderModelOnly",
                                    "inputs": {"model": ["1", 0], "lora_name": "fed-node.safetensors",
                                               "strength_model": 1.0}}}, timeout=600)
    record = read_record(comfy_server.base / "models" / "loras" / "fed-node.safetensors")
    assert record.mechanism == "dp-fedavg" and record.steps == 2 and record.privacy_unit == "client"
    assert len(entry["outputs"]["2"]["images"]) == 1  # the held-out loss per round


def test_split_server_client_and_apply_nodes_train_download_and_steer_ksampler(comfy_server):
    from privdiff.privacy.record import read_record

    graph = {**TINY, "2": _circles(),
             "3": {"class_type": "PrivDiffSplitServer",
                   "inputs": {**BASE, "name": "split-node", "learning_rate": 1e-4, "checkpoint_every": 1, "seed": 0}},
             "4": {"class_type": "PrivDiffSplitClientTrain",
                   "inputs": {**BASE, "dataset": ["2", 0], "server": ["3", 0], "name": "split-node",
                              **_split_settings(), "stop_server": True}}}
    comfy_server.run(graph, timeout=600)  # raises with ComfyUI's error message unless the graph succeeds
    path = comfy_server.base / "models" / "controlnet" / "split-node.safetensors"
    record = read_record(path)
    assert record.mechanism == "split-hardened" and record.steps == 4
    assert not _processes_named("split serve"), "stop_server left the server running"

    hint = comfy_server.base / "input" / "hint.png"
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(picture).ellipse((16, 16, 48, 48), outline="white", width=3)
    picture.save(hint)

    def sample(strength):
        graph = {**TINY,
                 "5": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
                 "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
                 "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
                 "8": {"class_type": "PrivDiffSplitControlNetApply",
                       "inputs": {"positive": ["6", 0], "negative": ["7", 0], "controlnet": "split-node.safetensors",
                                  "image": ["5", 0], "vae": ["1", 2], "strength": strength, "start_percent": 0.0,
                                  "end_percent": 1.0}},
                 "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                 "10": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["8", 0],
                                                             "negative": ["8", 1], "latent_image": ["9", 0],
                                                             "seed": 0, "steps": 4, "cfg": 5.0,
                                                             "sampler_name": "euler", "scheduler": "normal",
                                                             "denoise": 1.0}},
                 "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
                 "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": f"split-{strength}"}}}
        entry = comfy_server.run(graph)
        image = entry["outputs"]["12"]["images"][0]
        return Image.open(comfy_server.base / "output" / image["subfolder"] / image["filename"])

    import numpy as np

    steered, plain = np.asarray(sample(5.0), dtype=float), np.asarray(sample(0.0), dtype=float)
    # The ControlNet's residuals reach ComfyUI's UNet: the same seed gives another image.
    assert np.abs(steered - plain).mean() > 1.0


def test_split_attack_node_reports_that_paper_mode_leaks(comfy_server):
    entry = comfy_server.run({**TINY, "2": _circles(),
                              "3": {"class_type": "PrivDiffSplitAttack",
                                    "inputs": {**BASE, "dataset": ["2", 0], **_split_settings(mode="paper", epochs=1),
                                               "optimisation_steps": 0}}})
    report = entry["outputs"]["3"]["text"][0]
    assert report.startswith("paper mode, 8 images, 2 server steps")
    best = float(report.splitlines()[1].split(":")[1].split("dB")[0])
    assert best > 40  # the reference design gives every image away, and the audit says so


def test_split_client_with_bad_mode_is_a_node_error(comfy_server):
    status, body = comfy_server.post("/prompt", {"prompt": {
        **TINY, "2": _circles(),
        "3": {"class_type": "PrivDiffSplitAttack",
              "inputs": {**BASE, "dataset": ["2", 0], **_split_settings(mode="leaky"), "optimisation_steps": 0}}}})
    assert status == 400 and "leaky" in str(body["node_errors"])


def _psnr_after(report: str, label: str) -> float:
    """The PSNR (dB) on the first line of `report` that starts with `label`."""
    line = next(row for row in report.splitlines() if row.strip().startswith(label))
    return float(line.split(":", 1)[1].split("dB")[0])


def test_split_settings_node_drives_the_audit_and_the_server_view_matches_it(comfy_server):
    """[11] acceptance 3: one settings node overrides the audit's own widgets (paper there, hardened
    here), and the server view's PSNR for the same settings and this ComfyUI's secret is the audit's."""
    settings = {"mode": "hardened", "snr_bound": 0.01, "sigma_label": 1.0, "sigma_hint": 1.0, "draws_per_image": 1}
    entry = comfy_server.run({
        **TINY, "2": _circles(),
        "3": {"class_type": "PrivDiffSplitPrivacy", "inputs": settings},
        "4": {"class_type": "PrivDiffSplitAttack",
              "inputs": {**BASE, "dataset": ["2", 0], **_split_settings(mode="paper", epochs=2),
                         "optimisation_steps": 0, "privacy": ["3", 0]}},
        "5": {"class_type": "PrivDiffSplitServerView",
              "inputs": {**BASE, "dataset": ["2", 0], "count": 8, "epochs": 2, "optimisation_steps": 0,
                         "privacy": ["3", 0]}},
        "6": {"class_type": "PrivDiffSplitActivation",
              "inputs": {**BASE, "dataset": ["2", 0], "count": 8, "privacy": ["3", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}},
    })
    audit, view = entry["outputs"]["4"]["text"][0], entry["outputs"]["5"]["text"][0]
    assert audit.startswith("hardened mode, 8 images") and view.startswith("hardened mode, 8 images, 2 epochs")
    assert "σ_hint = 1" in entry["outputs"]["3"]["text"][0]
    for label in ("images,", "hints:"):
        assert abs(_psnr_after(audit, label) - _psnr_after(view, label)) <= 0.5, (label, audit, view)
    assert _psnr_after(view, "images,") < 20  # hardened: far from the paper mode's > 40 dB
    for node in ("7", "8", "9", "10"):
        assert len(entry["outputs"][node]["images"]) == 8


def test_split_settings_node_plans_for_a_target_margin_and_shows_its_predictions(comfy_server):
    """[11] acceptance 2-3: with a target the settings node takes the planner's k and σ_hint (the typed
    ones are ignored) and shows the predicted margins; a graph saved without the input still runs."""
    from privdiff.pipelines.split_plan import plan_split

    typed = {"mode": "hardened", "snr_bound": 0.5, "sigma_label": 1.0, "sigma_hint": 0.0, "draws_per_image": 1}
    shown = {"2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}  # ComfyUI's own output node
    planned = comfy_server.run({"1": {"class_type": "PrivDiffSplitPrivacy", "inputs": {**typed, "target_margin_db": 3.0}},
                                **shown})["outputs"]["1"]["text"][0]
    plan = plan_split(images=1000, target_margin_db=3.0)
    assert f"k = {plan.snr_bound:g}," in planned and f"σ_hint = {plan.sigma_hint:g}," in planned, planned
    assert "predicted" in planned and "image attack margin" in planned
    old = comfy_server.run({"1": {"class_type": "PrivDiffSplitPrivacy", "inputs": typed}, **shown})["outputs"]["1"]["text"][0]
    assert "k = 0.5," in old and "σ_hint = 0," in old, old
