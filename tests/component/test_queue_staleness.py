"""Staleness with real actor processes: max_staleness = 0 is generate-then-train; k bounds every lag."""

from __future__ import annotations

import time

from test_queue_support import ActorPlan, ListSource, actors, drain, make_cfg, queue_thread

from shared.queue.client import ClientSettings, LearnerClient


def test_max_staleness_zero_alternates_generation_and_training() -> None:
    cfg = make_cfg(max_staleness=0, prompts_per_step=4)
    settings = ClientSettings.from_config(cfg)
    plans = [ActorPlan(i, prompts_per_lease=1, gen_delay_s=0.01) for i in range(2)]
    published = {0: 0.0}
    batches: dict[int, tuple[float, list[int]]] = {}
    with queue_thread(cfg, ListSource(1000)), actors(settings, plans) as (events, _):
        learner = LearnerClient(settings)
        for version in range(6):
            batch = learner.get_batch(4, timeout_s=10)
            batches[version] = (time.monotonic(), sorted(g.prompt_id for g in batch.groups))
            assert [g.policy_version for g in batch.groups] == [version] * 4  # lag 0, every time
            time.sleep(0.05)  # "training": nothing may be generated meanwhile
            published[version + 1] = time.monotonic()
            learner.publish_version(version + 1)
        stats = learner.stats()
        learner.close()
    leases = [(t, lease) for kind, _, t, grant, _ in drain(events) if kind == "lease" for lease in grant]
    for version, (handed_at, prompt_ids) in batches.items():
        mine = [(t, prompt_id) for t, (_, prompt_id, v) in leases if v == version]
        assert sorted(p for _, p in mine) == prompt_ids  # exactly the batch's prompts were generated at v
        assert all(published[version] <= t <= handed_at for t, _ in mine)  # between the push and the batch
    assert stats.dropped_stale == 0 and stats.version_lag_max == 0 and stats.num_expired == 0
    assert stats.identity_holds()


def test_max_staleness_k_never_hands_out_a_group_lagging_more_than_k() -> None:
    k = 1
    cfg = make_cfg(max_staleness=k, prompts_per_step=4)
    settings = ClientSettings.from_config(cfg)
    plans = [ActorPlan(0, prompts_per_lease=2), ActorPlan(1, prompts_per_lease=2),
             ActorPlan(2, prompts_per_lease=1, gen_delay_s=0.3)]  # a straggler: its groups arrive too old
    with queue_thread(cfg, ListSource(10_000)), actors(settings, plans) as (events, _):
        learner = LearnerClient(settings)
        while learner.stats().num_actors < 3:
            time.sleep(0.05)
        lags: list[int] = []
        version = 0
        while version < 12 or (learner.stats().dropped_stale == 0 and version < 100):
            batch = learner.get_batch(4, timeout_s=10)
            lags += [version - g.policy_version for g in batch.groups]
            time.sleep(0.02)  # "training"
            version += 1
            learner.publish_version(version)
        stats = learner.stats()
        learner.close()
    statuses = [s for kind, actor, _, _, sts in drain(events) if kind == "submit" and actor == 2 for s in sts]
    assert max(lags) <= k and min(lags) >= 0
    assert stats.dropped_stale > 0 and set(statuses) <= {"accepted", "stale"}  # the gate did work
    assert stats.version_lag_max <= k and stats.identity_holds()
