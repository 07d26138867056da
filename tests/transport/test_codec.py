"""The wire codec: round trip without copies, and every malformed, altered, replayed or oversize
message refused before its buffers are used."""

import json
import random
import tracemalloc

import numpy as np
import pytest

from privdiff.transport.codec import Limits, Message, ProtocolError, decode, encode

KEY = b"k" * 32
SESSION = "ab12"


def _frames(seq=1, **tensors):
    tensors = tensors or {"z_t": np.arange(24, dtype=np.float16).reshape(2, 3, 4), "t": np.array([5, 9])}
    return encode(Message(kind="batch", fields={"step": 3}, tensors=tensors), key=KEY, session=SESSION, seq=seq)


def _as_bytes(frames):
    return [bytes(f) for f in frames]


def test_round_trip_keeps_values_and_does_not_copy():
    z = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float16)
    frames = _as_bytes(_frames(z_t=z, t=np.array([1, 2], dtype=np.int64)))
    message, seq = decode(frames, key=KEY, session=SESSION, last_seq=0)
    assert seq == 1 and message.kind == "batch" and message.fields == {"step": 3}
    assert np.array_equal(message.tensors["z_t"], z) and message.tensors["t"].tolist() == [1, 2]
    assert not message.tensors["z_t"].flags.writeable
    assert np.shares_memory(message.tensors["z_t"], np.frombuffer(frames[1], dtype=np.uint8))  # a view, no copy


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_a_changed_byte_in_any_frame_is_refused(which):
    frames = _as_bytes(_frames())
    changed = bytearray(frames[which])
    changed[len(changed) // 2] ^= 0x01
    frames[which] = bytes(changed)
    with pytest.raises(ProtocolError):
        decode(frames, key=KEY, session=SESSION, last_seq=0)


def test_replayed_reordered_truncated_and_foreign_messages_are_refused():
    first, second = _as_bytes(_frames(seq=1)), _as_bytes(_frames(seq=2))
    _, last = decode(first, key=KEY, session=SESSION, last_seq=0)
    with pytest.raises(ProtocolError, match="sequence"):
        decode(first, key=KEY, session=SESSION, last_seq=last)  # replayed
    with pytest.raises(ProtocolError, match="sequence"):
        decode(_as_bytes(_frames(seq=3)), key=KEY, session=SESSION, last_seq=last)  # one skipped: reordered
    with pytest.raises(ProtocolError, match="frames"):
        decode(second[:-2] + second[-1:], key=KEY, session=SESSION, last_seq=last)  # a buffer dropped
    swapped = [second[0], second[2], second[1], second[3]]
    with pytest.raises(ProtocolError):
        decode(swapped, key=KEY, session=SESSION, last_seq=last)  # buffers swapped
    with pytest.raises(ProtocolError, match="MAC"):
        decode(second, key=b"x" * 32, session=SESSION, last_seq=last)  # another key
    with pytest.raises(ProtocolError, match="session"):
        decode(second, key=KEY, session="other", last_seq=last)
    decode(second, key=KEY, session=SESSION, last_seq=last)  # the genuine next message still passes


def test_disallowed_dtypes_are_neither_sent_nor_read():
    with pytest.raises(ValueError, match="dtype"):
        encode(Message(kind="x", tensors={"o": np.array([object()])}), key=KEY, session=SESSION, seq=1)
    frames = _as_bytes(_frames())
    header = json.loads(frames[0])
    header["tensors"][0]["dtype"] = "object"
    frames[0] = json.dumps(header).encode()
    with pytest.raises(ProtocolError, match="allowlist"):
        decode(frames, key=KEY, session=SESSION, last_seq=0)


def test_oversize_messages_are_refused_before_allocation():
    frames = _as_bytes(_frames())
    header = json.loads(frames[0])
    header["tensors"][0]["shape"] = [1 << 20, 1 << 20, 1 << 10]  # announces 2 PB
    frames[0] = json.dumps(header).encode()
    tracemalloc.start()
    with pytest.raises(ProtocolError, match="limit"):
        decode(frames, key=KEY, session=SESSION, last_seq=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20
    with pytest.raises(ProtocolError, match="header"):
        decode([b"{" * 100_000, b"x" * 32], key=KEY, session=SESSION, last_seq=0, limits=Limits(max_header_bytes=65536))
    big = _as_bytes(_frames(z=np.zeros(1000, dtype=np.float32)))
    with pytest.raises(ProtocolError, match="limit"):
        decode(big, key=KEY, session=SESSION, last_seq=0, limits=Limits(max_tensor_bytes=1000))


def test_ten_thousand_random_and_malformed_messages_only_raise_protocol_errors():
    rng = random.Random(0)
    genuine = _as_bytes(_frames())
    tracemalloc.start()
    baseline = None
    for i in range(10_000):
        kind = i % 4
        if kind == 0:  # random frames
            frames = [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(0, 6))]
        elif kind == 1:  # a genuine message with one byte changed
            frames = [bytearray(f) for f in genuine]
            target = frames[rng.randrange(len(frames))]
            target[rng.randrange(len(target))] ^= rng.randrange(1, 256)
            frames = [bytes(f) for f in frames]
        elif kind == 2:  # headers that parse as JSON but lie
            header = {"v": 1, "kind": "batch", "session": SESSION, "seq": rng.choice([1, -1, 2**70, True]),
                      "fields": rng.choice([{}, [], None]),
                      "tensors": [{"name": "a", "dtype": rng.choice(["float16", "object", "<f4"]),
                                   "shape": [rng.choice([-1, 0, 3, 2**40, 1.5, "x"])]}]}
            frames = [json.dumps(header).encode(), rng.randbytes(6), rng.randbytes(32)]
        else:  # deep or odd JSON
            frames = [rng.choice([b"[" * 5000, b'"x"', b"null", b"1e999", "\udcff".encode("utf-8", "surrogatepass")]),
                      b"", b""]
        with pytest.raises(ProtocolError):
            decode(frames, key=KEY, session=SESSION, last_seq=0)
        if i == 999:
            baseline = tracemalloc.get_traced_memory()[0]
    grown = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    assert grown < 256 * 1024, f"decoding garbage kept {grown} bytes"
