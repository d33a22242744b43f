"""An actor's side of the weight-group membership protocol: registration, and taking part in the pushes.

The contract is in `shared.weights.protocol` (module note, "Membership"); the learner's side is
`learner.weight_sync.MembershipManager`. This module owns the actor's TCPStore client of the
learner's store (on `sync.master_port`) and decides, between generation rounds, whether the
latest group spec asks this actor to receive a push:

- `connect` retries until the learner's store is up (or a timeout passes) and registers:
  `members/<actor_id>` = {num_workers, incarnation, epoch, active}.
- `next_push` reads `group/current`; a spec with a new push id that lists this process (by
  incarnation) is returned; one that does not list it makes the follower check its
  registration and register again (epoch + 1) when the learner marked it dropped.
- `take_part` joins the spec's generation when the engine is not in it yet (two-phase: write
  `ready`, wait for `go`; a `go` of 0 means the learner gave up on that generation, so the
  follower reads the spec again), then receives the push into the engine and returns its
  version.

An actor that dies without `leave` (SIGKILL, a lost node) cannot mark itself `left`; the
launcher, which sees it die, does it on its behalf with `mark_left` before starting a
replacement, so a rebuild the learner is waiting on drops it at once instead of at the timeout.

Failure modes.
- The learner's store goes away (learner restart): every store call raises `DistError`;
  `next_push` then reconnects with a short timeout per attempt, leaves the engine's group (it
  belonged to the old store) and registers afresh, and returns None until the new learner
  writes a spec.
- A push that fails in the engine (a receiver error, a dead sender, a timeout) leaves the
  weights possibly mixed: `take_part` raises, after leaving the group and registering again
  (a new epoch), so the learner's next push rebuilds the group with this actor in it. The
  caller must not sample until a later push succeeds.
- A spec or registration that does not decode is logged, counted in `num_rejected` and
  ignored; the follower keeps the state it had.

May import torch.distributed (for the store); must not import learner, deploy or vllm (the
engine is passed in).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any, Protocol

import torch.distributed as dist

from shared.weights import protocol as wp
from shared.weights.group import mark_member, put

log = logging.getLogger("vapo.actor.membership")
_RETRY_S = 0.5
_RECONNECT_TIMEOUT_S = 1.0


def mark_left(master_addr: str, master_port: int, actor_id: int, *, timeout_s: float = 5.0) -> bool:
    """Mark a dead actor's active registration `left` on its behalf; whether it did.

    It marks whichever registration is active, so the caller (the launcher) calls it after the
    actor died and before it starts a replacement. Compare-and-set on the record read: one
    written between the read and the write is kept. An unreachable store or a record that does
    not decode is logged, not raised: the learner's join timeout still bounds the wait.
    """
    key = wp.member_key(actor_id)
    try:
        store = dist.TCPStore(master_addr, master_port, is_master=False, timeout=timedelta(seconds=timeout_s))
        if not store.check([key]):
            return False
        raw = bytes(store.get(key))
        member = wp.decode_member(raw)
        if member.state != "active":
            return False
        return mark_member(store, member, raw, "left")
    except (dist.DistError, ValueError) as e:
        log.warning("could not mark actor %d left in the weight group: %s", actor_id, str(e).splitlines()[0])
        return False


class WeightEngine(Protocol):
    """What the follower needs of `actors.engine.Engine`."""

    num_workers: int

    def join_weight_group(self, master_addr: str, master_port: int, *, rank_offset: int, world_size: int,
                          group_name: str, backend: str, timeout_s: float) -> list[int]: ...

    def apply_weights(self) -> int: ...

    def leave_weight_group(self) -> None: ...


class WeightFollower:
    """The actor's registration in the learner's store and its part in the pushes that list it."""

    def __init__(self, engine: WeightEngine, master_addr: str, master_port: int, actor_id: int, *,
                 incarnation: int, backend: str = "gloo", timeout_s: float = 120.0) -> None:
        self.engine = engine
        self.master_addr, self.master_port = master_addr, master_port
        self.actor_id, self.incarnation = actor_id, incarnation
        self.backend, self.timeout_s = backend, timeout_s
        self.epoch = 0
        self.group: str | None = None
        """The generation the engine's workers are in."""
        self.last_push = 0
        """Push id of the latest spec acted on."""
        self.num_rejected = 0
        self.latest: wp.GroupSpec | None = None
        """The latest spec read."""
        self._rejected = b""
        self._store: dist.TCPStore | None = None

    # --- store connection and registration ----------------------------------------------------------------

    def connect(self, timeout_s: float) -> None:
        """Connect to the learner's store, retrying until it is up, and register; TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not self._try_connect(min(5.0, max(deadline - time.monotonic(), 0.1))):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no weight-group store at {self.master_addr}:{self.master_port} "
                                   f"within {timeout_s:.0f}s (sync.master_addr / sync.master_port)")
            time.sleep(_RETRY_S)
        self.register()

    def _try_connect(self, timeout_s: float) -> bool:
        try:
            self._store = dist.TCPStore(self.master_addr, self.master_port, is_master=False,
                                        timeout=timedelta(seconds=timeout_s))
        except dist.DistError:  # not up (yet): the caller retries
            return False
        self._store.set_timeout(timedelta(seconds=self.timeout_s))
        return True

    @property
    def store(self) -> dist.TCPStore:
        assert self._store is not None, "connect first"
        return self._store

    def _member(self, state: str = "active") -> wp.Member:
        return wp.Member(self.actor_id, self.engine.num_workers, self.incarnation, self.epoch, state)

    def register(self) -> None:
        """Write a new registration (the next epoch); the learner's next push includes this actor."""
        self.epoch += 1
        put(self.store, wp.member_key(self.actor_id), wp.encode_member(self._member()))
        log.info("actor %d registered with the weight group (epoch %d)", self.actor_id, self.epoch)

    def leave(self) -> None:
        """Mark the registration `left` (at exit); a learner that is gone already is not an error."""
        if self._store is None:
            return
        try:
            put(self.store, wp.member_key(self.actor_id), wp.encode_member(self._member("left")))
        except dist.DistError as e:
            log.info("could not deregister from the weight group (learner gone?): %s", str(e).splitlines()[0])
        self._store = None

    def _check_registration(self) -> None:
        """Register again when the learner dropped this registration (or never saw it: a new store)."""
        raw = self.store.get(wp.member_key(self.actor_id)) if self.store.check([wp.member_key(self.actor_id)]) else None
        try:
            member = wp.decode_member(raw) if raw is not None else None
        except ValueError as e:
            self.num_rejected += 1
            log.warning("malformed registration record of actor %d: %s", self.actor_id, e)
            member = None
        if member is None or member.state != "active" or member.incarnation != self.incarnation:
            self.register()

    def _reconnect(self, error: Exception) -> None:
        log.warning("lost the weight-group store (%s); reconnecting", str(error).splitlines()[0])
        self._store = None
        if self.group is not None:
            self.engine.leave_weight_group()
            self.group = None
        self.last_push = 0
        self.latest = None
        if self._try_connect(_RECONNECT_TIMEOUT_S):
            self.register()

    # --- pushes -------------------------------------------------------------------------------------------

    def read_spec(self) -> wp.GroupSpec | None:
        """The learner's latest group spec; None when there is none yet or it does not decode."""
        if not self.store.check([wp.GROUP_SPEC_KEY]):
            return None
        raw = self.store.get(wp.GROUP_SPEC_KEY)
        if raw == self._rejected:
            return None
        try:
            self.latest = wp.decode_spec(raw)
        except ValueError as e:
            self._rejected = raw  # counted and logged once, however often it is read again
            self.num_rejected += 1
            log.warning("ignoring a malformed group spec (%d so far): %s", self.num_rejected, e)
            return None
        return self.latest

    def next_push(self) -> wp.GroupSpec | None:
        """The spec of a push this actor must receive now, or None (nothing new, or not listed)."""
        try:
            if self._store is None:
                self._reconnect(ConnectionError("not connected"))
                return None
            spec = self.read_spec()
            if spec is None or spec.push_id <= self.last_push:
                return None
            if spec.slot(self.actor_id, self.incarnation) is None:
                self.last_push = spec.push_id
                self._check_registration()
                return None
            return spec
        except dist.DistNetworkError as e:
            self._reconnect(e)
            return None

    def take_part(self, spec: wp.GroupSpec) -> int | None:
        """Join `spec`'s generation if needed and receive its push; the version, or None when the learner gave up.

        Raises what the engine raised when joining or applying failed (see the module note).
        """
        while True:
            slot = spec.slot(self.actor_id, self.incarnation)
            assert slot is not None
            self.last_push = spec.push_id
            if self.group == spec.name:
                break
            if self.group is not None:
                self.engine.leave_weight_group()
                self.group = None
            if self._handshake(spec.name):
                self._join(spec, slot)
                break
            later = self._wait_for_spec(spec.push_id)  # abandoned: the learner writes the next generation
            if later is None:
                return None
            spec = later
        try:
            return self.engine.apply_weights()
        except Exception:  # vLLM reports a worker's failure as a plain Exception
            self._after_failure()
            raise

    def _join(self, spec: wp.GroupSpec, slot: wp.Slot) -> None:
        try:
            self.engine.join_weight_group(self.master_addr, self.master_port, rank_offset=slot.rank_offset,
                                          world_size=spec.world_size, group_name=spec.name, backend=self.backend,
                                          timeout_s=self.timeout_s)
        except Exception:  # vLLM reports a worker's failure as a plain Exception
            self._after_failure()
            raise
        self.group = spec.name

    def _after_failure(self) -> None:
        """Leave the group; register anew only when the learner dropped this registration.

        A push that failed on the learner's side (another member died) is retried by the learner
        on a rebuilt group that lists this actor's current registration: a new epoch written here
        at the same time would race that retry and leave the actor pending after it had the weights.
        """
        self.engine.leave_weight_group()
        self.group = None
        try:
            self._check_registration()
        except dist.DistNetworkError as e:
            self._reconnect(e)

    def _handshake(self, name: str) -> bool:
        """Say ready for generation `name` and wait for the learner's go; False when it abandoned it."""
        self.store.set(wp.ready_key(name, self.actor_id), str(self.incarnation))
        try:
            self.store.wait([wp.go_key(name)], timedelta(seconds=2 * self.timeout_s))
        except dist.DistStoreError:
            log.warning("no go for weight group %s within %.0fs", name, 2 * self.timeout_s)
            return False
        return self.store.get(wp.go_key(name)) == b"1"

    def _wait_for_spec(self, after_push: int) -> wp.GroupSpec | None:
        """A spec newer than `after_push` that lists this actor, waiting up to the timeout; else None."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            spec = self.read_spec()
            if spec is not None and spec.push_id > after_push:
                if spec.slot(self.actor_id, self.incarnation) is not None:
                    return spec
                self.last_push = spec.push_id
                self._check_registration()
                return None
            time.sleep(0.05)
        return None

    def describe(self) -> dict[str, Any]:
        """State for logs: epoch, group, last push id, rejected specs."""
        return {"epoch": self.epoch, "group": self.group, "last_push": self.last_push, "rejected": self.num_rejected}
