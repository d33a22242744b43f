"""The learner process loop against the real replay queue (ZeroMQ) and a real MLflow store.

A synthetic actor thread leases prompts and returns groups of random tokens (no vLLM: the
actor tests cover generation); the learner trains, publishes versions, checkpoints, logs to
MLflow, and a resumed run continues with the same step and version numbers. With two ranks
(processes on gloo), a SIGTERM to rank 1 alone, which does not talk to the queue, stops both
ranks at the same step boundary with one checkpoint of that step.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from learner import checkpoint
from learner.main import run_learner
from shared.config import VapoConfig, load_config
from shared.queue.client import ActorClient, ClientSettings, LearnerClient
from shared.queue.service import serve
from shared.signals import SignalStop
from shared.tracking.tracker import Tracker, metric_history
from shared.types import make_group
from tests.component.test_queue_support import ListSource, free_port


def _synthetic_actor(settings: ClientSettings, stop: threading.Event, vocab: int,
                     seen: set[tuple[int, int]] | None = None, pause_at_version: int | None = None) -> None:
    client = ActorClient(settings, 7)
    rng = np.random.default_rng(0)
    version = 0
    while not stop.is_set():
        if version == pause_at_version:
            time.sleep(12)  # silent for a while: the learner waits for data (and re-pushes meanwhile)
            pause_at_version = None
        reply = client.lease(2, version)
        version = max(version, reply.version)
        if seen is not None:
            seen.add((reply.version, reply.weights_version))
        if not reply.leases:
            time.sleep(0.02)
            continue
        groups = []
        for lease in reply.leases:
            lengths = rng.integers(1, 12, 4)
            correct = rng.random(4) < 0.5
            groups.append(
                make_group(
                    lease=lease,
                    actor_id=7,
                    prompt_token_ids=rng.integers(3, vocab, 5),
                    responses=[
                        (rng.integers(3, vocab, n), -3.5 + 0.1 * rng.standard_normal(n), version) for n in lengths
                    ],
                    finish_reasons=["stop"] * 4,
                    rewards=np.where(correct, 1.0, -1.0),
                    correct=correct,
                    gen_started_at=time.time(),
                    gen_seconds=0.01,
                )
            )
        client.submit(groups)
    client.close()


def _loop_cfg(tmp_path: Path, model_dir: Path, *overrides: str) -> VapoConfig:
    return load_config(
        [],
        [
            f"model.path={model_dir}",
            f"queue.port={free_port()}",
            f"queue.pub_port={free_port()}",
            "queue.max_staleness=1",
            "queue.lease_timeout_s=5",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=4",
            "learner.mini_batch_size=8",
            "learner.micro_batch_tokens=128",
            "algo.value_pretrain_steps=1",
            "learner.checkpoint_every=2",
            "learner.device=cpu",
            f"run_dir={tmp_path / 'run'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
            *overrides,
        ],
    )


class RecordingPusher:
    def __init__(self) -> None:
        self.versions: list[int] = []

    def push(self, named_tensors, version: int) -> None:
        assert sum(1 for _ in named_tensors()) > 0
        self.versions.append(version)


def _run(random_model_dir: Path, tmp_path: Path, total_steps: int, resume: bool, *overrides: str,
         pusher: RecordingPusher | None = None, seen: set[tuple[int, int]] | None = None) -> tuple:
    cfg = _loop_cfg(tmp_path, random_model_dir, f"learner.total_steps={total_steps}", *overrides)
    stop = threading.Event()
    queue = threading.Thread(target=serve, args=(cfg, ListSource(1000)), kwargs={"stop_event": stop})
    queue.start()
    settings = ClientSettings.from_config(cfg)
    actor = threading.Thread(target=_synthetic_actor, args=(settings, stop, 50, seen))
    actor.start()
    learner_client = LearnerClient(settings)
    tracker = Tracker(cfg)
    try:
        report = run_learner(
            cfg,
            source=learner_client,
            pusher=pusher,
            device=torch.device("cpu"),
            tracker=tracker,
            resume_from=checkpoint.latest(cfg.run_dir) if resume else None,
        )
        stats = learner_client.stats()
    finally:
        tracker.close()
        stop.set()
        learner_client.close()
        actor.join()
        queue.join()
    return cfg, report, stats, tracker.run_id


def test_learner_loop_trains_checkpoints_logs_and_resumes(random_model_dir: Path, tmp_path: Path) -> None:
    cfg, report, stats, run_id = _run(random_model_dir, tmp_path, total_steps=3, resume=False)
    assert (report.steps, report.version) == (3, 3)
    assert stats.identity_holds()
    assert all(m["async/version_lag_max"] <= cfg.queue.max_staleness for m in report.metrics)
    assert report.metrics[0]["train/value_only"] == 1.0 and report.metrics[1]["train/value_only"] == 0.0
    history = metric_history(run_id, ["loss/value", "async/version_lag_mean", "rollout/acc"], cfg.tracking.tracking_uri)
    assert [s for s, _ in history["loss/value"]] == [1, 2, 3]
    assert len(history["async/version_lag_mean"]) == 3

    _, resumed, _, _ = _run(random_model_dir, tmp_path, total_steps=5, resume=True)
    assert (resumed.steps, resumed.version) == (5, 5)
    assert len(resumed.metrics) == 2  # steps 4 and 5 only

    # A time budget ends the run at a step boundary, with a checkpoint of the last step.
    _, timed, _, _ = _run(random_model_dir, tmp_path, 1000, True, "learner.time_budget_s=0.5")
    assert timed.stopped and 6 <= timed.steps < 1000 and len(timed.metrics) == timed.steps - 5
    ckpt = checkpoint.latest(cfg.run_dir)
    assert ckpt is not None and checkpoint.read_meta(ckpt)["step"] == timed.steps


def test_value_pretraining_announces_versions_with_unchanged_weights_and_pushes_nothing(
    random_model_dir: Path, tmp_path: Path
) -> None:
    pusher, seen = RecordingPusher(), set()
    _, report, stats, _ = _run(random_model_dir, tmp_path, 4, False, "algo.value_pretrain_steps=2",
                               "learner.checkpoint_every=0", pusher=pusher, seen=seen)
    assert (report.steps, report.version) == (4, 4) and stats.identity_holds()
    assert [m["train/value_only"] for m in report.metrics] == [1.0, 1.0, 0.0, 0.0]
    assert pusher.versions == [3, 4]  # the policy first changes at step 3
    assert [m["sync/push_seconds"] > 0 for m in report.metrics] == [False, False, True, True]
    # the queue tells actors which versions have the initial weights (0) and which were pushed
    assert all(w == (0 if v <= 2 else v) for v, w in seen), seen
    assert any(v in (1, 2) for v, _ in seen), seen


def _rank_main(rank: int, cfg: VapoConfig, init_method: str, events: mp.Queue) -> None:
    """One learner rank in its own process (`run_rank`, as `python -m learner.main` runs it): rank 0's
    client and membership store are its own; run_learner runs in the main thread, so SIGTERM reaches it."""
    from learner.main import run_rank

    report = run_rank(cfg, rank, 2, init_method, on_step=lambda m: events.put(("step", int(m["train/version"]))))
    events.put(("report", rank, report.steps, report.version, report.stopped))


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(random_model_dir: Path, tmp_path: Path) -> None:
    cfg = _loop_cfg(tmp_path, random_model_dir, "learner.total_steps=50", "learner.checkpoint_every=0",
                    "queue.embedded=false", f"sync.master_port={free_port()}", "tracking.enabled=false")
    stop = threading.Event()
    queue = threading.Thread(target=serve, args=(cfg, ListSource(10_000)), kwargs={"stop_event": stop})
    queue.start()
    actor = threading.Thread(target=_synthetic_actor, args=(ClientSettings.from_config(cfg), stop, 50))
    actor.start()
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ranks = [ctx.Process(target=_rank_main, args=(r, cfg, init_method, events)) for r in range(2)]
    try:
        for proc in ranks:
            proc.start()
        assert events.get(timeout=300) == ("step", 1)
        os.kill(ranks[1].pid, signal.SIGTERM)  # rank 1 never talks to the queue: only the all-reduce tells rank 0
        reports, steps = {}, [1]
        while len(reports) < 2:
            event = events.get(timeout=300)
            if event[0] == "step":
                steps.append(event[1])
            else:
                reports[event[1]] = event[2:]
        for proc in ranks:
            proc.join(timeout=60)
            assert proc.exitcode == 0
    finally:
        for proc in ranks:
            if proc.is_alive():
                proc.kill()
        stop.set()
        actor.join()
        queue.join()
    last = steps[-1]
    assert last <= 3, steps  # the step that was running when the signal came, at most one more
    assert reports == {0: (last, last, True), 1: (last, last, True)}
    ckpt = checkpoint.latest(cfg.run_dir)
    assert ckpt is not None and ckpt.name == f"step_{last:06d}"
    meta = checkpoint.read_meta(ckpt)
    assert (meta["step"], meta["version"]) == (last, last)
    assert (ckpt / "rng_rank1.pt").is_file()


class _WaitingActorPusher:
    """Rank 0's pusher: records every push and has one actor waiting for weights after the first one."""

    def __init__(self) -> None:
        self.pushes: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.waiting = False

    def push(self, tensors, version: int) -> None:
        self.pushes.append((version, {name: t.clone() for name, t in (tensors() if callable(tensors) else tensors)}))
        self.waiting = len(self.pushes) == 1

    def pending(self) -> bool:
        return self.waiting


