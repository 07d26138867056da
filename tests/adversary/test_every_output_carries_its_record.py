"""[8] acceptance 4 and defects 4, 5: run every command that writes results from private data and walk
its output folder. Each file must be a release with a complete record (the fields DESIGN.md 5 lists
for its mechanism, its adjacency, composed over rounds where there are rounds), whose ε an independent
accountant (dp-accounting's PLD, under the record's own adjacency) recomputes from the record alone,
or a by-product labelled as outside the guarantee, and those are gone unless the user kept them.

(`privdiff pretrain` writes the public model from public data and is not walked here; the split
server's job folder is the server's own, the adversary's, side.)
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from privdiff.cli import main
from privdiff.privacy.record import (BYPRODUCT_SUFFIX, DP_MECHANISMS, SIDECAR_SUFFIX, PrivacyRecord,
                                     PrivacyRecordError, read_record)

BYPRODUCTS = "byproducts-not-covered-by-dp"


def recompute_epsilon(record: PrivacyRecord) -> float:
    """ε from the record's own fields, with dp-accounting's PLD under the relation it states."""
    import dp_accounting
    from dp_accounting import pld

    relation = record.accounted_adjacency or record.adjacency
    neighbours = {"add-remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                  "replace-one": dp_accounting.NeighboringRelation.REPLACE_ONE}[relation]
    segments = record.extra.get("history") or [[record.noise_multiplier, record.sample_rate, record.steps]]
    events = []
    for sigma, q, steps in segments:
        event = dp_accounting.GaussianDpEvent(sigma)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        events.append(dp_accounting.SelfComposedDpEvent(event, int(steps)))
    accountant = pld.PLDAccountant(neighboring_relation=neighbours, value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(record.delta))


def check_release(path: Path) -> PrivacyRecord:
    record = read_record(path)  # raises when there is none
    for nested in [record] + ([PrivacyRecord.from_dict(record.extra["local_dp_sgd"])]
                              if "local_dp_sgd" in record.extra else []):
        if nested.mechanism in DP_MECHANISMS:
            assert nested.adjacency in ("add-remove", "replace-one"), path
            independent = recompute_epsilon(nested)
            # Never below what an independent accountant finds (PRV and PLD differ by their grids).
            assert nested.epsilon == pytest.approx(independent, rel=0.05), (path, nested.epsilon, independent)
        else:
            assert nested.epsilon is None and ("warning" in nested.extra or nested.mechanism.startswith("split")), path
    return record


def walk(folder: Path, *, keep_byproducts: bool = False) -> dict[str, PrivacyRecord]:
    """Every file under `folder`: a release (checked), its sidecar, or a labelled by-product."""
    releases = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if BYPRODUCTS in path.parts or path.name.endswith(BYPRODUCT_SUFFIX):
            assert keep_byproducts or path.name.endswith(BYPRODUCT_SUFFIX), f"{relative}: a by-product left behind"
            continue
        if path.name.endswith(SIDECAR_SUFFIX):
            assert path.with_name(path.name[:-len(SIDECAR_SUFFIX)]).is_file(), f"{relative}: a sidecar of nothing"
            continue
        try:
            releases[relative] = check_release(path)
        except PrivacyRecordError as error:
            raise AssertionError(f"{relative} is neither a release with its record nor a labelled by-product: "
                                 f"{error}") from None
    return releases


def _run(*argv):
    assert main([str(a) for a in argv]) == 0, argv


@pytest.mark.parametrize("keep", [False, True])
def test_dp_ldm_outputs(tmp_path, keep):
    _run("train", "dp-ldm", "--data", "digits", "--num-items", "16", "--epochs", "1", "--batch-size", "4",
         "--physical-batch-size", "4", "--out", tmp_path, *(["--keep-byproducts"] if keep else []),
         *(["--adjacency", "replace-one"] if keep else []))
    releases = walk(tmp_path, keep_byproducts=keep)
    assert set(releases) == {"dp_ldm_unet_diff.safetensors", "dp_ldm_comfyui.safetensors", "samples.png"}
    assert {r.adjacency for r in releases.values()} == {"replace-one" if keep else "add-remove"}
    assert (tmp_path / BYPRODUCTS).is_dir() == keep


@pytest.mark.parametrize("method", ["dpagg", "dpsgd"])
def test_dp_ti_outputs(tmp_path, method):
    _run("train", "dp-ti", "--method", method, "--data", "style", "--num-items", "6", "--steps", "2",
         "--epochs", "1", "--batch-size", "3", "--token", "<walk>", "--init-word", "circle", "--delta", "0.01",
         "--a1111", "--out", tmp_path)
    releases = walk(tmp_path)
    assert set(releases) == {"learned_embeds.safetensors", "learned_embeds_comfyui.safetensors",
                             "learned_embeds_a1111.pt"}
    mechanism = {"dpagg": "gaussian-aggregate", "dpsgd": "dp-sgd"}[method]
    assert {r.mechanism for r in releases.values()} == {mechanism}


def test_federated_outputs_compose_over_rounds(tmp_path):
    pytest.importorskip("flwr")
    _run("fed", "simulate", "--num-items", "32", "--heldout-items", "8", "--num-clients", "2", "--rounds", "2",
         "--batch-size", "8", "--client-noise-multiplier", "1.0", "--local-epsilon", "8", "--out", tmp_path)
    releases = walk(tmp_path)
    assert set(releases) == {"global-round-1.safetensors", "global-round-2.safetensors"}
    first, second = releases["global-round-1.safetensors"], releases["global-round-2.safetensors"]
    assert (first.mechanism, first.steps, second.steps) == ("dp-fedavg", 1, 2) and second.epsilon > first.epsilon
    local = PrivacyRecord.from_dict(second.extra["local_dp_sgd"])
    # [8] defect 3: the local ε is the total over both rounds (σ calibrated over rounds × local steps), not
    # spent again each round (which gave 4.33 for a target of 3); tests/federated/test_fedavg.py's
    # test_local_epsilon_is_the_total_over_every_round (slow) checks each client's report and the accountant too.
    assert 0.9 * 8.0 < local.epsilon <= 8.0, local
    assert local.steps == 2 * PrivacyRecord.from_dict(first.extra["local_dp_sgd"]).steps


def test_audit_reports_are_labelled(tmp_path):
    _run("audit", "mia", "--data", "shapes", "--num-members", "4", "--out", tmp_path / "mia")
    _run("split", "attack", "--num-items", "4", "--epochs", "1", "--batch-size", "4", "--optimisation-steps", "0",
         "--out", tmp_path / "attack")
    assert walk(tmp_path) == {}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "membership-audit.not-covered-by-dp.json", "split-attack.not-covered-by-dp.json"]


def _free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def test_split_client_output(tmp_path):
    from privdiff.transport.keys import create_keys

    keys = tmp_path / "keys"
    create_keys(folder=keys, name="server")
    create_keys(folder=keys, name="walker")
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "walker.key").write_bytes((keys / "walker.key").read_bytes())
    endpoint = _free_endpoint()
    server = subprocess.Popen([sys.executable, "-m", "privdiff", "split", "serve", "--bind", endpoint,
                               "--server-key", keys / "server.key_secret", "--allowed-clients", tmp_path / "allowed",
                               "--out", tmp_path / "job"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _run("split", "train", "--data", "circles", "--num-items", "4", "--batch-size", "2", "--connect", endpoint,
             "--client-key", keys / "walker.key_secret", "--server-key", keys / "server.key",
             "--out", tmp_path / "client")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    releases = walk(tmp_path / "client")
    assert set(releases) == {"split_controlnet.safetensors"}
    record = releases["split_controlnet.safetensors"]
    assert record.mechanism == "split-hardened" and record.steps == 2 and record.num_examples == 4
    assert record.extra["attack"]["image_margin_db"] > 0 and record.extra["attack"]["hints_protected"] is True
    assert record.extra["attack"]["hint_margin_db"] > 0
    # The client's secret and ledger stay beside its key, never in the output.
    assert (keys / "walker.split-secret").is_file() and (keys / "walker.split-ledger.sqlite").is_file()
