"""A quiet console: what `privdiff demo` prints when its output goes to a file (as in CI and logs)."""

import os
import re
import subprocess
import sys
import time

import pytest


def _run(argv, tmp_path, timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY",
                                                            "TQDM_DISABLE", "NO_COLOR")}
    return subprocess.run([sys.executable, "-m", "privdiff", *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def test_the_demo_prints_no_warning_no_repeat_no_control_codes_and_a_line_per_round(tmp_path):
    pytest.importorskip("flwr", reason="the demo's federated feature needs Flower")
    done = _run(["demo", "--out", str(tmp_path / "demo")], tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    text = done.stdout
    assert "\x1b[" not in text, "ANSI colour codes in redirected output"
    assert "\r" not in text, "carriage-return progress bars in redirected output"
    lines = [line for line in text.splitlines() if line.strip()]
    warnings = [line for line in lines if re.search(r"\bwarn(ing)?s?\b|deprecat", line, re.IGNORECASE)]
    assert not warnings, warnings
    repeated = sorted({line for line in lines if lines.count(line) > 1})
    assert not repeated, repeated
    # the federated part: 2 rounds, at most one line each (Flower's own lines only with -v)
    rounds = [line for line in lines if re.search(r"\bround \d+/\d+", line, re.IGNORECASE)]
    assert 1 <= len(rounds) <= 2, rounds
    assert not any("INFO" in line or "DEBUG" in line for line in lines)
    # and the federated feature did its work: two simulated clients, a global model saved per round,
    # the by-products gone (the whole demo runs here, so its parts are checked here too)
    from privdiff.privacy.record import read_record

    assert "2 clients, 2 FedAvg rounds" in text
    federated = tmp_path / "demo" / "federated"
    assert read_record(federated / "global-round-2.safetensors").extra["federated"]["rounds"] == 2
    assert sorted(p.name for p in federated.iterdir()) == ["global-round-1.safetensors", "global-round-2.safetensors"]


@pytest.mark.slow  # about 3 minutes on 2 cores
def test_a_first_dp_ldm_run_with_the_defaults_takes_minutes(tmp_path):
    started = time.monotonic()
    done = _run(["train", "dp-ldm", "--base", "tiny", "--data", "shapes", "--out", str(tmp_path / "run")], tmp_path,
                timeout=900)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:]
    assert "using 1,000 of shapes's 10,000 items" in done.stdout
    for phase in ("encoding", "calibrating", "training", "sampling"):
        assert f"dp-ldm: {phase}" in done.stdout, phase
    assert seconds < 300, f"{seconds:.0f} s"
