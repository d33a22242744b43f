"""An actor's submits to the replay queue, pipelined: many in flight, none waiting a round trip per group.

Owns the submit side of `ActorClient` (`shared/queue/client.py`): which groups are in which
request, their statuses, `busy` resends. Imports no zmq (the `Requester` of
`shared/queue/transport.py` owns the socket and the at-most-once resends); used from one thread.

Design.
- A window: at most `max_in_flight` submit requests, and (beyond the first) at most
  `max_in_flight_bytes` of groups, are unanswered at once. `send` returns a ticket at once;
  the statuses arrive later (`results`, `flush`, `wait`).
- Coalescing: while the window is full, new groups wait in an outbox; when a reply frees a
  slot, everything waiting goes out in one request (up to `max_message_bytes`). A queue that
  falls behind thus gets fewer, larger messages (one decode and one reply for many groups),
  and nothing changes while it keeps up. `send` blocks only while half a message's worth waits.
  The byte bound is what coalesces large groups: a few megabytes in flight already keep the
  connection busy (they fill the socket buffers), so a group sent behind them would only wait
  in the kernel instead of the outbox, and waiting in the outbox lets it share a request (one
  envelope, one decode, one reply) with the groups sent after it.
- Every group gets its own final status: accepted (the queue accounts for it), filtered,
  stale, late, duplicate or rejected:<reason>. The queue refuses a malformed message as a
  whole, so when a message of several groups is refused, each of its groups is resent alone
  and gets its own answer (one bad group does not take its companions down).
- `busy` (the queue's memory bound): the group is resent after the queue's hint, until the
  ticket's deadline; past it its final status is `busy`. The bound stays the backpressure.

Failure modes.
- Queue silent: the `Requester` resends every unanswered request on a fresh socket after
  `request_timeout_s`; after 3 x that without any reply, TimeoutError (nothing is lost: the
  tickets stay pending and later calls continue them).
- Abandoned ticket (`abandon`, or closing the client): its waiting groups are dropped; a
  request carrying only its groups is abandoned (its reply is ignored). Groups whose reply
  never came are, in the queue, either accounted for or never received (their leases expire
  and are re-issued), never half-taken.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.queue.transport import Requester
from shared.types import RolloutGroup
from shared.wire import Buffer, EncodedGroup, WireError, decode, encode, encode_group, encoded_nbytes

MESSAGE_OVERHEAD = 1024
"""Bytes of a submit's own header and envelope, beyond its groups."""
DEFAULT_IN_FLIGHT_BYTES = 8 * 2**20
"""Group bytes in unanswered submits beyond which more groups wait and coalesce (about two socket buffers)."""
_NO_LIMIT = 1 << 62

_Part = tuple[int, int]
"""(ticket, index of a group in it)."""


@dataclass
class _Ticket:
    """Groups of one `send`: their statuses so far and what a resend needs."""

    statuses: list[str]
    encoded: list[EncodedGroup]
    sizes: list[int]
    """Bytes each group adds to a submit message."""
    deadline: float | None
    unsettled: int
    """Groups without a final status."""
    request_ids: set[int] = field(default_factory=set)


