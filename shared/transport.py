"""ZeroMQ transport of the replay queue: the only module that imports zmq.

Owns sockets, the request envelope, the optional HMAC, retries and reconnects. Knows
nothing of what the messages mean (that is `shared/wire.py`) nor of leases and batches
(`shared/queue_service.py`). Messages are lists of buffers, sent with copy=False.

Sockets.
- `Server` binds a ROUTER for requests and a PUB for broadcasts. Rollouts travel only over
  ROUTER/DEALER, which never drop silently: the ROUTER runs with ROUTER_MANDATORY, so a reply
  to a peer that is gone or past its high-water mark raises here instead of vanishing, and is
  reported as not delivered. The PUB socket, which drops past its high-water mark and for
  slow joiners, carries only the latest-value state (policy version, pause/stop), and the
  service repeats it periodically, so a lost broadcast costs nothing.
- `Requester` is a DEALER used as a request/reply client (a REQ socket would wedge after a
  lost reply). Each request carries the client's name and a request id that only grows. On
  an attempt timeout the socket is closed (linger 0, dropping anything queued) and a new one
  resends the same id: the lazy-pirate pattern. This is how clients survive a queue restart.
- `Subscriber` is a SUB socket that drains to the latest broadcasts.
- The server also binds inproc endpoints (`inproc_endpoints`): a learner that embeds the
  queue in a thread talks to it without any copy. For that every socket of a process comes
  from one shared context (two I/O threads).

Copies. Frames are sent with copy=False. A group the queue forwards to the learner goes out
as the very zmq.Frame it arrived in (zmq shares it by reference count), so the queue copies
no rollout bytes itself; the kernel's TCP copies are the only ones, once into the queue and
once out of it (none out of it when the learner is in-process).

Envelope, after the ROUTER's routing id: [client name, request id (8 bytes LE), message
frames..., HMAC?]; replies: [request id, message frames..., HMAC?]; broadcasts: [message
frames..., HMAC?].

At-most-once execution. The server remembers, per client name, the last request id and
its reply. A resent request with that id is not handed to the service again: the cached
reply is resent (or, while the service still works on it, the reply is redirected to the
new socket). An older id is a delayed duplicate and is dropped. So a retried submit is not
counted twice, a retried lease request does not grant twice, and a batch whose reply was
lost is delivered on the retry instead of being lost. One cached reply per client is kept
until that client's next request or `prune`.

Failure modes.
- A peer without the shared secret (when one is configured): its messages fail the HMAC and
  are dropped and counted as `unauthenticated`, with no reply. The HMAC authenticates; it
  does not encrypt and does not stop replays of recorded traffic (use CurveZMQ or a private
  network for that).
- Oversized input: a message over `max_message_bytes` is received, then dropped and counted
  (`too_large`). zmq's MAXMSGSIZE is set to 4x that limit as a hard ceiling: a single frame
  beyond it makes zmq drop the connection before buffering it, which is not counted.
- Queue restart: a client's pending attempt times out, reconnects and resends; the new
  queue knows nothing of the old request ids and serves the request fresh.
- A reply that cannot be routed (the requester went away) is kept in the cache, so the
  requester's resend still gets it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from shared.wire import MAC_BYTES, Buffer, sign, verify

MAX_CLIENT_NAME = 64
MIN_SECRET_BYTES = 16


def load_secret(path: str | None) -> bytes | None:
    """The shared secret in `path` (surrounding whitespace stripped), or None when no file is configured."""
    if path is None:
        return None
    secret = Path(path).read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"queue.secret_file {path}: the secret must have at least {MIN_SECRET_BYTES} bytes")
    return secret


def endpoint(host: str, port: int) -> str:
    """tcp://host:port."""
    return f"tcp://{host}:{port}"


def inproc_endpoints(port: int) -> tuple[str, str]:
    """The in-process (request, publish) endpoints of the queue whose request port is `port`."""
    return f"inproc://vapo-queue-{port}", f"inproc://vapo-queue-{port}-pub"


_context_lock = threading.Lock()
_shared_context: zmq.Context | None = None


def _context() -> zmq.Context:
    """One context per process, shared by the server and clients, so inproc endpoints connect.

    Two I/O threads: one alone limits a busy queue to about one core of socket copies.
    """
    global _shared_context
    with _context_lock:
        if _shared_context is None or _shared_context.closed:
            _shared_context = zmq.Context(io_threads=2)
        return _shared_context


