"""The receiving end of a weight push: a vLLM worker extension that joins the learner's broadcast group.

vLLM mixes `WeightReceiver` into its worker class when the engine is built with
`worker_extension_cls="actors.weight_receiver.WeightReceiver"`, so these methods run inside
every vLLM worker process (one per tensor-parallel rank) with `self.model_runner`,
`self.rank` and `self.device` at hand; `actors.engine.Engine` calls them through
`LLM.collective_rpc`. Attribute names carry a `_wr_` prefix so they cannot clash with the
worker's own.

Group: built apart from vLLM's own torch.distributed world (which the worker already
initialised; `init_process_group` would clash with it): a `ProcessGroupGloo` (CPU) or
`ProcessGroupNCCL` (GPU, chosen by backend name) directly on a `PrefixStore(group_name,
TCPStore(...))` client of the learner's store. Rank 0 is the learner's `WeightSender`;
worker w of an actor whose workers start at `rank_offset` is rank `rank_offset + w`, so with
tensor parallelism every TP worker receives the full tensors and vLLM's weight loaders
shard them. The wire format is `shared.weights.protocol`.

Apply: one `reload_weights(weights_iterator=...)` call per push, fed by a generator that
receives bucket after bucket while vLLM's layerwise reload consumes them (so memory stays
bounded by a bucket and a layer); vLLM fuses q/k/v and gate/up itself. The plain
`model.load_weights` is not used: it fails on CPU once the weights have been processed after
loading.

Tied embeddings: vLLM's `lm_head.weight` is the same Parameter as `embed_tokens.weight`, but
the lm_head layer keeps state derived from it at load time (on CPU, a packed GEMM weight), and
the layerwise reload only refreshes a layer that received weights. A push of a tied model
usually comes from `named_parameters()`, which lists the shared tensor once, as
`model.embed_tokens.weight`; the receiver then feeds the same tensor again as
`lm_head.weight` (if the push did not carry one), so both layers are reprocessed. Without
that, the storage is updated but the logits still use the old embedding.

Failure modes: no store at the address, no sender, or a world size that differs from the
sender's raise within `timeout_s` (the store and the group both carry it); two workers
claiming one rank raise ValueError. The first bucket of a push is received before vLLM's
reload starts, so a sender that never pushes (or dies first) costs a timeout but leaves the
model untouched. If applying fails part way (an unknown tensor name, say), vLLM's layerwise
reload is finalised so no layer stays on the meta device, the rest of the push is drained so
the group stays in step with the sender, and the error is raised; the model then holds a mix
of old and new weights, so the actor must not sample until a later push succeeds. After a
failed collective (timeout, dead peer, undecodable header) the group is closed: the actor
re-joins the next generation.

Must not import learner or deploy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from vllm.config import set_current_vllm_config
from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

from shared.weights import protocol as wp
from shared.weights.group import broadcast_from_root, make_weight_group

EMBED_NAME, HEAD_NAME = "model.embed_tokens.weight", "lm_head.weight"


class BucketStream:
    """Receives the buckets of one push and yields (name, tensor) views into them."""

    def __init__(
        self,
        group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL,
        device: torch.device,
        timeout: timedelta | None = None,
    ) -> None:
        self.group, self.device, self.timeout = group, device, timeout
        self.version: int | None = None
        self.num_tensors = self.num_bytes = self.num_buckets = 0
        self.done = False
        self.broken = False
        """A collective failed (timeout, dead peer): the group is out of step and must be rebuilt."""
        self._pending: tuple[wp.BucketHeader, torch.Tensor, int] | None = None

    def _broadcast(self, tensor: torch.Tensor) -> None:
        try:
            broadcast_from_root(self.group, tensor, self.timeout)
        except RuntimeError:  # DistBackendError and gloo timeouts: the group cannot be trusted any more
            self.broken = True
            raise

    def _next_bucket(self, validate: bool = True) -> tuple[wp.BucketHeader, torch.Tensor, int]:
        sizes = torch.empty(2, dtype=torch.int64, device=self.device)
        self._broadcast(sizes)
        header_nbytes, buffer_nbytes = (int(x) for x in sizes.tolist())
        buffer = torch.empty(buffer_nbytes, dtype=torch.uint8, device=self.device)
        self._broadcast(buffer)
        index = self.num_buckets
        self.num_buckets += 1
        start = wp.data_start(header_nbytes)
        try:
            header = wp.decode_header(buffer[:header_nbytes].cpu().numpy().tobytes(), buffer_nbytes - start)
        except ValueError:
            self.broken = True  # without a header the end of the push cannot be found
            raise
        self.done = header.last
        version_changed = self.version is not None and header.policy_version != self.version
        if validate and (header.bucket_index != index or version_changed):
            raise ValueError(
                f"bucket {header.bucket_index} of version {header.policy_version} arrived; "
                f"expected bucket {index} of version {self.version}"
            )
        self.version = header.policy_version
        return header, buffer, start

    def fetch_first(self) -> None:
        """Receive the first bucket now, so that a sender that never pushes fails before the model is touched."""
        self._pending = self._next_bucket()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        while self._pending is not None or not self.done:
            header, buffer, start = self._pending if self._pending is not None else self._next_bucket()
            self._pending = None
            for t in header.tensors:
                raw = buffer[start + t.offset : start + t.offset + t.nbytes]
                self.num_tensors += 1
                self.num_bytes += t.nbytes
                yield t.name, raw.view(getattr(torch, t.dtype)).view(t.shape)

    def drain(self) -> None:
        """Receive (and drop) the rest of the push, keeping the group in step with the sender."""
        while not self.done and not self.broken:
            self._next_bucket(validate=False)


def join_weight_group(
    master_addr: str, master_port: int, rank: int, world_size: int, backend: str, timeout_s: float, group_name: str
) -> tuple[dist.ProcessGroupGloo | dist.ProcessGroupNCCL, dist.Store]:
    """Join generation `group_name` of the broadcast group as `rank`, handshake first; returns the group and store."""
    if not 0 < rank < world_size:
        raise ValueError(f"weight group rank {rank} outside 1..{world_size - 1} (rank 0 is the sender)")
    timeout = timedelta(seconds=timeout_s)
    client = dist.TCPStore(master_addr, master_port, is_master=False, timeout=timeout)
    store = dist.PrefixStore(group_name, client)
    sender_world = int(store.get(wp.WORLD_SIZE_KEY))
    if sender_world != world_size:
        raise ValueError(
            f"weight group {group_name!r} has world size {sender_world}; this worker expected {world_size}"
        )
    if store.add(wp.joined_key(rank), 1) != 1:
        raise ValueError(f"rank {rank} of weight group {group_name!r} was claimed twice")
    return make_weight_group(store, rank, world_size, backend, timeout), store


def _is_tied(model: torch.nn.Module) -> bool:
    """Whether vLLM's model shares one Parameter between lm_head and embed_tokens."""
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    return head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 1)


