"""Clients of the replay queue: `ActorClient` (leases, groups, heartbeats) and `LearnerClient` (batches, version).

Owns the request side of the protocol in `shared/queue/service.py`. Imports no zmq (the
`Requester`/`Subscriber` of `shared/queue/transport.py` own the sockets). A client is used from
one thread; the optional heartbeat thread has its own socket.

Failure modes.
- Queue gone or restarting: every request is resent on a fresh socket every
  `queue.request_timeout_s` until its own deadline, then raises TimeoutError. Requests are
  executed at most once by the queue, so a resend is safe (no double lease, no double group).
- A `get_batch` that raised TimeoutError is continued, not replaced, by the next call: the
  batch may already have been handed out and its reply is only cached by the queue, so a new
  request id would lose it. Batch requests use a client name of their own, so `stats()` and
  `publish_version()` in between do not supersede them.
- A rejected message (`error` reply) raises WireError with the queue's reason; it is not
  resent. For a submit it becomes each of its groups' status instead (`rejected:<reason>`).
- Pipelined submits (`ActorClient.submit`, `shared/queue/submit.py`): each group is sent as
  the caller's iterable yields it, up to 8 submit requests (and 8 MiB of groups) travel at
  once, and groups taken while that window is full go out together; the call returns once
  every group has its final status. A submit that raised TimeoutError leaves its groups in
  the client, and the next one carries them on; closing the client drops them.
- Broadcasts (version, pause, stop) can be lost; the queue repeats them and every lease
  reply carries the version too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.config import VapoConfig
from shared.queue.submit import SubmitPipeline
from shared.queue.transport import Requester, Subscriber, endpoint, inproc_endpoints, load_secret
from shared.types import LeaseReply, QueueStats, RolloutGroup
from shared.wire import Buffer, Message, WireError, decode, encode

_NO_LIMIT = 1 << 62


@dataclass
class Batch:
    """Groups handed out to the learner, oldest version first, with the queue's counters at that moment."""

    groups: list[RolloutGroup]
    stats: QueueStats
    """Counters after this hand-out; `stats.cursor` is the prompt cursor to checkpoint with this batch."""
    short: bool
    """Fewer groups than asked (dynamic-sampling rounds used up, or no further progress possible)."""
    stopping: bool
    """The queue is shutting down."""


@dataclass
class Broadcast:
    """The latest state the queue published."""

    version: int
    command: str
    """run, pause or stop."""
    weights_version: int = 0
    """The oldest version with `version`'s weights (see `LearnerClient.publish_version`)."""


@dataclass
class ClientSettings:
    """Where the queue is and how patient to be with it."""

    address: str
    pub_address: str
    secret: bytes | None = None
    request_timeout_s: float = 5.0
    max_message_bytes: int = 512 * 2**20

    @classmethod
    def from_config(cls, cfg: VapoConfig, *, in_process: bool = False) -> ClientSettings:
        """Settings from `cfg.queue`; `in_process` for a client in the process that runs the queue (inproc, no copy)."""
        q = cfg.queue
        address, pub_address = (inproc_endpoints(q.port) if in_process
                                else (endpoint(q.host, q.port), endpoint(q.host, q.pub_port)))
        return cls(address, pub_address, load_secret(q.secret_file), q.request_timeout_s, q.max_message_bytes)


class _Client:
    def __init__(self, settings: ClientSettings, name: str | None = None) -> None:
        self.settings = settings
        self._rq = Requester(settings.address, secret=settings.secret, name=name)

    def _call(self, kind: str, body: dict[str, Any], *, timeout_s: float | None = None,
              rq: Requester | None = None) -> Message:
        s = self.settings
        reply = (rq or self._rq).request(encode(kind, body), timeout_s=timeout_s or 3 * s.request_timeout_s,
                                         attempt_s=s.request_timeout_s)
        return self._decode(reply)

    def _decode(self, frames: Sequence[Buffer], *, trusted_groups: bool = False) -> Message:
        msg = decode(frames, max_bytes=_NO_LIMIT, max_group_bytes=self.settings.max_message_bytes,
                     trusted_groups=trusted_groups)
        if msg.kind == "error":
            raise WireError(msg.body["reason"], "refused by the queue")
        return msg

    def close(self) -> None:
        """Close the sockets."""
        self._rq.close()


