"""Every shipped workflow, converted by ComfyUI's real frontend (headless Chromium), runs through
/prompt to success; ComfyUI serves them as example workflows."""

import json
import os
import re
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
    assert {w.stem for w in WORKFLOWS} >= {"privdiff-dp-ldm", "privdiff-dpagg-ti", "privdiff-dpsgd-ti",
                                           "privdiff-canary-audit"}
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
        assert notes and "Load Checkpoint" in notes[0]["widgets_values"][0], path.name
        assert all("randomize" not in (n.get("widgets_values") or []) for n in workflow["nodes"]), path.name


# Longest a privdiff node may run without telling the user anything (a progress step, a phase line).
SILENCE_SECONDS = 5.0


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_converts_in_the_real_frontend_and_runs(comfy_server, frontend_driver, workflow, tmp_path):
    """It runs to success and shows pictures where it has a picture node; every report's text is in its
    node's UI output (a canary audit's bound at most the recorded ε); no privdiff node is silent for more
    than SILENCE_SECONDS; the server log has no warning from the run."""
    from comfy_server import Listener

    prompt = frontend_driver(server=comfy_server, workflow=workflow, out=tmp_path / "api.json")
    assert all(node["class_type"] != "Note" for node in prompt.values())
    log_start = len(comfy_server.log())
    listener = Listener(comfy_server)
    try:
        entry = comfy_server.wait(comfy_server.queue(prompt, client_id=listener.client_id), timeout=1200)
    finally:
        listener.close()
    assert entry["status"]["status_str"] == "success", entry["status"]
    if any(node["class_type"] in ("PreviewImage", "SaveImage") for node in prompt.values()):
        assert any(node_output.get("images") for node_output in entry["outputs"].values()), "no picture came out"
    for node_id, node in prompt.items():
        if node["class_type"] == "PrivDiffPrivacyReport":
            text = entry["outputs"][node_id]["text"][0]
            assert "mechanism:" in text and ("ε" in text or "dB" in text), text
        if node["class_type"] == "PrivDiffCanaryAudit":  # the canaries show something, and never more than recorded
            bound, recorded = entry["outputs"][node_id]["text"][0].splitlines()[:2]
            audited = float(re.search(r"ε >= ([-\d.e+]+) at 99% confidence", bound).group(1))
            claimed = float(re.search(r"recorded ε: ([-\d.e+]+) at δ", recorded).group(1))
            assert 0 < audited <= claimed <= node["inputs"]["epsilon"] and "EXCEEDED" not in recorded, (bound, recorded)
    assert _longest_silences(listener.messages, prompt) == {}, "privdiff nodes silent for too long"
    warnings = [line for line in comfy_server.log()[log_start:].splitlines() if "WARNING" in line or "Warning" in line]
    assert warnings == [], warnings


def _longest_silences(messages, prompt) -> dict:
    """{node: (seconds, after what)} for every privdiff node that went quiet for longer than
    SILENCE_SECONDS while it ran (from 'executing' it to 'executing' the next node)."""
    running, last, longest = None, None, {}

    def heard(at, what):
        nonlocal last
        gap = at - last[0]
        if prompt.get(running, {}).get("class_type", "").startswith("PrivDiff") and gap > SILENCE_SECONDS:
            longest[running] = max(longest.get(running, (0, "")), (round(gap, 1), last[1]))
        last = (at, what)

    for at, kind, data in messages:
        if kind == "executing" and data.get("prompt_id"):
            if running is not None:
                heard(at, "end")
            running, last = data.get("node"), (at, "start")
        elif running is not None:
            node = data.get("node") if kind == "progress" else data[0] if kind == "text" else None
            if node == running or kind == "preview":
                heard(at, data[1] if kind == "text" else kind)
    return longest


def test_results_show_on_the_nodes_in_the_real_frontend(comfy_server, frontend_driver, tmp_path):
    """Queued from the real frontend, a training node's "embedding · ε" line and the privacy report's
    text appear on the nodes themselves (web/privdiff.js), and the screenshot is what a user sees."""
    workflow = json.loads((HERE.parents[1] / "workflows" / "privdiff-dpagg-ti.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "PrivDiffDPAggTITrain":
            node["widgets_values"][0] = "frontend-results"  # a name of its own in this server
    source = tmp_path / "workflow.json"
    source.write_text(json.dumps(workflow))
    shot = tmp_path / "results.png"
    done = subprocess.run(["node", str(HERE / "frontend.cjs"), comfy_server.url, "run", str(source), str(shot)],
                          check=True, capture_output=True, text=True, env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
                          timeout=900)
    shown = {value["type"]: value["text"] for value in json.loads(done.stdout.strip().splitlines()[-1]).values()}
    assert shown["PrivDiffDPAggTITrain"].startswith("embedding:frontend-results · ε = 1"), shown
    assert "mechanism: gaussian-aggregate" in shown["PrivDiffPrivacyReport"], shown
    assert shot.stat().st_size > 50_000  # a real screenshot of the graph
    if os.environ.get("PRIVDIFF_SCREENSHOTS"):  # README pictures, refreshed on demand
        shutil.copy(shot, Path(os.environ["PRIVDIFF_SCREENSHOTS"]) / "privdiff-dpagg-ti-results.png")
