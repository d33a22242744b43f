"""The replay queue embedded in learner rank 0's Ray actor (`queue.embedded`, the default), on a real local Ray.

What the launcher relies on: `LearnerRank.open` (rank 0's `learner.main.RankZero`) binds the queue
before it returns (so the actors and the learner's client find it), resumes from a checkpoint's cursor
and version exactly as the queue in its own process does (no prompt consumed before the checkpoint
comes again, the ones in flight come first), serves actors over TCP from inside the rank's process,
and `close` hands back the final stats.
`QueueProcess`, the queue as a Ray actor of its own (`queue.embedded=false`), does the same. The
learner's in-process (inproc) client is covered by test_queue_flow.py and, through `vapo train`, by
tests/e2e/test_train_smoke.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
from test_queue_support import free_port, make_cfg, synthetic_group

from deploy import ray_actors
from shared.config import DataConfig, SyncConfig
from shared.data.source import open_prompt_source
from shared.queue.client import ActorClient, ClientSettings, LearnerClient
from shared.queue.service import QueueThread


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.parametrize("embedded", [True, False], ids=["in-learner-rank-0", "own-process"])
def test_the_launchers_queue_resumes_from_a_checkpoint_cursor(local_ray: None, embedded: bool) -> None:
    import ray

    cfg = make_cfg(max_staleness=1, prompts_per_step=2, group_size=2)
    cfg = dataclasses.replace(cfg, data=DataConfig(builtin_train_size=64), sync=SyncConfig(master_port=free_port()))
    rng = np.random.default_rng(0)

    # A first run (here, in this process): 4 prompts leased (the admission window), 2 consumed.
    first = QueueThread(cfg, open_prompt_source(cfg))
    actor = ActorClient(ClientSettings.from_config(cfg), actor_id=0)
    learner = LearnerClient(ClientSettings.from_config(cfg, in_process=True))
    leases = actor.lease(4, 0).leases
    assert len(leases) == 4
    assert actor.submit([synthetic_group(x, 0, 0, 2, 8, rng) for x in leases[:2]]) == ["accepted"] * 2
    batch = learner.get_batch(2, timeout_s=10)
    assert sorted(g.prompt_id for g in batch.groups) == sorted(x.prompt_id for x in leases[:2])
    cursor = batch.stats.cursor  # what the learner checkpoints with this batch
    learner.close()
    actor.close()
    assert first.stop() is not None

    # The resumed run, at the checkpoint's cursor and version 3: the queue in learner rank 0's process
    # (queue.embedded), or the Ray actor of its own the launcher starts for queue.embedded=false.
    if embedded:
        host = ray_actors.LearnerRank.options(num_cpus=0).remote()
        ray.get(host.open.remote(cfg, cursor, 3), timeout=120)
    else:
        host = ray_actors.QueueProcess.options(num_cpus=0).remote(cfg, cursor, 3)
        assert ray.get(host.alive.remote(), timeout=120)  # constructed: bound
    try:
        actor = ActorClient(ClientSettings.from_config(cfg), actor_id=1)  # over TCP, as the rollout actors
        reply = actor.lease(4, 3)
        assert reply.version == 3
        resumed = [x.prompt_id for x in reply.leases]
        assert resumed[:2] == [x.prompt_id for x in leases[2:]]  # in flight at the checkpoint: issued again first
        assert not set(resumed) & {x.prompt_id for x in leases[:2]}  # consumed before it: never again
        assert len(set(resumed)) == 4 and all(x.policy_version == 3 for x in reply.leases)
        assert actor.submit([synthetic_group(x, 1, 3, 2, 8, rng) for x in reply.leases[:1]]) == ["accepted"]
        actor.close()
        stats = ray.get((host.close if embedded else host.stop).remote(), timeout=60)
    finally:
        ray.kill(host)
    assert stats.leased == 4 and stats.queued == 1 and stats.in_flight == 3 and stats.identity_holds()
