"""Flower's supported simulation entry point: `flwr run` against a simulation SuperLink that privdiff
starts for the run and that never outlives it, with Flower's own files kept out of the user's FLWR_HOME."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="federated diffusion needs Flower: pip install 'privdiff[federated]'")


def test_a_federation_has_one_supernode_per_client_on_one_cpu_each():
    from flwr.cli.config_utils import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    from privdiff.federated.simulation import federation_config

    values = parse_config_args([federation_config(num_clients=5, verbose=False)])
    config = simulation_config_from_json({k.replace("-", "_"): v for k, v in values.items()})  # as flwr run does
    assert config.num_supernodes == 5
    assert config.client_resources_num_cpus == 1 and config.client_resources_num_gpus == 0.0
    assert config.init_args_log_to_driver is False


@pytest.mark.slow  # about 40 s: the run must be under way, Ray's workers up, before the kill
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc (Linux)")
def test_a_killed_simulation_takes_its_superlink_and_flower_home_with_it(tmp_path, flower_processes):
    """SIGKILL of `privdiff fed simulate` mid-run (no chance to clean up): the SuperLink it started,
    Flower's simulation process and Ray's workers all end too, and the user's own FLWR_HOME is never
    written."""
    assert not flower_processes(wait=60), "another Flower run is on this machine"
    user_home = tmp_path / "user-flwr-home"
    user_home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(user_home)}
    child = subprocess.Popen([sys.executable, "-m", "privdiff", "fed", "simulate", "--data", "digits", "--num-clients",
                              "2", "--rounds", "1", "--num-items", "16", "--heldout-items", "8", "--batch-size", "8",
                              "--out", str(tmp_path / "fed")], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # Killed once the run is under way: the SuperLink, its simulation process and Ray's workers all up.
        while not any("raylet" in p for p in flower_processes()):
            assert child.poll() is None and time.monotonic() < deadline, "the simulation never started"
            time.sleep(0.2)
        time.sleep(2.0)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not flower_processes(wait=30), "Flower processes outlived privdiff"
    assert not any(user_home.iterdir()), "the user's FLWR_HOME was written"
