"""Faults with real processes: a killed actor, a late actor, a slow actor, a restarted queue, SIGTERM."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from test_queue_support import (
    ActorPlan,
    ListSource,
    actors,
    drain,
    make_cfg,
    queue_thread,
    start_service_process,
    synthetic_group,
)

from shared import wire
from shared.queue.client import ActorClient, ClientSettings, LearnerClient
from shared.queue.transport import Requester
from shared.types import Lease, QueueStats

RNG = np.random.default_rng(0)


def _wait_for(events: Any, kind: str, timeout_s: float = 10.0) -> tuple:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in drain(events):
            if event[0] == kind:
                return event
        time.sleep(0.01)
    raise AssertionError(f"no {kind} event within {timeout_s}s")


def _lease_until(client: ActorClient, prompt_ids: set[int], timeout_s: float = 5.0) -> list[Lease]:
    """Lease until the given prompts came back; returns every lease granted meanwhile."""
    got: list[Lease] = []
    deadline = time.monotonic() + timeout_s
    while not prompt_ids <= {x.prompt_id for x in got}:
        assert time.monotonic() < deadline, f"prompts {prompt_ids} were never re-issued"
        reply = client.lease(4, 0)
        got += reply.leases
        time.sleep(0.02)
    return got


def _submit_all(client: ActorClient, leases: list[Lease], actor_id: int) -> list[str]:
    return client.submit([synthetic_group(x, actor_id, 0, 2, 8, RNG) for x in leases])


def test_a_killed_actor_prompts_are_reissued_after_the_timeout() -> None:
    cfg = make_cfg(max_staleness=0, prompts_per_step=4, lease_timeout_s=0.5)
    settings = ClientSettings.from_config(cfg)
    with queue_thread(cfg, ListSource(100)), actors(settings, [ActorPlan(0, max_leases=2, gen_delay_s=60)]) as (
            events, (proc,)):
        _, _, granted_at, dead_leases, _ = _wait_for(events, "lease")
        proc.kill()  # mid-lease, without a word
        survivor = ActorClient(settings, actor_id=9)
        leases = _lease_until(survivor, {p for _, p, _ in dead_leases})
        assert time.monotonic() - granted_at >= 0.5
        assert {x.lease_id for x in leases}.isdisjoint({lid for lid, _, _ in dead_leases})
        assert _submit_all(survivor, leases, 9) == ["accepted"] * 4
        learner = LearnerClient(settings)
        batch = learner.get_batch(4, timeout_s=5)
        assert sorted(g.prompt_id for g in batch.groups) == [0, 1, 2, 3]
        assert batch.stats.expired_and_reissued == 2 and batch.stats.identity_holds()
        survivor.close()
        learner.close()


def test_a_late_duplicate_is_discarded_and_counted() -> None:
    cfg = make_cfg(max_staleness=0, prompts_per_step=4, lease_timeout_s=0.5)
    settings = ClientSettings.from_config(cfg)
    slow = ActorPlan(0, max_leases=2, gen_delay_s=1.5)  # silent for three lease timeouts
    with queue_thread(cfg, ListSource(100)), actors(settings, [slow]) as (events, _):
        _, _, _, slow_leases, _ = _wait_for(events, "lease")
        fast = ActorClient(settings, actor_id=9)
        leases = _lease_until(fast, {p for _, p, _ in slow_leases})
        assert _submit_all(fast, leases, 9) == ["accepted"] * 4
        _, _, _, late_prompts, statuses = _wait_for(events, "submit")
        assert sorted(late_prompts) == sorted(p for _, p, _ in slow_leases) and statuses == ["late", "late"]
        learner = LearnerClient(settings)
        batch = learner.get_batch(4, timeout_s=5)
        assert {g.actor_id for g in batch.groups} == {9}  # the late copies were never queued
        assert sorted(g.prompt_id for g in batch.groups) == [0, 1, 2, 3]
        stats = learner.stats()
        assert stats.rejected_late == 2 and stats.expired_and_reissued == 0 and stats.identity_holds()
        fast.close()
        learner.close()


def test_heartbeats_keep_a_slow_actor_leases_alive() -> None:
    cfg = make_cfg(lease_timeout_s=0.5)
    settings = ClientSettings.from_config(cfg)
    with queue_thread(cfg, ListSource(100)):
        client = ActorClient(settings, actor_id=1)
        leases = client.lease(2, 0).leases
        client.start_heartbeat(0.05)
        time.sleep(1.5)  # a long generation: three lease timeouts
        assert _submit_all(client, leases, 1) == ["accepted", "accepted"]
        client.close()


def test_clients_survive_a_queue_restart() -> None:
    cfg = make_cfg(max_staleness=1, prompts_per_step=4, request_timeout_s=3.0)  # a process start can be slow
    settings = ClientSettings.from_config(cfg)
    proc, _ = start_service_process(cfg)
    actor, learner = ActorClient(settings, actor_id=1), LearnerClient(settings)
    assert len(actor.lease(2, 0).leases) == 2
    proc.kill()
    proc.join()
    pending: dict[str, Any] = {}
    call = threading.Thread(target=lambda: pending.update(reply=actor.lease(2, 0)))
    call.start()  # a request made while the queue is down...
    time.sleep(0.6)
    proc, _ = start_service_process(cfg)  # ...is answered by the new queue
    call.join(20)
    assert len(pending["reply"].leases) == 2
    stats = learner.stats()
    assert stats.leased == 2 and stats.identity_holds()
    proc.kill()
    proc.join()
    actor.close()
    learner.close()


def test_sigterm_stops_cleanly_and_reports_unconsumed_groups() -> None:
    cfg = make_cfg(max_staleness=1, prompts_per_step=4)
    settings = ClientSettings.from_config(cfg)
    proc, results = start_service_process(cfg)
    actor, learner = ActorClient(settings, actor_id=1), LearnerClient(settings)
    leases = actor.lease(4, 0).leases
    assert _submit_all(actor, leases, 1) == ["accepted"] * 4
    assert len(learner.get_batch(2, timeout_s=5).groups) == 2
    waiting: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: waiting.update(batch=learner.get_batch(10, timeout_s=10)))
    waiter.start()
    time.sleep(0.3)  # the request is parked in the queue
    proc.terminate()  # SIGTERM
    waiter.join(10)
    assert waiting["batch"].stopping and waiting["batch"].groups == []
    final = results.get(timeout=10)
    proc.join(10)
    assert proc.exitcode == 0
    stats = QueueStats(**final)
    assert stats.consumed == 2 and stats.queued == 2 and stats.identity_holds()
    assert stats.cursor == {"source": {"pos": 2}, "skip": []}  # the two unconsumed prompts are pending
    actor.close()
    learner.close()


def test_a_resent_request_is_executed_once() -> None:
    cfg = make_cfg()
    settings = ClientSettings.from_config(cfg)
    with queue_thread(cfg, ListSource(100)):
        rq = Requester(settings.address, name="resender")
        learner = LearnerClient(settings)
        frames = wire.encode("lease", {"actor_id": 3, "incarnation": 1, "policy_version": 0, "num_prompts": 2})
        req_id = rq.send(frames)
        deadline = time.monotonic() + 5
        while learner.stats().leased < 2:  # executed and answered; the reply waits unread in the socket
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rq.keep_alive(attempt_s=0.0)  # the reply is lost with the old socket; a new one resends the request
        assert rq.reconnects == 1
        reply = wire.decode(rq.wait(req_id, timeout_s=5, attempt_s=5), max_bytes=1 << 20)
        assert len(reply.body["leases"]) == 2
        assert learner.stats().leased == 2  # the resend was answered from the cache, not granted again
        rq.close()
        learner.close()
