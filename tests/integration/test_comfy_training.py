"""privdiff's training nodes in a real ComfyUI server: on privdiff-tiny from the pack's loader and on an
SD1.5-shaped checkpoint from ComfyUI's own CheckpointLoaderSimple; outputs that ComfyUI's own loaders
use; the stop button; a resume."""

import time

import pytest
import torch

pytestmark = pytest.mark.comfyui

TINY = {"1": {"class_type": "PrivDiffTinyLoader", "inputs": {}}}


def _dataset(name="shapes", num_items=8, resolution=64):
    return {"class_type": "PrivDiffProceduralDataset",
            "inputs": {"name": name, "num_items": num_items, "resolution": resolution, "seed": 0}}


def _dp_ldm(name, **overrides):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "name": name,
              "epsilon": 8.0, "trainable": "attention", "epochs": 1.0, "batch_size": 4, "learning_rate": 0.003,
              "clip_norm": 0.1, "lora_rank": 4, "seed": 0, "resume": False, "num_samples": 0}
    return {"class_type": "PrivDiffDPLDMTrain", "inputs": {**inputs, **overrides}}


def _sample(model, clip_node, vae_node, text, *, size=64, seed=0):
    """KSampler graph pieces: text -> image (PreviewImage), 4 steps."""
    return {
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_node, "text": text}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_node, "text": ""}},
        "12": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "13": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["10", 0], "negative": ["11", 0],
                                                    "latent_image": ["12", 0], "seed": seed, "steps": 4, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": vae_node}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["14", 0]}},
    }


def _record(path):
    from privdiff.privacy.record import read_record

    return read_record(path)


def test_dp_ldm_on_tiny_writes_a_lora_that_lora_loader_model_only_applies(comfy_server):
    entry = comfy_server.run({**TINY, "2": _dataset(), "3": _dp_ldm("tiny-attention", num_samples=2),
                              "4": {"class_type": "PrivDiffPrivacyReport", "inputs": {"artifact": ["3", 1]}}})
    lora = comfy_server.base / "models" / "loras" / "tiny-attention.safetensors"
    record = _record(lora)
    assert record.mechanism == "dp-sgd" and 0 < record.epsilon <= 8.0
    report = entry["outputs"]["4"]["text"][0]
    assert f"ε = {record.epsilon:.4g}" in report and "dp-sgd" in report
    previews = entry["outputs"]["3"]["images"]
    assert len(previews) == 2  # samples, and the loss curve labelled as not covered by ε
    from PIL import Image

    for preview in previews:
        image = Image.open(comfy_server.base / "temp" / preview["subfolder"] / preview["filename"])
        assert not set(image.info) & {"prompt", "workflow"}, "a privdiff preview must not carry the workflow"
    # ComfyUI's own LoRA loader applies every key of the file (it logs the keys it cannot place).
    before = len(comfy_server.log())
    comfy_server.run({**TINY, "5": {"class_type": "LoraLoaderModelOnly",
                                    "inputs": {"model": ["1", 0], "lora_name": lora.name, "strength_model": 1.0}},
                      **_sample(["5", 0], ["1", 1], ["1", 2], "a red circle")})
    assert "lora key not loaded" not in comfy_server.log()[before:]


def test_dp_ldm_lora_set_and_stop_button_then_resume(comfy_server):
    run = comfy_server.base / "output" / "privdiff" / "tiny-stopped"
    checkpoint = run / "byproducts-not-covered-by-dp" / "checkpoint.safetensors"
    graph = {**TINY, "2": _dataset(num_items=16), "3": _dp_ldm("tiny-stopped", trainable="lora", epochs=15.0)}
    prompt_id = comfy_server.queue(graph)
    deadline = time.monotonic() + 300
    while not checkpoint.is_file():  # training is under way once its first checkpoint is written
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    status, _ = comfy_server.post("/interrupt")
    assert status == 200
    entry = comfy_server.wait(prompt_id)
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    from privdiff.training.checkpoint import load_checkpoint

    stopped_at = load_checkpoint(folder=checkpoint.parent, kind="dp-ldm", fingerprint=None).state["step"]
    assert 0 < stopped_at < 60
    assert not (comfy_server.base / "models" / "loras" / "tiny-stopped.safetensors").exists()

    graph["3"]["inputs"]["resume"] = True
    comfy_server.run(graph)
    lora = comfy_server.base / "models" / "loras" / "tiny-stopped.safetensors"
    record = _record(lora)
    assert record.steps == 60, record  # the resumed run finished the planned steps, not more
    assert not checkpoint.exists(), "by-products outside ε are deleted when a run ends"