def _views(frames: Sequence[zmq.Frame]) -> list[memoryview]:
    return [f.buffer for f in frames]


def _signed(secret: bytes | None, frames: Sequence[Buffer]) -> list[Buffer]:
    return [*frames, sign(secret, frames)] if secret else list(frames)


def _as_sendable(frame: Any) -> Any:
    """A view of a whole received frame goes back out as that zmq.Frame: zmq shares it (no copy, no tracking)."""
    if isinstance(frame, memoryview) and isinstance(frame.obj, zmq.Frame) and frame.nbytes == len(frame.obj):
        return frame.obj
    return frame


def _authentic(secret: bytes | None, frames: list[memoryview]) -> list[memoryview] | None:
    """The frames without their HMAC, or None when the HMAC is missing or wrong."""
    if not secret:
        return frames
    if len(frames) < 2 or frames[-1].nbytes != MAC_BYTES or not verify(secret, frames[:-1], frames[-1]):
        return None
    return frames[:-1]


@dataclass
class Request:
    """One request from a client; `peer` is the routing id its reply goes to (updated on a resend)."""

    peer: bytes
    client: str
    req_id: int
    frames: list[memoryview]


@dataclass
class _Last:
    req_id: int
    request: Request
    reply: list[Buffer] | None
    at: float


class Server:
    """The queue's bound sockets: ROUTER for requests, PUB for broadcasts."""

    def __init__(self, host: str, port: int, pub_port: int, *, secret: bytes | None, max_message_bytes: int) -> None:
        self._ctx = _context()
        self._secret = secret
        self._max_bytes = max_message_bytes
        self.router = self._ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, 4 * max_message_bytes)
        self.pub = self._ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.port = self._bind(self.router, host, port)
        self.pub_port = self._bind(self.pub, host, pub_port)
        for sock, address in zip((self.router, self.pub), inproc_endpoints(self.port), strict=True):
            sock.bind(address)  # for clients in this process (the learner embedding the queue): no copies
        self._poller = zmq.Poller()
        self._poller.register(self.router, zmq.POLLIN)
        self._last: dict[str, _Last] = {}
        self.rejected: Counter[str] = Counter()
        """Messages dropped before the service saw them, by reason."""
        self.undelivered = 0
        """Replies that could not be routed at once (their requester resends to get them)."""

    @staticmethod
    def _bind(sock: zmq.Socket, host: str, port: int) -> int:
        if port == 0:
            return sock.bind_to_random_port(f"tcp://{host}")
        sock.bind(endpoint(host, port))
        return port

    def poll(self, timeout_s: float) -> Request | None:
        """The next new, authentic request, waiting at most `timeout_s`; None when there is none (yet)."""
        if not self._poller.poll(max(0, int(timeout_s * 1000))):
            return None
        for _ in range(1000):  # bounded, so a flood of rejected input cannot starve the service's other duties
            try:
                raw = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            request = self._accept(raw)
            if request is not None:
                return request
        return None

    def _accept(self, raw: list[zmq.Frame]) -> Request | None:
        frames = _views(raw)
        peer = bytes(frames[0])
        if sum(f.nbytes for f in frames[1:]) > self._max_bytes + 4096:
            self.rejected["too_large"] += 1
            return None
        frames = _authentic(self._secret, frames[1:])  # type: ignore[assignment]
        if frames is None:
            self.rejected["unauthenticated"] += 1
            return None
        if len(frames) < 3 or frames[1].nbytes != 8 or not 0 < frames[0].nbytes <= MAX_CLIENT_NAME:
            self.rejected["bad_envelope"] += 1
            return None
        client = bytes(frames[0]).decode("utf-8", "replace")
        req_id = int.from_bytes(frames[1], "little")
        last = self._last.get(client)
        if last is not None and req_id <= last.req_id:
            if req_id == last.req_id:  # a resend: redirect, and replay the reply if there is one
                last.request.peer = peer
                if last.reply is not None:
                    self._send(peer, last.reply)
            return None
        request = Request(peer=peer, client=client, req_id=req_id, frames=frames[2:])
        self._last[client] = _Last(req_id, request, None, time.monotonic())
        return request

    def is_current(self, request: Request) -> bool:
        """Whether `request` is still its client's latest (a newer one supersedes it)."""
        last = self._last.get(request.client)
        return last is not None and last.req_id == request.req_id

    def reply(self, request: Request, frames: Sequence[Buffer]) -> bool:
        """Send the reply of `request` and cache it for a resend; False when it could not be routed now."""
        envelope = [request.req_id.to_bytes(8, "little"), *frames]
        last = self._last.get(request.client)
        if last is not None and last.req_id == request.req_id:
            last.reply, last.at = envelope, time.monotonic()
        return self._send(request.peer, envelope)

    def _send(self, peer: bytes, envelope: list[Buffer]) -> bool:
        try:
            frames = [peer, *map(_as_sendable, _signed(self._secret, envelope))]
            self.router.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.undelivered += 1
            return False
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer's socket is gone (ROUTER_MANDATORY)
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.undelivered += 1
            return False

    def publish(self, frames: Sequence[Buffer]) -> None:
        """Broadcast a (small, latest-value) message; may be dropped for slow or absent subscribers."""
        self.pub.send_multipart(_signed(self._secret, frames), copy=False)

    def prune(self, max_age_s: float) -> None:
        """Forget clients idle for `max_age_s` (and their cached replies)."""
        cutoff = time.monotonic() - max_age_s
        for client in [c for c, last in self._last.items() if last.at < cutoff]:
            del self._last[client]

    def close(self) -> None:
        """Close both sockets (the process-wide context stays)."""
        self.router.close(linger=0)
        self.pub.close(linger=0)


