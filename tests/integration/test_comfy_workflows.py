"""Every shipped workflow, converted by ComfyUI's real frontend (headless Chromium), runs through
/prompt to success; ComfyUI serves them as example workflows."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

HERE = Path(__file__).resolve().parent
WORKFLOWS = sorted((HERE.parents[1] / "workflows").glob("*.json"))
NODE_MODULES = Path(os.environ.get("NODE_PATH", "~/pw/node_modules")).expanduser()
CHROMIUM = os.environ.get("PRIVDIFF_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def frontend_driver():
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the frontend tests drive ComfyUI's frontend with playwright-core")
    if not (NODE_MODULES / "playwright-core").is_dir():
        pytest.skip(f"playwright-core is not in {NODE_MODULES}: `npm install playwright-core` there, or set NODE_PATH")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium, or set PRIVDIFF_CHROMIUM")

    def to_api(*, server, workflow: Path, out: Path) -> dict:
        subprocess.run(["node", str(HERE / "frontend.cjs"), server.url, "to-api", str(workflow), str(out)], check=True,
                       env={**os.environ, "NODE_PATH": str(NODE_MODULES)}, timeout=300)
        return json.loads(out.read_text())

    return to_api


def test_workflows_are_shipped_with_a_note_on_swapping_in_sd15():
    assert {w.stem for w in WORKFLOWS} >= {"privdiff-dp-ldm", "privdiff-dpagg-ti", "privdiff-dpsgd-ti"}
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
        assert notes and "Load Checkpoint" in notes[0]["widgets_values"][0], path.name
        assert all("randomize" not in (n.get("widgets_values") or []) for n in workflow["nodes"]), path.name


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_converts_in_the_real_frontend_and_runs(comfy_server, frontend_driver, workflow, tmp_path):
    prompt = frontend_driver(server=comfy_server, workflow=workflow, out=tmp_path / "api.json")
    assert all(node["class_type"] != "Note" for node in prompt.values())
    entry = comfy_server.run(prompt, timeout=1200)
    assert any(node_output.get("images") for node_output in entry["outputs"].values()), "no picture came out"


def test_comfy_serves_the_workflows_as_examples(comfy_server):
    served = comfy_server.get("/api/workflow_templates")
    assert sorted(served.get("privdiff", [])) == sorted(w.stem for w in WORKFLOWS)