def _with_tied_head(weights: Iterator[tuple[str, torch.Tensor]], tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass weights through; for a tied model whose push had no lm_head.weight, end with the embedding under it."""
    embed, head_seen = None, False
    for name, tensor in weights:
        if name == EMBED_NAME:
            embed = tensor
        head_seen = head_seen or name == HEAD_NAME
        yield name, tensor
    if tied and embed is not None and not head_seen:
        yield HEAD_NAME, embed


class WeightReceiver:
    """vLLM worker extension: joins the weight broadcast group and applies pushed weights in place."""

    _wr_group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL | None = None
    _wr_store: dist.Store | None = None
    _wr_backend: str = "gloo"
    _wr_timeout: timedelta | None = None

    def init_weight_group(
        self,
        master_addr: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        group_name: str,
    ) -> int:
        """Join group `group_name` as rank `rank_offset + self.rank`; returns that rank."""
        if self._wr_group is not None:
            raise ValueError("this worker already belongs to a weight group; close it first")
        rank = rank_offset + int(self.rank)  # type: ignore[attr-defined]
        self._wr_group, self._wr_store = join_weight_group(
            master_addr, master_port, rank, world_size, backend, timeout_s, group_name
        )
        self._wr_backend, self._wr_timeout = backend, timedelta(seconds=timeout_s)
        return rank

    def receive_weights(self) -> dict[str, float]:
        """Receive one push and apply it with vLLM's in-place reload; returns its version and counts."""
        if self._wr_group is None:
            raise ValueError("receive_weights before init_weight_group")
        device = self.device if self._wr_backend == "nccl" else torch.device("cpu")  # type: ignore[attr-defined]
        stream = BucketStream(self._wr_group, device, self._wr_timeout)
        t0 = time.perf_counter()
        try:
            stream.fetch_first()
        finally:
            if stream.broken:
                self.close_weight_group()
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        applied = False
        try:
            self.reload_weights(weights_iterator=_with_tied_head(iter(stream), _is_tied(model)))  # type: ignore[attr-defined]
            applied = True
        finally:
            if not applied:
                self._wr_abort_reload(model, stream)
        assert stream.version is not None and stream.done
        return {
            "policy_version": stream.version,
            "num_tensors": stream.num_tensors,
            "num_bytes": stream.num_bytes,
            "num_buckets": stream.num_buckets,
            "seconds": time.perf_counter() - t0,
        }

    def _wr_abort_reload(self, model: torch.nn.Module, stream: BucketStream) -> None:
        """After a failed reload: take the layers off the meta device, then drain the push or drop a broken group."""
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            finalize_layerwise_reload(model, self.vllm_config.model_config)  # type: ignore[attr-defined]
        if not stream.broken:
            stream.drain()
        if stream.broken:
            self.close_weight_group()

    def close_weight_group(self) -> None:
        """Leave the weight group (a no-op when not in one)."""
        group, self._wr_group, self._wr_store = self._wr_group, None, None
        if group is not None and hasattr(group, "shutdown"):
            group.shutdown()
