"""The replay queue service: one loop that answers actors and the learner and broadcasts state.

Owns the glue between the sockets (`shared/queue/transport.py`), the bytes (`shared/wire.py`) and
the bookkeeping (`shared/queue/state.py`). Imports no zmq itself. Runs as its own process
(`vapo queue`) or in a thread of learner rank 0 (`QueueThread`, the launcher's default,
`queue.embedded`): the learner's client then talks to it over inproc, so a batch reaches the
learner without a copy and rollouts cross the network once, from the actor into this process.

Requests (all on one ROUTER, answered in arrival order by one thread):
- lease(actor_id, incarnation, policy_version, num_prompts) -> leases (or none, a reason and
  a retry-after);
- submit(actor_id, incarnation, groups) -> one status per group;
- heartbeat(actor_id, incarnation) -> renews the actor's leases;
- get_batch(num_groups, wait_s) -> parked until the batch is full, no progress is possible
  (a short batch) or wait_s passes (`timed_out`, nothing handed out);
- set_version(version, weights_version), get_stats, get_cursor, control(pause | resume | stop | shutdown).
  `stop` ends leasing (results of live leases are still taken, and a waiting batch gets what
  is there); `shutdown` also ends the loop, like SIGTERM.
The publish socket repeats {version, weights_version, command} every `publish_interval_s` and on every change.

Flow control: the queue's memory is bounded by admission control (in flight + queued is at
most (S + 1) x prompts per version in steady state) and by `max_queued_groups` /
`max_queued_bytes`: past them leases are refused (`memory`) and a submit is answered `busy`
(the actor keeps the group and resends after the hint; its leases stay alive). A slow
learner therefore slows the actors instead of growing the queue. Set the caps above the
admission window ((S + 1) x prompts per version groups): below it, a group an actor holds
back while the queue is full can be overtaken by newer ones and end up dropped as stale.

Failure modes.
- Malformed, oversized, unauthenticated or wrong-version input is dropped and counted in
  `stats.rejected[reason]` with a (rate-limited) log line; the loop goes on.
- An actor that dies: its leases expire after `lease_timeout_s` and are re-issued; a late
  result is counted `rejected_late` and discarded. A restarted actor (same id, new
  incarnation) has its old leases expired at its first message.
- A learner whose batch reply was lost gets it again when its client resends the request
  (the transport's reply cache). A get_batch superseded by a newer request of the same
  client is dropped without handing anything out.
- SIGTERM/SIGINT (when run in the main thread) or `stop_event`: the loop ends, waiting
  batch requests get an empty `stopping` reply, queued groups are reported as unconsumed
  (count and prompt ids in the log; they stay pending in the cursor), and the final stats are
  returned.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.config import VapoConfig
from shared.queue.state import PromptSourceLike, QueueState
from shared.queue.transport import Request, Server, load_secret
from shared.types import QueueStats
from shared.wire import WireError, decode, encode, group_nbytes, lease_to_wire, stats_to_wire

log = logging.getLogger("vapo.queue")

REQUEST_KINDS = ("lease", "submit", "heartbeat", "get_batch", "set_version", "get_stats", "get_cursor", "control")
_TICK_S = 0.02  # upper bound of a poll: lease expiry and batch deadlines are checked this often
_CLIENT_IDLE_S = 3600.0  # a client silent this long loses its cached reply


@dataclass
class _Parked:
    request: Request
    num_groups: int
    deadline: float


class QueueService:
    """The replay queue: state, sockets and the request handlers."""

    def __init__(self, cfg: VapoConfig, source: PromptSourceLike, *, cursor: dict[str, Any] | None = None,
                 initial_version: int = 0) -> None:
        q = cfg.queue
        self.cfg = q
        self.state = QueueState(
            source, prompts_per_version=cfg.rollout.prompts_per_step * cfg.sync.push_every,
            max_staleness=q.max_staleness, lease_timeout_s=q.lease_timeout_s,
            group_size=cfg.rollout.samples_per_prompt, dynamic_sampling=cfg.algo.dynamic_sampling,
            max_filter_rounds=cfg.algo.max_filter_rounds, max_queued_groups=q.max_queued_groups,
            max_queued_bytes=q.max_queued_bytes, initial_version=initial_version, cursor=cursor)
        self.server = Server(q.host, q.port, q.pub_port, secret=load_secret(q.secret_file),
                             max_message_bytes=q.max_message_bytes)
        self._parked: dict[str, _Parked] = {}
        self._command = "run"
        self._shutdown = False
        self._next_publish = 0.0
        self._next_expire = 0.0
        self._handlers = {
            "lease": self._lease, "submit": self._submit, "heartbeat": self._heartbeat, "get_batch": self._get_batch,
            "set_version": self._set_version, "get_stats": self._get_stats, "get_cursor": self._get_cursor,
            "control": self._control,
        }
        log.info("replay queue on %s:%d (pub %d), max_staleness=%d, prompts per version=%d", q.host,
                 self.server.port, self.server.pub_port, q.max_staleness, self.state.prompts_per_version)

    def run(self, stop_event: threading.Event | None = None) -> QueueStats:
        """Serve until `stop_event` is set or a shutdown request; returns the final stats."""
        try:
            while not self._shutdown and not (stop_event is not None and stop_event.is_set()):
                self.step()
        finally:
            stats = self._close()
        return stats

    def step(self) -> None:
        """One turn of the loop: at most one request, then expiry, waiting batches and the broadcast."""
        request = self.server.poll(_TICK_S)
        now = time.monotonic()
        if request is not None:
            self._handle(request, now)
        if now >= self._next_expire:
            if self.state.expire(now):
                log.info("leases expired and re-issued: %d so far", self.state.stats.num_expired)
            self._next_expire = now + _TICK_S
            self.server.prune(_CLIENT_IDLE_S)
        self._serve_parked(now)
        if now >= self._next_publish:
            self._publish(now)

    def _handle(self, request: Request, now: float) -> None:
        try:
            msg = decode(request.frames, max_bytes=self.cfg.max_message_bytes, kinds=REQUEST_KINDS, build_groups=False)
        except WireError as e:
            self._count_reject(e.reason, str(e), request.client)
            self._reply(request, "error", {"reason": e.reason})
            return
        self._handlers[msg.kind](request, msg, now)

    def _count_reject(self, reason: str, detail: str, client: str) -> None:
        self.state.reject(reason)
        self._log_reject(reason, detail, client)

    def _log_reject(self, reason: str, detail: str, client: str) -> None:
        count = self.state.stats.rejected[reason]
        if count & (count - 1) == 0:  # log the 1st, 2nd, 4th, 8th, ... of each reason
            log.warning("rejected a message from %s (%s, %d so far): %s", client, reason, count, detail[:200])

    def _reply(self, request: Request, kind: str, body: dict[str, Any], groups: Sequence[Any] = ()) -> None:
        self.server.reply(request, encode(kind, body, groups))

    # --- handlers ----------------------------------------------------------------------------------------------

    def _lease(self, request: Request, msg: Any, now: float) -> None:
        b = msg.body
        leases, reason = self.state.lease(b["actor_id"], b["incarnation"], b["policy_version"], b["num_prompts"], now)
        retry = 0.0 if not reason else self.cfg.retry_after_s
        self._reply(request, "leases", {"leases": [lease_to_wire(x) for x in leases], "retry_after_s": retry,
                                        "reason": reason, "version": self.state.version,
                                        "weights_version": self.state.weights_version})

    def _submit(self, request: Request, msg: Any, now: float) -> None:
        actor_id, incarnation = msg.body["actor_id"], msg.body["incarnation"]
        statuses = []
        for encoded in msg.encoded_groups:  # validated headers (decode's build_groups=False: no RolloutGroup)
            group = encoded[0]
            if group["actor_id"] != actor_id:
                status = self.state.reject("wrong_actor")
            else:  # also while stopping: work already admitted is still taken, only new leases end
                status = self.state.submit(
                    lease_id=group["lease_id"], prompt_id=group["prompt_id"], actor_id=actor_id,
                    incarnation=incarnation, policy_version=group["policy_version"], correct=group["correct"],
                    nbytes=group_nbytes(encoded), payload=encoded, now=now)
            if status.startswith("rejected:"):
                self._log_reject(status.split(":", 1)[1], f"group for lease {group['lease_id']}", request.client)
            statuses.append(status)
        busy = any(s == "busy" for s in statuses)
        self._reply(request, "submitted", {"statuses": statuses, "retry_after_s": self.cfg.retry_after_s * busy})

    def _heartbeat(self, request: Request, msg: Any, now: float) -> None:
        self.state.touch(msg.body["actor_id"], msg.body["incarnation"], now)
        self._reply(request, "ack", {"status": "ok", "reason": "", "retry_after_s": 0.0})

    def _get_batch(self, request: Request, msg: Any, now: float) -> None:
        self._parked[request.client] = _Parked(request, msg.body["num_groups"], now + msg.body["wait_s"])

    def _set_version(self, request: Request, msg: Any, now: float) -> None:
        try:
            dropped = self.state.set_version(msg.body["version"], msg.body["weights_version"])
        except ValueError as e:
            self._count_reject("version_regress", str(e), request.client)
            self._reply(request, "error", {"reason": "version_regress"})
            return
        if dropped:
            log.info("version %d: dropped %d stale groups", self.state.version, dropped)
        self._reply(request, "ack", {"status": "ok", "reason": "", "retry_after_s": 0.0})
        self._publish(now)

    def _get_stats(self, request: Request, msg: Any, now: float) -> None:
        self._reply(request, "stats", {"stats": stats_to_wire(self.stats(now))})

    def _get_cursor(self, request: Request, msg: Any, now: float) -> None:
        self._reply(request, "cursor", {"cursor": self.state.cursor_state()})

    def _control(self, request: Request, msg: Any, now: float) -> None:
        command = msg.body["command"]
        if command in ("pause", "resume"):
            self.state.paused = command == "pause"
            self._command = "pause" if self.state.paused else "run"
        else:  # stop and shutdown: no more leases (groups of live leases are still taken); shutdown ends the loop
            self.state.stopping = True
            self._command = "stop"
            self._shutdown = command == "shutdown"
        log.info("control: %s", command)
        self._reply(request, "ack", {"status": "ok", "reason": "", "retry_after_s": 0.0})
        self._publish(now)

    # --- batches, broadcast, shutdown --------------------------------------------------------------------------

    def _serve_parked(self, now: float) -> None:
        for client, parked in list(self._parked.items()):
            if not self.server.is_current(parked.request):
                del self._parked[client]  # superseded by a newer request of the same client
                continue
            payloads = self.state.take_batch(parked.num_groups)
            if payloads is None and now < parked.deadline:
                continue
            del self._parked[client]
            self._send_batch(parked, payloads or [], timed_out=payloads is None, stopping=self.state.stopping, now=now)

    def _send_batch(self, parked: _Parked, payloads: list[Any], *, timed_out: bool, stopping: bool,
                    now: float) -> None:
        body = {"stats": stats_to_wire(self.stats(now)), "short": len(payloads) < parked.num_groups,
                "timed_out": timed_out, "stopping": stopping}
        self._reply(parked.request, "batch", body, payloads)

    def _publish(self, now: float) -> None:
        state = {"version": self.state.version, "weights_version": self.state.weights_version, "command": self._command}
        self.server.publish(encode("state", state))
        self._next_publish = now + self.cfg.publish_interval_s

    def stats(self, now: float | None = None) -> QueueStats:
        """Counters, gauges and cursor now, including the transport's own rejections."""
        stats = self.state.snapshot(time.monotonic() if now is None else now)
        for reason, count in self.server.rejected.items():
            stats.rejected[reason] = stats.rejected.get(reason, 0) + count
        return stats

    def cursor_state(self) -> dict[str, Any]:
        """The prompt cursor to checkpoint (see `shared/queue/state.py`)."""
        return self.state.cursor_state()

    def _close(self) -> QueueStats:
        now = time.monotonic()
        self.state.stopping = True
        self._command = "stop"
        for parked in self._parked.values():
            self._send_batch(parked, [], timed_out=False, stopping=True, now=now)
        self._parked.clear()
        self._publish(now)
        stats = self.stats(now)
        unconsumed = self.state.unconsumed()
        log.info("replay queue stopped: consumed=%d queued (unconsumed)=%d in_flight=%d; unconsumed prompt ids: %s",
                 stats.consumed, stats.queued, stats.in_flight, unconsumed[:64])
        self.server.close()
        return stats


