"""Client (DEALER) and server (ROUTER) over CurveZMQ, speaking the codec's authenticated messages.

Security: the server has a Curve key pair and admits only clients whose public key lies in its
allowlist folder (ZeroMQ's ZAP handler checks it during the handshake, before any message of that
client reaches privdiff); every message is encrypted by Curve and then authenticated by the codec's
HMAC with a per-session key, with sequence numbers in both directions.

A session starts with the client's `hello`, which carries a fresh random MAC key (inside the
encrypted, authenticated Curve channel). A client *is* its Curve key: the server takes its identity
from the public key ZAP authenticated (the message's User-Id), never from anything the client says,
checks it on every message, and hands it to the job (which de-duplicates and counts per key); the
allowlist file's name is only its label in logs. Then the client either sends one request and waits
for its reply (`request`), or streams requests with a bounded window of them unanswered (`stream`):
the client makes the next batch while the server trains the ones before it, so neither side waits
for the other, and the window is the backpressure (the server's queue never holds more than a
window per client). Replies come back in order; every wait has a timeout.
While the client computes between requests (encoding a batch can take long on a laptop), a
background thread sends `heartbeat` every `heartbeat_interval` seconds of silence, so the server
keeps its session; the server forgets sessions silent for longer than `session_timeout`. Both
sockets also use ZeroMQ's own (ZMTP) heartbeats to notice a dead connection. After a timeout the
client reconnects with a new socket and a new session, and re-sends what was unanswered.

Which kinds of message exist is fixed here, so a reviewer can see that during training nothing flows
back that the client must apply: the server answers `hello` with `welcome`, a `batch` with `ack`
(counts only, no tensors), `heartbeat` with `heartbeat`, and only `download` with `weights`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, public_name
from .codec import Limits, Message, ProtocolError, decode, encode, peek_header

CLIENT_KINDS = ("hello", "batch", "heartbeat", "download", "bye")
#: What the server may send, and for which request. Only `download` is answered with tensors.
REPLY_KINDS = {"hello": "welcome", "batch": "ack", "heartbeat": "heartbeat", "download": "weights", "bye": "bye"}
#: The most requests `SplitClient.stream` keeps unanswered (well under the server's receive queue).
MAX_WINDOW = 16


@public_name
class TransportError(RuntimeError, UserError):
    """The peer did not answer in time, refused the session, or sent something invalid."""


@dataclass
class _Session:
    key: bytes
    client: str  # the Curve public key (Z85) that ZAP authenticated: the client's identity
    session_id: str
    last_in: int = 1  # the hello was message 1
    last_out: int = 0
    last_seen: float = field(default_factory=time.monotonic)


class SplitServer:
    """Serves several clients at once; `handler(client, message) -> Message` answers each request,
    `client` being the Z85 public key ZAP authenticated (`name_of(client)` gives its allowlist label;
    the reply's kind is forced to the one allowed for the request)."""

    def __init__(self, *, bind: str, server_key: str | os.PathLike, allowed_clients: str | os.PathLike,
                 handler: Callable[[str, Message], Message], limits: Limits = Limits(),
                 session_timeout: float = 60.0, receive_queue: int = 64):
        import zmq
        from zmq.auth.thread import ThreadAuthenticator

        from .keys import load_keys

        public, secret = load_keys(server_key)
        if secret is None:
            raise ValueError(f"{server_key} holds no secret key; give the server's .key_secret file.")
        allowed = Path(allowed_clients)
        if not allowed.is_dir() or not any(allowed.glob("*.key")):
            raise ValueError(f"{allowed} holds no client .key files: no client could connect. Copy each "
                             "client's public .key file there.")
        self.handler, self.limits, self.session_timeout = handler, limits, session_timeout
        self.names = _allowlist_names(allowed)
        self.context = zmq.Context()
        self.auth = ThreadAuthenticator(self.context)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(allowed))
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.curve_secretkey, self.socket.curve_publickey, self.socket.curve_server = secret, public, True
        self.socket.setsockopt(zmq.LINGER, 0)
        _set_transport_heartbeats(self.socket)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable reply raises instead of vanishing
        # libzmq drops a peer whose frame is larger than this before allocating it: oversize messages
        # never reach memory, let alone the codec.
        self.socket.setsockopt(zmq.MAXMSGSIZE, max(limits.max_tensor_bytes, limits.max_header_bytes))
        # Backpressure: each client has at most a stream window (MAX_WINDOW) of requests unanswered, and at
        # most this many wait in the queue (libzmq then drops more, whose senders time out and retry), so
        # memory stays bounded.
        self.socket.setsockopt(zmq.RCVHWM, receive_queue)
        try:
            self.socket.bind(bind)
        except zmq.ZMQError as error:
            self.close()
            reason = "the port is already in use" if error.errno == zmq.EADDRINUSE else error.strerror
            raise ValueError(f"cannot listen on {bind!r}: {reason}; pass another --bind, e.g. tcp://0.0.0.0:5556 "
                             "(a ZeroMQ endpoint: tcp://<address>:<port>).") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sessions: dict[bytes, _Session] = {}
        self.rejected = 0  # messages dropped as malformed, unauthentic or out of sequence
        self.failures = 0  # messages whose handling failed (each answered with an error)

    def serve(self, *, should_stop: Callable[[], bool], poll_ms: int = 100) -> None:
        import zmq

        while not should_stop():
            if self.socket.poll(poll_ms, zmq.POLLIN):
                self._handle(self.socket.recv_multipart(copy=False))
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        for identity in [i for i, s in self.sessions.items() if now - s.last_seen > self.session_timeout]:
            del self.sessions[identity]

    def name_of(self, client: str) -> str:
        """The allowlist file name of a client key (its label for people), or the key's first characters."""
        return self.names.get(client, client[:8])

    def _handle(self, frames) -> None:
        identity, user = frames[0].bytes, _user_id(frames[1])
        frames = [f.buffer for f in frames[1:]]
        header = None
        try:
            if not user:
                raise ProtocolError("the message carries no authenticated client key.")
            header = peek_header(frames, limits=self.limits)
            if header["kind"] not in CLIENT_KINDS:
                raise ProtocolError(f"unknown message kind {header['kind']!r}.")
            if header["kind"] == "hello":
                key = bytes.fromhex(str(header["fields"].get("mac_key", "")))
                if len(key) != 32:
                    raise ProtocolError("hello needs a 32-byte mac_key.")
                message, _ = decode(frames, key=key, session=header["session"], last_seq=0, limits=self.limits)
                self.sessions[identity] = session = _Session(key=key, client=user, session_id=header["session"])
            else:
                session = self.sessions.get(identity)
                if session is None or header["session"] != session.session_id or session.client != user:
                    self._reply_unknown(identity)
                    return
                message, session.last_in = decode(frames, key=session.key, session=session.session_id,
                                                  last_seq=session.last_in, limits=self.limits)
        except (ProtocolError, ValueError) as error:
            self.rejected += 1
            session = self.sessions.get(identity) if header is not None else None
            if (session is None or header["kind"] not in REPLY_KINDS or header["session"] != session.session_id
                    or session.client != user or header["seq"] != session.last_in + 1):
                return  # dropped without a reply: garbage gets no amplification
            # The allowlisted client of this session (CurveZMQ vouches for its key) sent a message the
            # codec refuses (too many tensors, a wrong size, a bad dtype): tell it why, in sequence,
            # so a faulty client stops instead of timing out. Nothing of the message was used.
            session.last_in, session.last_seen = header["seq"], time.monotonic()
            session.last_out += 1
            reply = Message(kind=REPLY_KINDS[header["kind"]], fields={"error": f"the server refused this message: {error}"})
            self._send(identity, encode(reply, key=session.key, session=session.session_id, seq=session.last_out))
            return
        session.last_seen = time.monotonic()
        if message.kind == "heartbeat":
            reply = Message(kind="heartbeat")
        elif message.kind == "hello":
            reply = Message(kind="welcome", fields={"protocol": "privdiff-split"})
        else:
            try:
                reply = self.handler(session.client, message)
            except Exception as error:  # noqa: BLE001 (one message's failure must not end the service)
                # That client is told; the job and the other clients carry on.
                self.failures += 1
                print(f"privdiff split server: a {message.kind!r} from {self.name_of(session.client)} failed "
                      f"({type(error).__name__}: {error})", file=sys.stderr, flush=True)
                reply = Message(kind=REPLY_KINDS[message.kind],
                                fields={"error": f"the server could not handle this {message.kind} "
                                                 f"({type(error).__name__}); it carries on"})
            allowed = REPLY_KINDS[message.kind]
            if reply.kind != allowed or (reply.tensors and allowed != "weights"):
                raise RuntimeError(f"the handler answered {message.kind!r} with {reply.kind!r}"
                                   f"{' carrying tensors' if reply.tensors else ''}; only {allowed!r}"
                                   f"{'' if allowed == 'weights' else ' without tensors'} is allowed.")
        session.last_out += 1
        self._send(identity, encode(reply, key=session.key, session=session.session_id, seq=session.last_out))
        if message.kind == "bye":
            self.sessions.pop(identity, None)

    def _reply_unknown(self, identity: bytes) -> None:
        # Not authenticated (no key for this session): an unsigned notice, which the client treats
        # only as a reason to say hello again, never as data.
        self.rejected += 1
        self._send(identity, [b'{"unknown_session":true}'])

    def _send(self, identity: bytes, frames) -> None:
        import zmq

        try:
            self.socket.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError:
            self.sessions.pop(identity, None)  # the client is gone

    def close(self) -> None:
        self.socket.close(0)
        self.auth.stop()
        self.context.term()


