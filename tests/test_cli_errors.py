"""[9] acceptance 1: bad input to every subcommand, each run as a real `privdiff` process (forked from one
that imported the libraries once), ends as one `privdiff <command>: error: …` line on stderr, exit code 2,
no traceback, and no file left behind."""

import os
import pickle
import socket
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


class _RunsCode:
    """A pickle that would run a command when loaded (what a hostile .ckpt holds)."""

    def __reduce__(self):
        return (os.system, ("touch hacked",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad and good inputs the cases point at (made once; a case must not change them)."""
    from safetensors.torch import save_file
    import torch

    from privdiff.transport.keys import create_keys

    root = tmp_path_factory.mktemp("inputs")
    (root / "text.safetensors").write_text("not a model")
    (root / "empty.safetensors").write_bytes(b"")
    save_file({"x": torch.zeros(64, 64)}, str(root / "whole.safetensors"))
    (root / "truncated.safetensors").write_bytes((root / "whole.safetensors").read_bytes()[:200])
    (root / "folder").mkdir()
    (root / "code.ckpt").write_bytes(_zip_pickle(_RunsCode()))
    with open(root / "raw.ckpt", "wb") as f:
        pickle.dump({"x": 1}, f)
    (root / "a-file").write_text("x")
    (root / "bad.json").write_text("{not json")
    (root / "unknown.json").write_text('{"num_clients": 2, "surprise": 1}')
    (root / "images").mkdir()
    _png(root / "images" / "one.png")
    _png(root / "images" / "two.png")
    (root / "empty-images").mkdir()
    create_keys(folder=root / "keys", name="server")
    create_keys(folder=root / "keys", name="client")
    (root / "allowed").mkdir()
    (root / "allowed" / "client.key").write_bytes((root / "keys" / "client.key").read_bytes())
    (root / "no-allowed").mkdir()
    return root


def _png(path):
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(path)


def _zip_pickle(obj) -> bytes:
    """A torch-style .ckpt: a zip holding data.pkl."""
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(obj))
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def _busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


BUSY = _busy_port()  # held for the module's life: "port in use"
F = "{files}"  # placeholder for the inputs folder
LDM = ["train", "dp-ldm", "--data", "digits", "--num-items", "40", "--out", "run"]
TI = ["train", "dp-ti", "--data", "style", "--num-items", "6", "--token", "<x>", "--out", "run"]
FED = ["fed", "simulate", "--num-items", "12", "--heldout-items", "4", "--num-clients", "2", "--out", "run"]
SERVE = ["split", "serve", "--server-key", f"{F}/keys/server.key_secret", "--allowed-clients", f"{F}/allowed",
         "--out", "job"]
CLIENT = ["split", "train", "--data", "circles", "--num-items", "4", "--client-key", f"{F}/keys/client.key_secret",
          "--server-key", f"{F}/keys/server.key", "--out", "run", "--timeout", "1"]
ATTACK = ["split", "attack", "--num-items", "4", "--epochs", "1"]

CASES = [
    # (command line, what the error line must say)
    (["demo", "--only", "nope", "--out", "d"], "not a demo feature"),
    (["demo", "--out", f"{F}/a-file"], "is a file"),
    (["demo", "--base", f"{F}/missing.safetensors", "--out", "d"], "nothing exists"),
    (["demo", "--base", f"{F}/text.safetensors", "--out", "d"], "not a readable .safetensors"),
    (["demo"], "required: --out"),
    (["pretrain", "--data", "digits", "--out", "p"], "public corpus only"),
    (["pretrain", "--resume", "--out", "p"], "no pretraining checkpoint"),
    (["pretrain", "--unet-steps", "-1", "--out", "p"], "unet_steps"),
    (["pretrain", "--out", f"{F}/a-file"], "is a file"),
    ([*LDM, "--epsilon", "0"], "use --no-dp"),
    ([*LDM, "--epsilon", "-1"], "must be positive"),
    ([*LDM, "--delta", "2"], "delta"),
    ([*LDM, "--delta", "0.5"], "not below 1/num_examples"),
    ([*LDM, "--batch-size", "0"], "batch_size"),
    ([*LDM, "--batch-size", "1000"], "larger than the dataset"),
    ([*LDM, "--epochs", "0"], "epochs"),
    ([*LDM, "--clip-norm", "0"], "clip_norm"),
    ([*LDM, "--learning-rate", "-1"], "learning_rate"),
    ([*LDM, "--physical-batch-size", "0"], "physical_batch_size"),
    ([*LDM, "--trainable", "everything"], "invalid choice"),
    ([*LDM, "--conditioning-clip-share", "1.5"], "conditioning_clip_share"),
    ([*LDM, "--conditioning-clip-share", "0.5"], "give some"),
    ([*LDM, "--privacy-unit", "subject"], "subject"),
    ([*LDM, "--num-items", "0"], "num_items"),
    ([*LDM, "--base", f"{F}/text.safetensors"], "not a readable .safetensors"),
    ([*LDM, "--base", f"{F}/empty.safetensors"], "not a readable .safetensors"),
    ([*LDM, "--base", f"{F}/truncated.safetensors"], "not a readable .safetensors"),
    ([*LDM, "--base", f"{F}/folder"], "no model_index.json"),
    ([*LDM, "--base", f"{F}/code.ckpt"], "holds code or a format privdiff does not read"),
    ([*LDM, "--base", f"{F}/raw.ckpt"], "holds code or a format privdiff does not read"),
    ([*LDM, "--base", f"{F}/a-file"], "a single-file checkpoint ends in"),
    ([*LDM, "--device", "cuda"], "sees no CUDA GPU"),
    ([*LDM, "--device", "quantum"], "not a device torch knows"),
    ([*LDM, "--out", f"{F}/a-file"], "is a file"),
    ([*LDM, "--out", "/proc/privdiff-run"], "cannot be created"),
    ([*LDM, "--resume"], "holds no checkpoint"),
    (["train", "dp-ldm", "--data", f"{F}/empty-images", "--out", "run"], "no images"),
    (["train", "dp-ldm", "--data", f"{F}/images", "--out", "run"], "has no caption"),
    (["train", "dp-ldm", "--data", f"{F}/missing", "--out", "run"], "not an existing folder"),
    (["train", "dp-ldm", "--out", "run"], "--data is required"),
    ([*TI, "--token", "two words"], "one word"),
    (["train", "dp-ti", "--data", "style", "--out", "run"], "required: --token"),
    ([*TI, "--token", "painting"], "already in the vocabulary"),
    ([*TI, "--init-word", "two words"], "--init-word"),
    ([*TI, "--template", "no placeholder"], "{token}"),
    ([*TI, "--num-vectors", "0"], "num_vectors"),
    ([*TI, "--checkpoint-every", "0"], "--checkpoint-every 0"),
    ([*TI, "--method", "dpsgd", "--no-dp"], "always private"),
    ([*TI, "--clip-norm", "0"], "clip_norm"),
    ([*TI, "--sample-rate", "1.5"], "sample_rate"),
    ([*TI, "--num-subsets", "0"], "num_subsets"),
    ([*TI, "--num-subsets", "9"], "more than the 6 images"),
    ([*TI, "--epsilon", "0"], "use --no-dp"),
    ([*TI, "--privacy-unit", "subject", "--num-subsets", "2"], "num_subsets"),
    ([*TI, "--resume"], "holds no checkpoint"),
    (["audit", "mia", "--data", "shapes", "--num-members", "0", "--out", "a"], "at least one member"),
    (["audit", "mia", "--data", "digits", "--num-members", "5000", "--out", "a"], "--num-members"),
    (["audit", "mia", "--data", "shapes", "--num-members", "4", "--weights", f"{F}/missing", "--out", "a"],
     "nothing there"),
    (["audit", "mia", "--data", f"{F}/images", "--num-members", "2", "--out", "a"], "--nonmember-data"),
    (["audit", "mia", "--num-members", "2", "--out", "a"], "--data is required"),
    ([*FED, "--num-clients", "20"], "at least one example"),
    ([*FED, "--beta", "0"], "must be positive"),
    ([*FED, "--rounds", "0"], "rounds"),
    ([*FED, "--trainable", "everything"], "not a parameter set"),
    ([*FED, "--local-epsilon", "0"], "local_epsilon"),
    ([*FED, "--client-noise-multiplier", "1", "--client-delta", "0.9"], "client_delta"),
    ([*FED, "--config", f"{F}/folder"], "go with a single-file --base"),
    (["fed", "simulate", "--settings", f"{F}/missing.json", "--out", "run"], "no such file"),
    (["fed", "simulate", "--settings", f"{F}/bad.json", "--out", "run"], "bad.json is not valid JSON"),
    (["fed", "simulate", "--settings", f"{F}/unknown.json", "--out", "run"], "surprise"),
    (["fed", "certs", "--out", "certs", "--nodes", "site/a"], "plain file name"),
    (["fed", "certs", "--out", "certs", "--nodes", "a", "a"], "its own name"),
    (["fed", "certs", "--out", f"{F}/a-file"], "is a file"),
    (["split", "keys", "--out", "k", "--name", "../up"], "plain file name"),
    (["split", "keys", "--out", f"{F}/keys", "--name", "server"], "already exists"),
    ([*SERVE, "--server-key", f"{F}/keys/missing.key_secret"], "no key file"),
    ([*SERVE, "--server-key", f"{F}/keys/server.key"], "holds no secret key"),
    ([*SERVE, "--allowed-clients", f"{F}/no-allowed"], "holds no client .key files"),
    ([*SERVE, "--bind", f"tcp://127.0.0.1:{BUSY.getsockname()[1]}"], "already in use"),
    ([*SERVE, "--bind", "carrier-pigeon"], "cannot listen on"),
    ([*SERVE, "--checkpoint-every", "0"], "checkpoint-every"),
    ([*SERVE, "--out", f"{F}/a-file"], "is a file"),
    ([*CLIENT, "--client-key", f"{F}/keys/missing.key_secret"], "no key file"),
    ([*CLIENT, "--client-key", f"{F}/keys/client.key"], "holds no secret key"),
    ([*CLIENT, "--server-key", f"{F}/keys/missing.key"], "no key file"),
    ([*CLIENT, "--connect", "tcp://127.0.0.1:9"], "no answer from"),
    ([*CLIENT, "--connect", "pigeon://nowhere"], "cannot connect to"),
    (["split", "train", "--data", "digits", "--num-items", "4", "--client-key", f"{F}/keys/client.key_secret",
      "--server-key", f"{F}/keys/server.key", "--out", "run"], "no hints"),
    ([*CLIENT, "--snr-bound", "0"], "snr_bound"),
    ([*CLIENT, "--draws-per-image", "-1"], "draws_per_image"),
    ([*CLIENT, "--epochs", "0"], "--epochs"),
    ([*CLIENT, "--target-margin-db", "3", "--snr-bound", "0.1"], "chooses k and σ_hint itself"),
    (["split", "plan", "--images", "0"], "at least 1"),
    (["split", "plan", "--images", "1000", "--target-margin-db", "0.1"], "spread between secrets"),
    ([*ATTACK, "--num-items", "0"], "num_items"),
    ([*ATTACK, "--epochs", "0"], "--epochs"),
    ([*ATTACK, "--sigma-label", "-1"], "sigma_label"),
    ([*ATTACK, "--optimisation-steps", "-1"], "optimisation-steps"),
    ([*ATTACK, "--mode", "leaky"], "invalid choice"),
    (["inspect", f"{F}/text.safetensors"], "not a readable .safetensors"),
    (["inspect", f"{F}/empty.safetensors"], "not a readable .safetensors"),
    (["inspect", f"{F}/folder"], "is a folder"),
    (["inspect", f"{F}/missing.safetensors"], "does not exist"),
    (["inspect", f"{F}/code.ckpt"], "holds code"),
    (["frobnicate"], "invalid choice"),
]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


# A `privdiff` process per case, without paying the imports each time: this parent imports what the
# commands use once, then forks a child per case, which runs the command line with its own working
# folder, stdout and stderr, and exits with the command's code (so each case is still a real process
# with its own exit status and nothing shared). One fork at a time; two of these run side by side.
_ZYGOTE = """
import json, os, signal, sys, traceback
import numpy, PIL.Image, safetensors.torch, scipy.stats, torch, diffusers, transformers  # noqa: F401 (once)
from privdiff.cli import main
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(case["cwd"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        signal.alarm(180)  # a bad input that was not refused, and started working
        try:
            code = main(case["argv"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class _Zygote:
    def __init__(self):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)

    def run(self, argv, files: Path, work: Path):
        import json

        argv = [a.replace(F, str(files)) for a in argv]
        out, err = work.parent / f"{work.name}.out", work.parent / f"{work.name}.err"
        self.process.stdin.write(json.dumps({"argv": argv, "cwd": str(work), "stdout": str(out),
                                             "stderr": str(err)}) + "\n")
        self.process.stdin.flush()
        code = json.loads(self.process.stdout.readline())
        stderr = err.read_text(errors="replace") if err.exists() else ""
        if code == -14:
            stderr += "(still running after 180 s)"
        return argv, subprocess.CompletedProcess(argv, returncode=code, stdout=out.read_text(errors="replace"),
                                                 stderr=stderr)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def test_at_least_sixty_bad_inputs_across_every_subcommand():
    commands = {" ".join(a for a in argv[:2] if not a.startswith("-")) for argv, _ in CASES}
    assert len(CASES) >= 60
    for command in ("demo", "pretrain", "train dp-ldm", "train dp-ti", "audit mia", "fed simulate", "fed certs",
                    "split keys", "split serve", "split train", "split attack", "split plan"):
        assert any(c.startswith(command) for c in commands), command


def test_every_bad_input_is_one_error_line_exit_2_and_leaves_nothing(files, tmp_path):
    before = _snapshot(files)
    works = []
    for index in range(len(CASES)):
        work = tmp_path / f"case-{index}"
        work.mkdir()
        works.append(work)
    zygotes = [_Zygote(), _Zygote()]
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            halves = [pool.submit(lambda z, k: [z.run(CASES[i][0], files, works[i]) for i in range(k, len(CASES), 2)],
                                  zygote, k) for k, zygote in enumerate(zygotes)]
            done = [h.result() for h in halves]
    finally:
        for zygote in zygotes:
            zygote.close()
    runs = [done[i % 2][i // 2] for i in range(len(CASES))]
    problems = []
    for (argv, done), (_, expected), work in zip(runs, CASES, works):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = None
        if done.returncode != 2:
            why = f"exit {done.returncode}"
        elif "Traceback" in done.stderr:
            why = "a traceback"
        elif not lines or not lines[-1].startswith("privdiff") or ": error: " not in lines[-1]:
            why = "no error line"
        elif len([line for line in lines if ": error: " in line]) != 1:
            why = "more than one error line"
        elif expected not in lines[-1]:
            why = f"the error does not say {expected!r}"
        elif list(work.iterdir()):
            why = f"left {sorted(p.name for p in work.iterdir())}"
        if why:
            problems.append(f"{' '.join(argv)}: {why}\n    {done.stderr.strip()[-600:]}")
    assert not problems, f"{len(problems)} of {len(CASES)} bad inputs misbehaved:\n" + "\n".join(problems)
    assert _snapshot(files) == before, "a refused command changed its inputs"
    assert not (files / "hacked").exists() and not any(w.joinpath("hacked").exists() for w in works)
