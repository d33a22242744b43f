"""The Ray launcher's driver: `vapo train` places the queue, the learner ranks and the actors and follows the run.

`train(cfg)` is what `vapo train CONFIG` runs:

1. resolve the config once for every process of the run (`resolve_paths`): `model.path` becomes
   a directory (the tiny model is built on first use), and relative run and MLflow paths become
   absolute, since Ray workers do not share the driver's working directory; with `resume=true`
   the latest checkpoint is looked up once, and its cursor, version and step go to the queue,
   the learner ranks and the progress lines;
2. `ray.init` (a local instance unless `deploy.ray_address`); a placement group reserves every
   learner rank's CPUs/GPUs (and `deploy.learner_resources`) together, and each actor gets its own
   one-bundle group (`deploy.actor_resources` places actors on the nodes that were started with that
   resource), so a run that cannot fit fails with the resources it asked for rather than hanging
   half-started (`deploy.ray_actors.reserve`);
3. the learner ranks (rank 0 owns the queue client, the weight-group membership manager and the
   MLflow run), the queue and the controller (`deploy.ray_actors`). The queue
   (`shared.queue.service.QueueThread`) runs by default (`queue.embedded`) in a thread of learner
   rank 0's process: the learner takes its batches over inproc, without a copy, so rollouts cross
   the network once, from an actor into the learner, as in a bare PUSH/PULL pair
   (`bench/queue.py`); `queue.host` is then learner rank 0's machine. With `queue.embedded=false`
   it is a Ray actor of its own pinned to the driver's node (`queue.host` is the machine `vapo
   train` runs on), and every rollout byte crosses the loopback or network twice;
4. progress lines (`deploy.cluster.progress_line`: step, reward, accuracy, length, version lag,
   tokens/s, ETA) until the learner finishes; then the actors, rank 0's links and the queue are
   stopped, in that order, and the run is closed.

A cluster (`deploy/start_cluster.sh`, several nodes) is joined with `connect`; `cluster_status` reads
its nodes and the running job (actors, where they run, the learner's last step) for `vapo status`,
and `scale` changes the number of actors through the named controller.

Stopping: SIGINT/SIGTERM to the driver (Ctrl-C) asks every learner rank to stop (`shared.signals.
SignalStop`; the Ray calls go in a new thread, since they do not belong in a signal handler). The
ranks agree on the step boundary to stop at (`learner.main`), write a checkpoint of it and return;
the actors and the queue are then stopped as at the end of a run, and `resume=true` continues from
that checkpoint. A second signal to the driver aborts without waiting.

Failure modes: a dead learner rank ends the run at once with an error naming the checkpoint that
`resume=true` continues from (the other ranks may be stuck in a collective with it; stopping the Ray
instance ends them); an actor that fails `deploy.max_start_failures` starts in a row without generating
a group (`deploy.ray_actors.Controller`) stops the run as a signal does (the learner checkpoints, the
actors and the queue stop), which then ends with `cluster.RunFailed`: one line naming the actor, its
error and its log; no Ray cluster at `deploy.ray_address`, a missing model path or a port in use
fail before anything starts, with one line; resources that cannot be placed fail with one line
naming what was asked and what the cluster has (a `scale` that cannot place every new actor keeps
the ones it placed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from deploy import cluster
from deploy.ray_actors import NAMESPACE, Controller, LearnerRank, QueueProcess, in_group, reserve
from shared.config import VapoConfig
from shared.signals import SignalStop

log = logging.getLogger("vapo.launch")
CONTROLLER_NAME = "vapo-controller"


# ---- the config every process reads, and checks (plain functions, no Ray) --------------------


def resolve_model_path(path: str) -> str:
    """`builtin:tiny` -> the tiny model's directory (built on first use); a directory must exist."""
    if path == "builtin:tiny":
        from deploy.doctor import builtin_model_path

        return builtin_model_path(path)
    if Path(path).exists():
        return str(Path(path).resolve())
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return path  # a hub id; loading it needs network access
    raise ValueError(f"model.path {path!r} does not exist")


def resolve_paths(cfg: VapoConfig) -> VapoConfig:
    """The config with model.path resolved (`resolve_model_path`), and run_dir and a relative sqlite
    tracking URI made absolute: what every process of the run reads, wherever it runs."""
    tracking = cfg.tracking
    uri = tracking.resolved_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=resolve_model_path(cfg.model.path)),
        run_dir=str(Path(cfg.run_dir).resolve()),
        tracking=dataclasses.replace(tracking, tracking_uri=uri),
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- Ray ------------------------------------------------------------------------------------


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


# ---- the driver -----------------------------------------------------------------------------


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


