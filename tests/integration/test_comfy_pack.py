"""The node pack in a real ComfyUI server: it loads fast, lists every node with its inputs, and
refuses bad input as node_errors (the server carries on)."""

import re

import pytest

pytestmark = pytest.mark.comfyui

# Node ids never change once shipped: workflows people share name them.
SHIPPED_NODES = {
    "PrivDiffTinyLoader", "PrivDiffProceduralDataset", "PrivDiffImageFolderDataset", "PrivDiffImageBatchDataset",
    "PrivDiffDPLDMTrain", "PrivDiffDPAggTITrain", "PrivDiffDPSGDTITrain", "PrivDiffPrivacyReport",
    "PrivDiffMembershipAudit", "PrivDiffFederatedSimulate", "PrivDiffSplitServer", "PrivDiffSplitClientTrain",
    "PrivDiffSplitControlNetApply", "PrivDiffSplitAttack", "PrivDiffDatasetImages", "PrivDiffSplitPrivacy",
    "PrivDiffSplitActivation", "PrivDiffSplitServerView", "PrivDiffCanaryAudit",
}
# Nodes that train or talk to the network: ComfyUI must run them again on every queue.
TRAINING_NODES = {"PrivDiffDPLDMTrain", "PrivDiffDPAggTITrain", "PrivDiffDPSGDTITrain", "PrivDiffFederatedSimulate",
                  "PrivDiffSplitServer", "PrivDiffSplitClientTrain", "PrivDiffSplitAttack", "PrivDiffCanaryAudit"}


def test_pack_loads_without_errors_in_under_a_second(comfy_server):
    log = comfy_server.log()
    assert not re.search(r"Cannot import .*privdiff", log), log[-3000:]
    line = re.search(r"^\s*([\d.]+) seconds( \(IMPORT FAILED\))?: \S*custom_nodes/privdiff\s*$", log, re.M)
    assert line is not None, "ComfyUI did not report loading the pack"
    assert line.group(2) is None, line.group(0)
    assert float(line.group(1)) < 1.0, f"loading the pack took {line.group(1)} s"


def test_object_info_lists_every_node_with_tooltips(comfy_server):
    info = comfy_server.get("/object_info")
    listed = {name for name in info if name.startswith("PrivDiff")}
    assert listed == SHIPPED_NODES
    for name in SHIPPED_NODES:
        node = info[name]
        assert node["category"].startswith("privdiff/"), name
        assert node["description"], name
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        for input_name, (_, options) in ((k, (v + [{}])[:2]) for k, v in inputs.items()):
            assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert info["PrivDiffDPLDMTrain"]["output"] == ["MODEL", "STRING"]
    assert info["PrivDiffTinyLoader"]["output"] == ["MODEL", "CLIP", "VAE"]


def test_training_nodes_are_not_idempotent_and_thin(comfyui_root):
    """Every training / networking node is not_idempotent; every execute is a few lines over the library."""
    import ast
    import inspect
    import textwrap

    from privdiff.nodes import PrivDiffExtension
    import asyncio

    nodes = asyncio.run(PrivDiffExtension().get_node_list())
    assert {n.define_schema().node_id for n in nodes} == SHIPPED_NODES
    for node in nodes:
        schema = node.define_schema()
        assert schema.not_idempotent == (schema.node_id in TRAINING_NODES), schema.node_id
        tree = ast.parse(textwrap.dedent(inspect.getsource(node.execute)))
        statements = [n for n in ast.walk(tree.body[0]) if isinstance(n, ast.stmt)
                      and not isinstance(n, (ast.FunctionDef, ast.Import, ast.ImportFrom))]
        assert len(statements) <= 8, f"{schema.node_id}.execute has {len(statements)} statements: move the logic into the library"


def _dp_ldm_graph(**overrides):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "name": "bad-input-run",
              "epsilon": 8.0, "trainable": "attention", "epochs": 1.0, "batch_size": 4, "learning_rate": 0.003,
              "clip_norm": 0.1, "lora_rank": 4, "seed": 0, "resume": False, "num_samples": 0}
    inputs.update(overrides)
    return {"1": {"class_type": "PrivDiffTinyLoader", "inputs": {}},
            "2": {"class_type": "PrivDiffProceduralDataset",
                  "inputs": {"name": "shapes", "num_items": 8, "resolution": 64, "seed": 0}},
            "3": {"class_type": "PrivDiffDPLDMTrain", "inputs": inputs}}


@pytest.mark.parametrize("overrides,fragment", [
    ({"epsilon": -1.0}, "epsilon"),
    ({"name": "../outside"}, "name"),
])
def test_bad_input_comes_back_as_one_node_error_under_its_input(comfy_server, overrides, fragment):
    status, reply = comfy_server.post("/prompt", {"prompt": _dp_ldm_graph(**overrides)})
    assert status == 400, reply
    errors = reply["node_errors"]["3"]["errors"]
    assert len(errors) == 1, errors  # once, under the input that is wrong
    assert errors[0]["extra_info"]["input_name"] == fragment, errors
    assert comfy_server.get("/system_stats")  # still serving


def test_a_bad_combo_in_a_posted_graph_fails_as_the_node_starts_with_one_clear_error(comfy_server):
    """ComfyUI checks V3 combo values only in its frontend; a posted graph's bad combo is refused by the
    config as the node starts, before any training, once, with privdiff's own error type."""
    from comfy_server import execution_error

    entry = comfy_server.wait(comfy_server.queue(_dp_ldm_graph(trainable="everything", name="bad-combo")))
    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert "trainable='everything'" in error and '"exception_type": "ValueError"' in error, error
    errors = [kind for kind, _ in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1


def test_error_types_read_as_privdiff_names(comfy_server):
    """ComfyUI imports the pack under its folder's path; an error's type must still read privdiff.<module>."""
    from comfy_server import execution_error

    graph = _dp_ldm_graph(name="no-folder")
    graph["2"] = {"class_type": "PrivDiffImageFolderDataset",  # a folder that is not there: a DatasetError
                  "inputs": {"folder": "no-such-folder", "resolution": 64, "hints_required": False}}
    entry = comfy_server.wait(comfy_server.queue(graph))
    error = execution_error(entry)
    assert '"exception_type": "privdiff.' in error and "custom_nodes" not in error, error


def test_file_inputs_are_lists_of_the_folders_files(comfy_server):
    """As ComfyUI's own loaders: the split ControlNet and the report's file are picked from a list of the
    folder's files (a training node in the same graph links its file instead)."""
    folder = comfy_server.base / "models" / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "listed.safetensors").write_bytes(b"")
    info = comfy_server.get("/object_info")
    apply = info["PrivDiffSplitControlNetApply"]["input"]
    assert apply["required"]["controlnet"][0] == "COMBO"
    assert "listed.safetensors" in apply["required"]["controlnet"][1]["options"]
    assert apply["optional"]["controlnet_name"][1].get("forceInput")
    report = info["PrivDiffPrivacyReport"]["input"]["optional"]["file"]
    assert report[0] == "COMBO" and "controlnet/listed.safetensors" in report[1]["options"]
