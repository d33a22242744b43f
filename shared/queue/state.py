"""The replay queue's bookkeeping: prompt leases, admission control, staleness gate, filter, cursor.

Pure: no sockets, no clocks (every call takes `now`), no decoding (a queued group is an
opaque payload with its version, size and correctness flags). `shared/queue/service.py`
drives it from the socket loop; the unit tests drive it directly.

Accounting, in prompts (one prompt = one lease = at most one group). Every lease ends in
exactly one bucket, so at every moment
    leased = consumed + dropped_stale + filtered + rejected_late + expired_and_reissued
             + in_flight + queued.
A lease whose actor stays silent for `lease_timeout_s` (any message from the actor renews
all its leases) is expired: counted in `expired_and_reissued` and its prompt goes back to
the front of the line under a new lease id. A late result for it is discarded and the lease
moves to `rejected_late`. A group too stale to train on is dropped (`dropped_stale`) and its
prompt is leased again too; only DAPO-filtered groups retire their prompt untrained.

Admission control (AReaL). With P = prompts per version (prompts_per_step x push_every),
S = max_staleness, v = the learner's version and v0 the version this queue started at, a
lease is granted only while
    in_flight + queued + retired + excess_filtered <= (v - v0 + S + 1) * P,
where `retired` counts the slots of batches already handed out (a short batch retires the
size asked for) and `excess_filtered` the filtered groups beyond the dynamic-sampling
allowance (max_filter_rounds x P per version). In steady state retired = (v - v0) P and
this is the issue's `in_flight + queued <= (S + 1) P`; tying it to v as well is what makes
S = 0 exactly synchronous: after the learner takes batch v nothing more is admitted until it
publishes v + 1. An actor is also refused (`stale_weights`) when its weights are older than
the version its slot will be consumed at minus S, so it fetches weights before it generates.
The rule bounds the work in flight, not each lease's lag: a straggler holding one slot for
several steps is overtaken by faster actors, and its group is then dropped at the gate.

Staleness gate. A group's version_lag is the learner's version at hand-out minus the
group's `policy_version` (the oldest version of any of its tokens). Groups with lag > S are
dropped on submit, on every version change and at hand-out; batches are handed out oldest
version first (arrival order within a version).

Short batches. A waiting batch request is answered with fewer groups only when no progress
is possible: nothing in flight and no lease grantable (dynamic-sampling rounds used up, the
dataset exhausted, memory full, or the queue stopping). An empty answer retires nothing.

Cursor. Every drawn prompt gets a draw number; the source's state before each draw is kept
until the prompt is done (consumed or filtered). `cursor_state()` is the state before the
oldest prompt not yet done plus the draw offsets after it that are done: restoring it
re-issues exactly the prompts in flight, queued or handed out after the cursor was taken,
and nothing else. The source's `state_dict()` must be small (it is copied at every draw).
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.types import Lease, QueueStats

_CLOSED_CAP = 1 << 18  # remembered finished lease ids (to tell late results and duplicates from garbage)


class PromptRecordLike(Protocol):
    prompt: str
    ground_truth: str
    data_source: str
    index: int
    messages: Any


class PromptSourceLike(Protocol):
    def __next__(self) -> PromptRecordLike: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class _Lease:
    lease_id: int
    seq: int
    actor_id: int
    incarnation: int
    """The holder: the actor and the incarnation (process) the lease was granted to."""
    deadline: float


@dataclass
class _Actor:
    incarnation: int
    last_seen: float
    leases: set[int] = field(default_factory=set)
    replaced: set[int] = field(default_factory=set)
    """Earlier incarnations of this actor id (restarted processes)."""


@dataclass(order=True)
class _Queued:
    policy_version: int
    arrival: int
    seq: int = field(compare=False)
    nbytes: int = field(compare=False)
    payload: Any = field(compare=False)


def _messages(raw: Any) -> tuple[tuple[str, str], ...] | None:
    if raw is None:
        return None
    return tuple((m["role"], m["content"]) if isinstance(m, dict) else (m[0], m[1]) for m in raw)


def keep_group(correct: Sequence[bool]) -> bool:
    """DAPO dynamic sampling: keep a group only when its responses are not all judged the same (at least one
    right and one wrong). An all-right or all-wrong group has zero group-normalised advantage and, with a
    critic, little signal; an empty group has nothing to learn from."""
    flags = [bool(flag) for flag in correct]
    return any(flags) and not all(flags)


class QueueState:
    """Leases, queued groups and counters of one replay queue incarnation."""

    def __init__(self, source: PromptSourceLike, *, prompts_per_version: int, max_staleness: int,
                 lease_timeout_s: float, group_size: int, dynamic_sampling: bool = False, max_filter_rounds: int = 0,
                 max_queued_groups: int = 1 << 30, max_queued_bytes: int = 1 << 62, initial_version: int = 0,
                 cursor: dict[str, Any] | None = None, lease_id_base: int | None = None) -> None:
        if prompts_per_version < 1 or max_staleness < 0 or lease_timeout_s <= 0 or group_size < 1:
            raise ValueError("prompts_per_version, group_size >= 1, max_staleness >= 0 and lease_timeout_s > 0 needed")
        self._source: Any = source
        self.prompts_per_version, self.max_staleness = prompts_per_version, max_staleness
        self.lease_timeout_s, self.group_size = lease_timeout_s, group_size
        self.dynamic_sampling, self.max_filter_rounds = dynamic_sampling, max_filter_rounds
        self.max_queued_groups, self.max_queued_bytes = max_queued_groups, max_queued_bytes
        self.version = self._v0 = initial_version
        self.weights_version = initial_version  # the oldest version whose weights `version` has
        self.paused = self.stopping = self.exhausted = False
        self.stats = QueueStats(version=initial_version)
        self._next_lease = (int.from_bytes(os.urandom(2)) << 40) if lease_id_base is None else lease_id_base
        self._leases: dict[int, _Lease] = {}
        self._actors: dict[int, _Actor] = {}
        self._closed: OrderedDict[int, tuple[str, int, int]] = OrderedDict()  # how it ended, and its holder
        self._queue: list[_Queued] = []
        self._arrivals = 0
        self._retired = 0
        self._seq = 0  # draws from the source so far (this incarnation)
        self._pending: dict[int, tuple[Any, dict[str, Any]]] = {}  # seq -> (record, source state before the draw)
        self._reissue: list[int] = []  # heap of seqs to lease again
        self._done: set[int] = set()  # done seqs at or after the cursor's base (and skips restored from a cursor)
        if cursor is not None:
            if set(cursor) != {"source", "skip"}:
                raise ValueError(f"queue cursor must have keys source and skip, got {sorted(cursor)}")
            source.load_state_dict(copy.deepcopy(cursor["source"]))
            self._done = {int(s) for s in cursor["skip"]}

    # --- admission ---------------------------------------------------------------------------------------------

    def _window(self) -> int:
        return (self.version - self._v0 + self.max_staleness + 1) * self.prompts_per_version

    def _occupied(self) -> int:
        allowance = self.max_filter_rounds * self._window() if self.dynamic_sampling else 0
        return len(self._leases) + len(self._queue) + self._retired + max(0, self.stats.filtered - allowance)

    def room(self) -> int:
        """Leases admission control would grant now."""
        return self._window() - self._occupied()

    def memory_full(self) -> bool:
        """Whether the queued groups reached the configured count or byte bound."""
        return len(self._queue) >= self.max_queued_groups or self.stats.queued_bytes >= self.max_queued_bytes

    def can_progress(self) -> bool:
        """Whether more groups can still arrive without a new version (in flight, or grantable)."""
        if self.stopping or self.memory_full():
            return False
        return bool(self._leases) or (self.room() > 0 and (bool(self._reissue) or not self.exhausted))

    # --- actors and leases -------------------------------------------------------------------------------------

    def touch(self, actor_id: int, incarnation: int, now: float) -> bool:
        """Renew all leases of a live actor; a new incarnation (a restart) expires the old one's leases at once.

        Returns False for a message from an incarnation that was replaced (it renews nothing).
        """
        actor = self._actors.get(actor_id)
        if actor is None:
            actor = self._actors[actor_id] = _Actor(incarnation, now)
        elif actor.incarnation != incarnation:
            if incarnation in actor.replaced:
                return False
            for lease_id in sorted(actor.leases):
                self._expire(lease_id)
            actor.replaced.add(actor.incarnation)
            actor.incarnation = incarnation
        actor.last_seen = now
        for lease_id in actor.leases:
            self._leases[lease_id].deadline = now + self.lease_timeout_s
        return True

    def lease(self, actor_id: int, incarnation: int, actor_version: int, num_prompts: int,
              now: float) -> tuple[list[Lease], str]:
        """Grant up to `num_prompts` leases; returns them and why fewer were granted ('' when all were)."""
        if not self.touch(actor_id, incarnation, now):
            return [], "replaced"
        if self.stopping:
            return [], "stopping"
        if self.paused:
            return [], "paused"
        if self.memory_full():
            return [], "memory"
        granted: list[Lease] = []
        while len(granted) < num_prompts:
            occupied = self._occupied()
            if occupied >= self._window():
                return granted, "capacity"
            slot_version = self._v0 + occupied // self.prompts_per_version
            if actor_version < max(slot_version, self.version) - self.max_staleness:
                return granted, "stale_weights"
            seq = self._next_prompt()
            if seq is None:
                return granted, "exhausted"
            granted.append(self._grant(seq, actor_id, incarnation, now))
        return granted, ""

    def _next_prompt(self) -> int | None:
        if self._reissue:
            return heapq.heappop(self._reissue)
        while not self.exhausted:
            state = copy.deepcopy(self._source.state_dict())
            try:
                record = next(self._source)
            except StopIteration:
                self.exhausted = True
                return None
            seq, self._seq = self._seq, self._seq + 1
            if seq not in self._done:  # else: done before the cursor this run resumed from was taken
                self._pending[seq] = (record, state)
                return seq
        return None

    def _grant(self, seq: int, actor_id: int, incarnation: int, now: float) -> Lease:
        lease_id, self._next_lease = self._next_lease, self._next_lease + 1
        self._leases[lease_id] = _Lease(lease_id, seq, actor_id, incarnation, now + self.lease_timeout_s)
        self._actors[actor_id].leases.add(lease_id)
        self.stats.leased += 1
        record = self._pending[seq][0]
        return Lease(lease_id=lease_id, prompt_id=int(record.index), prompt=record.prompt,
                     ground_truth=str(record.ground_truth), data_source=record.data_source,
                     messages=_messages(getattr(record, "messages", None)), policy_version=self.version)

    def _close(self, lease_id: int, how: str) -> _Lease:
        entry = self._leases.pop(lease_id)
        actor = self._actors.get(entry.actor_id)
        if actor is not None:
            actor.leases.discard(lease_id)
        self._closed[lease_id] = (how, entry.actor_id, entry.incarnation)
        if len(self._closed) > _CLOSED_CAP:
            self._closed.popitem(last=False)
        return entry

    def _expire(self, lease_id: int) -> None:
        entry = self._close(lease_id, "expired")
        self.stats.expired_and_reissued += 1
        heapq.heappush(self._reissue, entry.seq)

    def expire(self, now: float) -> int:
        """Expire the leases past their deadline (their prompts are leased again); returns how many."""
        late = [lid for lid, entry in self._leases.items() if entry.deadline <= now]
        for lease_id in late:
            self._expire(lease_id)
        return len(late)

    def next_deadline(self) -> float | None:
        """The earliest lease deadline, if any lease is in flight."""
        return min((entry.deadline for entry in self._leases.values()), default=None)

    # --- results -----------------------------------------------------------------------------------------------

    def submit(self, *, lease_id: int, prompt_id: int, actor_id: int, incarnation: int, policy_version: int,
               correct: Sequence[bool], nbytes: int, payload: Any, now: float) -> str:
        """Take a group; returns accepted, filtered, stale, late, duplicate, busy or rejected:<reason>.

        Only the lease's holder, the actor and incarnation it was granted to, may submit for it, also once
        it has ended: a group from anyone else is `rejected:wrong_actor` and changes nothing of the lease.
        """
        self.touch(actor_id, incarnation, now)
        entry = self._leases.get(lease_id)
        closed = self._closed.get(lease_id) if entry is None else None
        holder = (entry.actor_id, entry.incarnation) if entry is not None else closed[1:] if closed else None
        if holder is not None and holder != (actor_id, incarnation):
            return self.reject("wrong_actor")
        if entry is None:
            if closed is not None and closed[0] == "expired":
                self._closed[lease_id] = ("late", *closed[1:])
                self.stats.expired_and_reissued -= 1
                self.stats.rejected_late += 1
                return "late"
            if closed is not None:
                self.stats.duplicates += 1
                return "duplicate"
            return self.reject("unknown_lease")
        record = self._pending[entry.seq][0]
        if int(record.index) != prompt_id:
            return self.reject("wrong_prompt")
        if len(correct) != self.group_size:
            return self.reject("wrong_group_size")
        if self._queue and (len(self._queue) >= self.max_queued_groups
                            or self.stats.queued_bytes + nbytes > self.max_queued_bytes):
            return "busy"  # the actor keeps the group and resends it later (an empty queue takes anything)
        self._close(lease_id, "done")
        if self.version - policy_version > self.max_staleness:
            self.stats.dropped_stale += 1
            heapq.heappush(self._reissue, entry.seq)
            return "stale"
        if self.dynamic_sampling and not keep_group(correct):
            self.stats.filtered += 1
            self._finish(entry.seq)
            return "filtered"
        heapq.heappush(self._queue, _Queued(policy_version, self._arrivals, entry.seq, nbytes, payload))
        self._arrivals += 1
        self.stats.queued_bytes += nbytes
        return "accepted"

    def reject(self, reason: str) -> str:
        """Count a refused message under `reason`."""
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        return f"rejected:{reason}"

    def _finish(self, seq: int) -> None:
        del self._pending[seq]
        self._done.add(seq)

    @property
    def queued(self) -> int:
        """Groups waiting to be handed out."""
        return len(self._queue)

    # --- learner side ------------------------------------------------------------------------------------------

    def set_version(self, version: int, weights_version: int | None = None) -> int:
        """The learner published `version`, whose weights are those of `weights_version` (default: its own;
        older while value pretraining leaves the policy unchanged); drops what became too stale and returns
        how many."""
        weights_version = version if weights_version is None else weights_version
        if version < self.version:
            raise ValueError(f"policy version went back from {self.version} to {version}")
        if not self.weights_version <= weights_version <= version:
            raise ValueError(f"weights version {weights_version} of version {version} is not in "
                             f"[{self.weights_version}, {version}]")
        self.version = self.stats.version = version
        self.weights_version = weights_version
        return self._drop_stale()

    def _drop_stale(self) -> int:
        dropped = 0
        while self._queue and self.version - self._queue[0].policy_version > self.max_staleness:
            item = heapq.heappop(self._queue)
            self.stats.queued_bytes -= item.nbytes
            self.stats.dropped_stale += 1
            heapq.heappush(self._reissue, item.seq)
            dropped += 1
        return dropped

    def take_batch(self, num_groups: int, *, force: bool = False) -> list[Any] | None:
        """Hand out the `num_groups` oldest groups; fewer only when no progress is possible (or `force`).

        Returns their payloads, or None while the batch should wait.
        """
        self._drop_stale()
        if len(self._queue) < num_groups and not force and self.can_progress():
            return None
        items = [heapq.heappop(self._queue) for _ in range(min(num_groups, len(self._queue)))]
        if not items:
            return []
        for item in items:
            lag = self.version - item.policy_version
            self.stats.version_lag_sum += lag
            self.stats.version_lag_max = max(self.stats.version_lag_max, lag)
            self.stats.queued_bytes -= item.nbytes
            self._finish(item.seq)
        self.stats.consumed += len(items)
        self.stats.batches += 1
        self.stats.short_batches += len(items) < num_groups
        self._retired += num_groups
        return [item.payload for item in items]

    # --- reporting ---------------------------------------------------------------------------------------------

    def cursor_state(self) -> dict[str, Any]:
        """Where to resume the prompt stream so that nothing is repeated or skipped (see the module docstring)."""
        if self._pending:
            base = min(self._pending)
            state = self._pending[base][1]
        else:
            base, state = self._seq, self._source.state_dict()
        self._done = {s for s in self._done if s >= base}
        return {"source": copy.deepcopy(state), "skip": sorted(s - base for s in self._done)}

    def snapshot(self, now: float) -> QueueStats:
        """A copy of the counters with the gauges filled in and the cursor attached."""
        stats = dataclasses.replace(self.stats, rejected=dict(self.stats.rejected))  # the rest is ints (cursor below)
        stats.in_flight, stats.queued = len(self._leases), len(self._queue)
        stats.num_actors = sum(now - a.last_seen < self.lease_timeout_s for a in self._actors.values())
        stats.cursor = self.cursor_state()
        assert stats.identity_holds(), stats
        return stats

    def unconsumed(self) -> list[int]:
        """Prompt ids of the groups still queued (reported at shutdown)."""
        return [int(self._pending[item.seq][0].index) for item in sorted(self._queue)]
