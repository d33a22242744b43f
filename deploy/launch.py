"""The Ray launcher: places the replay queue, the learner ranks and the actors, watches them, scales actors.

The only module that imports Ray. `train(cfg)` is what `vapo train CONFIG` runs:

1. resolve paths (the tiny model is built on first use; relative run and MLflow paths become
   absolute, since Ray workers do not share the driver's working directory);
2. `ray.init` (a local instance unless `deploy.ray_address`); a placement group reserves every
   learner rank's CPUs/GPUs (and `deploy.learner_resources`) together, and each actor gets its own
   one-bundle group (`deploy.actor_resources` places actors on the nodes that were started with that
   resource), so a run that cannot fit fails with the resources it asked for rather than hanging
   half-started: at once when no node could ever hold a bundle, after `deploy.placement_timeout_s`
   when they fit but are taken (Ray's placement groups otherwise wait forever);
3. the learner ranks (rank 0 owns the queue client, the weight-group membership manager and the
   MLflow run), the queue and the controller. The queue (`shared.queue.service.QueueThread`; on
   resume it starts from the checkpoint's cursor and version) runs by default (`queue.embedded`)
   in a thread of learner rank 0's process: the learner takes its batches over inproc, without a
   copy, so rollouts cross the network once, from an actor into the learner, as in a bare
   PUSH/PULL pair (`bench/queue.py`); `queue.host` is then learner rank 0's machine. With
   `queue.embedded=false` it is a Ray actor of its own pinned to the driver's node (`queue.host`
   is the machine `vapo train` runs on), and every rollout byte crosses the loopback or network
   twice. The controller, a named Ray actor (`vapo-controller`), starts the rollout actors,
   restarts dead ones and changes their number while the run goes on (`vapo scale N`,
   `deploy/start_cluster.sh scale N`);
4. progress lines (step, reward, accuracy, length, version lag, tokens/s, ETA) until the learner
   finishes; then the actors and the queue are stopped and the run is closed.

Actors and learner ranks run their loops in a thread of a threaded Ray actor, so health checks and
progress queries are answered while they work. A dead rollout actor is detected by its health
check (the Ray actor died, or its loop ended with an error) and replaced under the same id: its
leases expire in the queue and are re-issued, and the new process registers with the learner's
weight group and receives the current weights before it generates. Before the restart the
controller marks the dead one `left` in the weight group (`actors.weight_sync.mark_left`), so a push
the learner is rebuilding for goes on without it instead of waiting `sync.timeout_s` for it.

A cluster (`deploy/start_cluster.sh`, several nodes) is joined with `connect`; `cluster_status` reads
its nodes and the running job (actors, where they run, the learner's last step) for `vapo status`.
An actor's placement group outlives restarts of the actor (the replacement lands where it was) and is
released when the actor is scaled away.

Stopping: SIGINT/SIGTERM to the driver (Ctrl-C) asks every learner rank to stop; SIGTERM to a learner
rank's own process does the same for that rank (its handler is installed in the actor's `__init__`, which
runs in the process's main thread, and replaces Ray's, which would exit at once). The ranks agree on the
step boundary to stop at (`learner.main`), write a checkpoint of it and return; the actors and the queue
are then stopped as at the end of a run, and `resume=true` continues from that checkpoint. A second signal
to the driver aborts without waiting.

Failure modes: a dead learner rank ends the run at once with an error naming the checkpoint that
`resume=true` continues from (the other ranks may be stuck in a collective with it; stopping the Ray
instance ends them);
no Ray cluster at `deploy.ray_address`, a missing model path or a port in use fail before anything
starts, with one line; resources that cannot be placed fail with one line naming what was asked
and what the cluster has (a `scale` that cannot place every new actor keeps the ones it placed).

Longer than ~400 lines because it is the only module allowed to import Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import ray

from deploy import cluster
from shared.config import VapoConfig

log = logging.getLogger("vapo.launch")
CONTROLLER_NAME = "vapo-controller"
NAMESPACE = "vapo"


# ---- paths and checks (plain functions, no Ray) ------------------------------------------


def resolve_model_path(path: str) -> str:
    """`builtin:tiny` -> the tiny model's directory (built on first use); a directory must exist."""
    if path == "builtin:tiny":
        from deploy.doctor import resolve_model_path as resolve_builtin

        return resolve_builtin(path)
    if Path(path).exists():
        return str(Path(path).resolve())
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return path  # a hub id; loading it needs network access
    raise ValueError(f"model.path {path!r} does not exist")


