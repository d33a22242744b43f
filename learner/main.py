"""The learner process: set up, then loop (receive a batch, train, push weights, log, checkpoint).

Reads top to bottom: `run_learner` sets up the process group, the models, the optimisers and
(on rank 0) the queue client, the weight pusher and the tracker, then loops over rollout
steps. Rank 0 is the only rank that talks to the queue, the actors and MLflow; it hands every
rank whole prompt groups (round-robin), as wire-encoded msgpack bytes over the learner's own
process group (nothing is pickled).

Versions: the learner's policy version starts at the checkpoint's (0 for a fresh run) and
goes up by one per push. A push is: every rank gathers full tensors one parameter at a time
(FSDP), rank 0 publishes the new version through the queue (so actors know to receive) and
broadcasts the weights. After a resume the first action is a push, so actors generate with
the checkpoint's weights, never with stale ones.

Stopping is collective. A stop request (SIGTERM in the main thread, or `stop_event`, which the
Ray launcher sets on every rank when the driver gets SIGTERM/SIGINT or a rank's own process
gets SIGTERM) is only looked at at a step boundary, through an all-reduce (MAX) of every rank's
flag, so all ranks leave the loop after the same step and take part in the same checkpoint;
a rank that left alone would hang the others in their next collective. The flags are reduced
once before rank 0 takes a batch (so it does not take one it would not train on) and once
after (rank 0 found the queue stopping). The checkpoint written on the way out holds the last
finished step and the data cursor of that step's batch, so a batch taken but not trained is
re-issued by the resumed queue.

Failure modes: no batch within the wait -> keep waiting (the wait is logged as idle time);
a stop request -> finish the current step, checkpoint, exit (a stop seen only by a rank other
than 0 waits until rank 0 has its next batch, or its own stop); the queue stopping ->
checkpoint, exit; a second SIGTERM -> the handler installed before (the process ends).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np
import torch
import torch.distributed as dist

from learner import checkpoint
from learner.batching import Rollout
from learner.final_artifacts import log_final_artifacts
from learner.model import iter_full_params, load_policy, load_value_model, shard
from learner.train_step import Learner
from shared.config import VapoConfig
from shared.types import RolloutGroup
from shared.wire import decode, encode, encode_group

log = logging.getLogger("vapo.learner")


class WeightPusher(Protocol):
    """What rank 0 uses to get new weights to the actors (see `learner.weight_sync`)."""

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> Any: ...


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


def rollouts_from_groups(groups: Sequence[RolloutGroup], first_group_index: int = 0) -> list[Rollout]:
    """Flatten groups into the learner's per-response records (group index for group statistics)."""
    out = []
    for g_index, group in enumerate(groups, start=first_group_index):
        for i in range(group.num_responses):
            tokens, logprobs, versions = group.response(i)
            out.append(
                Rollout(
                    prompt_ids=group.prompt_token_ids,
                    response_ids=tokens,
                    behavior_logprobs=logprobs,
                    score=float(group.rewards[i]),
                    correct=bool(group.correct[i]),
                    group=g_index,
                    policy_version=int(versions.min()) if len(versions) else group.policy_version,
                )
            )
    return out


def _groups_to_bytes(groups: Sequence[RolloutGroup]) -> bytes:
    frames = encode("submit", {"actor_id": 0, "incarnation": 0}, [encode_group(g) for g in groups])
    return msgpack.packb([bytes(memoryview(f)) for f in frames], use_bin_type=True)


def _groups_from_bytes(data: bytes) -> list[RolloutGroup]:
    frames = msgpack.unpackb(data, raw=False)
    return decode(frames, max_bytes=len(data) + 1, kinds=("submit",)).groups


