"""Pipelined requests: many submits in flight per actor, each executed once and answered with its own status."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import zmq
from test_queue_support import ListSource, make_cfg, queue_thread, start_service_process, synthetic_group

from shared import wire
from shared.queue.client import ActorClient, ClientSettings, LearnerClient
from shared.queue.submit import SubmitPipeline
from shared.queue.transport import Requester
from shared.types import Lease, RolloutGroup

RNG = np.random.default_rng(0)


def _group(lease: Lease, actor_id: int = 1, **changes: object) -> RolloutGroup:
    group = synthetic_group(lease, actor_id, 0, 2, 8, RNG)
    for name, value in changes.items():
        setattr(group, name, value)
    return group


def _pipeline(settings: ClientSettings, actor: ActorClient, **window: int) -> tuple[Requester, SubmitPipeline]:
    """The submit side of `actor` on a connection of its own, with the window under test."""
    rq = Requester(settings.address)
    ids = {"actor_id": actor.actor_id, "incarnation": actor.incarnation}
    return rq, SubmitPipeline(rq, ids, max_message_bytes=settings.max_message_bytes,
                              request_timeout_s=settings.request_timeout_s, **window)


def test_pipelined_submits_are_each_accounted_for_and_refused_groups_get_their_reason() -> None:
    cfg = make_cfg(max_staleness=100, prompts_per_step=8, group_size=2)
    settings = ClientSettings.from_config(cfg)
    with queue_thread(cfg, ListSource(100)):
        actor, learner = ActorClient(settings, actor_id=1), LearnerClient(settings)
        rq, pipeline = _pipeline(settings, actor, max_in_flight=3)
        leases = actor.lease(8, 0).leases
        assert len(leases) == 8
        cases = [
            *[(_group(x), "accepted") for x in leases[:2]],
            (_group(leases[2], behavior_logprobs=np.zeros(1, np.float32)), "rejected:length_mismatch"),
            (_group(leases[3], actor_id=2), "rejected:wrong_actor"),
            (_group(Lease(12345, 3, "q", "3", "synthetic", None, 0)), "rejected:unknown_lease"),
            *[(_group(x), "accepted") for x in leases[4:8]],
            (_group(leases[0]), "duplicate"),
        ]

        def groups() -> Iterator[RolloutGroup]:
            for group, _ in cases:
                yield group  # sent before the next is taken, without waiting for its reply
                assert rq.in_flight <= 3

        assert pipeline.submit(groups(), timeout_s=10) == [status for _, status in cases]  # one final status each
        assert rq.in_flight == 0 and pipeline.submit([]) == []
        stats = learner.stats()
        assert stats.queued == 6 and stats.duplicates == 1 and stats.identity_holds()
        # a malformed group is refused once more when it travelled with others and was then resent alone
        assert stats.rejected["wrong_actor"] == 1 and stats.rejected["unknown_lease"] == 1
        assert stats.rejected["length_mismatch"] in (1, 2) and len(stats.rejected) == 3
        rq.close()
        actor.close()
        learner.close()


def test_a_full_queue_answers_busy_and_the_groups_are_resent_until_the_learner_makes_room() -> None:
    cfg = make_cfg(max_staleness=3, prompts_per_step=2, group_size=2, max_queued_groups=2)
    settings = ClientSettings.from_config(cfg)
    with queue_thread(cfg, ListSource(100)):
        actor, learner = ActorClient(settings, actor_id=1), LearnerClient(settings)
        rq, pipeline = _pipeline(settings, actor, max_in_flight=4)
        leases = actor.lease(6, 0).leases
        assert len(leases) == 6
        taken: list[int] = []

        def learn() -> None:
            for _ in range(3):
                taken.extend(g.prompt_id for g in learner.get_batch(2, timeout_s=10).groups)

        with pytest.raises(TimeoutError):  # two are taken, the other four are held back (busy) and resent
            pipeline.submit([_group(x) for x in leases], timeout_s=0.5)
        deadline = time.monotonic() + 5
        while learner.stats().queued < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        assert learner.stats().queued == 2
        thread = threading.Thread(target=learn)
        thread.start()
        assert pipeline.submit([], timeout_s=10) == ["accepted"] * 6  # the next submit carries the six on
        thread.join(10)
        assert sorted(taken) == sorted(x.prompt_id for x in leases)
        stats = learner.stats()
        assert stats.consumed == 6 and stats.queued == 0 and stats.identity_holds()
        rq.close()
        actor.close()
        learner.close()


def test_a_reconnect_resends_every_outstanding_request_and_each_runs_once() -> None:
    cfg = make_cfg(max_staleness=100)
    settings = ClientSettings.from_config(cfg)
    with queue_thread(cfg, ListSource(100)):
        rq, learner = Requester(settings.address, name="pipeliner"), LearnerClient(settings)
        frames = wire.encode("lease", {"actor_id": 3, "incarnation": 1, "policy_version": 0, "num_prompts": 2})
        req_ids = [rq.send(frames) for _ in range(3)]
        assert rq.in_flight == 3
        deadline = time.monotonic() + 5
        while learner.stats().leased < 6:  # all three executed; their replies wait unread in the socket
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rq.keep_alive(attempt_s=0.0)  # the replies are lost with the old socket; a new one resends all three
        replies = [wire.decode(rq.wait(r, timeout_s=5, attempt_s=5), max_bytes=1 << 20) for r in reversed(req_ids)]
        granted = [x.prompt_id for reply in replies for x in reply.body["leases"]]
        assert len(granted) == len(set(granted)) == 6
        assert learner.stats().leased == 6 and rq.reconnects == 1  # answered from the cache, not granted again
        rq.close()
        learner.close()


def test_replies_below_the_ack_floor_are_released_and_their_resends_dropped() -> None:
    cfg = make_cfg(max_staleness=100)
    settings = ClientSettings.from_config(cfg)
    with queue_thread(cfg, ListSource(100)):
        learner = LearnerClient(settings)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(settings.address)
        lease = wire.encode("lease", {"actor_id": 3, "incarnation": 1, "policy_version": 0, "num_prompts": 1})

        def send(req_id: int, floor: int) -> dict | None:
            sock.send_multipart([b"raw", req_id.to_bytes(8, "little") + floor.to_bytes(8, "little"), *lease])
            if not sock.poll(500):
                return None
            tag, *reply = sock.recv_multipart()
            assert int.from_bytes(tag, "little") == req_id
            return msgpack.unpackb(reply[0])

        first, second = send(1, 1), send(2, 1)  # two in flight: the floor stays at 1
        assert first is not None and second is not None
        assert send(1, 1) == first  # still open (the floor is 1): replayed from the cache
        third = send(3, 3)  # acknowledges 1 and 2
        assert third is not None and send(2, 2) is None  # released: a delayed duplicate, dropped
        assert send(3, 3) == third
        assert send(5, 6) is None  # a floor above the request id is a bad envelope
        stats = learner.stats()
        assert stats.leased == 3 and stats.rejected == {"bad_envelope": 1}
        sock.close()
        learner.close()


@pytest.mark.parametrize("window", [{"max_in_flight": 1}, {"max_in_flight": 8, "max_in_flight_bytes": 1}],
                         ids=["one_request", "one_byte"])
def test_groups_taken_while_the_window_is_full_travel_together_and_a_refusal_is_sorted_out_per_group(
        window: dict[str, int]) -> None:
    """The window is full at `max_in_flight` requests, or at `max_in_flight_bytes` once one request is in flight."""
    cfg = make_cfg(max_staleness=100, prompts_per_step=8)
    settings = ClientSettings.from_config(cfg)
    proc, _ = start_service_process(cfg)
    try:
        actor, learner = ActorClient(settings, actor_id=1), LearnerClient(settings)
        rq, pipeline = _pipeline(settings, actor, **window)
        leases = actor.lease(3, 0).leases
        os.kill(proc.pid, signal.SIGSTOP)  # the queue answers nothing until SIGCONT

        def groups() -> Iterator[RolloutGroup]:
            yield _group(leases[0])  # the one request in flight
            yield _group(leases[1], behavior_logprobs=np.zeros(1, np.float32))  # these two wait,
            yield _group(leases[2])  # then go out as one message, which the queue refuses whole
            assert rq.in_flight == 1
            os.kill(proc.pid, signal.SIGCONT)

        assert pipeline.submit(groups(), timeout_s=10) == ["accepted", "rejected:length_mismatch", "accepted"]
        stats = learner.stats()
        assert stats.rejected == {"length_mismatch": 2}  # the pair, then the bad group alone
        assert stats.queued == 2 and stats.identity_holds()
        learner.control("shutdown")
        rq.close()
        actor.close()
        learner.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
