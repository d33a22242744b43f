"""The weight-broadcast process group both sides build: one function, used by the learner's sender and
the actors' receiver.

Not pure (it imports torch.distributed), so it stays out of `shared/weight_protocol.py`. The group
is built directly on a store, apart from the default torch.distributed world (vLLM owns that one
in the actor's workers, FSDP in the learner).
"""

from __future__ import annotations

from datetime import timedelta

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
