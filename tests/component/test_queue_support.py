"""Helpers shared by the replay-queue component tests (this module holds no tests).

A list-backed prompt source, synthetic groups (random tokens and log-probs, real wire
messages), a synthetic actor process (spawned), and the queue run in a thread of the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import queue
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.config import AlgoConfig, LearnerConfig, QueueConfig, RolloutConfig, VapoConfig
from shared.queue.client import ActorClient, ClientSettings
from shared.queue.service import QueueThread, serve
from shared.types import Lease, RolloutGroup, make_group

SPAWN = mp.get_context("spawn")


@dataclass(frozen=True)
class Record:
    prompt: str
    ground_truth: str
    data_source: str
    index: int
    messages: Any = None


class ListSource:
    """A prompt list with a resumable position; finite unless `cycle`."""

    def __init__(self, num: int, cycle: bool = False) -> None:
        self.records = [Record(f"q{i}", str(i), "synthetic", i) for i in range(num)]
        self.pos = 0
        self.cycle = cycle

    def __next__(self) -> Record:
        if self.pos >= len(self.records) and not self.cycle:
            raise StopIteration
        self.pos += 1
        return self.records[(self.pos - 1) % len(self.records)]

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = state["pos"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cfg(*, max_staleness: int = 1, prompts_per_step: int = 4, group_size: int = 2,
             dynamic_sampling: bool = False, **queue: Any) -> VapoConfig:
    """A small, fast configuration on free loopback ports."""
    q = {"port": free_port(), "pub_port": free_port(), "max_staleness": max_staleness, "lease_timeout_s": 5.0,
         "request_timeout_s": 1.0, "retry_after_s": 0.01, "publish_interval_s": 0.05, **queue}
    return VapoConfig(queue=QueueConfig(**q),
                      rollout=RolloutConfig(prompts_per_step=prompts_per_step, samples_per_prompt=group_size),
                      learner=LearnerConfig(mini_batch_size=group_size),
                      algo=AlgoConfig(dynamic_sampling=dynamic_sampling))


def synthetic_group(lease: Lease, actor_id: int, version: int, group_size: int, max_tokens: int,
                    rng: np.random.Generator) -> RolloutGroup:
    """Random responses of random lengths (some truncated), with rewards and correctness."""
    lengths = rng.integers(1, max_tokens + 1, group_size)
    correct = rng.random(group_size) < 0.5
    return make_group(
        lease=lease, actor_id=actor_id, prompt_token_ids=rng.integers(0, 32000, 8),
        responses=[(rng.integers(0, 32000, n), -rng.exponential(1.0, n), version) for n in lengths],
        finish_reasons=["length" if n == max_tokens else "stop" for n in lengths],
        rewards=np.where(correct, 1.0, -1.0), correct=correct, gen_started_at=time.time(), gen_seconds=0.01)


@dataclass
class ActorPlan:
    """What a synthetic actor does."""

    actor_id: int
    prompts_per_lease: int = 2
    group_size: int = 2
    max_tokens: int = 16
    gen_delay_s: float = 0.0
    """Simulated generation time per lease."""
    max_leases: int | None = None
    """Stop after this many lease grants (then idle until told to stop)."""


def actor_main(settings: ClientSettings, plan: ActorPlan, events: Any, stop: Any) -> None:
    """A synthetic actor: lease, "generate" with its current weights, submit; report everything on `events`.

    Its weights follow the queue's version at once (a lease reply or a broadcast with a newer
    version stands for a finished weight load).
    """
    client = ActorClient(settings, plan.actor_id)
    rng = np.random.default_rng(plan.actor_id)
    version, granted = 0, 0
    try:
        while not stop.is_set():
            if plan.max_leases is not None and granted >= plan.max_leases:
                time.sleep(0.01)
                continue
            broadcast = client.poll_broadcast()
            if broadcast is not None:
                if broadcast.command == "stop":
                    break
                version = max(version, broadcast.version)
            reply = client.lease(plan.prompts_per_lease, version)
            now = time.monotonic()
            if reply.reason == "stale_weights":
                version = reply.version
            if not reply.leases:
                time.sleep(reply.retry_after_s)
                continue
            granted += len(reply.leases)
            grant = [(x.lease_id, x.prompt_id, x.policy_version) for x in reply.leases]
            events.put(("lease", plan.actor_id, now, grant, version))
            time.sleep(plan.gen_delay_s)
            groups = [synthetic_group(x, plan.actor_id, version, plan.group_size, plan.max_tokens, rng)
                      for x in reply.leases]
            statuses = client.submit(groups)
            events.put(("submit", plan.actor_id, time.monotonic(), [g.prompt_id for g in groups], statuses))
    finally:
        client.close()


@contextlib.contextmanager
def actors(settings: ClientSettings, plans: list[ActorPlan]) -> Iterator[tuple[Any, list[Any]]]:
    """Spawned synthetic actor processes; yields (events queue, processes) and stops them on exit."""
    events, stop = SPAWN.Queue(), SPAWN.Event()
    procs = [SPAWN.Process(target=actor_main, args=(settings, plan, events, stop), daemon=True) for plan in plans]
    for p in procs:
        p.start()
    try:
        yield events, procs
    finally:
        stop.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def drain(events: Any) -> list[tuple]:
    """Everything the actors reported so far."""
    out = []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out


@contextlib.contextmanager
def queue_thread(cfg: VapoConfig, source: Any, **kw: Any) -> Iterator[dict[str, Any]]:
    """The service in a thread of this process (`QueueThread`, as learner rank 0 runs it); yields {'stats': final}."""
    out: dict[str, Any] = {}
    service = QueueThread(cfg, source, **kw)
    try:
        yield out
    finally:
        out["stats"] = service.stop(10)
        assert not service.alive() and out["stats"] is not None


def service_main(cfg: VapoConfig, num_prompts: int, results: Any) -> None:
    """The queue as its own process (as `vapo queue` runs it); puts its final stats on `results`."""
    stats = serve(cfg, ListSource(num_prompts))
    results.put(dataclasses.asdict(stats))


def start_service_process(cfg: VapoConfig, num_prompts: int = 1000) -> tuple[Any, Any]:
    """A spawned queue process and the queue its final stats arrive on."""
    results = SPAWN.Queue()
    proc = SPAWN.Process(target=service_main, args=(cfg, num_prompts, results), daemon=True)
    proc.start()
    return proc, results
