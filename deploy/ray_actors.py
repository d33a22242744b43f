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

Restarts back off and give up (`deploy.cluster.StartFailures`): the replacement starts after
`deploy.restart_backoff_s`, doubled per failed start in a row (a death before the actor generated
anything), and after `deploy.max_start_failures` of them the controller restarts that actor no more
and holds one line (`failure`: the actor, its error, its log) that the driver polls and ends the run
with. Whether an actor generated is its health check's `generated` (the rounds its engine returned
samples for, counted by `RolloutWorker` around the engine it builds and hands to `run_actor`); the
health check also names the actor's log (the file Ray sends the worker's stderr to), remembered so
it can be named after the process is gone. An actor that generated and died in less than a health
check interval counts as a failed start.

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
import time
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


def own_log() -> str | None:
    """The file this process's stderr goes to: in a Ray worker, its `worker-*.err` in the session's logs dir."""
    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:
        return None
    return path if path.startswith("/") and os.path.isfile(path) else None


class _CountingEngine:
    """The actor's engine, counting the rounds it returned samples for: the controller's evidence that the
    actor got going (a death before the first one is a failed start). Every other attribute is the engine's."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.num_generated = 0

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        samples = self._engine.generate(*args, **kwargs)
        self.num_generated += bool(samples)
        return samples

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@ray.remote(max_concurrency=4)
class RolloutWorker:
    """One rollout actor (vLLM engine + loop), in a thread of this Ray actor."""

    def __init__(self, cfg: VapoConfig, actor_id: int) -> None:
        _worker_logging()
        self.cfg, self.actor_id = cfg, actor_id
        self._stop = threading.Event()
        self.error: str | None = None
        self.report: Any = None
        self._engine: _CountingEngine | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from actors.main import build_engine, run_actor

        try:
            self._engine = _CountingEngine(build_engine(self.cfg, self.actor_id, self.cfg.model.path))
            try:
                self.report = run_actor(self.cfg, self.actor_id, stop_event=self._stop, engine=self._engine)
            finally:
                self._engine.shutdown()
        except Exception as e:  # reported to the controller, which restarts this actor or gives up on it
            log.exception("actor %d failed", self.actor_id)
            self.error = f"{type(e).__name__}: {e}"

    def health(self) -> dict[str, Any]:
        return {
            "alive": self._thread.is_alive(),
            "error": self.error,
            "generated": self._engine is not None and self._engine.num_generated > 0,
            "log": own_log(),
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
        self.start_failures = cluster.StartFailures(cfg.deploy.max_start_failures, cfg.deploy.restart_backoff_s)
        self.failure: str | None = None
        """The line the run ends with: an actor that failed `deploy.max_start_failures` starts in a row."""
        self._seen: dict[int, dict[str, Any]] = {}  # actor id -> the last health its current process answered
        self._due: dict[int, float] = {}  # dead actor id -> monotonic time of its restart
        self._given_up: set[int] = set()  # dead actor ids not restarted (their failed starts ended the run)
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
                    dead = self._due.pop(actor_id, None) is not None or actor_id in self._given_up
                    if not dead:
                        ray.get(worker.stop.remote(), timeout=180)
                finally:
                    ray.kill(worker)
                    self._release(actor_id)
                    self._seen.pop(actor_id, None)
                    self._given_up.discard(actor_id)
                    self.start_failures.forget(actor_id)
            return sorted(self.workers)

    def _watch(self) -> None:
        """Health checks every `deploy.health_check_s`, and each dead actor's restart when its backoff is over."""
        next_check = time.monotonic() + self.cfg.deploy.health_check_s
        while True:
            wake = min([next_check, *self._due.values()])
            if self._stop.wait(max(wake - time.monotonic(), 0.0)):
                return
            with self._lock:
                if self._stop.is_set():
                    return
                now = time.monotonic()
                for actor_id, at in list(self._due.items()):
                    if at <= now:
                        del self._due[actor_id]
                        self.restarts += 1
                        self._start(actor_id)
                if now >= next_check:
                    self._check_health()
                    next_check = time.monotonic() + self.cfg.deploy.health_check_s

    def _check_health(self) -> None:
        for actor_id, worker in list(self.workers.items()):
            if actor_id in self._due or actor_id in self._given_up:
                continue  # dead, waiting for its restart or given up on
            try:
                health = ray.get(worker.health.remote(), timeout=30)
                self._seen[actor_id] = health
                dead, error = not health["alive"] and health["error"] is not None, health["error"]
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                dead, error = True, str(e)
            if not dead or self._stop.is_set():
                continue
            self._deregister(actor_id)  # before a replacement registers under the same id
            if self.cfg.deploy.restart_actors:
                ray.kill(worker)
                self._died(actor_id, _first_line(error))

    def _died(self, actor_id: int, error: str) -> None:
        """Schedule a dead actor's restart after its backoff, or give up on it (`failure`)."""
        seen = self._seen.pop(actor_id, {})
        delay = self.start_failures.died(actor_id, generated=bool(seen.get("generated")))
        if delay is not None:
            log.warning("actor %d is dead; restarting it in %.3g s (%s)", actor_id, delay, error)
            self._due[actor_id] = time.monotonic() + delay
            return
        self._given_up.add(actor_id)
        if self.failure is not None:  # the run is ending already; its line names the first actor given up on
            log.error("actor %d failed to start %d times in a row: %s", actor_id,
                      self.start_failures.failures[actor_id], error)
            return
        logs = seen.get("log") or _logs_hint()
        self.failure = (f"actor {actor_id} failed to start {self.start_failures.failures[actor_id]} times in a row "
                        f"(deploy.max_start_failures) without generating a group: {error}; its log: {logs}")
        log.error("%s", self.failure)

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
        return {"actors": sorted(self.workers), "restarts": self.restarts, "actor_nodes": nodes,
                "start_failures": dict(self.start_failures.failures), "failure": self.failure}

    def failed(self) -> str | None:
        """The line the run ends with when an actor cannot start (`failure`), else None."""
        return self.failure

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
            self._due.clear()
            for actor_id in list(self.groups):
                self._release(actor_id)
            return reports


def _first_line(error: str, limit: int = 300) -> str:
    """The first non-empty line of an error, at most `limit` characters (Ray's and vLLM's run to many lines)."""
    line = next((x.strip() for x in error.splitlines() if x.strip()), "no error message")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _logs_hint() -> str:
    """Where a worker's log is when the worker never answered a health check: the session's logs directory
    (this process's own log is in it), whose `worker-*-PID.err` files are the workers'."""
    mine = own_log()
    return f"a worker-*.err under {os.path.dirname(mine)}" if mine else "the Ray session's logs directory"
