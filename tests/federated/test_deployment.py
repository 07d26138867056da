"""Flower deployment with real processes on loopback: one SuperLink with TLS and SuperNode
authentication, two SuperNodes, `flwr run` of privdiff's app; a SuperNode killed mid-round."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="deployment needs Flower: pip install 'privdiff[federated]'")
pytestmark = pytest.mark.slow  # about 3 minutes of real processes

APP = Path(__file__).resolve().parents[2] / "federated" / "privdiff-fed"
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(home: Path) -> dict:
    from privdiff.federated.fedavg import QUIET_ENVIRONMENT

    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **QUIET_ENVIRONMENT, "FLWR_HOME": str(home)}


def _wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared in {path}:\n{path.read_text(errors='replace')[-3000:]}")


def test_tls_deployment_survives_a_supernode_killed_mid_round(tmp_path):

    from safetensors.torch import load_file

    from privdiff.federated.deploy import create_node_key, create_tls_material

    certs = create_tls_material(folder=tmp_path / "certs")
    keys = {name: create_node_key(folder=tmp_path / "certs", name=name) for name in ("site-a", "site-b")}
    link_port = _port()
    processes = []

    def start(args, home, log):
        handle = open(tmp_path / log, "w")
        process = subprocess.Popen(args, env=_env(tmp_path / home), stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        processes.append(process)
        return process

    def supernode(name, partition):
        return start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}",
                      "--root-certificates", str(certs["ca"]), "--auth-supernode-private-key", str(keys[name]["private"]),
                      "--node-config", f"partition-id={partition} num-partitions=2", "--port", str(_port())],
                     name, f"{name}.log")

    try:
        start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile",
               str(certs["certificate"]), "--ssl-keyfile", str(certs["key"]), "--enable-supernode-auth",
               "--disable-runtime-dependency-installation", "--port", str(link_port),
               "--database", str(tmp_path / "link.db")], "link", "link.log")
        cli = _env(tmp_path / "cli")
        # The connection `flwr` uses (written by hand: any flwr command run without one would create the
        # default config, whose `local` connection starts a simulation SuperLink in the background).
        (tmp_path / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "privdiff-tls"\n\n[superlink.privdiff-tls]\naddress = "127.0.0.1:{link_port}"\n'
            f'root-certificates = "{certs["ca"]}"\n')
        time.sleep(5)
        for name in keys:
            subprocess.run([str(BIN / "flwr"), "supernode", "register", str(keys[name]["public"]), "privdiff-tls"],
                           env=cli, check=True, capture_output=True)
        supernode("site-a", 0)
        site_b = supernode("site-b", 1)
        out = tmp_path / "run"
        run_log = open(tmp_path / "run.log", "w")
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(APP), "privdiff-tls", "--stream", "--run-config",
                                f"out='{out}' num-clients=2 rounds=2 num-items=32 heldout-items=8 batch-size=8"],
                               env=cli, stdout=run_log, stderr=subprocess.STDOUT)
        processes.append(run)
        # Round 1 has started on site-b once it launched a ClientApp process: kill the whole site.
        _wait_for(tmp_path / "run.log", "[ROUND 1/2]", 180)
        time.sleep(2)
        os.killpg(site_b.pid, signal.SIGKILL)
        # The round goes on with site-a; the next waits for two nodes, so site-b comes back (same key).
        _wait_for(tmp_path / "run.log", "[ROUND 2/2]", 240)
        supernode("site-b", 1)
        assert run.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
        # Node authentication: a key the SuperLink never registered is refused.
        stranger = create_node_key(folder=tmp_path / "certs", name="stranger")
        intruder = start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}",
                          "--root-certificates", str(certs["ca"]), "--auth-supernode-private-key",
                          str(stranger["private"]), "--port", str(_port())], "stranger", "stranger.log")
        _wait_for(tmp_path / "stranger.log", "Failed to activate SuperNode", 120)
        assert "Sent successfully" not in (tmp_path / "stranger.log").read_text()
        del intruder
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    log = (tmp_path / "run.log").read_text()
    assert "1 failures" in log or "Received 2 results" in log
    from privdiff.federated.fedavg import load_state
    from privdiff.privacy.record import read_record

    state = load_state(out)  # the coordinator's by-products (labelled), beside records on every round
    assert state["last_round"] == 2 and set(state["heldout_loss"]) == {"0", "1", "2"}
    assert read_record(out / "global-round-2.safetensors").extra["federated"]["rounds"] == 2
    for round_number in (1, 2):  # every saved global model is whole and finite
        model = load_file(str(out / f"global-round-{round_number}.safetensors"))
        assert model and all(bool(v.isfinite().all()) for v in model.values())
