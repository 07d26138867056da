"""[9] acceptance 4: an allowlisted client sends every kind of malformed-but-authenticated batch.
The server keeps serving, the sender gets an error, and the job's ControlNet stays finite and equal to
the one it gets without the abuse: abusive batches are refused, never trained."""

import copy
import threading

import numpy as np
import pytest
import torch

from privdiff.pipelines.split_client import SplitConfig, client_payload
from privdiff.pipelines.split_server import SplitJob, SplitTrainer, batch_limits
from privdiff.privacy.split_secret import ClientSecret
from privdiff.transport.codec import Message
from privdiff.transport.keys import create_keys
from privdiff.transport.peer import SplitClient, SplitServer, TransportError


@pytest.fixture(scope="module")
def tiny():
    from privdiff.models.privdiff_tiny import load_privdiff_tiny

    return load_privdiff_tiny()


@pytest.fixture(scope="module")
def batches(tiny):
    from privdiff.data import load_dataset

    data = load_dataset(data="circles", num_items=8, seed=0)
    secret = ClientSecret(bytes(32))
    ids = [secret.image_id(bytes([i])) for i in range(8)]
    pixels = torch.stack([data[i]["pixel_values"] for i in range(8)])
    hints = torch.stack([data[i]["hint"] for i in range(8)]) * 2 - 1
    return [client_payload(pipeline=tiny, pixels=pixels[k:k + 4], hint_pixels=hints[k:k + 4], image_ids=ids[k:k + 4],
                           epoch=0, config=SplitConfig(), secret=secret) for k in (0, 4)]


def _abusive(good: dict) -> dict:
    """Every kind of malformed batch, built from a good one."""
    h = good["h"]
    return {
        "missing label": {k: v for k, v in good.items() if k != "label"},
        "an extra tensor": {**good, "extra": np.zeros(3, dtype=np.float16)},
        "paper and hardened at once": {**good, "conv_in_z_t": np.zeros((4, 64, 8, 8), dtype=np.float16)},
        "wrong channels": {**good, "h": np.zeros((4, 3, 8, 8), dtype=np.float16)},
        "wrong batch size": {**good, "label": good["label"][:2]},
        "odd latent side": {**{k: (v[..., :7, :7] if v.ndim == 4 else v) for k, v in good.items()}},
        "float32 latents": {**good, "z_t": good["z_t"].astype(np.float32)},
        "float timesteps": {**good, "t": good["t"].astype(np.float32)},
        "timesteps past the schedule": {**good, "t": np.full_like(good["t"], 5000)},
        "negative timesteps": {**good, "t": np.full_like(good["t"], -1)},
        "an empty batch": {k: v[:0] for k, v in good.items()},
        "NaN label": {**good, "label": np.full_like(good["label"], np.nan)},
        "infinite z_t": {**good, "z_t": np.full_like(good["z_t"], np.inf)},
        "a NaN hint value": {**good, "h": np.where(np.arange(h.size).reshape(h.shape) == 5, np.nan, h).astype(h.dtype)},
    }


def _job(tiny):
    return SplitJob(trainer=SplitTrainer(unet=copy.deepcopy(tiny.unet), learning_rate=1e-3, seed=0),
                    num_train_timesteps=tiny.scheduler.config.num_train_timesteps)


def test_every_malformed_batch_is_refused_to_its_sender_and_never_trained(tiny, batches, tmp_path):
    reference = _job(tiny)
    for k, batch in enumerate(batches):
        reference("honest", Message(kind="batch", fields={"batch_id": f"b{k}"}, tensors=batch))

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("server", "honest", "abuser"):
        create_keys(folder=keys, name=name)
        if name != "server":
            (allowed / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    job = _job(tiny)
    limits = batch_limits(tiny.unet.config)
    server = SplitServer(bind="tcp://127.0.0.1:*", server_key=keys / "server.key_secret", allowed_clients=allowed,
                         handler=job, limits=limits)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set}, daemon=True)
    thread.start()

    def client(name, **kwargs):
        return SplitClient(connect=server.endpoint, client_key=keys / f"{name}.key_secret",
                           server_public_key=keys / "server.key", name=name, **kwargs)

    try:
        honest, abuser = client("honest"), client("abuser")
        first = honest.request(Message(kind="batch", fields={"batch_id": "b0"}, tensors=batches[0]))
        assert first.fields == {"applied": 1, "duplicate": False}
        for kind, tensors in _abusive(batches[1]).items():
            reply = abuser.request(Message(kind="batch", fields={"batch_id": kind}, tensors=tensors))
            assert reply.fields.get("error"), f"{kind}: accepted"
            assert reply.fields.get("applied", 0) == 0, kind
        # A frame over the job's bound never reaches memory: libzmq drops it, and the sender times out.
        oversize = np.zeros(limits.max_tensor_bytes // 2 + 1, dtype=np.float16)
        with pytest.raises(TransportError, match="no answer"):
            client("abuser", timeout=2.0, retries=0).request(
                Message(kind="batch", fields={"batch_id": "huge"}, tensors={**batches[1], "h": oversize}))
        assert thread.is_alive(), "the server died"
        second = honest.request(Message(kind="batch", fields={"batch_id": "b1"}, tensors=batches[1]))
        assert second.fields == {"applied": 2, "duplicate": False}
        honest.close(), abuser.close()
    finally:
        stop.set()
        thread.join()
        server.close()
    assert job.trainer.steps == 2 and job.per_client.get(next(iter(job.per_client))) == 2
    for name, value in reference.trainer.controlnet.state_dict().items():
        got = job.trainer.controlnet.state_dict()[name]
        assert torch.isfinite(got).all() and torch.equal(got, value), name


def test_a_failing_handler_answers_its_sender_and_keeps_serving(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("server", "a"):
        create_keys(folder=keys, name=name)
    (allowed / "a.key").write_bytes((keys / "a.key").read_bytes())
    calls = []

    def handler(client, message):
        calls.append(message.kind)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return Message(kind="ack", fields={"applied": 1})

    server = SplitServer(bind="tcp://127.0.0.1:*", server_key=keys / "server.key_secret", allowed_clients=allowed,
                         handler=handler)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set}, daemon=True)
    thread.start()
    try:
        a = SplitClient(connect=server.endpoint, client_key=keys / "a.key_secret", server_public_key=keys / "server.key")
        assert "could not handle this batch (RuntimeError)" in a.request(Message(kind="batch")).fields["error"]
        assert a.request(Message(kind="batch")).fields == {"applied": 1}
        a.close()
    finally:
        stop.set()
        thread.join()
        server.close()
    assert server.failures == 1