def _streaming_rank(rank: int, cfg: VapoConfig, init_method: str, out: mp.Queue) -> None:
    from types import SimpleNamespace

    from learner.main import run_rank
    from shared.queue.client import ClientSettings, LearnerClient

    pusher = _WaitingActorPusher()
    rank0 = SimpleNamespace(source=LearnerClient(ClientSettings.from_config(cfg)), pusher=pusher) if rank == 0 \
        else None
    report = run_rank(cfg, rank, 2, init_method, rank0=rank0)
    if rank == 0:
        rank0.source.close()
        out.put([(v, {k: t.numpy() for k, t in tensors.items()}) for v, tensors in pusher.pushes])
    out.put(("report", rank, report.steps, report.version))


def test_two_ranks_stream_pushes_and_re_push_together_while_rank0_waits(random_model_dir: Path, tmp_path: Path) -> None:
    """Several ranks: each push streams the gathered tensors (no copy of the model); an actor waiting for
    weights while rank 0 waits for data gets a re-push that both ranks take part in (a rank left out
    would hang in its gathers), with exactly the weights of the last push."""
    cfg = _loop_cfg(tmp_path, random_model_dir, "learner.total_steps=2", "learner.checkpoint_every=0",
                    "algo.value_pretrain_steps=0", "queue.embedded=false", "tracking.enabled=false",
                    "queue.max_staleness=0")  # no prompt of step 2 is leased before version 1
    stop = threading.Event()
    queue = threading.Thread(target=serve, args=(cfg, ListSource(10_000)), kwargs={"stop_event": stop})
    queue.start()
    actor = threading.Thread(target=_synthetic_actor,
                             args=(ClientSettings.from_config(cfg), stop, 50, None, 1))  # silent at version 1
    actor.start()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ranks = [ctx.Process(target=_streaming_rank, args=(r, cfg, init_method, out)) for r in range(2)]
    try:
        for proc in ranks:
            proc.start()
        results = [out.get(timeout=600) for _ in range(3)]
        for proc in ranks:
            proc.join(timeout=60)
            assert proc.exitcode == 0
    finally:
        for proc in ranks:
            if proc.is_alive():
                proc.kill()
        stop.set()
        actor.join()
        queue.join()
    pushes = next(r for r in results if isinstance(r, list))
    reports = sorted(r[1:] for r in results if isinstance(r, tuple))
    assert reports == [(0, 2, 2), (1, 2, 2)]
    assert [v for v, _ in pushes] == [1, 1, 2]  # version 1, its re-push while rank 0 waited, version 2
    names = _param_names(random_model_dir)
    assert all(list(tensors) == names for _, tensors in pushes)
    first, again, second = (tensors for _, tensors in pushes)
    assert all(np.array_equal(first[n], again[n]) for n in names)
    assert any(not np.array_equal(first[n], second[n]) for n in names)


def _param_names(model_dir: Path) -> list[str]:
    from learner.model import load_policy

    return [name for name, _ in load_policy(model_dir).named_parameters()]


def test_sigterm_sets_the_stop_once_then_goes_to_the_previous_handler() -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        stop = threading.Event()
        with SignalStop(stop):
            signal.raise_signal(signal.SIGTERM)
            assert stop.is_set() and calls == []
            signal.raise_signal(signal.SIGTERM)  # a second one: the handler installed before
            assert calls == [signal.SIGTERM]
        signal.raise_signal(signal.SIGTERM)  # restored on the way out
        assert calls == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
