"""privdiff's wire format: a small JSON header, raw tensor buffers, and an HMAC over all of them.

A message is the multipart ZeroMQ message

    [header (UTF-8 JSON), buffer_0, ..., buffer_{n-1}, mac (32 bytes)]

header = {"v": PROTOCOL_VERSION, "kind": str, "session": hex, "seq": int, "fields": {...},
          "tensors": [{"name", "dtype", "shape"}, ...]}  (tensor i travels in buffer_i)

mac = HMAC-SHA256(session key, len(header) || header || for each buffer: len || buffer), so a changed,
added, dropped or reordered frame fails. Within a session sequence numbers must rise by exactly one,
so replayed and reordered messages are refused. Everything is checked before any buffer is used:
frame count, header size, JSON shape, the dtype allowlist, shapes against the actual buffer sizes,
every size against `Limits`, then the MAC. Nothing received is ever unpickled: the only decoders are
`json.loads` and `numpy.frombuffer` (read-only views, no copy).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from ..errors import public_name

PROTOCOL_VERSION = 1
MAC_BYTES = 32
# dtypes a tensor may have on the wire: plain numeric types only (no object, no structured dtypes).
ALLOWED_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


@public_name
class ProtocolError(ValueError):
    """A message that is malformed, too large, out of sequence or not authentic."""


@dataclass(frozen=True)
class Limits:
    """Bounds checked before anything is allocated for a received message."""

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 64
    max_tensor_bytes: int = 512 * 2**20
    max_message_bytes: int = 2 * 2**30
    max_dims: int = 8

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_tensors", "max_tensor_bytes", "max_message_bytes", "max_dims"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")


@dataclass(frozen=True)
class Message:
    kind: str
    fields: Mapping = field(default_factory=dict)
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)


def _mac(key: bytes, header: bytes, buffers: Sequence) -> bytes:
    digest = hmac.new(key, digestmod=hashlib.sha256)
    digest.update(struct.pack("<Q", memoryview(header).nbytes))
    digest.update(header)
    for buffer in buffers:
        view = memoryview(buffer)
        digest.update(struct.pack("<Q", view.nbytes))
        digest.update(view)
    return digest.digest()


def encode(message: Message, *, key: bytes, session: str, seq: int) -> list:
    """The frames of `message` (buffers are zero-copy views of C-contiguous arrays)."""
    if not isinstance(message.kind, str) or not message.kind:
        raise ValueError("a message needs a kind (a non-empty string).")
    specs, buffers = [], []
    for name, array in message.tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in ALLOWED_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; the wire carries only {ALLOWED_DTYPES}.")
        specs.append({"name": str(name), "dtype": array.dtype.name, "shape": list(array.shape)})
        buffers.append(memoryview(array.reshape(-1).view(np.uint8)))  # also for empty tensors
    header = json.dumps({"v": PROTOCOL_VERSION, "kind": message.kind, "session": session, "seq": int(seq),
                         "fields": dict(message.fields), "tensors": specs},
                        separators=(",", ":"), allow_nan=False).encode()
    return [header, *buffers, _mac(key, header, buffers)]


def peek_header(frames: Sequence, *, limits: Limits = Limits()) -> dict:
    """The parsed, shape-checked header of a message, before its MAC is verified (to find the session
    key). Nothing in it may be trusted until `decode` has checked the MAC."""
    if not isinstance(frames, (list, tuple)) or len(frames) < 2:
        raise ProtocolError("a message has at least a header and a MAC frame.")
    header_frame = memoryview(frames[0])
    if header_frame.nbytes > limits.max_header_bytes:
        raise ProtocolError(f"header of {header_frame.nbytes} bytes is over the {limits.max_header_bytes}-byte limit.")
    try:
        header = json.loads(header_frame.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ProtocolError(f"header is not UTF-8 JSON ({type(error).__name__}).") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object.")
    expected = {"v": int, "kind": str, "session": str, "seq": int, "fields": dict, "tensors": list}
    for name, kind in expected.items():
        if not isinstance(header.get(name), kind) or (kind is int and isinstance(header.get(name), bool)):
            raise ProtocolError(f"header field {name!r} is missing or not a {kind.__name__}.")
    if header["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header['v']} is not {PROTOCOL_VERSION}; update privdiff on both sides.")
    if len(header["tensors"]) > limits.max_tensors:
        raise ProtocolError(f"{len(header['tensors'])} tensors is over the limit of {limits.max_tensors}.")
    if len(frames) != len(header["tensors"]) + 2:
        raise ProtocolError(f"{len(frames)} frames for {len(header['tensors'])} tensors: a frame is missing or extra.")
    return header


def decode(frames: Sequence, *, key: bytes, session: str, last_seq: int, limits: Limits = Limits()) -> tuple[Message, int]:
    """Check and read one message of `session`; returns (message, its sequence number).

    The sequence number must be `last_seq + 1`. Raises ProtocolError, having allocated nothing for
    the buffers, on anything else.
    """
    header = peek_header(frames, limits=limits)
    if header["session"] != session:
        raise ProtocolError("the message belongs to another session.")
    buffers = [memoryview(frame) for frame in frames[1:-1]]
    total = memoryview(frames[0]).nbytes
    for spec, buffer in zip(header["tensors"], buffers):
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec.get("dtype") in ALLOWED_DTYPES
                and isinstance(spec.get("shape"), list) and len(spec["shape"]) <= limits.max_dims
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in spec["shape"])):
            raise ProtocolError(f"tensor description {str(spec)[:100]} is malformed or has a dtype outside the allowlist.")
        nbytes = math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize
        if nbytes > limits.max_tensor_bytes:
            raise ProtocolError(f"tensor {spec['name']!r} of {nbytes} bytes is over the {limits.max_tensor_bytes}-byte limit.")
        if buffer.nbytes != nbytes:
            raise ProtocolError(f"tensor {spec['name']!r}: {buffer.nbytes} bytes on the wire, {nbytes} announced.")
        total += nbytes
    if total > limits.max_message_bytes:
        raise ProtocolError(f"message of {total} bytes is over the {limits.max_message_bytes}-byte limit.")
    mac = memoryview(frames[-1]).tobytes()
    if len(mac) != MAC_BYTES or not hmac.compare_digest(mac, _mac(key, memoryview(frames[0]), buffers)):
        raise ProtocolError("the message's MAC does not verify: it was altered or not sent by the session's peer.")
    if header["seq"] != last_seq + 1:
        raise ProtocolError(f"sequence number {header['seq']} where {last_seq + 1} was due: a replayed, reordered "
                            "or lost message.")
    tensors = {}
    for spec, buffer in zip(header["tensors"], buffers):
        array = np.frombuffer(buffer, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
        array.flags.writeable = False
        tensors[spec["name"]] = array
    return Message(kind=header["kind"], fields=header["fields"], tensors=tensors), header["seq"]
