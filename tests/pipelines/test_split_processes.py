"""Real processes on loopback: `privdiff split serve` killed mid-training and restarted from its
checkpoint; the `privdiff split train` client reconnects and the job ends with every batch trained once."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest


from privdiff.privacy.record import read_record


def _free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def _wait_for(predicate, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_server_killed_mid_training_restarts_and_the_client_finishes_with_no_step_lost_or_doubled(tmp_path):
    job, env, serve, server = _start_server(tmp_path)
    client = _start_client(tmp_path, env, serve, batch_size=2, epochs=2, timeout=5)
    try:
        def steps_saved():
            try:
                return _job_state(job)["steps"]
            except (ValueError, FileNotFoundError):
                return 0

        _wait_for(lambda: steps_saved() >= 2, timeout=120, what="two checkpointed steps")
        server.send_signal(signal.SIGKILL)  # a hard kill, mid-training
        steps_at_kill = steps_saved()
        server.wait(timeout=30)
        server = subprocess.Popen(serve, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = client.communicate(timeout=300)
        assert client.returncode == 0, out
        assert steps_at_kill < 16, "the kill came after the job's end: nothing was tested"
        assert "the server trained 16 of this client's batches" in out, out  # 8 per epoch, 2 epochs, each once
        record = read_record(tmp_path / "client" / "split_controlnet.safetensors")
        assert record.mechanism == "split-hardened" and record.steps == 16 and record.num_examples == 16
    finally:
        _stop(client, server)
    meta = _job_state(job)
    assert meta["steps"] == 16 and len(meta["applied"]) == 16


def _stop(*processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _start_server(tmp_path):
    """Keys, an allowlist and a `privdiff split serve` process that has said it is serving."""
    from privdiff.transport.keys import create_keys

    create_keys(folder=tmp_path / "keys", name="server")
    create_keys(folder=tmp_path / "keys", name="client-a")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client-a.key").write_bytes((tmp_path / "keys" / "client-a.key").read_bytes())
    endpoint, job = _free_endpoint(), tmp_path / "job"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    serve = [sys.executable, "-m", "privdiff", "split", "serve", "--bind", endpoint,
             "--server-key", str(tmp_path / "keys" / "server.key_secret"), "--allowed-clients", str(allowed),
             "--out", str(job), "--checkpoint-every", "1", "--learning-rate", "1e-4"]
    server = subprocess.Popen(serve, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The client checks the server first (before it writes anything): start it once the server listens.
    _wait_for_line(server, "serving the split ControlNet job", timeout=180)
    return job, env, serve, server


def _start_client(tmp_path, env, serve, *, batch_size: int, epochs: int, timeout: int):
    endpoint = serve[serve.index("--bind") + 1]
    return subprocess.Popen(
        [sys.executable, "-m", "privdiff", "split", "train", "--data", "circles", "--num-items", "16",
         "--batch-size", str(batch_size), "--epochs", str(epochs), "--connect", endpoint, "--timeout", str(timeout),
         "--client-key", str(tmp_path / "keys" / "client-a.key_secret"),
         "--server-key", str(tmp_path / "keys" / "server.key"), "--out", str(tmp_path / "client")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(process, text: str, *, timeout: float) -> None:
    """Read `process`'s output until a line holds `text`; the rest keeps draining in a thread."""
    import threading

    found, lines = threading.Event(), []

    def read():
        for line in process.stdout:
            lines.append(line)
            if text in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        raise AssertionError(f"the server never said {text!r}:\n{''.join(lines)[-3000:]}")


def _job_state(folder):
    from privdiff.training.checkpoint import load_checkpoint

    return load_checkpoint(folder=folder, kind="split-job", name="job.safetensors").state


@pytest.mark.slow  # several minutes: the server is restarted after each kill
def test_server_killed_at_random_points_again_and_again_trains_every_batch_once(tmp_path):
    """[9] acceptance 2 for the split server: SIGKILL at random moments (mid-batch, mid-checkpoint,
    between batches) PRIVDIFF_KILLS times (default 20); each restart resumes from the job's checkpoint
    and the client's batches are each trained exactly once in the end."""
    import random

    kills_wanted = int(os.environ.get("PRIVDIFF_KILLS", "20"))
    job, env, serve, server = _start_server(tmp_path)
    client = _start_client(tmp_path, env, serve, batch_size=1, epochs=4, timeout=30)
    rng, kills = random.Random("split-kills"), 0
    try:
        while kills < kills_wanted and client.poll() is None:
            time.sleep(rng.uniform(0.0, 4.0))
            if client.poll() is not None:
                break
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)
            kills += 1
            server = subprocess.Popen(serve, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            _wait_for_line(server, "serving the split ControlNet job", timeout=180)
        out, _ = client.communicate(timeout=900)
        assert client.returncode == 0, out
        assert kills >= min(kills_wanted, 5), f"only {kills} kills landed before the client finished"
        assert "the server trained 64 of this client's batches" in out, out  # 16 per epoch, 4 epochs, each once
        print(f"split server: {kills} kills, every one of the client's 64 batches trained once")
    finally:
        _stop(client, server)
    meta = _job_state(job)
    assert meta["steps"] == 64 and len(meta["applied"]) == 64
