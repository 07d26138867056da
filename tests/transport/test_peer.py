"""Client and server over CurveZMQ on loopback: allowlist, several clients, bad traffic contained."""

import threading
import time

import numpy as np
import pytest

from privdiff.transport.codec import Message, encode
from privdiff.transport.keys import create_keys
from privdiff.transport.peer import SplitClient, SplitServer, TransportError


@pytest.fixture()
def keys(tmp_path):
    create_keys(folder=tmp_path / "server", name="server")
    for name in ("alice", "bob", "mallory"):
        create_keys(folder=tmp_path / name, name=name)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for name in ("alice", "bob"):
        (allowed / f"{name}.key").write_bytes((tmp_path / name / f"{name}.key").read_bytes())
    return tmp_path


@pytest.fixture()
def server(keys):
    seen = []

    def handler(name, message):
        seen.append((name, message.kind, {k: v.copy() for k, v in message.tensors.items()}))
        return Message(kind="ack", fields={"received": int(message.tensors["z"].shape[0])})

    server = SplitServer(bind="tcp://127.0.0.1:*", server_key=keys / "server" / "server.key_secret",
                         allowed_clients=keys / "allowed", handler=handler)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set}, daemon=True)
    thread.start()
    yield server, seen
    stop.set()
    thread.join()
    server.close()


def _client(keys, server, name, **kwargs):
    return SplitClient(connect=server.endpoint, client_key=keys / name / f"{name}.key_secret",
                       server_public_key=keys / "server" / "server.key", name=name, **kwargs)


def test_allowed_clients_are_served_at_once_and_replies_carry_no_tensors(keys, server):
    server, seen = server
    alice, bob = _client(keys, server, "alice"), _client(keys, server, "bob")
    z = np.ones((3, 4, 8, 8), dtype=np.float16)
    assert alice.request(Message(kind="batch", tensors={"z": z})).fields == {"received": 3}
    reply = bob.request(Message(kind="batch", tensors={"z": z[:2]}))
    assert reply.fields == {"received": 2} and not reply.tensors
    assert alice.request(Message(kind="heartbeat")).kind == "heartbeat"
    assert [(server.name_of(key), kind) for key, kind, _ in seen] == [("alice", "batch"), ("bob", "batch")]
    assert np.array_equal(seen[0][2]["z"], z)
    alice.close(), bob.close()


def test_a_key_outside_the_allowlist_never_reaches_the_server(keys, server):
    server, seen = server
    with pytest.raises(TransportError, match="allowlist"):
        _client(keys, server, "mallory", timeout=1.0)
    assert not seen and all(server.name_of(s.client) != "mallory" for s in server.sessions.values())


def test_garbage_from_one_client_does_not_harm_another(keys, server):
    server, seen = server
    alice, bob = _client(keys, server, "alice"), _client(keys, server, "bob")
    rejected = server.rejected
    for frames in ([b"not json", b"x"], [b"{}"], [b'{"v":1}', b"", b""]):
        bob.socket.send_multipart(frames)
    bob.last_out += 1  # and a replay of an old sequence number with a valid MAC
    bob.socket.send_multipart(encode(Message(kind="heartbeat"), key=bob.key, session=bob.session, seq=1))
    z = np.zeros((1, 4, 8, 8), dtype=np.float16)
    assert alice.request(Message(kind="batch", tensors={"z": z})).fields == {"received": 1}
    deadline = time.monotonic() + 5  # the server takes the two clients' messages in fair turns
    while server.rejected < rejected + 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.rejected == rejected + 4
    alice.close(), bob.close()


def test_the_server_refuses_to_answer_a_batch_with_tensors(keys):
    def leaky(name, message):
        return Message(kind="ack", tensors={"gradient": np.zeros(3, dtype=np.float32)})

    server = SplitServer(bind="tcp://127.0.0.1:*", server_key=keys / "server" / "server.key_secret",
                         allowed_clients=keys / "allowed", handler=leaky)
    errors = []

    def serve():
        try:
            server.serve(should_stop=lambda: bool(errors))
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    alice = _client(keys, server, "alice", timeout=2.0, retries=0)
    with pytest.raises(TransportError):
        alice.request(Message(kind="batch", tensors={"z": np.zeros((1, 4, 8, 8), dtype=np.float16)}))
    thread.join(timeout=5)
    assert errors and "without tensors" in str(errors[0])
    alice.close()
    server.close()