def absolute_paths(cfg: VapoConfig) -> VapoConfig:
    """The config with run_dir and a relative sqlite tracking URI made absolute."""
    tracking = cfg.tracking
    uri = tracking.resolved_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return dataclasses.replace(
        cfg, run_dir=str(Path(cfg.run_dir).resolve()), tracking=dataclasses.replace(tracking, tracking_uri=uri)
    )


def check_ports_free(cfg: VapoConfig) -> None:
    """Fail with one line when a port this run binds is taken."""
    for key, host, port in (
        ("queue.port", cfg.queue.host, cfg.queue.port),
        ("queue.pub_port", cfg.queue.host, cfg.queue.pub_port),
        ("sync.master_port", cfg.sync.master_addr, cfg.sync.master_port),
    ):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise ValueError(f"{key}={port} on {host} is not free ({e.strerror})") from None


def open_prompt_source(cfg: VapoConfig):  # -> shared.data.records.PromptSource
    """The training prompts of `cfg.data` in their seeded, resumable order."""
    from shared.data.records import PromptSource, load_records

    d = cfg.data
    records = load_records(
        d.train_path,
        prompt_key=d.prompt_key,
        answer_key=d.answer_key,
        source_key=d.source_key,
        split="train",
        num=d.builtin_train_size if d.train_path.startswith("builtin:") else None,
        seed=cfg.seed,
    )
    return PromptSource(records, seed=cfg.seed, shuffle=d.shuffle)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- cluster connection and placement -------------------------------------------------------


def connect(address: str, label: str = "deploy.ray_address", *, log_to_driver: bool = True) -> None:
    """`ray.init` on the running cluster at `address` (host:port or auto); one line when none answers there."""
    cluster.check_address(address, label)
    cluster.use_token_if_available()
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=log_to_driver, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise ValueError(f"{label}={address}: no Ray cluster there, or not its auth token ({e})") from None


