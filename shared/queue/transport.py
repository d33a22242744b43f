"""ZeroMQ transport of the replay queue: the only module that imports zmq.

Owns sockets, the request envelope, the optional HMAC, retries and reconnects. Knows
nothing of what the messages mean (that is `shared/wire.py`) nor of leases and batches
(`shared/queue/service.py`). Messages are lists of buffers, sent with copy=False.

Sockets.
- `Server` binds a ROUTER for requests and a PUB for broadcasts. Rollouts travel only over
  ROUTER/DEALER, which never drop silently: the ROUTER runs with ROUTER_MANDATORY, so a reply
  to a peer that is gone or past its high-water mark raises here instead of vanishing, and is
  reported as not delivered. The PUB socket, which drops past its high-water mark and for
  slow joiners, carries only the latest-value state (policy version, pause/stop), and the
  service repeats it periodically, so a lost broadcast costs nothing.
- `Requester` is a DEALER used as a pipelined request/reply client (a REQ socket would wedge
  after a lost reply, and allows one request at a time): any number of requests may be in
  flight, each with a request id that only grows; replies are matched by id. When the server
  stays silent for an attempt's time while requests are outstanding, the socket is closed
  (linger 0, dropping anything queued) and a new one resends every outstanding request, in
  id order: the lazy-pirate pattern. This is how clients survive a queue restart.
- `Subscriber` is a SUB socket that drains to the latest broadcasts.
- The server also binds inproc endpoints (`inproc_endpoints`): a learner that embeds the
  queue in a thread talks to it without any copy. For that every socket of a process comes
  from one shared context (two I/O threads).

Copies. Frames are sent with copy=False. A group the queue forwards to the learner goes out
as the very zmq.Frame it arrived in (zmq shares it by reference count), so the queue copies
no rollout bytes itself; the kernel's TCP copies are the only ones, once into the queue and
once out of it (none out of it when the learner is in-process).

Envelope, after the ROUTER's routing id: [client name, ids (16 bytes: the request id, then
the client's ack floor, both u64 LE), message frames..., HMAC?]; replies: [request id (8
bytes LE), message frames..., HMAC?]; broadcasts: [message frames..., HMAC?]. The ack floor
is the lowest request id whose reply the client still waits for (its own id for a client
with one request at a time): every reply below it has arrived.

At-most-once execution. The server remembers, per client name, the highest request id seen
and each request above the client's ack floor with its reply once there is one. A resent
request it still remembers is not handed to the service again: the cached reply is resent
(or, while the service still works on it, the reply is redirected to the new socket). An id
at or below the highest that it no longer remembers is a delayed duplicate of an
acknowledged request and is dropped. So a retried submit is not counted twice, a retried
lease request does not grant twice, and a batch whose reply was lost is delivered on the
retry instead of being lost. Cached replies are released when the ack floor passes them (a
client with one request at a time keeps exactly one, until its next request), when a client
has more than `MAX_OPEN_REQUESTS` open (the oldest goes), or at `prune`. Ids must reach the
server in order per client, which holds because a zmq connection delivers in order, loses
only a suffix when it is closed, and a reconnect resends every outstanding id in order.

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

Longer than ~400 lines: it is the only module that imports zmq, so the three socket roles (the
queue's `Server`, the clients' `Requester` with its at-most-once resends, the `Subscriber`) and
the frame signing they share live here together.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from shared.wire import MAC_BYTES, Buffer, sign, verify

MAX_CLIENT_NAME = 64
MIN_SECRET_BYTES = 16
MAX_OPEN_REQUESTS = 1024
"""Requests (with their cached replies) the server keeps per client above its ack floor."""


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


# pyzmq's send_multipart/recv_multipart cost a few microseconds per frame in Python (type
# checks, flag arithmetic on enum members, a getsockopt(RCVMORE) per frame); a group is 4
# frames and a batch 64, so the queue uses these plain loops on ints and Frame.more instead.
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)


def _send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """send_multipart(frames, flags, copy=False): zmq queues all parts or (EAGAIN on the first) none."""
    more = flags | _SNDMORE
    for frame in frames[:-1]:
        sock.send(frame, more, copy=False)
    sock.send(frames[-1], flags, copy=False)


def _recv_frames(sock: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """recv_multipart(flags, copy=False)."""
    frames = [sock.recv(flags, copy=False)]
    while frames[-1].more:
        frames.append(sock.recv(flags, copy=False))
    return frames


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
class _Open:
    request: Request
    reply: list[Buffer] | None = None


@dataclass
class _Peer:
    """What the server remembers of one client name."""

    highest: int = 0
    open: dict[int, _Open] = field(default_factory=dict)
    """Requests above the client's ack floor, by id (ascending: ids only grow)."""
    at: float = 0.0


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
        self._peers: dict[str, _Peer] = {}
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
        polled = False  # a busy queue finds the next request waiting: no poll call for it
        for _ in range(1000):  # bounded, so a flood of rejected input cannot starve the service's other duties
            try:
                raw = _recv_frames(self.router, _NOBLOCK)
            except zmq.Again:
                if polled or not self._poller.poll(max(0, int(timeout_s * 1000))):
                    return None
                polled = True
                continue
            request = self._accept(raw)
            if request is not None:
                return request
        return None

    def _accept(self, raw: list[zmq.Frame]) -> Request | None:
        frames = _views(raw)
        routing = bytes(frames[0])
        if sum(f.nbytes for f in frames[1:]) > self._max_bytes + 4096:
            self.rejected["too_large"] += 1
            return None
        frames = _authentic(self._secret, frames[1:])  # type: ignore[assignment]
        if frames is None:
            self.rejected["unauthenticated"] += 1
            return None
        if len(frames) < 3 or frames[1].nbytes != 16 or not 0 < frames[0].nbytes <= MAX_CLIENT_NAME:
            self.rejected["bad_envelope"] += 1
            return None
        req_id, floor = int.from_bytes(frames[1][:8], "little"), int.from_bytes(frames[1][8:], "little")
        if floor > req_id:
            self.rejected["bad_envelope"] += 1
            return None
        client = bytes(frames[0]).decode("utf-8", "replace")
        peer = self._peers.setdefault(client, _Peer())
        peer.at = time.monotonic()
        while peer.open and next(iter(peer.open)) < floor:  # acknowledged: the client has these replies
            del peer.open[next(iter(peer.open))]
        if req_id <= peer.highest:
            known = peer.open.get(req_id)
            if known is not None:  # a resend: redirect, and replay the reply if there is one
                known.request.peer = routing
                if known.reply is not None:
                    self._send(routing, known.reply)
            return None  # else a delayed duplicate of an acknowledged request
        request = Request(peer=routing, client=client, req_id=req_id, frames=frames[2:])
        peer.highest = req_id
        peer.open[req_id] = _Open(request)
        if len(peer.open) > MAX_OPEN_REQUESTS:
            del peer.open[next(iter(peer.open))]
        return request

    def is_current(self, request: Request) -> bool:
        """Whether the client still waits for `request` (it has not moved its ack floor past it)."""
        peer = self._peers.get(request.client)
        return peer is not None and request.req_id in peer.open

    def reply(self, request: Request, frames: Sequence[Buffer]) -> bool:
        """Send the reply of `request` and cache it for a resend; False when it could not be routed now.

        The request's own frames are released (the handler is done with them).
        """
        envelope = [request.req_id.to_bytes(8, "little"), *frames]
        request.frames = []
        peer = self._peers.get(request.client)
        known = None if peer is None else peer.open.get(request.req_id)
        if known is not None:
            known.reply = envelope
        return self._send(request.peer, envelope)

    def _send(self, peer: bytes, envelope: list[Buffer]) -> bool:
        try:
            frames = [peer, *map(_as_sendable, _signed(self._secret, envelope))]
            _send_frames(self.router, frames, _NOBLOCK)
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
        _send_frames(self.pub, _signed(self._secret, frames))

    def prune(self, max_age_s: float) -> None:
        """Forget clients idle for `max_age_s` (and their cached replies)."""
        cutoff = time.monotonic() - max_age_s
        for client in [c for c, peer in self._peers.items() if peer.at < cutoff]:
            del self._peers[client]

    def close(self) -> None:
        """Close both sockets (the process-wide context stays)."""
        self.router.close(linger=0)
        self.pub.close(linger=0)


