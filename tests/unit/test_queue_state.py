"""shared/queue/state.py: accounting identity, admission control, staleness gate, filter, expiry, cursor."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from shared.queue.state import QueueState, keep_group
from shared.types import Lease

G = 4  # responses per group


@dataclass(frozen=True)
class Record:
    prompt: str
    ground_truth: str
    data_source: str
    index: int
    messages: Any = None


class ListSource:
    """A finite prompt list with a resumable position (the shape of shared/data/records.py's PromptSource)."""

    def __init__(self, num: int) -> None:
        self.records = [Record(f"q{i}", str(i), "arith", i) for i in range(num)]
        self.pos = 0

    def __next__(self) -> Record:
        if self.pos >= len(self.records):
            raise StopIteration
        self.pos += 1
        return self.records[self.pos - 1]

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = state["pos"]


def _state(num_prompts: int = 1000, **kw: Any) -> QueueState:
    kw = {"prompts_per_version": 4, "max_staleness": 1, "lease_timeout_s": 10.0, "group_size": G,
          "lease_id_base": 0, **kw}
    return QueueState(ListSource(num_prompts), **kw)


def _submit(q: QueueState, lease: Lease, *, version: int | None = None, correct: list[bool] | None = None,
            actor: int = 0, incarnation: int = 0, now: float = 0.0, nbytes: int = 100) -> str:
    return q.submit(lease_id=lease.lease_id, prompt_id=lease.prompt_id, actor_id=actor, incarnation=incarnation,
                    policy_version=lease.policy_version if version is None else version,
                    correct=correct or [True, False, True, False], nbytes=nbytes, payload=lease.prompt_id, now=now)


def _check(q: QueueState, now: float = 0.0) -> None:
    assert q.snapshot(now).identity_holds()


def test_admission_grants_the_window_then_waits_for_the_version() -> None:
    q = _state(max_staleness=1)
    leases, reason = q.lease(0, 0, 0, 100, now=0)
    assert len(leases) == 8 and reason == "capacity"  # (S + 1) * P
    for lease in leases:
        assert _submit(q, lease) == "accepted"
    assert q.take_batch(4) == [0, 1, 2, 3]
    assert q.lease(0, 0, 0, 100, now=0) == ([], "capacity")  # taking a batch alone admits nothing
    q.set_version(1)
    leases, _ = q.lease(0, 0, 1, 100, now=0)
    assert [x.prompt_id for x in leases] == [8, 9, 10, 11]
    _check(q)


def test_issue_inequality_holds_in_steady_state() -> None:
    q = _state(max_staleness=2)
    for version in range(6):
        leases, _ = q.lease(0, 0, version, 1000, now=0)
        for lease in leases:
            _submit(q, lease)
        s = q.snapshot(0)
        assert s.in_flight + s.queued <= (2 + 1) * 4
        assert len(q.take_batch(4) or []) == 4
        q.set_version(version + 1)
    assert q.stats.dropped_stale == 0


def test_max_staleness_zero_is_generate_then_train() -> None:
    q = _state(max_staleness=0)
    for version in range(5):
        leases, reason = q.lease(0, 0, version, 100, now=0)
        assert len(leases) == 4 and reason == "capacity"
        assert q.take_batch(4) is None  # the learner waits for the generation
        for lease in leases:
            _submit(q, lease)
        assert q.lease(0, 0, version, 100, now=0) == ([], "capacity")
        assert q.take_batch(4) == [lease.prompt_id for lease in leases]
        assert q.lease(0, 0, version, 100, now=0) == ([], "capacity")  # no generation while training
        q.set_version(version + 1)
        assert q.lease(0, 0, version, 100, now=0) == ([], "stale_weights")  # must load v + 1 first
    assert q.stats.version_lag_max == 0 and q.stats.dropped_stale == 0


def test_stale_groups_are_dropped_counted_and_their_prompts_leased_again() -> None:
    q = _state(max_staleness=1)
    old, _ = q.lease(0, 0, 0, 2, now=0)
    for lease in old:
        _submit(q, lease)
    q.set_version(1)
    fresh, _ = q.lease(1, 0, 1, 2, now=0)
    _submit(q, fresh[0], actor=1)
    assert q.set_version(2) == 2  # the two version-0 groups now lag 2 > 1
    assert q.stats.dropped_stale == 2 and q.queued == 1
    again, _ = q.lease(1, 0, 2, 2, now=0)
    assert [x.prompt_id for x in again] == [0, 1]  # re-issued first, under new lease ids
    assert {x.lease_id for x in again}.isdisjoint({x.lease_id for x in old})
    assert _submit(q, fresh[1], actor=1, version=0) == "stale"  # too old already on arrival
    _check(q)


def test_batches_hand_out_the_oldest_version_first() -> None:
    q = _state(max_staleness=3, prompts_per_version=8)
    leases, _ = q.lease(0, 0, 0, 6, now=0)
    for lease, version in zip(leases, [2, 0, 1, 0, 2, 1], strict=True):
        _submit(q, lease, version=version)
    assert q.take_batch(6) == [1, 3, 2, 5, 0, 4]


def test_silent_actor_leases_expire_and_a_late_result_is_discarded() -> None:
    q = _state(lease_timeout_s=5.0)
    (a,), _ = q.lease(0, 0, 0, 1, now=0)
    q.touch(0, 0, now=4)  # a heartbeat renews
    assert q.expire(now=8) == 0
    assert q.expire(now=9.5) == 1
    assert q.stats.expired_and_reissued == 1
    _check(q, 9.5)
    (b,), _ = q.lease(1, 0, 0, 1, now=10)
    assert b.prompt_id == a.prompt_id and b.lease_id != a.lease_id
    assert _submit(q, a, now=11) == "late"
    assert q.stats.rejected_late == 1 and q.stats.expired_and_reissued == 0 and q.stats.num_expired == 1
    assert _submit(q, b, actor=1, now=11) == "accepted"
    assert _submit(q, b, actor=1, now=11) == "duplicate"
    assert _submit(q, a, now=11) == "duplicate"
    assert q.take_batch(1) == [a.prompt_id]  # trained on once
    _check(q, 11)


def test_a_restarted_actor_loses_its_old_leases_at_once() -> None:
    q = _state()
    old, _ = q.lease(0, incarnation=1, actor_version=0, num_prompts=3, now=0)
    new, _ = q.lease(0, incarnation=2, actor_version=0, num_prompts=3, now=1)
    assert [x.prompt_id for x in new] == [x.prompt_id for x in old]
    assert q.stats.expired_and_reissued == 3
    assert q.lease(0, incarnation=1, actor_version=0, num_prompts=1, now=2) == ([], "replaced")
    assert _submit(q, old[0], incarnation=1) == "late"
    _check(q)


def test_wrong_groups_are_rejected_and_counted() -> None:
    q = _state()
    (lease,), _ = q.lease(0, 0, 0, 1, now=0)
    bogus = Lease(**{**lease.__dict__, "lease_id": 999_999})
    assert _submit(q, bogus) == "rejected:unknown_lease"
    moved = Lease(**{**lease.__dict__, "prompt_id": lease.prompt_id + 1})
    assert _submit(q, moved) == "rejected:wrong_prompt"
    assert _submit(q, lease, correct=[True]) == "rejected:wrong_group_size"
    assert q.stats.rejected == {"unknown_lease": 1, "wrong_prompt": 1, "wrong_group_size": 1}
    assert _submit(q, lease) == "accepted"  # the lease survived the bad attempts


def test_only_the_holder_of_a_lease_may_submit_for_it() -> None:
    q = _state(lease_timeout_s=5.0)
    (lease,), _ = q.lease(0, 7, 0, 1, now=0)
    assert _submit(q, lease, actor=1, incarnation=7) == "rejected:wrong_actor"  # another actor
    assert _submit(q, lease, actor=0, incarnation=8) == "rejected:wrong_actor"  # the same id, another process
    assert q.stats.rejected == {"wrong_actor": 2}
    assert q.stats.duplicates == 0
    assert _submit(q, lease, actor=0, incarnation=8, now=1) == "rejected:wrong_actor"  # its leases expired...
    (again,), _ = q.lease(0, 8, 0, 1, now=1)  # ...so the restarted actor gets the prompt under a new lease
    assert again.prompt_id == lease.prompt_id
    assert _submit(q, lease, actor=1, incarnation=0, now=2) == "rejected:wrong_actor"  # an ended lease is held too
    assert _submit(q, lease, actor=0, incarnation=7, now=2) == "late"  # the holder's late result
    assert _submit(q, again, actor=2, incarnation=0, now=2) == "rejected:wrong_actor"
    assert _submit(q, again, actor=0, incarnation=8, now=2) == "accepted"
    assert _submit(q, again, actor=2, incarnation=0, now=2) == "rejected:wrong_actor"  # not a duplicate of it
    assert q.stats.duplicates == 0 and q.stats.rejected == {"wrong_actor": 6}
    assert q.take_batch(1) == [lease.prompt_id]
    _check(q, 2)


def test_dynamic_sampling_refills_then_hands_out_a_short_batch_after_bounded_rounds() -> None:
    q = _state(max_staleness=0, dynamic_sampling=True, max_filter_rounds=1)
    leased = 0
    for _ in range(10):
        leases, _ = q.lease(0, 0, 0, 100, now=0)
        leased += len(leases)
        for i, lease in enumerate(leases):  # one informative group per round, the rest all-correct
            _submit(q, lease, correct=[True, False, True, True] if i == 0 else [True] * G)
    assert leased == 8  # P plus max_filter_rounds * P extra, never more
    assert q.stats.filtered == leased - q.queued
    batch = q.take_batch(4)
    assert batch is not None and 0 < len(batch) < 4 and q.stats.short_batches == 1
    _check(q)


def test_dynamic_sampling_fills_the_batch_when_enough_groups_pass() -> None:
    q = _state(max_staleness=0, dynamic_sampling=True, max_filter_rounds=2)
    rng = random.Random(1)
    while q.take_batch(4) is None:
        leases, _ = q.lease(0, 0, 0, 100, now=0)
        for lease in leases:
            _submit(q, lease, correct=[rng.random() < 0.5 for _ in range(G)])
    assert q.stats.consumed == 4 and q.stats.short_batches == 0


def test_memory_bounds_backpressure_actors() -> None:
    q = _state(max_staleness=10, max_queued_groups=3)
    leases, _ = q.lease(0, 0, 0, 5, now=0)
    assert [_submit(q, x) for x in leases] == ["accepted"] * 3 + ["busy"] * 2
    assert q.lease(0, 0, 0, 1, now=0) == ([], "memory")
    assert q.take_batch(4) == [0, 1, 2]  # full memory: no progress possible, a short batch
    q2 = _state(max_staleness=10, max_queued_bytes=250)
    leases, _ = q2.lease(0, 0, 0, 4, now=0)
    assert [_submit(q2, x, nbytes=100) for x in leases] == ["accepted", "accepted", "busy", "busy"]
    assert q2.take_batch(1) == [0]
    assert _submit(q2, leases[2], nbytes=100) == "accepted"
    _check(q2)


def test_version_cannot_go_back() -> None:
    q = _state()
    q.set_version(3)
    with pytest.raises(ValueError, match="went back"):
        q.set_version(2)


def test_versions_with_unchanged_weights_keep_their_weights_version() -> None:
    q = _state()
    q.set_version(1, 0)  # value pretraining: version 1 has version 0's weights
    q.set_version(2, 0)
    assert (q.version, q.weights_version) == (2, 0)
    q.set_version(3)  # a push
    assert (q.version, q.weights_version) == (3, 3)
    with pytest.raises(ValueError, match=r"weights version 2 of version 4 is not in \[3, 4\]"):
        q.set_version(4, 2)  # weights cannot go back
    with pytest.raises(ValueError, match="not in"):
        q.set_version(4, 5)  # nor be newer than their version


def _random_run(q: QueueState, rng: random.Random, steps: int, actors: dict[int, list[Lease]],
                trained: list[int], stop_at_batch: int | None = None) -> dict[str, Any] | None:
    """Random actor/learner behaviour; checks the identity after every operation."""
    now = 0.0
    for _ in range(steps):
        now += rng.random()
        op = rng.random()
        actor = rng.randrange(3)
        if op < 0.3:
            leases, _ = q.lease(actor, 0, q.version - rng.randrange(2), rng.randrange(1, 4), now)
            actors.setdefault(actor, []).extend(leases)
        elif op < 0.7:
            if not actors.get(actor):
                continue
            lease = actors[actor].pop(rng.randrange(len(actors[actor])))
            if rng.random() < 0.1:  # a hostile peer first tries the lease under another actor's name
                assert _submit(q, lease, actor=actor + 1, now=now) == "rejected:wrong_actor"
            _submit(q, lease, actor=actor, now=now, correct=[rng.random() < 0.5 for _ in range(G)],
                    version=lease.policy_version - rng.randrange(2) if lease.policy_version else 0)
        elif op < 0.72:
            now += 6  # everyone is silent for a while: some leases expire
            q.expire(now)
        else:
            batch = q.take_batch(4)
            if batch is not None:
                trained.extend(batch)
                if stop_at_batch is not None and q.stats.batches == stop_at_batch:
                    return q.cursor_state()
                q.set_version(q.version + rng.randrange(2))  # a learner step, sometimes without a push
        _check(q, now)
        assert q.stats.version_lag_max <= q.max_staleness
    return None


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dynamic", [False, True])
def test_identity_holds_at_every_step_of_random_runs(seed: int, dynamic: bool) -> None:
    q = _state(num_prompts=10_000, dynamic_sampling=dynamic, max_filter_rounds=2, lease_timeout_s=5.0)
    trained: list[int] = []
    _random_run(q, random.Random(seed), 1500, {}, trained)
    assert len(trained) == len(set(trained)) > 40  # never trained on twice
    assert q.stats.consumed == len(trained)


@pytest.mark.parametrize("seed", range(5))
def test_resuming_from_a_cursor_neither_repeats_nor_skips(seed: int) -> None:
    rng = random.Random(seed)
    q = _state(num_prompts=60, lease_timeout_s=5.0, max_staleness=2)
    before: list[int] = []
    cursor = _random_run(q, rng, 10_000, {}, before, stop_at_batch=3)
    assert cursor is not None
    resumed = QueueState(ListSource(60), prompts_per_version=4, max_staleness=2, lease_timeout_s=5.0, group_size=G,
                         initial_version=q.version, cursor=cursor)
    assert resumed.cursor_state() == cursor  # a cursor taken before anything moved is the same cursor
    after: list[int] = []
    now = 0.0
    while not resumed.exhausted or resumed.snapshot(now).in_flight or resumed.queued:
        leases, _ = resumed.lease(0, 0, resumed.version, 8, now)
        for lease in leases:
            _submit(resumed, lease, now=now)
        after.extend(resumed.take_batch(4) or [])
        resumed.set_version(resumed.version + 1)
    assert sorted(before + after) == list(range(60))


def test_metrics_are_namespaced_and_lag_is_averaged_over_consumed_groups() -> None:
    q = _state(max_staleness=2)
    leases, _ = q.lease(0, 0, 0, 4, now=0)
    for lease in leases:
        _submit(q, lease)
    q.set_version(2)
    q.take_batch(4)
    metrics = q.snapshot(0).metrics()
    assert metrics["queue/version_lag_mean"] == 2.0 and metrics["queue/version_lag_max"] == 2.0
    assert "async/version_lag_mean" not in metrics  # per step, the learner reports its batch's lag
    assert metrics["queue/consumed"] == 4.0 and metrics["async/dropped_stale"] == 0.0


@pytest.mark.parametrize(
    "flags, keep",
    [([True, False, True], True), ([True, True], False), ([False, False, False], False), ([True], False), ([], False)],
)
def test_keep_group_keeps_only_groups_with_a_right_and_a_wrong_answer(flags: list[bool], keep: bool) -> None:
    assert keep_group(flags) is keep
    assert keep_group(np.array(flags, dtype=bool)) is keep