def test_keys_are_not_overwritten(tmp_path):
    create_keys(folder=tmp_path, name="server")
    with pytest.raises(FileExistsError):
        create_keys(folder=tmp_path, name="server")
    assert oct((tmp_path / "server.key_secret").stat().st_mode)[-3:] == "600"


def test_a_client_reconnects_to_a_restarted_server_with_a_new_session(keys):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"

    def start():
        server = SplitServer(bind=endpoint, server_key=keys / "server" / "server.key_secret",
                             allowed_clients=keys / "allowed",
                             handler=lambda name, m: Message(kind="ack", fields={"n": int(m.tensors["z"].shape[0])}))
        stop = threading.Event()
        thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set}, daemon=True)
        thread.start()
        return server, stop, thread

    first, stop, thread = start()
    alice = SplitClient(connect=endpoint, client_key=keys / "alice" / "alice.key_secret",
                        server_public_key=keys / "server" / "server.key", name="alice", timeout=2.0)
    z = np.zeros((2, 4, 8, 8), dtype=np.float16)
    assert alice.request(Message(kind="batch", tensors={"z": z})).fields == {"n": 2}
    old_session = alice.session
    stop.set(), thread.join(), first.close()
    second, stop, thread = start()
    assert alice.request(Message(kind="batch", tensors={"z": z})).fields == {"n": 2}
    assert alice.session != old_session
    alice.close()
    stop.set(), thread.join(), second.close()


def test_cli_creates_keys_and_refuses_to_overwrite(tmp_path, capsys):
    from privdiff.cli import main

    assert main(["split", "keys", "--out", str(tmp_path), "--name", "client-1"]) == 0
    assert (tmp_path / "client-1.key").is_file() and (tmp_path / "client-1.key_secret").is_file()
    assert main(["split", "keys", "--out", str(tmp_path), "--name", "client-1"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_ten_thousand_bad_messages_and_an_oversize_frame_leave_the_server_serving(keys):
    import os
    import random
    import tracemalloc

    from privdiff.transport.codec import Limits

    server = SplitServer(bind="tcp://127.0.0.1:*", server_key=keys / "server" / "server.key_secret",
                         allowed_clients=keys / "allowed", limits=Limits(max_tensor_bytes=1 << 20),
                         handler=lambda name, m: Message(kind="ack", fields={"n": len(m.tensors)}))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set, "poll_ms": 10}, daemon=True)
    thread.start()
    try:
        alice, bob = _client(keys, server, "alice"), _client(keys, server, "bob")
        rng = random.Random(1)
        tracemalloc.start()
        for i in range(10_000):
            bob.socket.send_multipart([rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 5))])
            if i == 1_000:
                settle = time.monotonic() + 30
                while server.rejected < 1_000 and time.monotonic() < settle:
                    time.sleep(0.01)
                baseline = tracemalloc.get_traced_memory()[0]
        deadline = time.monotonic() + 60
        while server.rejected < 10_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        grown = tracemalloc.get_traced_memory()[0] - baseline
        tracemalloc.stop()
        assert server.rejected >= 10_000 and grown < 1 << 20, (server.rejected, grown)
        bob.socket.send_multipart([b"{}", os.urandom(2 << 20)])  # a frame over the 1 MB limit: dropped by libzmq
        reply = alice.request(Message(kind="batch", tensors={"z": np.zeros((1, 4, 8, 8), dtype=np.float16)}))
        assert reply.fields == {"n": 1}
        alice.close(), bob.close()
    finally:
        stop.set()
        thread.join()
        server.close()


@pytest.mark.parametrize("heartbeats", [True, False])
def test_heartbeats_keep_an_idle_session_that_the_server_would_forget(keys, heartbeats):
    server = SplitServer(bind="tcp://127.0.0.1:*", server_key=keys / "server" / "server.key_secret",
                         allowed_clients=keys / "allowed", session_timeout=1.0,
                         handler=lambda name, m: Message(kind="ack"))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set, "poll_ms": 20}, daemon=True)
    thread.start()
    try:
        alice = _client(keys, server, "alice", heartbeat_interval=0.3 if heartbeats else None, timeout=2.0)
        session = alice.session
        time.sleep(2.5)  # idle, e.g. encoding the next batch, for longer than the server's session_timeout
        assert alice.request(Message(kind="batch", tensors={"z": np.zeros(1, np.float16)})).kind == "ack"
        # With heartbeats the same session goes on; without, the server forgot it and the client said hello again.
        assert (alice.session == session) is heartbeats
        alice.close()
        assert not alice._heartbeats or not alice._heartbeats.is_alive()
    finally:
        stop.set(), thread.join(), server.close()