def _get(ref: Any, timeout: float | None = None) -> Any:
    """`ray.get`, re-raising a ValueError raised inside a Ray actor as its one line."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ValueError):
            raise ValueError(str(e.cause)) from None
        raise


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


def _in_group(pg: Any, index: int = 0) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(pg, index) if pg is not None else None


# ---- Ray actors ---------------------------------------------------------------------------


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
    """The replay queue service, in a thread of this Ray actor."""

    def __init__(self, cfg: VapoConfig, cursor: dict | None, version: int) -> None:
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

    def __init__(self, cfg: VapoConfig, actor_id: int, model_path: str) -> None:
        _worker_logging()
        self.cfg, self.actor_id, self.model_path = cfg, actor_id, model_path
        self._stop = threading.Event()
        self.error: str | None = None
        self.report: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from actors.main import run_actor

        try:
            self.report = run_actor(self.cfg, self.actor_id, model_path=self.model_path, stop_event=self._stop)
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
    """One learner rank: joins the learner process group, then runs `learner.main.run_learner`."""

    def __init__(self) -> None:
        _worker_logging()
        self.latest: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._source: Any = None
        self._pusher: Any = None
        self._queue: Any = None  # the replay queue embedded in rank 0 (queue.embedded)
        self._stop = threading.Event()
        self._running = False
        # __init__ runs in the process's main thread (run() does not), so the SIGTERM handler goes here
        self._ray_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """A first SIGTERM during a run: checkpoint at the next step boundary and end the run; else Ray's exit."""
        if self._running and not self._stop.is_set():
            log.warning("SIGTERM: the learner stops at the next step boundary, after a checkpoint")
            self._stop.set()
        elif callable(self._ray_sigterm):
            self._ray_sigterm(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signum)

    def request_stop(self) -> None:
        """Stop at the next step boundary (every rank agrees on which), checkpoint, and return from run()."""
        self._stop.set()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def run(self, cfg: VapoConfig, rank: int, world: int, init_method: str, model_path: str) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        from learner.main import run_learner

        use_cuda = cfg.learner.device == "cuda" or (cfg.learner.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        backend = cfg.learner.backend if cfg.learner.backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        tracker = None
        if rank == 0:
            from learner import checkpoint
            from learner.weight_sync import MembershipManager
            from shared.queue.client import ClientSettings, LearnerClient
            from shared.tracking.tracker import Tracker, record_run, recorded_run

            self._source = LearnerClient(ClientSettings.from_config(cfg, in_process=self._queue is not None))
            sync_backend = cfg.sync.backend if cfg.sync.backend != "auto" else ("nccl" if use_cuda else "gloo")
            self._pusher = MembershipManager.from_config(cfg.sync, sync_backend)
            if cfg.tracking.enabled:  # a resume from this run_dir's checkpoint continues its MLflow run
                resumed = cfg.resume and checkpoint.latest(cfg.run_dir) is not None
                tracker = Tracker(cfg, run_id=recorded_run(cfg) if resumed else None)
                record_run(cfg.run_dir, tracker)

        def on_step(metrics: dict[str, float]) -> None:
            self.latest = metrics
            self.history.append(metrics)

        self._running = True
        try:
            report = run_learner(
                cfg,
                model_path=model_path,
                source=self._source,
                pusher=self._pusher,
                device=device,
                tracker=tracker,
                stop_event=self._stop,
                on_step=on_step,
            )
        finally:
            self._running = False
            if tracker is not None:
                tracker.close()
            dist.destroy_process_group()
        return {
            "steps": report.steps,
            "version": report.version,
            "stopped": report.stopped,
            "run_id": tracker.run_id if tracker is not None else None,
        }

    def start_queue(self, cfg: VapoConfig, cursor: dict | None, version: int) -> None:
        """Run the replay queue in a thread of this process (rank 0, queue.embedded), resumed at cursor/version."""
        from shared.queue.service import QueueThread

        self._queue = QueueThread(cfg, open_prompt_source(cfg), cursor=cursor, initial_version=version)

    def stop_queue(self) -> Any:
        """Stop the embedded queue (after the learner checkpointed and the actors stopped); its final stats."""
        return self._queue.stop() if self._queue is not None else None

    def shutdown(self) -> None:
        """Close the queue client and the weight group's store, after the actors have stopped."""
        if self._pusher is not None:
            self._pusher.close()
        if self._source is not None:
            self._source.close()

    def progress(self) -> dict[str, float]:
        return self.latest


@ray.remote(max_concurrency=8)
class Controller:
    """Starts, watches, restarts and scales the rollout actors of a run (a named Ray actor)."""

    def __init__(self, cfg: VapoConfig, model_path: str) -> None:
        _worker_logging()
        self.cfg, self.model_path = cfg, model_path
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
            scheduling_strategy=_in_group(self.groups[actor_id]),
            name=f"vapo-actor-{actor_id}",
            namespace=NAMESPACE,
        ).remote(self.cfg, actor_id, self.model_path)

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


# ---- the driver ---------------------------------------------------------------------------