class Requester:
    """A request/reply client over DEALER that retries on a fresh socket (lazy pirate)."""

    def __init__(self, address: str, *, secret: bytes | None = None, name: str | None = None) -> None:
        self._address = address
        self._secret = secret
        self.name = name or f"{os.getpid()}-{os.urandom(6).hex()}"
        assert 0 < len(self.name.encode()) <= MAX_CLIENT_NAME
        self._ctx = _context()
        self._next_id = 1
        self._sock = self._connect()
        self.reconnects = 0
        self.dropped_replies = 0
        """Replies ignored: for an older request, or failing the HMAC."""

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._address)
        return sock

    def new_id(self) -> int:
        """A fresh request id (ids only grow)."""
        req_id, self._next_id = self._next_id, self._next_id + 1
        return req_id

    def request(self, frames: Sequence[Buffer], *, timeout_s: float, attempt_s: float,
                req_id: int | None = None) -> list[memoryview]:
        """Send `frames` and return the reply's frames; resend on a new socket every `attempt_s`.

        Raises TimeoutError when no reply came within `timeout_s`. Passing the `req_id` of a
        request that timed out continues it (the server replays or redirects its reply).
        """
        req_id = self.new_id() if req_id is None else req_id
        tag = req_id.to_bytes(8, "little")
        envelope = _signed(self._secret, [self.name.encode(), tag, *frames])
        deadline = time.monotonic() + timeout_s
        while True:
            self._sock.send_multipart(envelope, copy=False)
            reply = self._wait(tag, min(deadline, time.monotonic() + attempt_s))
            if reply is not None:
                return reply
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no reply from {self._address} within {timeout_s:.1f}s")
            self._sock.close(linger=0)
            self._sock = self._connect()
            self.reconnects += 1

    def _wait(self, tag: bytes, until: float) -> list[memoryview] | None:
        while (left := until - time.monotonic()) > 0:
            if not self._sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                continue
            frames = _authentic(self._secret, _views(self._sock.recv_multipart(copy=False)))
            if frames is None or len(frames) < 2 or bytes(frames[0]) != tag:
                self.dropped_replies += 1
                continue
            return frames[1:]
        return None

    def close(self) -> None:
        """Close the socket (pending requests are abandoned)."""
        self._sock.close(linger=0)


class Subscriber:
    """SUB socket on the queue's broadcasts; `poll` drains what arrived."""

    def __init__(self, address: str, *, secret: bytes | None = None) -> None:
        self._secret = secret
        self._sock: zmq.Socket = _context().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(address)
        self.dropped = 0
        """Broadcasts ignored for failing the HMAC."""

    def poll(self, timeout_s: float = 0.0) -> list[list[memoryview]]:
        """Every authentic broadcast received so far, oldest first, waiting up to `timeout_s` for the first."""
        out: list[list[memoryview]] = []
        wait_ms = int(timeout_s * 1000)
        while self._sock.poll(wait_ms, zmq.POLLIN):
            wait_ms = 0
            frames = _authentic(self._secret, _views(self._sock.recv_multipart(copy=False)))
            if frames is None:
                self.dropped += 1
            else:
                out.append(frames)
        return out

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(linger=0)