def test_a_client_is_its_key_whatever_it_calls_itself(keys, server):
    """[8] defect 9: identity comes from the Curve key ZAP authenticated, never from the client's
    own words: bob posing as alice is still bob to the server and the job."""
    from zmq.utils import z85

    from privdiff.transport.keys import load_keys

    server, seen = server
    alice, bob = _client(keys, server, "alice"), _client(keys, server, "bob")
    bob.name = "alice"
    bob._open()  # a fresh session, whatever it says about itself
    z = np.ones((1, 4, 8, 8), dtype=np.float16)
    alice.request(Message(kind="batch", tensors={"z": z}))
    bob.request(Message(kind="batch", fields={"name": "alice"}, tensors={"z": z}))
    keys_seen = [key for key, _, _ in seen]
    expected = [load_keys(keys / who / f"{who}.key")[0].decode() for who in ("alice", "bob")]
    assert keys_seen == expected and len(set(keys_seen)) == 2
    assert z85.decode(keys_seen[1]) and server.name_of(keys_seen[1]) == "bob"
    alice.close(), bob.close()


def test_a_stream_keeps_a_window_of_requests_unanswered_and_yields_replies_in_order(keys):
    """The client makes request k + window only after reply k: the server always has the next batch
    queued while it works (never idle), and never holds more than a window of one client's."""
    queued_max = []

    def handler(name, message):
        time.sleep(0.02)  # a training step
        return Message(kind="ack", fields={"n": int(message.fields["n"])})

    server = SplitServer(bind="tcp://127.0.0.1:*", server_key=keys / "server" / "server.key_secret",
                         allowed_clients=keys / "allowed", handler=handler)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set, "poll_ms": 10}, daemon=True)
    thread.start()
    made = []
    try:
        alice = _client(keys, server, "alice")

        def messages():
            for n in range(12):
                made.append(n)
                yield Message(kind="batch", fields={"n": n}, tensors={"z": np.zeros(1, np.float16)})

        replies = []
        for request, reply in alice.stream(messages(), window=3):
            replies.append(reply.fields["n"])
            assert request.fields["n"] == reply.fields["n"]
            queued_max.append(len(made) - len(replies))
        assert replies == list(range(12))
        assert max(queued_max) == 3 - 1  # when reply k arrives, k + 1 and k + 2 are already sent: the window, no more
        assert alice.request(Message(kind="heartbeat")).kind == "heartbeat"  # plain requests work after it
        with pytest.raises(ValueError, match="window"):
            next(alice.stream([], window=0))
        alice.close()
    finally:
        stop.set(), thread.join(), server.close()


def test_a_stream_resends_what_was_unanswered_after_a_server_restart(keys):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    handled = []

    def start():
        server = SplitServer(bind=endpoint, server_key=keys / "server" / "server.key_secret",
                             allowed_clients=keys / "allowed",
                             handler=lambda name, m: handled.append(m.fields["n"]) or Message(
                                 kind="ack", fields={"n": m.fields["n"]}))
        stop = threading.Event()
        thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set, "poll_ms": 10},
                                  daemon=True)
        thread.start()
        return server, stop, thread

    first, stop, thread = start()
    alice = SplitClient(connect=endpoint, client_key=keys / "alice" / "alice.key_secret",
                        server_public_key=keys / "server" / "server.key", name="alice", timeout=1.0)
    replies = []
    try:
        for request, reply in alice.stream((Message(kind="batch", fields={"n": n}) for n in range(8)), window=4):
            replies.append(reply.fields["n"])
            if len(replies) == 2:  # the server goes away with requests on their way, and comes back
                stop.set(), thread.join(), first.close()
                first, stop, thread = start()
        assert replies == list(range(8))  # every request answered once, in order
        assert sorted(set(handled)) == list(range(8))  # some twice: the handler must be idempotent (the job is)
    finally:
        alice.close()
        stop.set(), thread.join(), first.close()