def _queue_process(cfg: VapoConfig, cursor: dict | None, version: int) -> Any:
    """The queue as a Ray actor of its own (queue.embedded=false), on the driver's node (`queue.host`)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return QueueProcess.options(num_cpus=0, name="vapo-queue", scheduling_strategy=here).remote(cfg, cursor, version)


def _init_ray(cfg: VapoConfig) -> None:
    if cfg.deploy.ray_address is None:
        needed = cfg.learner.num_ranks * cfg.deploy.learner_cpus + cfg.actors.num_actors * cfg.deploy.actor_cpus + 2
        ray.init(
            num_cpus=max(int(needed + 0.999), os.cpu_count() or 1),
            namespace=NAMESPACE,
            include_dashboard=False,
            log_to_driver=True,
        )
        return
    connect(cfg.deploy.ray_address)


def _placement(cfg: VapoConfig):
    d = cfg.deploy
    one = cluster.resource_bundle(d.learner_cpus, d.learner_gpus, d.learner_resources)
    n = cfg.learner.num_ranks
    return reserve([dict(one) for _ in range(n)], f"learner ({n} rank(s))", d.placement_timeout_s)


def _progress_line(m: dict[str, float], total: int, started: float, first_step: int) -> str:
    step = int(m.get("train/version", 0))
    done = max(step - first_step, 1)
    eta = (time.time() - started) / done * max(total - step, 0)
    return (
        f"step {step}/{total} | reward {m.get('rollout/reward_mean', 0):+.3f} | acc {m.get('rollout/acc', 0):.3f}"
        f" | len {m.get('rollout/len_mean', 0):.0f} | lag {m.get('async/version_lag_mean', 0):.2f}"
        f" | gen tok/s {m.get('perf/gen_tokens_per_s', 0):,.0f}"
        f" | train tok/s {m.get('perf/train_tokens_per_s', 0):,.0f}"
        f" | ETA {eta / 60:.1f} min"
    )


class _StopOnSignal:
    """SIGINT/SIGTERM to the driver (Ctrl-C, `kill`): the first calls `on_first` in a new thread (Ray calls do
    not belong in a signal handler, and the main thread may be inside one) to ask the learner to stop at its
    next step boundary (it checkpoints, then the run shuts down as usual); a second one aborts at once."""

    def __init__(self, on_first: Any) -> None:
        self.on_first = on_first
        self.requested = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers only there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            raise KeyboardInterrupt(f"second {name}: aborting without waiting for the learner's checkpoint")
        log.warning("%s: the learner stops at its next step boundary and checkpoints (again to abort)", name)
        self.requested.set()
        threading.Thread(target=self.on_first, daemon=True).start()

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def _follow_learner(cfg: VapoConfig, ranks: list[Any], runs: list[Any], first_step: int,
                    on_progress: Any) -> dict[str, Any]:
    """Print progress until every learner rank returns (rank 0's summary); forward a driver's stop request.

    A rank that died or failed ends the run with `cluster.RunFailed` at once (the others may be stuck in a
    collective with it), naming the checkpoint that `resume=true` continues from.
    """
    from learner import checkpoint

    started, last_step = time.time(), -1
    with _StopOnSignal(lambda: [rank.request_stop.remote() for rank in ranks]):
        while True:
            ready, _ = ray.wait(runs, num_returns=len(runs), timeout=1.0)
            for i, ref in enumerate(runs):
                if ref in ready:
                    try:
                        ray.get(ref)
                    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                        ckpt = checkpoint.latest(cfg.run_dir)
                        resume = f"resume=true continues from {ckpt}" if ckpt else "no checkpoint was written"
                        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        raise cluster.RunFailed(f"learner rank {i} died ({first}); {resume}") from e
            try:
                m = ray.get(ranks[0].progress.remote())
            except ray.exceptions.RayActorError:
                m = {}  # rank 0 died: its run reports it on the next round
            if m and int(m.get("train/version", -1)) != last_step:
                last_step = int(m["train/version"])
                on_progress(_progress_line(m, cfg.learner.total_steps, started, first_step))
            if len(ready) == len(runs):
                break
    summary = ray.get(runs[0])
    if summary["stopped"]:
        on_progress(f"stopped at step {summary['steps']} (policy version {summary['version']}): checkpoint "
                    f"{checkpoint.latest(cfg.run_dir)}; `vapo train ... resume=true` continues from it")
    return summary


def train(cfg: VapoConfig, *, on_progress: Any = print) -> dict[str, Any]:
    """Run a whole training job on Ray; returns the learner's summary and the final queue stats."""
    from learner import checkpoint

    cfg = absolute_paths(cfg)
    model_path = resolve_model_path(cfg.model.path)
    check_ports_free(cfg)
    cursor, version = None, 0
    ckpt = checkpoint.latest(cfg.run_dir) if cfg.resume else None
    if ckpt is not None:
        meta = checkpoint.read_meta(ckpt)
        cursor, version = meta["data_cursor"], int(meta["version"])
    _init_ray(cfg)
    pg = None
    try:
        pg = _placement(cfg)
        queue = None if cfg.queue.embedded else _queue_process(cfg, cursor, version)
        ranks = [
            LearnerRank.options(
                num_cpus=cfg.deploy.learner_cpus,
                num_gpus=cfg.deploy.learner_gpus,
                resources=dict(cfg.deploy.learner_resources),
                scheduling_strategy=_in_group(pg, i),
                name=f"vapo-learner-{i}",
                namespace=NAMESPACE,
            ).remote()
            for i in range(cfg.learner.num_ranks)
        ]
        if cfg.queue.embedded:  # before the learner's client and the actors connect; a taken port fails here
            _get(ranks[0].start_queue.remote(cfg, cursor, version))
        master = ray.get(ranks[0].node_ip.remote())
        init_method = f"tcp://{master}:{_free_port()}"
        runs = [r.run.remote(cfg, i, len(ranks), init_method, model_path) for i, r in enumerate(ranks)]
        controller = Controller.options(name=CONTROLLER_NAME, num_cpus=0, lifetime=None).remote(cfg, model_path)
        actor_ids = _get(controller.scale.remote(cfg.actors.num_actors))
        on_progress(
            f"running: {len(ranks)} learner rank(s), {len(actor_ids)} actor(s), "
            f"Ray cluster of {len(ray.nodes())} node(s)"
        )
        first_step = checkpoint.read_meta(ckpt)["step"] if ckpt is not None else 0
        summary = _follow_learner(cfg, ranks, runs, first_step, on_progress)
        summary["controller"] = ray.get(controller.status.remote())
        summary["actor_reports"] = ray.get(controller.stop_all.remote())
        ray.get(ranks[0].shutdown.remote())  # after the actors: they deregister from its store
        summary["queue_stats"] = ray.get(queue.stop.remote() if queue is not None else ranks[0].stop_queue.remote())
        return summary
    finally:
        if pg is not None:
            ray.util.remove_placement_group(pg)
        ray.shutdown()


def _controller() -> Any:
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        raise ValueError("no running vapo job on this Ray cluster (controller not found)") from None


def scale(num_actors: int, address: str = "auto") -> list[int]:
    """Change the number of rollout actors of the running job (through its named controller)."""
    if num_actors < 0:
        raise ValueError(f"the number of actors must be >= 0; got {num_actors}")
    connect(address, "--address", log_to_driver=False)
    try:
        return _get(_controller().scale.remote(num_actors))
    finally:
        ray.shutdown()


def cluster_status(address: str = "auto") -> dict[str, Any]:
    """The cluster's nodes (resources total and free) and the running job: actors, their nodes, last step."""
    connect(address, "--address", log_to_driver=False)
    try:
        nodes = [
            {"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": n["Alive"], "resources": n["Resources"]}
            for n in ray.nodes()
        ]
        status: dict[str, Any] = {"nodes": nodes, "available": ray.available_resources(), "job": None}
        try:
            controller = _controller()
        except ValueError:
            return status
        try:
            job = _get(controller.status.remote(), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # the job is ending
            return status
        try:
            job["progress"] = _get(ray.get_actor("vapo-learner-0", namespace=NAMESPACE).progress.remote(), 30)
        except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # the job is ending
            job["progress"] = {}
        status["job"] = job
        return status
    finally:
        ray.shutdown()
