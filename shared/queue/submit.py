"""An actor's submits to the replay queue, pipelined: each group leaves as soon as it is taken.

Owns the submit side of `ActorClient` (`shared/queue/client.py`): which groups are in which
request, their statuses, `busy` resends. Imports no zmq (the `Requester` of
`shared/queue/transport.py` owns the socket and the at-most-once resends); used from one thread.

Design.
- `submit` takes the groups from an iterable and sends each one at once, without waiting for
  the replies to those before it; the actor passes the generator that scores its round, so
  the scoring of a group overlaps the transfer and validation of the groups before it, and a
  round costs one round trip (after its last group), not one per group.
- A window: at most `max_in_flight` submit requests, and (beyond the first) at most
  `max_in_flight_bytes` of groups, are unanswered at once. Groups taken while the window is
  full wait in an outbox; when a reply frees a slot, everything waiting goes out in one
  request (up to `max_message_bytes`). A queue that falls behind thus gets fewer, larger
  messages (one decode and one reply for many groups), and nothing changes while it keeps
  up. The next group is taken only while less than half a message's worth waits. The byte
  bound is what coalesces large groups: a few megabytes in flight already keep the
  connection busy (they fill the socket buffers), so a group sent behind them would only
  wait in the kernel instead of the outbox, and waiting in the outbox lets it share a
  request (one envelope, one decode, one reply) with the groups taken after it.
- Every group gets its own final status: accepted (the queue accounts for it), filtered,
  stale, late, duplicate or rejected:<reason>. The queue refuses a malformed message as a
  whole, so when a message of several groups is refused, each of its groups is resent alone
  and gets its own answer (one bad group does not take its companions down).
- `busy` (the queue's memory bound): the group is resent after the queue's hint, for as long
  as the submit lasts. The bound stays the backpressure: the actor's submit, and with it its
  next round, waits until the learner makes room.

Failure modes.
- Queue silent: the `Requester` resends every unanswered request on a fresh socket after
  `request_timeout_s`; after 3 x that without any reply, TimeoutError. TimeoutError too when
  one wait for the queue (for room, or for the last statuses) lasts the submit's `timeout_s`
  (a queue that stays busy); the time the caller's iterable takes does not count. Nothing is
  lost: the groups taken so far stay here, and the next `submit` carries them on; it returns
  their statuses and then its own, in the order the groups were taken.
- A caller that scores slowly: replies that came meanwhile are read before a resend falls
  due, so a slow iterable alone does not make the `Requester` resend.
- Closing the client drops what is still waiting. Groups whose reply never came are, in the
  queue, either accounted for or never received (their leases expire and are re-issued),
  never half-taken.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from shared.queue.transport import Requester
from shared.types import RolloutGroup
from shared.wire import Buffer, EncodedGroup, WireError, decode, encode, encode_group, encoded_nbytes

MESSAGE_OVERHEAD = 1024
"""Bytes of a submit's own header and envelope, beyond its groups."""
DEFAULT_IN_FLIGHT = 8
"""Unanswered submit requests beyond which groups wait and coalesce."""
DEFAULT_IN_FLIGHT_BYTES = 8 * 2**20
"""Group bytes in unanswered submits beyond which more groups wait and coalesce (about two socket buffers)."""
_NO_LIMIT = 1 << 62


