"""The Ray actors of a run: each a thin shell around the function its process runs, and the controller.

- `LearnerRank`: `learner.main.run_rank` in a thread; rank 0 also holds `learner.main.RankZero`
  (the embedded replay queue, its client, the weight group's membership store) from `open`, which
  the driver calls before anything connects (so a taken port fails there), to `close`, which it
  calls after the actors have stopped (they deregister in that store);
- `RolloutWorker`: `actors.main.run_actor` in a thread;
- `QueueProcess`: the replay queue in a Ray actor of its own (`queue.embedded=false`);
- `Controller`, a named Ray actor (`vapo-controller`): starts the rollout actors, restarts dead
  ones and changes their number while the run goes on (`vapo scale N`).

Loops run in a thread of a threaded Ray actor, so health checks and progress queries are answered
while they work. A dead rollout actor is detected by its health check (the Ray actor died, or its
loop ended with an error) and replaced under the same id: its leases expire in the queue and are
re-issued, and the new process registers with the learner's weight group and receives the current
weights before it generates. Before the restart the controller marks the dead one `left` in the
weight group (`actors.weight_sync.mark_left`), so a push the learner is rebuilding for goes on
without it instead of waiting `sync.timeout_s` for it.

Placement: `reserve` gives a bundle list a PACK placement group or fails with one line: at once
when no node could ever hold a bundle (`deploy.cluster.placement_problem`), after
`deploy.placement_timeout_s` when they fit but are taken (Ray's placement groups otherwise wait
forever). Each actor gets its own one-bundle group, which outlives restarts of the actor (the
replacement lands where it was) and is released when the actor is scaled away.

SIGTERM to a learner rank's own process asks that rank to stop at the next step boundary (see
`learner.main`); the handler (`shared.signals.SignalStop`) is installed in `LearnerRank.__init__`,
which runs in the process's main thread, and replaces Ray's, which would exit at once; outside a
run, or for a second signal, Ray's handler runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Any

import ray

from deploy import cluster
from shared.config import VapoConfig
from shared.signals import SignalStop

log = logging.getLogger("vapo.launch")
NAMESPACE = "vapo"


def reserve(bundles: list[dict[str, float]], what: str, timeout_s: float) -> Any:
    """A ready PACK placement group for `bundles` (None when they request nothing), or a one-line ValueError:
    at once when the cluster could never hold them, after `timeout_s` when they fit but are taken."""
    from ray.util.placement_group import placement_group

    if not any(bundles):
        return None
    nodes = ray.nodes()
    problem = cluster.placement_problem(bundles, nodes)
    if problem is not None:
        raise ValueError(f"{what}: {problem}")
    pg = placement_group(bundles, strategy="PACK")
    if not pg.wait(timeout_seconds=timeout_s):
        ray.util.remove_placement_group(pg)
        needed, available = cluster.total_request(bundles), ray.available_resources()
        free = {k: available.get(k, 0.0) for k in needed}
        nodes_line = cluster.describe_nodes(nodes)
        raise ValueError(f"{what}: {needed} not free after {timeout_s:g} s (free now: {free}; cluster: {nodes_line})")
    return pg


def in_group(pg: Any, index: int = 0) -> Any:
    """The scheduling strategy that puts a Ray actor in bundle `index` of `pg` (None: anywhere)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(pg, index) if pg is not None else None


def _worker_logging() -> None:
    """The run's own INFO lines (`vapo.*`: resumes, weight updates, restarts) from a Ray worker, on stderr,
    which Ray forwards to the driver's terminal with the worker's name and pid."""
    logger = logging.getLogger("vapo")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@ray.remote(max_concurrency=4)
class QueueProcess:
    """The replay queue service, in a thread of this Ray actor, resumed at a checkpoint's cursor and version."""

    def __init__(self, cfg: VapoConfig, cursor: dict | None, version: int) -> None:
        from shared.data.source import open_prompt_source
        from shared.queue.service import QueueThread

        _worker_logging()
        self._queue = QueueThread(cfg, open_prompt_source(cfg), cursor=cursor, initial_version=version)

    def alive(self) -> bool:
        return self._queue.alive()

    def stop(self) -> Any:
        return self._queue.stop()