def scatter_groups(groups: Sequence[RolloutGroup] | None) -> list[RolloutGroup]:
    """Rank 0 passes the batch's groups; every rank gets its round-robin share of whole groups."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        assert groups is not None
        return list(groups)
    rank, world = dist.get_rank(), dist.get_world_size()
    size = torch.zeros(1, dtype=torch.long)
    payload = b""
    if rank == 0:
        assert groups is not None
        payload = _groups_to_bytes(groups)
        size[0] = len(payload)
    dist.broadcast(size, src=0)
    buf = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        if rank == 0
        else torch.empty(int(size), dtype=torch.uint8)
    )
    dist.broadcast(buf, src=0)
    everything = _groups_from_bytes(buf.numpy().tobytes())
    return everything[rank::world]


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


def build_learner(cfg: VapoConfig, model_path: str, device: torch.device) -> Learner:
    """Models (sharded when a process group exists), optimisers and the Learner around them."""
    from transformers import AutoTokenizer

    policy = load_policy(model_path, device=device)
    value = load_value_model(model_path, cfg.model.value_path, device=device) if cfg.algo.uses_critic else None
    ref = load_policy(model_path, device=device).requires_grad_(False) if cfg.algo.kl_coef > 0 else None
    if dist.is_initialized():
        mixed = device.type == "cuda" and cfg.model.dtype != "float32"
        for model in (policy, value, ref):
            if model is not None:
                shard(
                    model,
                    mixed_precision=mixed,
                    activation_checkpointing=cfg.learner.activation_checkpointing and model is not ref,
                )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Learner(cfg, policy, value, ref, pad_id=int(pad_id), device=device)


class Publisher:
    """Rank 0's side of a weight push, remembering the last one so it can be repeated for late actors."""

    def __init__(self, learner: Learner, pusher: WeightPusher | None, source: BatchSource | None) -> None:
        self.learner, self.pusher, self.source = learner, pusher, source
        self.version = 0
        self._tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None

    def push(self, version: int) -> float:
        """All ranks gather; rank 0 announces `version` and broadcasts. Returns the seconds taken.

        With one rank the pusher gets a function that re-reads the parameters, so a push that lost
        an actor can be retried on the rebuilt group; with several, rank 0 keeps the gathered full
        tensors of this push on CPU (the model's size) for the same reason, since the other ranks
        cannot join a second gather.
        """
        t0 = time.perf_counter()
        self.version = version
        world = dist.get_world_size() if dist.is_initialized() else 1
        is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if is_rank0 and self.source is not None:
            self.source.publish_version(version)  # actors see it and enter the receive; admission moves on
        if world == 1:
            self._tensors = lambda: iter_full_params(self.learner.policy)
        elif is_rank0:
            gathered = [(name, t.cpu()) for name, t in iter_full_params(self.learner.policy)]
            self._tensors = lambda: iter(gathered)
        else:
            for _ in iter_full_params(self.learner.policy):  # the other ranks take part in the gathers
                pass
        if is_rank0 and self.pusher is not None:
            assert self._tensors is not None
            self.pusher.push(self._tensors, version)
        return time.perf_counter() - t0

    def repush_if_waiting(self) -> None:
        """Rank 0, while waiting for data: push the current weights again to actors that registered late
        or missed a push (they wait for weights, so without this the run could stall)."""
        pending = getattr(self.pusher, "pending", None)
        if self.pusher is None or pending is None or self.version == 0 and self._tensors is None:
            return  # at version 0 every actor starts from model.path, the same weights
        if pending():
            tensors = self._tensors or (lambda: iter_full_params(self.learner.policy))
            log.info("re-pushing version %d to actors waiting for weights", self.version)
            self.pusher.push(tensors, self.version)