class Requester:
    """A pipelined request/reply client over DEALER that resends on a fresh socket when the server goes quiet."""

    def __init__(self, address: str, *, secret: bytes | None = None, name: str | None = None) -> None:
        self._address = address
        self._secret = secret
        self.name = name or f"{os.getpid()}-{os.urandom(6).hex()}"
        assert 0 < len(self.name.encode()) <= MAX_CLIENT_NAME
        self._ctx = _context()
        self._next_id = 1
        self._sock = self._connect()
        self._outstanding: dict[int, list[Buffer]] = {}  # sent, reply not yet here: id -> message frames
        self._replies: dict[int, list[memoryview]] = {}  # arrived, not yet taken
        self._attempt_at = time.monotonic()  # last reply, or (re)send while outstanding: when to resend
        self.quiet_since = time.monotonic()
        """Since when requests are outstanding with no reply: the last reply, or the first send after idle."""
        self.reconnects = 0
        self.dropped_replies = 0
        """Replies ignored: for a request not outstanding (a duplicate), or failing the HMAC."""

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._address)
        return sock

    @property
    def in_flight(self) -> int:
        """Requests sent whose reply has not arrived."""
        return len(self._outstanding)

    def send(self, frames: Sequence[Buffer]) -> int:
        """Send a request without waiting; returns its id (see `wait`, `take`). The frames must stay unchanged."""
        req_id, self._next_id = self._next_id, self._next_id + 1
        if not self._outstanding:
            self._attempt_at = self.quiet_since = time.monotonic()
        self._outstanding[req_id] = list(frames)
        self._transmit(req_id)
        return req_id

    def _transmit(self, req_id: int) -> None:
        floor = next(iter(self._outstanding))  # ids only grow, so the first outstanding is the lowest
        ids = req_id.to_bytes(8, "little") + floor.to_bytes(8, "little")
        envelope = _signed(self._secret, [self.name.encode(), ids, *self._outstanding[req_id]])
        _send_frames(self._sock, envelope)

    def pump(self, timeout_s: float = 0.0) -> int:
        """Receive the replies that arrived, waiting up to `timeout_s` for the first; returns how many."""
        received = 0
        wait_ms = max(0, math.ceil(timeout_s * 1000))
        while self._sock.poll(wait_ms, zmq.POLLIN):
            wait_ms = 0
            frames = _authentic(self._secret, _views(_recv_frames(self._sock)))
            req_id = int.from_bytes(frames[0], "little") if frames and frames[0].nbytes == 8 else 0
            if frames is None or len(frames) < 2 or self._outstanding.pop(req_id, None) is None:
                self.dropped_replies += 1
                continue
            self._replies[req_id] = frames[1:]
            self._attempt_at = self.quiet_since = time.monotonic()
            received += 1
        return received

    def take(self, req_id: int) -> list[memoryview] | None:
        """The reply of `req_id` if it arrived (it is handed out once), else None."""
        return self._replies.pop(req_id, None)

    def keep_alive(self, attempt_s: float) -> None:
        """Reconnect and resend everything outstanding when no reply came for `attempt_s` (lazy pirate)."""
        if self._outstanding and time.monotonic() - self._attempt_at >= attempt_s:
            self._sock.close(linger=0)
            self._sock = self._connect()
            self.reconnects += 1
            self._attempt_at = time.monotonic()
            for req_id in self._outstanding:
                self._transmit(req_id)

    def wait(self, req_id: int, *, timeout_s: float, attempt_s: float) -> list[memoryview]:
        """The reply of `req_id`, resending every outstanding request after `attempt_s` of silence.

        Raises TimeoutError when it did not come within `timeout_s`; the request stays
        outstanding, so a later `wait` continues it (or `abandon` gives it up).
        """
        deadline = time.monotonic() + timeout_s
        while (reply := self.take(req_id)) is None:
            assert req_id in self._outstanding, f"request {req_id} is not outstanding"
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no reply from {self._address} within {timeout_s:.1f}s")
            self.keep_alive(attempt_s)
            self.pump(min(deadline, self._attempt_at + attempt_s) - now)
        return reply

    def abandon(self, req_id: int) -> None:
        """Stop waiting for `req_id` (its reply, if it comes, is dropped; the server may still execute it)."""
        self._outstanding.pop(req_id, None)
        self._replies.pop(req_id, None)

    def request(self, frames: Sequence[Buffer], *, timeout_s: float, attempt_s: float) -> list[memoryview]:
        """Send `frames` and return the reply's frames; resend on a new socket every `attempt_s` of silence.

        Raises TimeoutError when no reply came within `timeout_s` (the request is abandoned).
        """
        req_id = self.send(frames)
        try:
            return self.wait(req_id, timeout_s=timeout_s, attempt_s=attempt_s)
        except TimeoutError:
            self.abandon(req_id)
            raise

    def close(self) -> None:
        """Close the socket (outstanding requests are abandoned)."""
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
            frames = _authentic(self._secret, _views(_recv_frames(self._sock)))
            if frames is None:
                self.dropped += 1
            else:
                out.append(frames)
        return out

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(linger=0)