@ray.remote(max_concurrency=4)
class RolloutWorker:
    """One rollout actor (vLLM engine + loop), in a thread of this Ray actor."""

    def __init__(self, cfg: VapoConfig, actor_id: int) -> None:
        _worker_logging()
        self.cfg, self.actor_id = cfg, actor_id
        self._stop = threading.Event()
        self.error: str | None = None
        self.report: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from actors.main import run_actor

        try:
            self.report = run_actor(self.cfg, self.actor_id, stop_event=self._stop)
        except Exception as e:  # reported to the controller, which restarts this actor
            log.exception("actor %d failed", self.actor_id)
            self.error = f"{type(e).__name__}: {e}"

    def health(self) -> dict[str, Any]:
        return {
            "alive": self._thread.is_alive(),
            "error": self.error,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def stop(self) -> Any:
        self._stop.set()
        self._thread.join(timeout=120)
        return dataclasses.asdict(self.report) if self.report is not None else None


@ray.remote(max_concurrency=4)
class LearnerRank:
    """One learner rank: `learner.main.run_rank` in a thread of this Ray actor (rank 0 `open`s its links first)."""

    def __init__(self) -> None:
        _worker_logging()
        self.latest: dict[str, float] = {}
        self._rank0: Any = None  # learner.main.RankZero, on rank 0 from open() to close()
        self._stop = threading.Event()
        self._running = False
        # __init__ runs in the process's main thread (run() does not), so the SIGTERM handler goes here
        SignalStop(self._stop, when=lambda: self._running).install()

    def open(self, cfg: VapoConfig, cursor: dict | None, version: int) -> None:
        """Rank 0, before the run: the queue (embedded, resumed at cursor/version), its client, the membership store."""
        from learner.main import RankZero

        self._rank0 = RankZero(cfg, cursor=cursor, version=version)

    def run(self, cfg: VapoConfig, rank: int, world: int, init_method: str, resume_from: str | None) -> dict[str, Any]:
        from learner.main import run_rank

        self._running = True
        try:
            report = run_rank(cfg, rank, world, init_method, resume_from=Path(resume_from) if resume_from else None,
                              rank0=self._rank0, stop_event=self._stop, on_step=self._on_step)
        finally:
            self._running = False
        return {"steps": report.steps, "version": report.version, "stopped": report.stopped, "run_id": report.run_id}

    def _on_step(self, metrics: dict[str, float]) -> None:
        self.latest = metrics

    def request_stop(self) -> None:
        """Stop at the next step boundary (every rank agrees on which), checkpoint, and return from run()."""
        self._stop.set()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def close(self) -> Any:
        """After the actors have stopped: close rank 0's links; the embedded queue's final stats (else None)."""
        return self._rank0.close() if self._rank0 is not None else None

    def progress(self) -> dict[str, float]:
        return self.latest


@ray.remote(max_concurrency=8)
class Controller:
    """Starts, watches, restarts and scales the rollout actors of a run (a named Ray actor)."""

    def __init__(self, cfg: VapoConfig) -> None:
        _worker_logging()
        self.cfg = cfg
        self.workers: dict[int, Any] = {}
        self.groups: dict[int, Any] = {}  # actor id -> its placement group, kept across restarts
        self.restarts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _start(self, actor_id: int) -> None:
        d = self.cfg.deploy
        gpus = d.actor_gpus * self.cfg.actors.tensor_parallel_size
        if actor_id not in self.groups:
            one = cluster.resource_bundle(d.actor_cpus, gpus, d.actor_resources)
            self.groups[actor_id] = reserve([one], f"actor {actor_id}", d.placement_timeout_s)
        self.workers[actor_id] = RolloutWorker.options(
            num_cpus=d.actor_cpus,
            num_gpus=gpus,
            resources=dict(d.actor_resources),
            scheduling_strategy=in_group(self.groups[actor_id]),
            name=f"vapo-actor-{actor_id}",
            namespace=NAMESPACE,
        ).remote(self.cfg, actor_id)

    def _release(self, actor_id: int) -> None:
        pg = self.groups.pop(actor_id, None)
        if pg is not None:
            ray.util.remove_placement_group(pg)

    def scale(self, num_actors: int) -> list[int]:
        """Start or stop actors so that `num_actors` run; returns their ids."""
        with self._lock:
            while len(self.workers) < num_actors:
                try:
                    self._start(max(self.workers, default=-1) + 1)
                except ValueError as e:
                    raise ValueError(f"{e}; {len(self.workers)} actor(s) run") from None
            while len(self.workers) > num_actors:
                actor_id = max(self.workers)
                worker = self.workers.pop(actor_id)
                try:
                    ray.get(worker.stop.remote(), timeout=180)
                finally:
                    ray.kill(worker)
                    self._release(actor_id)
            return sorted(self.workers)

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.deploy.health_check_s):
            with self._lock:
                for actor_id, worker in list(self.workers.items()):
                    try:
                        health = ray.get(worker.health.remote(), timeout=30)
                        dead = not health["alive"] and health["error"] is not None
                    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                        dead = True
                    if not dead or self._stop.is_set():
                        continue
                    self._deregister(actor_id)  # before a replacement registers under the same id
                    if self.cfg.deploy.restart_actors:
                        log.warning("actor %d is dead; restarting it", actor_id)
                        ray.kill(worker)
                        self.restarts += 1
                        self._start(actor_id)

    def _deregister(self, actor_id: int) -> None:
        """Mark a dead actor `left` in the weight group, so a rebuild waiting for it goes on without it."""
        from actors.weight_sync import mark_left

        if mark_left(self.cfg.sync.master_addr, self.cfg.sync.master_port, actor_id):
            log.warning("actor %d is dead; marked it left in the weight group", actor_id)

    def status(self) -> dict[str, Any]:
        """Actor ids, restarts, and the Ray node each actor runs on (None while it starts)."""
        nodes: dict[int, str | None] = {}
        for actor_id, worker in list(self.workers.items()):
            try:
                nodes[actor_id] = ray.get(worker.health.remote(), timeout=10)["node_id"]
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                nodes[actor_id] = None
        return {"actors": sorted(self.workers), "restarts": self.restarts, "actor_nodes": nodes}

    def kill_actor(self, actor_id: int) -> None:
        """Kill an actor's process without notice (fault tests; the watcher restarts it)."""
        ray.kill(self.workers[actor_id])

    def stop_all(self) -> list[Any]:
        self._stop.set()
        with self._lock:
            reports = []
            for worker in self.workers.values():
                try:
                    reports.append(ray.get(worker.stop.remote(), timeout=180))
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    reports.append(None)
            self.workers.clear()
            for actor_id in list(self.groups):
                self._release(actor_id)
            return reports
