"""Build `workflows/*.json` (ComfyUI's UI format) from the graphs below, through ComfyUI's real frontend,
and take each workflow's screenshot for the README.

    python tests/integration/build_workflows.py --server http://127.0.0.1:8199 [--screenshots workflows/screenshots]

Needs a running ComfyUI with this pack, node with playwright-core (NODE_PATH) and Chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE.parents[1] / "workflows"

SWAP_NOTE = ("Runs as is on privdiff-tiny (no download). For a real model: replace 'Load privdiff-tiny' with "
             "ComfyUI's Load Checkpoint (an SD1.5 .safetensors from models/checkpoints), connect its MODEL, CLIP "
             "and VAE to the same inputs, and set the dataset's resolution to 512 and the sampler's size to "
             "512 x 512. For your own data use 'privdiff image folder' or 'privdiff images + captions' instead of "
             "the procedural set (the federated node takes a set's name or an image folder in its data box).")
# The audit has no sampler: its own note.
AUDIT_NOTE = ("Runs as is on privdiff-tiny (no download). To audit a run on a real model: replace 'Load privdiff-tiny' "
              "with ComfyUI's Load Checkpoint (an SD1.5 .safetensors from models/checkpoints), connect its MODEL, CLIP "
              "and VAE to the same inputs, and set the dataset's resolution to 512. For your own data use 'privdiff "
              "image folder' or 'privdiff images + captions' instead of the procedural set, with batch_size = its "
              "number of images (full batches: the tightest audit).")
NOTES = {"privdiff-canary-audit": AUDIT_NOTE}
TINY = {"1": {"class_type": "PrivDiffTinyLoader", "inputs": {}}}


def _sampler(model, text):
    return {
        "20": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "21": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "22": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "23": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["20", 0], "negative": ["21", 0],
                                                    "latent_image": ["22", 0], "seed": 0, "steps": 20, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "24": {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["1", 2]}},
        "25": {"class_type": "PreviewImage", "inputs": {"images": ["24", 0]}},
    }


def _models(prefix):
    return {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "name": prefix}


SPLIT_SETTINGS = {"mode": "hardened", "snr_bound": 0.01, "sigma_label": 1.0, "sigma_hint": 0.0, "draws_per_image": 1,
                  "epochs": 2, "batch_size": 4, "seed": 0}

GRAPHS = {
    "privdiff-dp-ldm": {
        **TINY,
        "2": {"class_type": "PrivDiffProceduralDataset", "inputs": {"name": "shapes", "num_items": 32, "resolution": 64, "seed": 0}},
        "3": {"class_type": "PrivDiffDPLDMTrain", "inputs": {
            **_models("privdiff-dp-ldm-example"), "epsilon": 8.0, "trainable": "attention", "epochs": 2.0,
            "batch_size": 8, "learning_rate": 0.003, "clip_norm": 0.1, "lora_rank": 4, "seed": 0,
            "resume": False, "num_samples": 4}},
        "4": {"class_type": "PrivDiffPrivacyReport", "inputs": {"artifact": ["3", 1]}},
        **_sampler(["3", 0], "a red circle on a blue background"),
    },
    "privdiff-dpagg-ti": {
        **TINY,
        "2": {"class_type": "PrivDiffProceduralDataset", "inputs": {"name": "style", "num_items": 12, "resolution": 64, "seed": 0}},
        "3": {"class_type": "PrivDiffDPAggTITrain", "inputs": {
            **_models("privdiff-dpagg-example"), "init_word": "painting", "num_vectors": 1,
            "template": "a picture in the style of {token}", "epsilon": 1.0, "steps": 10, "clip_norm": 0.5,
            "learning_rate": 0.005, "seed": 0, "resume": False}},
        "4": {"class_type": "PrivDiffPrivacyReport", "inputs": {"artifact": ["3", 1]}},
        **_sampler(["1", 0], ["3", 0]),
    },
    "privdiff-dpsgd-ti": {
        **TINY,
        "2": {"class_type": "PrivDiffProceduralDataset", "inputs": {"name": "style", "num_items": 12, "resolution": 64, "seed": 0}},
        "3": {"class_type": "PrivDiffDPSGDTITrain", "inputs": {
            **_models("privdiff-dpsgd-example"), "init_word": "painting", "num_vectors": 1,
            "template": "a picture in the style of {token}", "epsilon": 4.0, "epochs": 2.0, "batch_size": 4,
            "clip_norm": 0.01, "learning_rate": 0.005, "seed": 0, "resume": False}},
        "4": {"class_type": "PrivDiffPrivacyReport", "inputs": {"artifact": ["3", 1]}},
        **_sampler(["1", 0], ["3", 0]),
    },
    "privdiff-federated": {
        **TINY,
        "2": {"class_type": "PrivDiffFederatedSimulate", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "name": "privdiff-federated-example",
            "data": "digits", "num_items": 64, "heldout_items": 32, "num_clients": 2, "rounds": 2, "beta": 0.0,
            "trainable": "attention", "local_epochs": 1.0, "batch_size": 16, "learning_rate": 0.001,
            "client_noise_multiplier": 1.0, "client_clip_norm": 0.1, "secure_aggregation": False, "seed": 0, "resume": False}},
        "4": {"class_type": "PrivDiffPrivacyReport", "inputs": {"artifact": ["2", 1]}},
        **_sampler(["2", 0], "a handwritten digit 7"),
    },
    "privdiff-split-controlnet": {
        **TINY,
        "2": {"class_type": "PrivDiffProceduralDataset", "inputs": {"name": "circles", "num_items": 16, "resolution": 64, "seed": 0}},
        "3": {"class_type": "PrivDiffSplitServer", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "name": "privdiff-split-example",
            "learning_rate": 0.0001, "checkpoint_every": 20, "seed": 0}},
        "4": {"class_type": "PrivDiffSplitClientTrain", "inputs": {
            **_models("privdiff-split-example"), "server": ["3", 0], **SPLIT_SETTINGS, "stop_server": True,
            "privacy": ["30", 0]}},
        "5": {"class_type": "PrivDiffPrivacyReport", "inputs": {"artifact": ["4", 0]}},
        "6": {"class_type": "PrivDiffSplitAttack", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], **SPLIT_SETTINGS,
            "optimisation_steps": 0, "privacy": ["30", 0]}},
        # One settings node drives the client, the audit and the two previews of what leaves the machine.
        "30": {"class_type": "PrivDiffSplitPrivacy", "inputs": {
            k: SPLIT_SETTINGS[k] for k in ("mode", "snr_bound", "sigma_label", "sigma_hint", "draws_per_image")}},
        "31": {"class_type": "PrivDiffSplitActivation", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "count": 8, "privacy": ["30", 0]}},
        "32": {"class_type": "PrivDiffSplitServerView", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "count": 16, "epochs": 2,
            "optimisation_steps": 0, "privacy": ["30", 0]}},
        "33": {"class_type": "PreviewImage", "inputs": {"images": ["31", 0]}},
        "34": {"class_type": "PreviewImage", "inputs": {"images": ["31", 1]}},
        "35": {"class_type": "PreviewImage", "inputs": {"images": ["32", 0]}},
        "36": {"class_type": "PreviewImage", "inputs": {"images": ["32", 1]}},
        # Hints for generation: circles the training never saw (another seed).
        "7": {"class_type": "PrivDiffProceduralDataset", "inputs": {"name": "circles", "num_items": 4, "resolution": 64, "seed": 1}},
        "8": {"class_type": "PrivDiffDatasetImages", "inputs": {"dataset": ["7", 0], "count": 4}},
        "9": {"class_type": "PrivDiffSplitControlNetApply", "inputs": {
            "positive": ["20", 0], "negative": ["21", 0], "controlnet": "", "controlnet_name": ["4", 0], "image": ["8", 1], "vae": ["1", 2],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        **_sampler(["1", 0], "a circle"),
        "23": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["9", 0], "negative": ["9", 1],
                                                    "latent_image": ["22", 0], "seed": 0, "steps": 20, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "26": {"class_type": "PreviewImage", "inputs": {"images": ["8", 1]}},
    },
    # The DP-LDM example's run audited with 1000 canaries: full batches (batch_size = num_items), the tightest
    # audit. The node is an output node and shows its report itself.
    "privdiff-canary-audit": {
        **TINY,
        "2": {"class_type": "PrivDiffProceduralDataset", "inputs": {"name": "shapes", "num_items": 32, "resolution": 64, "seed": 0}},
        "3": {"class_type": "PrivDiffCanaryAudit", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "epsilon": 8.0,
            "trainable": "attention", "epochs": 2.0, "batch_size": 32, "learning_rate": 0.003, "clip_norm": 0.1,
            "num_canaries": 1000, "delta": 1e-5, "seed": 0, "runs": 1, "guesses": "grid"}},
    },
}


def frontend(*, server: str, mode: str, source: Path, target: Path, note: Path | None = None) -> None:
    command = ["node", str(HERE / "frontend.cjs"), server, mode, str(source), str(target)] + ([str(note)] if note else [])
    subprocess.run(command, check=True, env={**os.environ, "NODE_PATH": os.environ.get("NODE_PATH", str(Path("~/pw/node_modules").expanduser()))})


def fixed_seeds(workflow: dict) -> dict:
    """Example workflows keep their seeds: the frontend's 'randomize' default would change them every run."""
    for node in workflow["nodes"]:
        values = node.get("widgets_values")
        if isinstance(values, list):
            node["widgets_values"] = ["fixed" if v == "randomize" else v for v in values]
    return workflow


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8199")
    parser.add_argument("--screenshots", default=None, help="folder for one PNG per workflow")
    parser.add_argument("--only", nargs="*", default=None, help="rebuild only these workflows (names without .json)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        note = Path(folder) / "note.txt"
        for name, graph in GRAPHS.items():
            if args.only and name not in args.only:
                continue
            note.write_text(NOTES.get(name, SWAP_NOTE))
            api, ui = Path(folder) / f"{name}.api.json", WORKFLOWS / f"{name}.json"
            api.write_text(json.dumps(graph))
            frontend(server=args.server, mode="from-api", source=api, target=ui, note=note)
            ui.write_text(json.dumps(fixed_seeds(json.loads(ui.read_text())), indent=1) + "\n")
            if args.screenshots:
                Path(args.screenshots).mkdir(parents=True, exist_ok=True)
                frontend(server=args.server, mode="screenshot", source=ui, target=Path(args.screenshots) / f"{name}.png")
            print(ui)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
