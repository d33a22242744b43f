"""The weight-broadcast process group both sides build, the one collective they run on it, and the two
store writes both sides of the membership protocol make: used by the learner's sender and membership
manager and by the actors' receiver and follower.

Not pure (it imports torch.distributed), so it stays out of `shared/weights/protocol.py`. The group
is built directly on a store, apart from the default torch.distributed world (vLLM owns that one
in the actor's workers, FSDP in the learner).
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.weights import protocol as wp


def make_weight_group(
    store: dist.Store, rank: int, world_size: int, backend: str, timeout: timedelta
) -> dist.ProcessGroupGloo | dist.ProcessGroupNCCL:
    """A process group of `backend` ('gloo' or 'nccl') on `store`, apart from the default world."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"weight group backend must be 'gloo' or 'nccl'; got {backend!r}")


def broadcast_from_root(group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL, tensor: torch.Tensor) -> None:
    """Broadcast `tensor` in place from rank 0 of `group` and wait; a timeout or dead peer raises RuntimeError."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()  # type: ignore[union-attr]  # missing from the stubs


def put(store: dist.Store, key: str, value: bytes) -> None:
    """store.set with bytes (the torch stubs say str; the binding takes bytes)."""
    store.set(key, value)  # type: ignore[arg-type]


def mark_member(store: dist.Store, member: wp.Member, raw: bytes, state: str) -> bool:
    """Compare-and-set the registration `raw` (as read) of `member` to `state`; whether it was written
    (a registration written meanwhile, e.g. by a restarted actor, is kept)."""
    marked = wp.encode_member(dataclasses.replace(member, state=state))
    return bytes(store.compare_set(wp.member_key(member.actor_id), raw, marked)) == marked  # type: ignore[arg-type]