def test_dpagg_ti_on_tiny_gives_an_embedding_that_changes_clip_text_encode(comfy_server):
    ti = {"class_type": "PrivDiffDPAggTITrain",
          "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "name": "tiny-style",
                     "init_word": "circle", "num_vectors": 1, "template": "a picture in the style of {token}",
                     "epsilon": 1.0, "steps": 2, "clip_norm": 0.5, "learning_rate": 0.005, "seed": 0,
                     "resume": False}}
    entry = comfy_server.run({**TINY, "2": _dataset("style", num_items=6), "3": ti})
    assert entry["outputs"]["3"]["text"][0].startswith("embedding:tiny-style")
    path = comfy_server.base / "models" / "embeddings" / "tiny-style.safetensors"
    assert _record(path).mechanism == "gaussian-aggregate"
    # The embedding goes into a prompt as embedding:tiny-style, through ComfyUI's own CLIPTextEncode.
    comfy_server.run({**TINY, **_sample(["1", 0], ["1", 1], ["1", 2], "a picture in the style of embedding:tiny-style")})

    from privdiff.nodes.comfy_objects import privdiff_tiny_objects

    _, clip, _ = privdiff_tiny_objects()
    prompt = "a picture in the style of embedding:tiny-style"
    clip.tokenizer.clip_l.embedding_directory = [str(path.parent)]
    with_embedding = clip.encode_from_tokens(clip.tokenize(prompt))
    clip.tokenizer.clip_l.embedding_directory = []
    without = clip.encode_from_tokens(clip.tokenize(prompt))
    assert with_embedding.shape == without.shape
    assert not torch.allclose(with_embedding, without, atol=1e-4)


@pytest.fixture(scope="module")
def sd15_in_comfy(comfy_server, sd15_checkpoint):
    folder = comfy_server.base / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / sd15_checkpoint.name
    if not link.exists():
        link.symlink_to(sd15_checkpoint)
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint.name}}}


def test_sd15_checkpoint_drives_dp_ldm_and_dp_ti(comfy_server, sd15_in_comfy):
    data = _dataset(num_items=4, resolution=64)
    comfy_server.run({**sd15_in_comfy, "2": data, "3": _dp_ldm("sd15-attention", batch_size=2)}, timeout=1800)
    lora = comfy_server.base / "models" / "loras" / "sd15-attention.safetensors"
    assert _record(lora).mechanism == "dp-sgd"
    before = len(comfy_server.log())
    comfy_server.run({**sd15_in_comfy, "5": {"class_type": "LoraLoaderModelOnly",
                                             "inputs": {"model": ["1", 0], "lora_name": lora.name, "strength_model": 1.0}},
                      **_sample(["5", 0], ["1", 1], ["1", 2], "a red circle")}, timeout=1800)
    assert "lora key not loaded" not in comfy_server.log()[before:]

    ti = {"class_type": "PrivDiffDPSGDTITrain",
          "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "name": "sd15-style",
                     "init_word": "painting", "num_vectors": 1, "template": "a picture in the style of {token}",
                     "epsilon": 4.0, "epochs": 1.0, "batch_size": 2, "clip_norm": 0.01, "learning_rate": 0.005,
                     "seed": 0, "resume": False}}
    comfy_server.run({**sd15_in_comfy, "2": data, "3": ti}, timeout=1800)
    embedding = comfy_server.base / "models" / "embeddings" / "sd15-style.safetensors"
    assert _record(embedding).mechanism == "dp-sgd"
    from safetensors.torch import load_file

    assert load_file(str(embedding))["clip_l"].shape == (1, 768)


def test_membership_audit_node_scores_the_trained_model(comfy_server):
    nonmembers = {"class_type": "PrivDiffProceduralDataset",
                  "inputs": {"name": "shapes", "num_items": 8, "resolution": 64, "seed": 1}}
    audit = {"class_type": "PrivDiffMembershipAudit",
             "inputs": {"model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2], "members": ["2", 0],
                        "nonmembers": ["5", 0], "num_examples": 8}}
    entry = comfy_server.run({**TINY, "2": _dataset(), "3": _dp_ldm("tiny-audited"), "5": nonmembers, "6": audit})
    report = entry["outputs"]["6"]["text"][0]
    auc = float(report.split("AUC ")[1].split()[0])
    assert 0.0 <= auc <= 1.0 and "8 members vs 8 non-members" in report
    assert "NOT covered" in report


def test_privacy_report_reads_the_file_again_when_it_changes(comfy_server):
    from privdiff.privacy.record import PrivacyRecord, write_safetensors

    path = comfy_server.base / "models" / "loras" / "report-me.safetensors"
    graph = {"1": {"class_type": "PrivDiffPrivacyReport", "inputs": {"artifact": "report-me"}}}
    write_safetensors(path=path, tensors={"x": torch.ones(1)}, record=PrivacyRecord(mechanism="none"))
    first = comfy_server.run(graph)["outputs"]["1"]["text"][0]
    record = PrivacyRecord(mechanism="gaussian-aggregate", epsilon=2.0, delta=1e-5, noise_multiplier=2.0, clip=0.5,
                           sample_rate=1.0, steps=1, num_examples=10, accountant="analytic", adjacency="replace-one")
    time.sleep(0.05)
    write_safetensors(path=path, tensors={"x": torch.ones(1)}, record=record)
    second = comfy_server.run(graph)["outputs"]["1"]["text"][0]
    assert first.splitlines()[1].startswith("NO differential privacy")
    assert second.splitlines()[1].startswith("(ε = 2, δ = 1e-05)")
    assert second.splitlines()[2].startswith("adjacency: replace-one")  # [8]: the report states the adjacency