class ActorClient(_Client):
    """An actor's connection: lease prompts, submit groups (pipelined), heartbeat, follow the broadcasts."""

    def __init__(self, settings: ClientSettings, actor_id: int, *, incarnation: int | None = None) -> None:
        super().__init__(settings)
        self.actor_id = actor_id
        self.incarnation = incarnation if incarnation is not None else int.from_bytes(os.urandom(6))
        self._sub = Subscriber(settings.pub_address, secret=settings.secret)
        self._heartbeat: tuple[threading.Thread, threading.Event] | None = None
        self._pipeline = SubmitPipeline(self._rq, self._ids(), max_message_bytes=settings.max_message_bytes,
                                        request_timeout_s=settings.request_timeout_s)

    def _ids(self) -> dict[str, int]:
        return {"actor_id": self.actor_id, "incarnation": self.incarnation}

    def lease(self, num_prompts: int, policy_version: int) -> LeaseReply:
        """Ask for up to `num_prompts` prompts for weights at `policy_version`."""
        b = self._call("lease", {**self._ids(), "policy_version": policy_version, "num_prompts": num_prompts}).body
        return LeaseReply(leases=b["leases"], retry_after_s=b["retry_after_s"], reason=b["reason"],
                          version=b["version"], weights_version=b["weights_version"])

    def submit(self, groups: Iterable[RolloutGroup], *, timeout_s: float | None = None) -> list[str]:
        """Send each group as `groups` yields it, pipelined; one status per group once all are answered.

        A status is accepted, filtered, stale, late, duplicate or rejected:<reason>. A group
        leaves without waiting for the replies to those before it (up to 8 requests in flight;
        see `shared/queue/submit.py`), so a generator that scores groups overlaps the scoring
        with their transfer. A `busy` queue (memory bound reached) is waited out: its groups are
        resent after its retry hint. TimeoutError when one wait for the queue lasts `timeout_s`
        (None: no limit; the time `groups` takes to yield does not count) or the queue stays
        silent; the groups taken so far stay in the client and the next `submit` carries them
        on, returning their statuses before its own.
        """
        return self._pipeline.submit(groups, timeout_s)

    def start_heartbeat(self, interval_s: float) -> None:
        """Heartbeat every `interval_s` from a background thread with its own socket (for long generations)."""
        assert self._heartbeat is None, "heartbeat already running"
        stop = threading.Event()
        rq = Requester(self.settings.address, secret=self.settings.secret)

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    self._call("heartbeat", self._ids(), rq=rq, timeout_s=interval_s)
                except TimeoutError:  # the queue is away; keep trying, leases are renewed once it answers
                    continue
            rq.close()

        thread = threading.Thread(target=loop, name=f"heartbeat-{self.actor_id}", daemon=True)
        thread.start()
        self._heartbeat = (thread, stop)

    def poll_broadcast(self, timeout_s: float = 0.0) -> Broadcast | None:
        """The latest valid broadcast received since the last call, or None."""
        latest = None
        for frames in self._sub.poll(timeout_s):
            try:
                msg = decode(frames, max_bytes=1 << 16, kinds=("state",))
            except WireError:
                continue  # a garbled broadcast is skipped; the next repeat replaces it
            latest = Broadcast(msg.body["version"], msg.body["command"], msg.body["weights_version"])
        return latest

    def close(self) -> None:
        """Stop the heartbeat thread and close the sockets."""
        if self._heartbeat is not None:
            thread, stop = self._heartbeat
            stop.set()
            thread.join()
            self._heartbeat = None
        self._sub.close()
        super().close()


class LearnerClient(_Client):
    """The learner's connection: batches, version, counters, control."""

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__(settings)
        self._batch_rq = Requester(settings.address, secret=settings.secret)
        self._pending: tuple[int, int, float] | None = None  # (req_id, num_groups, wait_s) of an unanswered get_batch

    def get_batch(self, num_groups: int, timeout_s: float) -> Batch:
        """The `num_groups` oldest groups (fewer only when the queue can make no progress).

        Raises TimeoutError when none came within `timeout_s` (the next call continues this request).
        """
        if self._pending is None:
            req_id = self._batch_rq.send(encode("get_batch", {"num_groups": num_groups, "wait_s": timeout_s}))
            self._pending = (req_id, num_groups, timeout_s)
        req_id, _, wait_s = self._pending
        reply = self._batch_rq.wait(req_id, timeout_s=wait_s + self.settings.request_timeout_s,
                                    attempt_s=self.settings.request_timeout_s)
        self._pending = None
        msg = self._decode(reply, trusted_groups=True)  # the queue validated every group on submit
        b = msg.body
        if b["timed_out"]:
            raise TimeoutError(f"no full batch of {num_groups} groups within {timeout_s:.1f}s")
        return Batch(groups=msg.groups, stats=b["stats"], short=b["short"], stopping=b["stopping"])

    def publish_version(self, version: int, weights_version: int | None = None) -> None:
        """Tell the queue (and through it the actors) the learner's policy version, and the oldest version
        with the same weights: `version` itself after a push (the default), older when the policy did not
        change (value pretraining), so actors holding those weights take `version` without a push."""
        weights = version if weights_version is None else weights_version
        self._call("set_version", {"version": version, "weights_version": weights})

    def stats(self) -> QueueStats:
        """The queue's counters now."""
        return self._call("get_stats", {}).body["stats"]

    def control(self, command: str) -> None:
        """pause, resume, stop (no more leases; actors are told to stop) or shutdown (the queue exits)."""
        self._call("control", {"command": command})

    def close(self) -> None:
        """Close the sockets."""
        self._batch_rq.close()
        super().close()
