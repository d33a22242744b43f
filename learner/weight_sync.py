"""Weight-group membership on the learner: `MembershipManager`, rank 0's side of the protocol in
`shared.weights.protocol` (the contract; the actors' side is `actors.weight_sync`). It owns a
`WeightSender` (`learner.weight_sender`) started without a group (the store must be up before any
actor can register) and, at every `push`, reads the registrations, rebuilds the group when they
changed or the last push failed (two-phase: every listed actor must say `ready` within
`join_timeout_s`, else it is dropped and the generation is written again for the rest, once; an
actor whose registration is gone meanwhile, marked `left` by the launcher that saw it die or
replaced by a new incarnation, is dropped at once instead of at the timeout), writes the spec with
the version and a new push id, and broadcasts. A push that fails (a receiver died or stayed away
longer than the group's timeout) is retried once on a rebuilt group, so one dead actor costs at most
a timeout, not the run (the retry needs the tensors again: pass a function that returns them).
`pending()` lists registered actors outside the group: a learner that waits for data must push its
current version again when it is not empty, because a new actor generates nothing until it has the
weights (unless the version is 0: every actor starts from `model.path`, which is version 0), and
after a failed push the actors' weights may be half-updated, so they wait for the next push too.
After a resume the learner's first action is a push of the checkpoint's version, so every actor gets
the checkpoint's weights.

Per backend, what a failed push is (`shared.weights.group`, which both sides use): the weight group is
its own communicator, never the learner's training group, created with `sync.timeout_s`.
- gloo: a broadcast to a dead or stalled receiver raises when the timeout expires; the sender closes
  the group and the retry rebuilds it without the dead member (tested: one dead actor costs ~1.3 s
  once its registration is gone, else a timeout).
- NCCL: the same, by the same code: the group is built so that its watchdog aborts only the
  communicator (never the process, NCCL's default), each broadcast is polled and, past the timeout,
  the communicator is aborted and RuntimeError raised, which this manager handles as on gloo. The
  training group is not touched. (The polling path is tested on gloo; NCCL itself only on a GPU.)
- After any failed push the receivers' weights may be half-written: actors wait for the next push.

Several learner ranks (FSDP): the tensors are gathered collectively, so every rank must
iterate them as often as rank 0 does. Rank 0 drains the iterator after a failed attempt (the
other ranks finish their gathers), but whether a second attempt follows is known only on
rank 0; such a learner passes the iterator itself (one attempt) and repairs a failed push
with the `pending()` re-push.

Must not import actors, deploy or vllm.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from learner.weight_sender import NamedTensors, PushStats, WeightSender
from shared.config import SyncConfig
from shared.weights import protocol as wp
from shared.weights.group import mark_member, put

log = logging.getLogger("vapo.weight_sync")
_READY_POLL_S = 0.25
"""While waiting for `ready`, how often the registrations are read again (a dead actor's is marked gone)."""


@dataclass(frozen=True)
class PushReport:
    """What `MembershipManager.push` did: the push (None when nobody got it) and the membership changes."""

    version: int
    stats: PushStats | None
    """None when there was nobody to push to or every attempt failed."""
    group_name: str
    members: tuple[int, ...]
    """Actor ids in the group the push went to (or was meant to)."""
    dropped: tuple[int, ...]
    """Actors dropped during this push (not ready in time, or missing after a failure)."""
    rebuilds: int
    """Generations opened (or tried) for this push."""
    attempts: int
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether the weights reached a group."""
        return self.stats is not None


class MembershipManager:
    """Learner rank 0's side of the membership protocol: registrations in, group spec out, then the push."""

    def __init__(
        self,
        master_addr: str,
        master_port: int,
        *,
        backend: str = "gloo",
        timeout_s: float = 120.0,
        join_timeout_s: float | None = None,
        bucket_bytes: int = 256 * 2**20,
    ) -> None:
        self.sender = WeightSender(
            master_addr, master_port, None, backend=backend, timeout_s=timeout_s, bucket_bytes=bucket_bytes
        )
        self.join_timeout = timedelta(seconds=join_timeout_s if join_timeout_s is not None else timeout_s)
        self.spec: wp.GroupSpec | None = None
        """The spec of the latest push attempt."""
        self.num_rejected = 0
        """Registrations that did not decode (logged and ignored)."""
        self._generation = 0
        self._push_id = 0
        self._excluded: set[tuple[int, int, int]] = set()
        self._raw: dict[int, bytes] = {}

    @classmethod
    def from_config(cls, sync: SyncConfig, backend: str) -> MembershipManager:
        """A manager on `sync.master_addr:master_port`; `backend` is the resolved gloo or nccl."""
        return cls(sync.master_addr, sync.master_port, backend=backend, timeout_s=sync.timeout_s,
                   bucket_bytes=sync.bucket_mb * 2**20)

    @property
    def port(self) -> int:
        """The store's port (useful when constructed with port 0)."""
        return self.sender.port

    def registered(self) -> list[wp.Member]:
        """Active registrations not dropped by this manager, in actor-id order."""
        store = self.sender.store
        keys = [k for k in store.list_keys() if k.startswith(wp.MEMBER_PREFIX)]
        records = []
        for key, raw in zip(keys, store.multi_get(keys) if keys else [], strict=True):
            try:
                member = wp.decode_member(bytes(raw))
                if wp.member_key(member.actor_id) != key:
                    raise ValueError(f"{key} holds the record of actor {member.actor_id}")
            except ValueError as e:
                self.num_rejected += 1
                log.warning("ignoring registration %s: %s", key, e)
                continue
            self._raw[member.actor_id] = bytes(raw)
            records.append(member)
        return wp.eligible_members(records, self._excluded)

    def pending(self) -> list[int]:
        """Registered actors the current group does not hold: the next push includes (and rebuilds for) them."""
        have = self.spec.identities if self.spec is not None and self.sender.has_group else frozenset()
        return [m.actor_id for m in self.registered() if m.identity not in have]

    def push(self, tensors: NamedTensors | Callable[[], NamedTensors], version: int, *,
             max_attempts: int = 2) -> PushReport:
        """Bring the group up to date with the registrations and push (name, full tensor) pairs as `version`.

        `tensors`: the pairs (one attempt: they can be iterated once), or a function returning
        them, called once per attempt (a failed attempt is retried on a rebuilt group, up to
        `max_attempts`). Never raises for an actor's failure: the report says who got the
        weights and who was dropped; after a failure `pending()` lists everyone to push to again.
        """
        t0 = time.perf_counter()
        if callable(tensors):
            make_tensors: Callable[[], NamedTensors] = tensors
        else:
            once = tensors
            make_tensors, max_attempts = (lambda: once), 1
        dropped: list[int] = []
        first_generation, attempts, stats = self._generation, 0, None
        while attempts < max_attempts and stats is None:
            attempts += 1
            members = self.registered()
            if wp.needs_rebuild(self.spec, members, group_alive=self.sender.has_group):
                if not self._build(members, version, dropped):
                    break
            elif not members:
                self._write_spec("", (), 1, version)
                break
            else:
                assert self.spec is not None
                self._write_spec(self.spec.name, self.spec.slots, self.spec.world_size, version)
            tensors = iter(make_tensors())
            try:
                stats = self.sender.push(tensors, version)
            except RuntimeError as e:  # a receiver died or stayed away: the sender closed the group
                log.warning("push of version %d to %s failed (attempt %d): %s", version, self.sender.group_name,
                            attempts, str(e).splitlines()[0] if str(e) else type(e).__name__)
                for _ in tensors:  # finish the iteration: other learner ranks may be gathering with us
                    pass
        name, members_now = (self.spec.name, tuple(s.actor_id for s in self.spec.slots)) if self.spec else ("", ())
        return PushReport(version, stats, name, members_now, tuple(dropped), self._generation - first_generation,
                          attempts, time.perf_counter() - t0)

    def _write_spec(self, name: str, slots: tuple[wp.Slot, ...], world_size: int, version: int) -> wp.GroupSpec:
        self._push_id += 1
        self.spec = wp.GroupSpec(name, world_size, version, self._push_id, slots)
        put(self.sender.store, wp.GROUP_SPEC_KEY, wp.encode_spec(self.spec))
        return self.spec

    def _build(self, members: list[wp.Member], version: int, dropped: list[int]) -> bool:
        """Open a new generation for `members` (dropping the ones that do not come, then trying once more)."""
        store = self.sender.store
        for _ in range(2):
            if not members:
                break
            self._generation += 1
            name = wp.group_name(self._generation)
            slots, world_size = wp.assign_slots(members)
            spec = self._write_spec(name, slots, world_size, version)
            missing = self._not_ready(spec)
            if not missing:
                put(store, wp.go_key(name), b"1")
                try:
                    self.sender.rebuild(world_size, name)
                    log.info("weight group %s: actors %s, world size %d", name, [s.actor_id for s in slots],
                             world_size)
                    return True
                except TimeoutError:  # ready, then gone before joining: the rest are stuck until their timeout
                    missing = self._not_joined(spec)
            else:
                put(store, wp.go_key(name), b"0")  # those waiting read the spec again
            log.warning("weight group %s: actors %s did not come (dead: registration gone, or not ready within %s); "
                        "dropped", name, missing, self.join_timeout)
            self._drop([m for m in members if m.actor_id in missing])
            dropped.extend(missing)
            members = [m for m in members if m.actor_id not in missing]
        self.sender.close_group()
        self._write_spec("", (), 1, version)
        return False

    def _not_ready(self, spec: wp.GroupSpec) -> list[int]:
        """The listed actors not ready: waits up to the join timeout, but not for an actor whose registration is gone.

        An actor that died does not say ready; its registration is then no longer the one the
        spec lists (the launcher marked it `left`, or its replacement registered as a new
        incarnation), so waiting for it ends at the next poll instead of at the timeout, and the
        actors that are ready go on without it.
        """
        store = self.sender.store
        keys = {s.actor_id: wp.ready_key(spec.name, s.actor_id) for s in spec.slots}
        deadline = time.monotonic() + self.join_timeout.total_seconds()
        while True:
            waiting = [s for s in spec.slots if not store.check([keys[s.actor_id]])]
            alive = [s for s in waiting if not self._registration_gone(s)]
            remaining = deadline - time.monotonic()
            if not alive or remaining <= 0:
                return [s.actor_id for s in waiting]
            try:
                store.wait([keys[s.actor_id] for s in alive], timedelta(seconds=min(_READY_POLL_S, remaining)))
            except dist.DistStoreError:
                pass  # not all of them yet: look again

    def _registration_gone(self, slot: wp.Slot) -> bool:
        """Whether the actor's registration is no longer the active one `slot` was made from."""
        key = wp.member_key(slot.actor_id)
        store = self.sender.store
        if not store.check([key]):
            return True
        try:
            member = wp.decode_member(bytes(store.get(key)))
        except ValueError:
            return False  # counted where registrations are read; the timeout decides
        return member.state != "active" or member.identity != (slot.actor_id, slot.incarnation, slot.epoch)

    def _not_joined(self, spec: wp.GroupSpec) -> list[int]:
        store = dist.PrefixStore(spec.name, self.sender.store)
        return [s.actor_id for s in spec.slots
                if not store.check([wp.joined_key(r) for r in range(s.rank_offset, s.rank_offset + s.num_workers)])]

    def _drop(self, members: list[wp.Member]) -> None:
        """Exclude these registrations and mark them dropped (unless the actor registered again meanwhile)."""
        for m in members:
            self._excluded.add(m.identity)
            mark_member(self.sender.store, m, self._raw[m.actor_id], "dropped")

    def close(self) -> None:
        """Close the group and the store."""
        self.sender.close()
