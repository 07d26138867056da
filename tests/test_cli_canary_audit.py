"""[14] `privdiff audit canary`: the bound next to the recorded ε, one line each, and the audit's JSON in
--out; a bad option is one error line and leaves nothing behind."""

import json

import pytest
import torch

from privdiff.cli import main


@pytest.fixture()
def one_thread():
    # Tiny matrices: on a shared 2-core machine the thread pool's hand-offs set the time, not the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_gaussian_reference_prints_the_bound_and_writes_the_record(tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", "canary", "--method", "gaussian", "--epsilon", "4", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("audited lower bound: ε >= ") and "99% confidence" in lines[0]
    assert lines[1].startswith("recorded ε: 4 at δ = 1e-05")
    assert lines[2].startswith("Gaussian fit of the scores: ε >= ") and "if the scores are Gaussian" in lines[2]
    record = json.loads((out / "canary-audit.json").read_text())
    assert record["kind"] == "canary audit" and record["mechanism"] == "gaussian" and record["num_canaries"] == 1000
    assert f"{record['epsilon_estimate_gaussian_fit']:.3g}" in lines[2]
    assert record["epsilon_lower_bound"] < record["epsilon_estimate_gaussian_fit"] < 4
    assert f"{record['epsilon_lower_bound']:.3g}" in lines[0] and 0 < record["epsilon_lower_bound"] < 4
    assert record["settings"] == {"method": "gaussian", "target_epsilon": 4.0, "delta": 1e-5, "num_canaries": 1000,
                                  "runs": 1, "guesses": "grid", "seed": 0}


def test_ten_runs_with_planned_guesses_pool_their_canaries(tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", "canary", "--method", "gaussian", "--epsilon", "2", "--runs", "10", "--guesses", "planned",
                 "--out", str(out)]) == 0
    record = json.loads((out / "canary-audit.json").read_text())
    assert record["num_canaries"] == 10000 and record["runs"] == 10 and record["settings"]["guesses"] == "planned"
    assert record["num_guesses"] == 2 * record["guesses_included"]  # the one planned pair (k, k)
    assert 0 < record["epsilon_lower_bound"] < 2
    lines = capsys.readouterr().out.splitlines()
    assert "10 runs × 1000 canaries" in lines[0] and "guesses (planned) right" in lines[0]


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--canaries", "10"], "--canaries 10: an audit needs at least 32"),
    (["--confidence", "1.5"], "--confidence 1.5 must lie between 0 and 1"),
    (["--delta", "0.01"], "canaries x runs <= 1/(2 delta) = 50"),
    (["--runs", "0"], "--runs 0 must be at least 1"),
    (["--runs", "60", "--method", "gaussian"], "canaries x runs <= 1/(2 delta) = 49999"),
    (["--epsilon", "0"], "--epsilon 0.0 must be positive"),
    (["--batch-size", "0", "--num-items", "8"], "batch_size=0 must be at least 1"),
])
def test_a_bad_setting_is_one_error_line_and_leaves_nothing(tmp_path, capsys, argv, fragment):
    out = tmp_path / "audit"
    assert main(["audit", "canary", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("privdiff audit canary: error: ") and fragment in err, err
    assert not out.exists()


def test_an_unknown_method_is_one_argparse_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["audit", "canary", "--out", str(tmp_path), "--method", "dp-sgd"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'dp-sgd'" in err


def test_dp_ldm_on_privdiff_tiny_writes_the_record_and_the_chart(tmp_path, capsys, one_thread):
    out = tmp_path / "audit"
    assert main(["audit", "canary", "--out", str(out), "--num-items", "16", "--epochs", "2", "--canaries", "256",
                 "--epsilon", "8", "-q"]) == 0  # full batches of the 16 items by default
    lines = capsys.readouterr().out.splitlines()
    record = json.loads((out / "canary-audit.json").read_text())
    assert record["mechanism"] == "dp-ldm" and record["bound"] == "fdp" and record["settings"]["steps"] == 2
    assert record["settings"]["sample_rate"] == 1.0 and record["settings"]["num_items"] == 16
    assert 0 < record["epsilon_lower_bound"] < record["recorded_epsilon"] <= 8.0
    assert lines[1].startswith(f"recorded ε: {record['recorded_epsilon']:.3g}")
    assert sorted(p.name for p in out.iterdir()) == ["canary-audit.json", "canary-audit.png"]


def test_the_federated_audit_runs_flowers_client_level_dp_with_canary_clients(tmp_path, capsys, one_thread):
    out = tmp_path / "audit"
    assert main(["audit", "canary", "--method", "federated", "--epsilon", "4", "--canaries", "64", "--rounds", "2",
                 "--out", str(out)]) == 0
    record = json.loads((out / "canary-audit.json").read_text())
    assert record["mechanism"] == "dp-fedavg" and record["num_canaries"] == 64
    assert 3.9 < record["recorded_epsilon"] <= 4.0  # z calibrated (conservatively) to the asked ε
    assert 0 <= record["epsilon_lower_bound"] <= record["recorded_epsilon"]


def test_the_dpsgd_ti_audit_trains_the_token_rows_with_canaries(tmp_path, capsys, one_thread):
    out = tmp_path / "audit"
    assert main(["audit", "canary", "--method", "dpsgd-ti", "--epsilon", "4", "--canaries", "64", "--num-vectors", "2",
                 "--num-items", "8", "--epochs", "1", "--data", "style", "--out", str(out)]) == 0
    record = json.loads((out / "canary-audit.json").read_text())
    assert record["mechanism"] == "dpsgd-ti" and record["settings"]["canary_dim"] == 128  # 2 vectors x 64 values
    assert 0 <= record["epsilon_lower_bound"] <= record["recorded_epsilon"]
    capsys.readouterr()
    assert main(["audit", "canary", "--method", "dpsgd-ti", "--runs", "2", "--out", str(tmp_path / "b")]) == 2
    assert "--runs and --guesses planned are for" in capsys.readouterr().err and not (tmp_path / "b").exists()
