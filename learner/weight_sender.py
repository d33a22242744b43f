"""The sending end of a weight push: learner rank 0 broadcasts full weights to every actor's vLLM workers.

Owns the TCPStore of the broadcast group (is_master=True, wait_for_workers=False, so it can
start before any actor) and the group itself: a `ProcessGroupGloo` (CPU) or
`ProcessGroupNCCL` (GPU), chosen by backend name and built directly on a `PrefixStore`, apart
from the learner's own torch.distributed world. Rank 0 is this sender; the actors' vLLM
workers (`actors.weight_receiver.WeightReceiver`) are ranks 1..world_size-1, one per tensor-
parallel worker, so world_size = 1 + the sum of the actors' TP sizes.

Generations: the actor set can change while a run goes on. `rebuild(world_size, group_name)`
closes the group and opens a new one under a new store prefix (a name no earlier generation
used, e.g. `weights/<n>`), so keys and peers of an old generation never mix with the new one;
the orchestrator tells the actors the new `group_name` (and each its `rank_offset`), and they
leave the old group and join the new one.

Push: `push(named_tensors, version)` takes (Hugging Face name, full unsharded tensor) pairs,
the names vLLM's `load_weights` understands, and streams them in buckets of at most
`bucket_bytes` (a larger tensor travels alone), each as two broadcasts (sizes, then one uint8
buffer holding the msgpack header and the tensors' bytes; see `shared.weights.protocol`), then
an empty final bucket. One flattened buffer per bucket keeps the number of collectives low;
memory beyond the model stays bounded by one bucket. The receivers must be inside
`receive_weights` while a push runs: the actor loop enters it when the learner announces a new
version.

Failure modes: a receiver that does not join within `timeout_s` makes the constructor (or
`rebuild`) raise TimeoutError naming the missing ranks; a receiver that dies during a push
makes the broadcast raise when the group's timeout expires (gloo) or the NCCL watchdog abort
it; the sender then closes the group (a later push raises until `rebuild`) and the caller
rebuilds it for the actors still alive. A tensor of a dtype the protocol does not know raises
ValueError before its bucket is sent, but possibly after earlier buckets; the receivers then
fail on their timeout, as they do when the sender dies mid-push.

Must not import actors, deploy or vllm.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.weights import protocol as wp
from shared.weights.group import broadcast_from_root, make_weight_group

NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class PushStats:
    """What one push moved and how long it took."""

    policy_version: int
    num_tensors: int
    num_buckets: int
    num_bytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return self.num_bytes / max(self.seconds, 1e-9)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class WeightSender:
    """Rank 0 of the weight broadcast group: owns the store, the group and the push."""

    def __init__(
        self,
        master_addr: str,
        master_port: int,
        world_size: int | None,
        *,
        backend: str = "gloo",
        timeout_s: float = 120.0,
        bucket_bytes: int = 256 * 2**20,
        group_name: str = "weights/0",
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl'; got {backend!r}")
        if bucket_bytes <= 0 or timeout_s <= 0:
            raise ValueError(f"bucket_bytes and timeout_s must be positive; got {bucket_bytes}, {timeout_s}")
        self.backend, self.bucket_bytes = backend, bucket_bytes
        self.timeout = timedelta(seconds=timeout_s)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        store = dist.TCPStore(master_addr, master_port, is_master=True, wait_for_workers=False, timeout=self.timeout)
        self.port: int = store.port
        self._store: dist.TCPStore | None = store
        self._used_names: set[str] = set()
        self._group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL | None = None
        self.group_name = ""
        self.world_size = 0
        if world_size is not None:  # None: the store only; the first group comes with `rebuild`
            self.rebuild(world_size, group_name)

    @property
    def store(self) -> dist.TCPStore:
        """The TCPStore every generation's prefix lives in (the membership keys too)."""
        if self._store is None:
            raise ValueError("the WeightSender is closed")
        return self._store

    @property
    def has_group(self) -> bool:
        """Whether a group is open (a push can go out)."""
        return self._group is not None

    def rebuild(self, world_size: int, group_name: str) -> None:
        """Close the current group and open generation `group_name` (never used before) of `world_size` ranks."""
        if world_size < 2:
            raise ValueError(f"a weight group needs the sender and at least one receiver; got world_size={world_size}")
        if group_name in self._used_names:
            raise ValueError(f"weight group name {group_name!r} was used by an earlier generation; pick a new one")
        if self._store is None:
            raise ValueError("rebuild on a closed WeightSender")
        self.close_group()
        self._used_names.add(group_name)
        self.group_name, self.world_size = group_name, world_size
        store = dist.PrefixStore(group_name, self._store)
        store.set(wp.WORLD_SIZE_KEY, str(world_size))
        keys = [wp.joined_key(r) for r in range(1, world_size)]
        try:
            store.wait(keys, self.timeout)
        except dist.DistStoreError as e:
            missing = [r for r, k in zip(range(1, world_size), keys, strict=True) if not store.check([k])]
            raise TimeoutError(
                f"weight group {group_name!r}: ranks {missing} did not join within {self.timeout}"
            ) from e
        self._group = make_weight_group(store, 0, world_size, self.backend, self.timeout)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        assert self._group is not None
        try:
            broadcast_from_root(self._group, tensor, self.timeout)
        except RuntimeError:  # DistBackendError, gloo timeouts: the group is out of step; only a rebuild helps
            self.close_group()
            raise

    def _send_bucket(self, items: list[tuple[str, torch.Tensor]], version: int, index: int, last: bool) -> int:
        metas, nbytes = wp.layout((name, _dtype_name(t.dtype), tuple(t.shape)) for name, t in items)
        header = wp.encode_header(wp.BucketHeader(version, index, last, nbytes, metas))
        start = wp.data_start(len(header))
        buffer = torch.empty(start + nbytes, dtype=torch.uint8, device=self.device)
        buffer[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        for meta, (_, t) in zip(metas, items, strict=True):
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            buffer[start + meta.offset : start + meta.offset + meta.nbytes].copy_(flat)
        self._broadcast(torch.tensor([len(header), buffer.numel()], dtype=torch.int64, device=self.device))
        self._broadcast(buffer)
        return nbytes

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> PushStats:
        """Broadcast (name, full tensor) pairs as policy `version`, bucket by bucket; returns what moved."""
        if self._group is None:
            raise ValueError("push on a closed WeightSender")
        t0 = time.perf_counter()
        num_tensors = num_bytes = num_buckets = 0
        nbytes_of = lambda item: item[1].numel() * item[1].element_size()
        for bucket in wp.group_into_buckets(named_tensors, nbytes_of, self.bucket_bytes):
            num_bytes += self._send_bucket(bucket, version, num_buckets, last=False)
            num_tensors += len(bucket)
            num_buckets += 1
        self._send_bucket([], version, num_buckets, last=True)
        return PushStats(version, num_tensors, num_buckets + 1, num_bytes, time.perf_counter() - t0)

    def close_group(self) -> None:
        """Leave the current group (the store stays, for the next generation)."""
        group, self._group = self._group, None
        if group is not None and hasattr(group, "shutdown"):
            group.shutdown()

    def close(self) -> None:
        """Close the group and the store."""
        self.close_group()
        self._store = None