class SplitClient:
    """One session with a SplitServer; `request(message)` sends and waits for the (verified) reply."""

    def __init__(self, *, connect: str, client_key: str | os.PathLike, server_public_key: str | os.PathLike,
                 name: str = "client", timeout: float = 30.0, limits: Limits = Limits(), retries: int = 3,
                 heartbeat_interval: float | None = 10.0):
        from .keys import load_keys

        self.public, self.secret = load_keys(client_key)
        if self.secret is None:
            raise ValueError(f"{client_key} holds no secret key; give this client's .key_secret file.")
        self.server_public, _ = load_keys(server_public_key)
        self.connect_to, self.name, self.timeout, self.limits, self.retries = connect, name, timeout, limits, retries
        self.context = None
        self.socket = None
        # Requests, streams and the heartbeat thread share the socket; each use holds this lock.
        self._lock = threading.Lock()
        self._last_exchange = time.monotonic()
        self._broken = False  # a heartbeat went unanswered: the next request reconnects first
        self._pending: deque[str] = deque()  # kinds of the requests sent and not yet answered, in order
        self._streaming = False
        self._open()
        self._stop_heartbeats = threading.Event()
        self._heartbeats = None
        if heartbeat_interval is not None:
            if not heartbeat_interval > 0:
                raise ValueError(f"heartbeat_interval={heartbeat_interval} must be positive, or None for none.")
            self._heartbeats = threading.Thread(target=self._send_heartbeats, args=(heartbeat_interval,),
                                                daemon=True, name="privdiff-split-heartbeat")
            self._heartbeats.start()

    def _send_heartbeats(self, interval: float) -> None:
        while not self._stop_heartbeats.wait(interval / 4):
            with self._lock:
                if self.socket is None or self._broken or time.monotonic() - self._last_exchange < interval:
                    continue
                if self._streaming:
                    # The stream reads every reply in order: it takes this one's answer too.
                    self._send(Message(kind="heartbeat"))
                    continue
                try:
                    self._exchange(Message(kind="heartbeat"))
                except (TransportError, _UnknownSession):
                    self._broken = True  # left to the next request, which reconnects and retries

    def _open(self) -> None:
        import zmq

        self._close_socket()
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.curve_secretkey, self.socket.curve_publickey = self.secret, self.public
        self.socket.curve_serverkey = self.server_public
        self.socket.setsockopt(zmq.LINGER, 0)
        _set_transport_heartbeats(self.socket)
        try:
            self.socket.connect(self.connect_to)
        except zmq.ZMQError as error:
            self._close_socket()
            raise ValueError(f"cannot connect to {self.connect_to!r}: {error.strerror}; pass a ZeroMQ endpoint such "
                             "as tcp://server.example.org:5555.") from None
        self.session, self.key = os.urandom(16).hex(), os.urandom(32)
        self.last_out = self.last_in = 0
        self._pending = deque()
        welcome = self._exchange(Message(kind="hello", fields={"mac_key": self.key.hex()}))
        if welcome.kind != "welcome":
            raise TransportError(f"the server answered hello with {welcome.kind!r}.")
        self._broken = False

    def _send(self, message: Message) -> None:
        self.last_out += 1
        self.socket.send_multipart(encode(message, key=self.key, session=self.session, seq=self.last_out), copy=False)
        self._pending.append(message.kind)
        self._last_exchange = time.monotonic()

    def _receive(self) -> tuple[str, Message]:
        """The next reply, verified and matched to the oldest unanswered request: (its kind, reply)."""
        import zmq

        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(int(left * 1000), zmq.POLLIN):
                raise TransportError(
                    f"no answer from {self.connect_to} within {self.timeout:g} s: the server is down or busy, the "
                    "server key given is not this server's public key, or the server does not admit this client's "
                    "key (its operator must add this client's .key file to the server's allowlist).")
            frames = [f.buffer for f in self.socket.recv_multipart(copy=False)]
            if len(frames) == 1 and bytes(frames[0]) == b'{"unknown_session":true}':
                raise _UnknownSession()
            try:
                reply, self.last_in = decode(frames, key=self.key, session=self.session, last_seq=self.last_in,
                                             limits=self.limits)
            except ProtocolError as error:
                # Only the server can reach this socket (Curve), so an invalid reply is a real fault.
                raise TransportError(f"the server's reply was refused: {error}") from None
            if not self._pending:
                raise TransportError(f"the server sent {reply.kind!r} that answers no request.")
            kind = self._pending.popleft()
            if reply.kind != REPLY_KINDS[kind]:
                raise TransportError(f"the server answered {kind!r} with {reply.kind!r}, not {REPLY_KINDS[kind]!r}.")
            self._last_exchange = time.monotonic()
            return kind, reply

    def _exchange(self, message: Message) -> Message:
        self._send(message)
        while True:
            _, reply = self._receive()
            if not self._pending:  # earlier answers can only be heartbeats' (nothing else is left unanswered)
                return reply

    def request(self, message: Message) -> Message:
        """Send one request and return its reply; on a timeout or a server that lost the session,
        reconnect (new socket, new session) and send it again, up to `retries` times."""
        _check_request(message)
        if self._streaming:
            raise RuntimeError("request() while a stream() is open: finish the stream first.")
        with self._lock:
            if self._broken:
                self._reopen_quietly()
            for attempt in range(self.retries + 1):
                try:
                    return self._exchange(message)
                except (TransportError, _UnknownSession):
                    if attempt == self.retries:
                        raise
                    self._reconnect(attempt, resend=())
        raise AssertionError("unreachable")

    def stream(self, messages: Iterable[Message], *, window: int = 4) -> Iterator[tuple[Message, Message]]:
        """Send `messages` keeping up to `window` of them unanswered; yield each (request, reply) in order.

        `messages` is drawn from only when the window has room, outside the lock, so whatever makes
        the next request (encoding, noising) runs while the server works on the ones before it, and
        heartbeats go on meanwhile. On a timeout or a lost session the client reconnects and re-sends
        every unanswered request in order, up to `retries` times in a row: requests must be safe to
        repeat (the split job acknowledges a batch it already trained without training it again).
        A stream left before its end leaves the session to be renewed by the next request."""
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window={window!r} must be a whole number from 1 to {MAX_WINDOW}.")
        if self._streaming:
            raise RuntimeError("a stream is already open on this client.")
        source, exhausted = iter(messages), False
        unanswered: deque[Message] = deque()
        failures = 0
        self._streaming = True
        try:
            while True:
                while not exhausted and len(unanswered) < window:
                    message = next(source, None)
                    if message is None:
                        exhausted = True
                        break
                    _check_request(message)
                    with self._lock:
                        if self._broken:  # only before the first send: heartbeats never fail mid-stream
                            self._reopen_quietly()
                        self._send(message)
                    unanswered.append(message)
                if not unanswered:
                    return
                with self._lock:
                    try:
                        kind, reply = self._receive()
                    except (TransportError, _UnknownSession):
                        failures += 1
                        if failures > self.retries:
                            raise
                        self._reconnect(failures - 1, resend=unanswered)
                        continue
                if kind in ("heartbeat", "hello"):  # a heartbeat's, or a late welcome after a reconnect timed out
                    continue
                failures = 0
                yield unanswered.popleft(), reply
        finally:
            self._streaming = False
            if unanswered or self._pending:
                self._broken = True  # answers still on their way belong to this session: start a new one

    def _reconnect(self, attempt: int, *, resend) -> None:
        """After failed try number `attempt` (from 0): back off, open a new session, re-send `resend`."""
        time.sleep(min(2.0 ** attempt * 0.2, 5.0))
        self._reopen_quietly()
        for message in resend:
            self._send(message)

    def _reopen_quietly(self) -> None:
        try:
            self._open()
        except (TransportError, _UnknownSession):
            pass  # the next attempt's exchange fails the same way and counts as a retry

    def close(self) -> None:
        stop = getattr(self, "_stop_heartbeats", None)
        if stop is not None:
            stop.set()
            if self._heartbeats is not None and self._heartbeats is not threading.current_thread():
                self._heartbeats.join()
        self._close_socket()

    def _close_socket(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
            self.context.term()
            self.socket = self.context = None


def _check_request(message: Message) -> None:
    if message.kind not in CLIENT_KINDS or message.kind == "hello":
        raise ValueError(f"kind {message.kind!r} is not a client request; use one of {CLIENT_KINDS[1:]}.")


def _user_id(frame) -> str:
    """The Curve public key (Z85) that ZAP authenticated for this message ('' when there is none)."""
    import zmq

    try:
        return str(frame.get("User-Id") or "")
    except zmq.ZMQError:
        return ""


def _allowlist_names(folder: Path) -> dict[str, str]:
    """Z85 public key -> the allowlist file's name, for logs."""
    from .keys import load_keys

    names = {}
    for path in sorted(folder.glob("*.key")):
        public, _ = load_keys(path)
        names[public.decode("ascii") if isinstance(public, bytes) else str(public)] = path.stem
    return names


def _set_transport_heartbeats(socket) -> None:
    """ZMTP-level pings: a connection whose peer stopped answering for 30 s is dropped and re-dialled."""
    import zmq

    socket.setsockopt(zmq.HEARTBEAT_IVL, 5_000)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30_000)
    socket.setsockopt(zmq.HEARTBEAT_TTL, 30_000)


class _UnknownSession(Exception):
    """The server has no session for us (it restarted, or forgot an idle session)."""