class SubmitPipeline:
    """Submit requests in flight on one `Requester`, with the groups' statuses, the outbox and `busy` resends.

    A group is known by its index in the groups taken since the last `submit` that returned.
    """

    def __init__(self, rq: Requester, ids: dict[str, Any], *, max_message_bytes: int, request_timeout_s: float,
                 max_in_flight: int = DEFAULT_IN_FLIGHT, max_in_flight_bytes: int = DEFAULT_IN_FLIGHT_BYTES) -> None:
        if max_in_flight < 1 or max_in_flight_bytes < 1:
            raise ValueError(f"max_in_flight and max_in_flight_bytes must be >= 1, got {max_in_flight}, "
                             f"{max_in_flight_bytes}")
        self._rq, self._ids = rq, ids
        self.max_in_flight, self.max_in_flight_bytes = max_in_flight, max_in_flight_bytes
        self.max_message_bytes, self.request_timeout_s = max_message_bytes, request_timeout_s
        self._encoded: list[EncodedGroup] = []
        self._sizes: list[int] = []  # bytes each group adds to a submit message
        self._statuses: list[str] = []  # "" until final
        self._unsettled = 0
        self._outbox: deque[int] = deque()  # groups waiting for room in the window, in the order taken
        self._outbox_bytes = 0
        self._requests: dict[int, list[int]] = {}  # request id -> the groups it carries, while unanswered
        self._in_flight_bytes = 0  # bytes of the groups in unanswered requests
        self._busy: list[tuple[float, int]] = []  # heap of (resend at, group)
        self._solo: set[int] = set()  # groups of a refused message of several, to resend alone

    def submit(self, groups: Iterable[RolloutGroup], timeout_s: float | None = None) -> list[str]:
        """Send the groups as they are taken and return one final status per group (see the module docstring)."""
        for group in groups:
            self._add(group)
            self._wait_until(lambda: self._outbox_bytes < self.max_message_bytes // 2, timeout_s)
        self._wait_until(lambda: self._unsettled == 0, timeout_s)
        assert not (self._requests or self._outbox or self._busy), "every group is settled"
        statuses = self._statuses
        self._encoded, self._sizes, self._statuses = [], [], []
        return statuses

    def _add(self, group: RolloutGroup) -> None:
        """Take one group (it is kept before anything can raise TimeoutError) and send what the window allows."""
        encoded = encode_group(group)
        size = encoded_nbytes(encoded)
        if size + MESSAGE_OVERHEAD > self.max_message_bytes:
            raise ValueError(f"a group of {size} bytes exceeds queue.max_message_bytes")
        self._encoded.append(encoded)
        self._sizes.append(size)
        self._statuses.append("")
        self._unsettled += 1
        self._enqueue(len(self._encoded) - 1)
        self._progress(0.0)

    def _wait_until(self, done: Callable[[], bool], timeout_s: float | None) -> None:
        """Make progress until `done()`; TimeoutError after `timeout_s` (None: no limit) or when the queue is silent."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"the queue kept {self._unsettled} groups waiting for {timeout_s}s (full or away)")
            wait = self.request_timeout_s if deadline is None else min(self.request_timeout_s, deadline - now)
            if self._busy:
                wait = min(wait, max(0.0, self._busy[0][0] - now))
            self._progress(wait)

    def _progress(self, timeout_s: float) -> None:
        """Take the replies that came (waiting up to `timeout_s`), resend due `busy` groups, send what waits."""
        if self._rq.in_flight:
            self._rq.pump(0.0)  # replies that came while the caller scored count before a resend falls due
            self._rq.keep_alive(self.request_timeout_s)
            self._rq.pump(timeout_s)
        elif timeout_s > 0 and self._busy:
            time.sleep(timeout_s)  # only `busy` resends are pending
        for req_id in list(self._requests):
            reply = self._rq.take(req_id)
            if reply is not None:
                parts = self._requests.pop(req_id)
                self._in_flight_bytes -= sum(self._sizes[i] for i in parts)
                self._settle(parts, reply)
        now = time.monotonic()
        while self._busy and self._busy[0][0] <= now:
            self._enqueue(heapq.heappop(self._busy)[1])
        self._dispatch()
        if self._rq.in_flight and now - self._rq.quiet_since >= 3 * self.request_timeout_s:
            raise TimeoutError(f"no reply from the queue within {3 * self.request_timeout_s:.1f}s")

    def _enqueue(self, part: int, *, front: bool = False) -> None:
        if front:
            self._outbox.appendleft(part)
        else:
            self._outbox.append(part)
        self._outbox_bytes += self._sizes[part]

    def _dispatch(self) -> None:
        """Send the waiting groups while the window has room, as many per request as the size limit allows."""
        while self._outbox and self._rq.in_flight < self.max_in_flight and (
                not self._requests or self._in_flight_bytes < self.max_in_flight_bytes):
            parts = [self._outbox.popleft()]
            nbytes = self._sizes[parts[0]]
            if parts[0] in self._solo:
                self._solo.discard(parts[0])
            else:
                while self._outbox and self._outbox[0] not in self._solo:
                    size = self._sizes[self._outbox[0]]
                    if nbytes + size + MESSAGE_OVERHEAD > self.max_message_bytes:
                        break
                    parts.append(self._outbox.popleft())
                    nbytes += size
            self._outbox_bytes -= nbytes
            req_id = self._rq.send(encode("submit", self._ids, [self._encoded[i] for i in parts]))
            self._requests[req_id] = parts
            self._in_flight_bytes += nbytes

    def _settle(self, parts: list[int], reply: Sequence[Buffer]) -> None:
        try:
            msg = decode(reply, max_bytes=_NO_LIMIT, kinds=("submitted", "error"))
            if msg.kind == "error":
                raise WireError(msg.body["reason"], "refused by the queue")
            statuses, retry_after_s = msg.body["statuses"], msg.body["retry_after_s"]
            if len(statuses) != len(parts):
                raise WireError("length_mismatch", f"{len(statuses)} statuses for {len(parts)} groups")
        except WireError as e:  # the whole message was refused
            if len(parts) > 1:  # one bad group refuses its companions too: each is resent alone for its own answer
                for part in reversed(parts):
                    self._solo.add(part)
                    self._enqueue(part, front=True)
                return
            statuses, retry_after_s = [f"rejected:{e.reason}"], 0.0
        resend_at = time.monotonic() + retry_after_s
        for part, status in zip(parts, statuses, strict=True):
            if status == "busy":
                heapq.heappush(self._busy, (resend_at, part))
                continue
            self._statuses[part] = status
            self._unsettled -= 1
