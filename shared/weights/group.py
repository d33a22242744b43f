"""The weight-broadcast process group both sides build, and the one collective they run on it: used by
the learner's sender and the actors' receiver.

Not pure (it imports torch.distributed), so it stays out of `shared/weights/protocol.py`. The group
is built directly on a store, apart from the default torch.distributed world (vLLM owns that one
in the actor's workers, FSDP in the learner).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


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