class QueueThread:
    """The service in a daemon thread of this process (learner rank 0 embedding it); `stop` ends it.

    The sockets are bound here, in the caller's thread, so a taken port raises at once instead
    of in the thread; zmq allows a socket to move to another thread at such a hand-over.
    """

    def __init__(self, cfg: VapoConfig, prompt_source: PromptSourceLike, *, cursor: dict[str, Any] | None = None,
                 initial_version: int = 0) -> None:
        self.service = QueueService(cfg, prompt_source, cursor=cursor, initial_version=initial_version)
        self._stop = threading.Event()
        self._stats: QueueStats | None = None
        self._thread = threading.Thread(target=self._run, name="vapo-queue", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._stats = self.service.run(self._stop)

    def alive(self) -> bool:
        """Whether the loop still runs."""
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> QueueStats | None:
        """End the loop (waiting batch requests get `stopping`); the final stats, None if it failed or did not end."""
        self._stop.set()
        self._thread.join(timeout_s)
        return self._stats


def serve(cfg: VapoConfig, prompt_source: PromptSourceLike, *, stop_event: threading.Event | None = None,
          cursor: dict[str, Any] | None = None, initial_version: int = 0) -> QueueStats:
    """Run the replay queue until SIGTERM/SIGINT, `stop_event` or a shutdown request; return the final stats.

    `cursor` (from `QueueStats.cursor` of a checkpoint) resumes the prompt stream;
    `initial_version` is the learner's version at start (its checkpoint's on resume). Signal
    handlers are installed only when called from the main thread (a thread relies on stop_event).
    """
    stop = stop_event or threading.Event()
    service = QueueService(cfg, prompt_source, cursor=cursor, initial_version=initial_version)
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        return service.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