def run_learner(
    cfg: VapoConfig,
    *,
    model_path: str,
    source: BatchSource | None,
    pusher: WeightPusher | None,
    device: torch.device,
    tracker: Any = None,
    stop_event: threading.Event | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> LearnerReport:
    """Train until `learner.total_steps`, `learner.time_budget_s`, a stop request or SIGTERM; rank 0 passes
    source/pusher/tracker.

    A stop (`stop_event` set on any rank, SIGTERM when running in the main thread, the queue
    stopping) takes effect at the next step boundary, on every rank at the same one: the loop
    ends, a checkpoint of the last finished step is written and the report says `stopped`.
    """
    stop = stop_event or threading.Event()
    with sigterm_sets(stop):
        is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
        torch.manual_seed(cfg.seed)
        learner = build_learner(cfg, model_path, device)
        publisher = Publisher(learner, pusher, source)
        version, cursor, resumed = _resume(cfg, learner, publisher)
        history: list[dict[str, float]] = []
        saved_step, stopped = (learner.step if resumed else -1), False  # a resumed step's checkpoint exists
        budget = cfg.learner.time_budget_s
        deadline = time.monotonic() + budget if budget else float("inf")
        while learner.step < cfg.learner.total_steps:
            t_wait = time.perf_counter()
            if is_rank0 and time.monotonic() >= deadline and not stop.is_set():
                log.info("time budget of %.0f s reached after step %d", budget, learner.step)
                stop.set()
            if _should_stop(stop.is_set()):  # before rank 0 takes a batch it would not train on
                stopped = True
                break
            groups, stats = _next_batch(cfg, source, stop, publisher) if is_rank0 else (None, None)
            if _should_stop(stop.is_set() or (is_rank0 and groups is None)):
                stopped = True
                break
            wait_s = time.perf_counter() - t_wait
            metrics = learner.train_step(rollouts_from_groups(scatter_groups(groups)))
            compute_s = time.perf_counter() - t_wait - wait_s
            if learner.step % cfg.sync.push_every == 0:
                version += 1
                metrics["sync/push_seconds"] = publisher.push(version)
            if is_rank0:
                assert groups is not None and stats is not None
                cursor = stats.cursor
                metrics.update(batch_metrics(groups, version - 1))
                metrics.update(stats.metrics())
                metrics["perf/learner_idle_frac"] = wait_s / max(wait_s + compute_s, 1e-9)
                metrics["train/version"] = float(version)
                history.append(metrics)
                _report(cfg, metrics, learner.step, tracker, on_step)
            if cfg.learner.checkpoint_every and learner.step % cfg.learner.checkpoint_every == 0:
                checkpoint.save(learner, cfg.run_dir, version=version, data_cursor=cursor, model_path=model_path)
                saved_step = learner.step
        if stopped:
            log.info("stopping at step %d (version %d): checkpointing, then exiting", learner.step, version)
        if saved_step != learner.step:
            checkpoint.save(learner, cfg.run_dir, version=version, data_cursor=cursor, model_path=model_path)
        # rank 0: plots/ and policy/ to MLflow
        log_final_artifacts(learner.policy, tracker, model_path, log_policy=cfg.tracking.log_policy)
    return LearnerReport(steps=learner.step, version=version, metrics=history, stopped=stopped)


def _report(cfg: VapoConfig, metrics: dict[str, float], step: int, tracker: Any,
            on_step: Callable[[dict[str, float]], None] | None) -> None:
    if tracker is not None and step % cfg.tracking.log_every == 0:
        tracker.log_metrics(metrics, step=step)
    if on_step is not None:
        on_step(metrics)


def _resume(cfg: VapoConfig, learner: Learner, publisher: Publisher) -> tuple[int, Any, bool]:
    """(version, data cursor, resumed): the latest checkpoint's when resuming (its weights pushed at once)."""
    ckpt = checkpoint.latest(cfg.run_dir) if cfg.resume else None
    if ckpt is None:
        return 0, None, False
    meta = checkpoint.load(learner, ckpt)
    version = int(meta["version"])
    log.info("resumed from %s at step %d, version %d", ckpt, learner.step, version)
    publisher.push(version)  # before any actor generates: they wait for the learner's announced version
    return version, meta["data_cursor"], True


@contextmanager
def sigterm_sets(stop: threading.Event) -> Iterator[None]:
    """While inside, SIGTERM sets `stop` (only in the main thread, where Python runs signal handlers).

    A second SIGTERM goes to the handler that was installed before, so a stuck process can still
    be ended the usual way. The previous handler is restored on the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if installed is None else installed  # None: a handler installed outside Python

    def handler(signum: int, frame: Any) -> None:
        if not stop.is_set():
            log.warning("SIGTERM: stopping at the next step boundary (after a checkpoint)")
            stop.set()
        elif callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _should_stop(local: bool) -> bool:
    """Whether any rank asks to stop: an all-reduce (MAX) of every rank's flag; all ranks call it at one point."""
    flag = torch.tensor([1 if local else 0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


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
