"""The learner process: set up, then loop (receive a batch, train, push weights, log, checkpoint).

`python -m learner.main CONFIG [key=value ...] --rank R --world-size N --init-method URL` runs
one rank; `run_rank` is the same for launchers (the Ray actor around it only calls it) and tests.
Reads top to bottom: `run_rank` resolves the `auto` device and backends, joins the learner's
process group and, on rank 0, opens the MLflow run and uses `RankZero` (the embedded replay
queue, its client and the weight group's membership manager); `run_learner` builds the models
and optimisers, resumes from the checkpoint it is given, then loops over rollout steps. Rank 0
is the only rank that talks to the queue, the actors and MLflow; it hands every rank whole
prompt groups (round-robin), as wire-encoded msgpack bytes over the learner's gloo control group
(`learner.dist`; nothing is pickled). The checkpoint to resume from is looked up once, by whoever starts the
ranks (`main`, the launcher's driver), and passed down.

Versions: the learner's policy version starts at the checkpoint's (0 for a fresh run) and
goes up by one per `sync.push_every` steps. A push is: every rank gathers full tensors one parameter at a time
(FSDP), rank 0 publishes the new version through the queue (so actors know to receive) and
broadcasts the weights. After a resume the first action is a push, so actors generate with
the checkpoint's weights, never with stale ones. Value-pretraining steps leave the policy as it
is: their versions are announced as having the last pushed weights, and nothing is pushed.

Stopping is collective. A stop request (SIGTERM in the main thread, through
`shared.signals.SignalStop`, or `stop_event`, which the Ray launcher sets on every rank when
the driver gets SIGTERM/SIGINT or a rank's own process gets SIGTERM) is only looked at at a
step boundary, through an all-reduce (MAX) of every rank's flag, so all ranks leave the loop
after the same step and take part in the same checkpoint; a rank that left alone would hang
the others in their next collective. The flags are reduced once before rank 0 takes a batch
(so it does not take one it would not train on) and once after (rank 0 found the queue
stopping). The checkpoint written on the way out holds the last finished step and the data
cursor of that step's batch, so a batch taken but not trained is re-issued by the resumed
queue.

Failure modes: no batch within the wait -> keep waiting (the wait is logged as idle time);
a stop request -> finish the current step, checkpoint, exit (a stop seen only by a rank other
than 0 waits until rank 0 has its next batch, or its own stop); the queue stopping ->
checkpoint, exit; a second SIGTERM -> the handler installed before (the process ends).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from learner import checkpoint
from learner import dist as ldist
from learner.dist import scatter_groups
from learner.final_artifacts import log_final_artifacts
from learner.model import compute_dtype, load_policy, load_value_model, shard
from learner.publisher import Publisher, WeightPusher
from learner.train_step import Learner
from shared.config import VapoConfig, load_config, resolve_auto
from shared.signals import SignalStop
from shared.types import RolloutGroup

if TYPE_CHECKING:
    from shared.tracking.tracker import Tracker
    from shared.types import QueueStats

log = logging.getLogger("vapo.learner")


class BatchSource(Protocol):
    """Where rank 0 gets rollout groups (the queue's `LearnerClient`, or anything shaped like it)."""

    def get_batch(self, num_groups: int, timeout_s: float) -> Any: ...

    def publish_version(self, version: int) -> None: ...


@dataclass
class LearnerReport:
    """What a finished learner reports."""

    steps: int
    version: int
    metrics: list[dict[str, float]]
    stopped: bool = False
    """Ended early by a stop request, SIGTERM or the queue stopping (a checkpoint of `steps` was written)."""
    run_id: str | None = None
    """The MLflow run (rank 0 with tracking on)."""


def batch_metrics(groups: Sequence[RolloutGroup], version: int) -> dict[str, float]:
    """Version lag and generation throughput of one consumed batch."""
    lags = np.array([version - g.policy_version for g in groups], dtype=np.float64)
    tokens = sum(g.num_tokens for g in groups)
    start = min(g.gen_started_at for g in groups)
    end = max(g.gen_started_at + g.gen_seconds for g in groups)
    return {
        "async/version_lag_mean": float(lags.mean()),
        "async/version_lag_max": float(lags.max()),
        "perf/gen_tokens_per_s": tokens / max(end - start, 1e-9),
        "rollout/reward_seconds_mean": float(np.mean([g.reward_seconds for g in groups])),
    }


def build_learner(cfg: VapoConfig, device: torch.device) -> Learner:
    """Models of `cfg.model.path`, optimisers and the Learner around them.

    With a process group (every `run_rank`, also at world size 1) the models are sharded with FSDP2,
    computing in `model.dtype` over float32 master weights, on CPU as on CUDA; without one (a learner
    built in-process) they are not sharded and compute in float32 (see `learner.model`).
    """
    from transformers import AutoTokenizer

    model_path = cfg.model.path
    trained = frozen = None
    ref_dtype = torch.float32
    if ldist.initialized():
        dtype, checkpointing = compute_dtype(cfg.model.dtype), cfg.model.gradient_checkpointing
        trained = partial(shard, dtype=dtype, activation_checkpointing=checkpointing)
        # the reference is never optimised: it needs no float32 masters and is held in the compute dtype
        ref_dtype, frozen = dtype, partial(shard)
    elif cfg.model.dtype != "float32":
        log.warning("no process group: the models are not sharded and compute in float32, not model.dtype=%s",
                    cfg.model.dtype)
    policy = load_policy(model_path, device=device, wrap=trained)
    value = load_value_model(model_path, cfg.model.value_path, device=device, wrap=trained) \
        if cfg.algo.uses_critic else None
    ref = load_policy(model_path, device=device, dtype=ref_dtype, wrap=frozen).requires_grad_(False) \
        if cfg.algo.kl_coef > 0 else None
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Learner(cfg, policy, value, ref, pad_id=int(pad_id), device=device)


class RankZero:
    """Learner rank 0's links to the rest of the run: the replay queue (in this process with `queue.embedded`,
    started at a checkpoint's `cursor` and `version`), the queue's client and the weight group's membership
    manager.

    They bind their ports when constructed, so a taken one fails here, before anything connects, and stay
    open until `close`, which comes after the actors have stopped: an actor that leaves deregisters in the
    manager's store and may still be submitting to the queue.
    """

    def __init__(self, cfg: VapoConfig, *, cursor: Any = None, version: int = 0) -> None:
        from learner.weight_sync import MembershipManager
        from shared.data.source import open_prompt_source
        from shared.queue.client import ClientSettings, LearnerClient
        from shared.queue.service import QueueThread

        cfg = resolve_auto(cfg, torch.cuda.is_available())
        embedded = cfg.queue.embedded
        self.queue = QueueThread(cfg, open_prompt_source(cfg), cursor=cursor, initial_version=version) if embedded \
            else None
        self.source = LearnerClient(ClientSettings.from_config(cfg, in_process=embedded))
        self.pusher = MembershipManager.from_config(cfg.sync, cfg.sync.backend)

    def close(self) -> QueueStats | None:
        """Close the client and the membership store, then stop the embedded queue: its final stats (else None)."""
        self.pusher.close()
        self.source.close()
        return self.queue.stop() if self.queue is not None else None


def run_rank(
    cfg: VapoConfig,
    rank: int,
    world_size: int,
    init_method: str,
    *,
    resume_from: Path | None = None,
    rank0: RankZero | None = None,
    stop_event: threading.Event | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> LearnerReport:
    """One learner rank: join the learner's process group on this process's device, then `run_learner`.

    Rank 0 opens the MLflow run (a resume continues the one recorded in run_dir) and reaches the queue
    and the actors through `rank0`; when none is given it opens its own, at `resume_from`'s cursor and
    version, and closes it on the way out (`main`; the Ray launcher keeps one open until the actors stop).
    """
    cfg = resolve_auto(cfg, torch.cuda.is_available())
    device = torch.device("cpu")
    if cfg.learner.device == "cuda":  # LOCAL_RANK: several ranks on one node started by torchrun or by hand
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)
    ldist.init(cfg.learner.backend, init_method, rank, world_size)
    own = rank == 0 and rank0 is None
    tracker = None
    try:
        if own:
            meta = checkpoint.read_meta(resume_from) if resume_from is not None else None
            cursor, version = (meta["data_cursor"], int(meta["version"])) if meta is not None else (None, 0)
            rank0 = RankZero(cfg, cursor=cursor, version=version)
        tracker = _open_tracker(cfg, resume_from) if rank == 0 else None
        report = run_learner(cfg, source=rank0.source if rank0 else None, pusher=rank0.pusher if rank0 else None,
                             device=device, tracker=tracker, resume_from=resume_from, stop_event=stop_event,
                             on_step=on_step)
    finally:
        if tracker is not None:
            tracker.close()
        if own and rank0 is not None:
            rank0.close()
        ldist.destroy()
    report.run_id = tracker.run_id if tracker is not None else None
    return report


def _open_tracker(cfg: VapoConfig, resume_from: Path | None) -> Tracker | None:
    """Rank 0's MLflow run (None with tracking off); a resume continues the run recorded in run_dir."""
    from shared.tracking.tracker import Tracker, record_run, recorded_run

    if not cfg.tracking.enabled:
        return None
    tracker = Tracker(cfg, run_id=recorded_run(cfg) if resume_from is not None else None)
    record_run(cfg.run_dir, tracker)
    return tracker


def run_learner(
    cfg: VapoConfig,
    *,
    source: BatchSource | None,
    pusher: WeightPusher | None,
    device: torch.device,
    tracker: Tracker | None = None,
    resume_from: Path | None = None,
    stop_event: threading.Event | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> LearnerReport:
    """Train until `learner.total_steps`, `learner.time_budget_s`, a stop request or SIGTERM; rank 0 passes
    source/pusher/tracker; every rank the same `resume_from` (a checkpoint directory, or None to start fresh).

    A stop (`stop_event` set on any rank, SIGTERM when running in the main thread, the queue
    stopping) takes effect at the next step boundary, on every rank at the same one: the loop
    ends, a checkpoint of the last finished step is written and the report says `stopped`.
    """
    stop = stop_event or threading.Event()
    with SignalStop(stop):
        is_rank0 = ldist.rank() == 0
        torch.manual_seed(cfg.seed)
        learner = build_learner(cfg, device)
        publisher = Publisher(learner, pusher, source)
        version, cursor, resumed = _resume(learner, publisher, resume_from)
        history: list[dict[str, float]] = []
        saved_step, stopped = (learner.step if resumed else -1), False  # a resumed step's checkpoint exists
        deadline = time.monotonic() + (cfg.learner.time_budget_s or float("inf"))
        while learner.step < cfg.learner.total_steps:
            t_wait = time.perf_counter()
            if is_rank0 and time.monotonic() >= deadline and not stop.is_set():
                log.info("time budget of %.0f s reached after step %d", cfg.learner.time_budget_s, learner.step)
                stop.set()
            if ldist.any_rank(stop.is_set()):  # before rank 0 takes a batch it would not train on
                stopped = True
                break
            if is_rank0:
                groups, stats = _next_batch(cfg, source, stop, publisher)
                publisher.release_followers()
            else:
                publisher.follow_repushes()  # rank 0 may re-push while it waits for data
                groups, stats = None, None
            if ldist.any_rank(stop.is_set() or (is_rank0 and groups is None)):
                stopped = True
                break
            wait_s = time.perf_counter() - t_wait
            policy_changes = learner.trains_policy()
            metrics = learner.train_step(scatter_groups(groups), version=version)
            compute_s = time.perf_counter() - t_wait - wait_s
            if learner.step % cfg.sync.push_every == 0:
                version += 1  # also in value pretraining: admission and staleness count versions
                metrics["sync/push_seconds"] = publisher.push(version) if policy_changes \
                    else publisher.announce_unchanged(version)
            if is_rank0:
                assert groups is not None and stats is not None
                cursor = stats.cursor
                metrics.update(batch_metrics(groups, version - 1), **stats.metrics())
                push_s = metrics.get("sync/push_seconds", 0.0)  # the push is synchronous: no training meanwhile
                step_s = max(wait_s + compute_s + push_s, 1e-9)
                metrics["perf/learner_idle_frac"] = (wait_s + push_s) / step_s
                metrics["perf/learner_push_frac"] = push_s / step_s
                metrics["train/version"] = float(version)
                _check_sync(cfg, metrics, learner.step)
                history.append(metrics)
                _report(cfg, metrics, learner.step, tracker, on_step)
            if cfg.learner.checkpoint_every and learner.step % cfg.learner.checkpoint_every == 0:
                checkpoint.save(learner, cfg.run_dir, version=version, data_cursor=cursor)
                saved_step = learner.step
        log.info("%s at step %d (version %d)", "stopping" if stopped else "done", learner.step, version)
        if saved_step != learner.step:
            checkpoint.save(learner, cfg.run_dir, version=version, data_cursor=cursor)
        log_final_artifacts(cfg, learner.policy, tracker)  # rank 0: plots/ and policy/ to MLflow
    return LearnerReport(steps=learner.step, version=version, metrics=history, stopped=stopped)


def sync_alert_threshold(cfg: VapoConfig) -> float:
    """`sync.alert_logprob_diff`, or the default of `model.dtype`: 1e-4 in float32, 1e-2 in bf16/fp16."""
    if cfg.sync.alert_logprob_diff is not None:
        return cfg.sync.alert_logprob_diff
    return 1e-4 if cfg.model.dtype == "float32" else 1e-2


def _check_sync(cfg: VapoConfig, metrics: dict[str, float], step: int) -> None:
    """Flag (`sync/alert`, a warning) a step whose lag-0 log-prob mismatch exceeds the threshold."""
    diff = metrics.get("sync/logprob_abs_diff_lag0")
    if diff is None:
        return
    threshold = sync_alert_threshold(cfg)
    metrics["sync/alert"] = float(diff > threshold)
    if diff > threshold:
        log.warning("step %d: SYNC ALERT: actors' and learner's log-probs of the same weights differ by %.3g "
                    "(> sync.alert_logprob_diff %.3g): a weight push or the engine's numerics are off",
                    step, diff, threshold)


def _report(cfg: VapoConfig, metrics: dict[str, float], step: int, tracker: Tracker | None,
            on_step: Callable[[dict[str, float]], None] | None) -> None:
    if tracker is not None and step % cfg.tracking.log_every == 0:
        tracker.log_metrics(metrics, step=step)
    if on_step is not None:
        on_step(metrics)


def _resume(learner: Learner, publisher: Publisher, ckpt: Path | None) -> tuple[int, Any, bool]:
    """(version, data cursor, resumed): `ckpt`'s when given (its weights pushed at once), else a fresh start."""
    if ckpt is None:
        return 0, None, False
    meta = checkpoint.load(learner, ckpt)
    version = int(meta["version"])
    log.info("resumed from %s at step %d, version %d", ckpt, learner.step, version)
    publisher.push(version)  # before any actor generates: they wait for the learner's announced version
    return version, meta["data_cursor"], True


def _next_batch(cfg: VapoConfig, source: BatchSource | None, stop: threading.Event, publisher: Publisher):
    """(groups, stats) of the next full batch, or (None, None) when stopping."""
    assert source is not None
    while not stop.is_set():
        try:
            batch = source.get_batch(cfg.rollout.prompts_per_step, timeout_s=5.0)
        except TimeoutError:
            publisher.repush_if_waiting()
            continue
        if batch.stopping or not batch.groups:
            return None, None
        return batch.groups, batch.stats
    return None, None


def main(argv: list[str] | None = None) -> int:
    """`python -m learner.main CONFIG [key=value ...] [--rank R] [--world-size N] [--init-method URL]`: one rank.

    The defaults follow torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/MASTER_PORT) when it is set;
    without it, one rank of `learner.num_ranks`. `model.path` must be a directory (`vapo make-tiny-model`
    prints the tiny model's); with `resume=true` every rank resumes from run_dir's latest checkpoint.
    """
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m learner.main", description="Run one learner rank.")
    parser.add_argument("items", nargs="*", metavar="CONFIG|key=value", help="YAML files, then overrides")
    parser.add_argument("--rank", type=int, default=int(env.get("RANK", "0")))
    parser.add_argument("--world-size", type=int, default=int(env["WORLD_SIZE"]) if "WORLD_SIZE" in env else None,
                        help="learner ranks in all (default: learner.num_ranks)")
    parser.add_argument("--init-method", default="env://" if "MASTER_ADDR" in env else "tcp://127.0.0.1:29500",
                        help="torch.distributed rendezvous of the learner's process group")
    args = parser.parse_args(argv)
    try:
        cfg = load_config([x for x in args.items if "=" not in x], [x for x in args.items if "=" in x])
        if cfg.model.path.startswith("builtin:"):
            raise ValueError(f"model.path {cfg.model.path!r} must be a directory (`vapo make-tiny-model` prints one)")
    except ValueError as e:
        print(f"python -m learner.main: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    resume_from = checkpoint.latest(cfg.run_dir) if cfg.resume else None
    report = run_rank(cfg, args.rank, args.world_size or cfg.learner.num_ranks, args.init_method,
                      resume_from=resume_from)
    summary = {k: v for k, v in asdict(report).items() if k != "metrics"}
    print(json.dumps({"rank": args.rank, **summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