def _placement(cfg: VapoConfig) -> Any:
    d = cfg.deploy
    one = cluster.resource_bundle(d.learner_cpus, d.learner_gpus, d.learner_resources)
    n = cfg.learner.num_ranks
    return reserve([dict(one) for _ in range(n)], f"learner ({n} rank(s))", d.placement_timeout_s)


def _stop_on_signal(on_first: Callable[[], None]) -> SignalStop:
    """SIGINT/SIGTERM to the driver (Ctrl-C, `kill`): the first calls `on_first` in a new thread (Ray calls do
    not belong in a signal handler, and the main thread may be inside one) to ask the learner to stop at its
    next step boundary (it checkpoints, then the run shuts down as usual); a second one aborts at once."""

    def abort(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        raise KeyboardInterrupt(f"second {name}: aborting without waiting for the learner's checkpoint")

    return SignalStop(
        threading.Event(),
        (signal.SIGINT, signal.SIGTERM),
        message="the learner stops at its next step boundary and checkpoints (again to abort)",
        on_first=lambda: threading.Thread(target=on_first, daemon=True).start(),
        on_repeat=abort,
    )


def _follow_learner(cfg: VapoConfig, ranks: list[Any], runs: list[Any], first_step: int, on_progress: Any,
                    controller: Any) -> dict[str, Any]:
    """Print progress until every learner rank returns (rank 0's summary); forward a driver's stop request.

    A rank that died or failed ends the run with `cluster.RunFailed` at once (the others may be stuck in a
    collective with it), naming the checkpoint that `resume=true` continues from. An actor the controller
    gave up on (`Controller.failed`) stops the learner as a signal does; the summary's `failure` says why.
    """
    from learner import checkpoint

    started, last_step, total = time.time(), -1, cfg.learner.total_steps
    failure: str | None = None
    with _stop_on_signal(lambda: [rank.request_stop.remote() for rank in ranks]):
        while True:
            if failure is None and (failure := ray.get(controller.failed.remote())) is not None:
                for rank in ranks:
                    rank.request_stop.remote()
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
                eta_s = (time.time() - started) / max(last_step - first_step, 1) * max(total - last_step, 0)
                on_progress(cluster.progress_line(m, total, eta_s))
            if len(ready) == len(runs):
                break
    summary = ray.get(runs[0])
    summary["failure"] = failure
    if summary["stopped"]:
        on_progress(f"stopped at step {summary['steps']} (policy version {summary['version']}): checkpoint "
                    f"{checkpoint.latest(cfg.run_dir)}; `vapo train ... resume=true` continues from it")
    return summary


def train(cfg: VapoConfig, *, on_progress: Any = print) -> dict[str, Any]:
    """Run a whole training job on Ray; returns the learner's summary and the final queue stats."""
    from learner import checkpoint

    cfg = resolve_paths(cfg)
    check_ports_free(cfg)
    ckpt = checkpoint.latest(cfg.run_dir) if cfg.resume else None  # the one look-up: passed to every process
    cursor, version, first_step = None, 0, 0
    if ckpt is not None:
        meta = checkpoint.read_meta(ckpt)
        cursor, version, first_step = meta["data_cursor"], int(meta["version"]), int(meta["step"])
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
                scheduling_strategy=in_group(pg, i),
                name=f"vapo-learner-{i}",
                namespace=NAMESPACE,
            ).remote()
            for i in range(cfg.learner.num_ranks)
        ]
        _get(ranks[0].open.remote(cfg, cursor, version))  # before anything connects: a taken port fails here
        master = ray.get(ranks[0].node_ip.remote())
        init_method = f"tcp://{master}:{_free_port()}"
        resume_from = str(ckpt) if ckpt is not None else None
        runs = [r.run.remote(cfg, i, len(ranks), init_method, resume_from) for i, r in enumerate(ranks)]
        controller = Controller.options(name=CONTROLLER_NAME, num_cpus=0, lifetime=None).remote(cfg)
        actor_ids = _get(controller.scale.remote(cfg.actors.num_actors))
        on_progress(
            f"running: {len(ranks)} learner rank(s), {len(actor_ids)} actor(s), "
            f"Ray cluster of {len(ray.nodes())} node(s)"
        )
        summary = _follow_learner(cfg, ranks, runs, first_step, on_progress, controller)
        summary["controller"] = ray.get(controller.status.remote())
        summary["actor_reports"] = ray.get(controller.stop_all.remote())
        embedded_stats = ray.get(ranks[0].close.remote())  # after the actors: they deregister in its store
        summary["queue_stats"] = ray.get(queue.stop.remote()) if queue is not None else embedded_stats
        if summary["failure"] is not None:  # stopped like a signal does, then failed with the controller's line
            raise cluster.RunFailed(summary["failure"])
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