class SubmitPipeline:
    """Submit requests in flight on one `Requester`, with their tickets, outbox and `busy` resends."""

    def __init__(self, rq: Requester, ids: dict[str, Any], *, max_in_flight: int, max_message_bytes: int,
                 request_timeout_s: float, max_in_flight_bytes: int = DEFAULT_IN_FLIGHT_BYTES) -> None:
        if max_in_flight < 1 or max_in_flight_bytes < 1:
            raise ValueError(f"max_in_flight and max_in_flight_bytes must be >= 1, got {max_in_flight}, "
                             f"{max_in_flight_bytes}")
        self._rq, self._ids = rq, ids
        self.max_in_flight, self.max_message_bytes = max_in_flight, max_message_bytes
        self.max_in_flight_bytes = max_in_flight_bytes
        self._in_flight_bytes: dict[int, int] = {}  # request id -> bytes of its groups, while unanswered
        self.request_timeout_s = request_timeout_s
        self._next_ticket = 1
        self._tickets: dict[int, _Ticket] = {}
        self._outbox: deque[_Part] = deque()  # groups waiting for room in the window, in send order
        self._outbox_bytes = 0
        self._requests: dict[int, list[_Part]] = {}  # request id -> the groups it carries
        self._busy: list[tuple[float, int, int]] = []  # heap of (resend at, ticket, index)
        self._solo: set[_Part] = set()  # groups of a refused message of several, to resend alone
        self._done: dict[int, list[str]] = {}

    @property
    def num_pending(self) -> int:
        """Tickets not settled yet."""
        return len(self._tickets)

    def send(self, groups: Sequence[RolloutGroup], *, timeout_s: float | None = None) -> int:
        """Queue groups for submission and return their ticket (see the module docstring)."""
        self.progress(0.0)
        encoded = [encode_group(g) for g in groups]
        sizes = [encoded_nbytes(e) for e in encoded]
        if sizes and max(sizes) + MESSAGE_OVERHEAD > self.max_message_bytes:
            raise ValueError(f"a group of {max(sizes)} bytes exceeds queue.max_message_bytes")
        ticket = self._next_ticket
        self._next_ticket += 1
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._tickets[ticket] = _Ticket([""] * len(groups), encoded, sizes, deadline, len(groups))
        for i in range(len(groups)):
            self._enqueue((ticket, i))
        if not groups:
            self._done[ticket] = self._tickets.pop(ticket).statuses
        self._dispatch()
        self.wait_until(lambda: self._outbox_bytes < self.max_message_bytes // 2, None)
        return ticket

    def results(self, timeout_s: float = 0.0) -> dict[int, list[str]]:
        """Statuses of the tickets settled since the last call, waiting up to `timeout_s` for replies."""
        self.progress(timeout_s)
        done, self._done = self._done, {}
        return done

    def wait(self, ticket: int) -> list[str]:
        """The statuses of `ticket`, once every group of it has one (TimeoutError when the queue stays silent)."""
        self.wait_until(lambda: ticket in self._done, None)
        return self._done.pop(ticket)

    def wait_until(self, done: Callable[[], bool], timeout_s: float | None) -> None:
        """Make progress until `done()`; TimeoutError after `timeout_s` (None: no limit) or when the queue is silent."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"{len(self._tickets)} submits still unanswered after {timeout_s}s")
            wait = self.request_timeout_s if deadline is None else deadline - now
            if self._busy:
                wait = min(wait, max(0.0, self._busy[0][0] - now))
            self.progress(wait)

    def progress(self, timeout_s: float) -> None:
        """Take the replies that came (waiting up to `timeout_s`), resend due `busy` groups, send what waits."""
        self._rq.keep_alive(self.request_timeout_s)
        if self._rq.in_flight:
            self._rq.pump(timeout_s)
        elif timeout_s > 0 and self._busy:
            time.sleep(timeout_s)  # only `busy` resends are pending
        for req_id in list(self._requests):
            reply = self._rq.take(req_id)
            if reply is not None:
                self._in_flight_bytes.pop(req_id, None)
                self._settle(req_id, self._requests.pop(req_id), reply)
        now = time.monotonic()
        while self._busy and self._busy[0][0] <= now:
            _, ticket, i = heapq.heappop(self._busy)
            self._enqueue((ticket, i))
        self._dispatch()
        if self._rq.in_flight and now - self._rq.quiet_since >= 3 * self.request_timeout_s:
            raise TimeoutError(f"no reply from the queue within {3 * self.request_timeout_s:.1f}s")

    def abandon(self, ticket: int) -> None:
        """Give up a ticket: its waiting groups are dropped, requests that carry only its groups abandoned."""
        t = self._tickets.pop(ticket, None)
        if t is None:  # settled meanwhile
            self._done.pop(ticket, None)
            return
        for req_id in t.request_ids:
            if all(part[0] == ticket for part in self._requests[req_id]):  # else the reply still serves others
                self._rq.abandon(req_id)
                del self._requests[req_id]
                self._in_flight_bytes.pop(req_id, None)
        self._outbox = deque(part for part in self._outbox if part[0] != ticket)
        self._outbox_bytes = sum(self._size(part) for part in self._outbox)
        self._solo = {part for part in self._solo if part[0] != ticket}
        self._busy = [entry for entry in self._busy if entry[1] != ticket]
        heapq.heapify(self._busy)

    def _size(self, part: _Part) -> int:
        return self._tickets[part[0]].sizes[part[1]]

    def _enqueue(self, part: _Part, *, front: bool = False) -> None:
        if front:
            self._outbox.appendleft(part)
        else:
            self._outbox.append(part)
        self._outbox_bytes += self._size(part)

    def _dispatch(self) -> None:
        """Send the waiting groups while the window has room, as many per request as the size limit allows."""
        while self._outbox and self._rq.in_flight < self.max_in_flight and (
                not self._in_flight_bytes or sum(self._in_flight_bytes.values()) < self.max_in_flight_bytes):
            parts = [self._outbox.popleft()]
            nbytes = self._size(parts[0])
            if parts[0] in self._solo:
                self._solo.discard(parts[0])
            else:
                while self._outbox and self._outbox[0] not in self._solo:
                    size = self._size(self._outbox[0])
                    if nbytes + size + MESSAGE_OVERHEAD > self.max_message_bytes:
                        break
                    parts.append(self._outbox.popleft())
                    nbytes += size
            self._outbox_bytes -= nbytes
            req_id = self._rq.send(encode("submit", self._ids, [self._tickets[t].encoded[i] for t, i in parts]))
            self._requests[req_id] = parts
            self._in_flight_bytes[req_id] = nbytes
            for t, _ in parts:
                self._tickets[t].request_ids.add(req_id)

    def _settle(self, req_id: int, parts: list[_Part], reply: Sequence[Buffer]) -> None:
        try:
            msg = decode(reply, max_bytes=_NO_LIMIT, kinds=("submitted", "error"))
            if msg.kind == "error":
                raise WireError(msg.body["reason"], "refused by the queue")
            statuses, retry_after_s = msg.body["statuses"], msg.body["retry_after_s"]
            if len(statuses) != len(parts):
                raise WireError("length_mismatch", f"{len(statuses)} statuses for {len(parts)} groups")
        except WireError as e:  # the whole message was refused
            live = [part for part in parts if part[0] in self._tickets]
            if len(live) > 1:  # one bad group refuses its companions too: each is resent alone for its own answer
                for part in reversed(live):
                    self._tickets[part[0]].request_ids.discard(req_id)
                    self._solo.add(part)
                    self._enqueue(part, front=True)
                return
            statuses, retry_after_s = [f"rejected:{e.reason}"] * len(parts), 0.0
        resend_at = time.monotonic() + retry_after_s
        for (ticket, i), status in zip(parts, statuses, strict=True):
            t = self._tickets.get(ticket)
            if t is None:  # abandoned
                continue
            t.request_ids.discard(req_id)
            t.statuses[i] = status
            if status == "busy" and (t.deadline is None or resend_at <= t.deadline):
                heapq.heappush(self._busy, (resend_at, ticket, i))
                continue
            t.unsettled -= 1
            if t.unsettled == 0:
                self._done[ticket] = self._tickets.pop(ticket).statuses
