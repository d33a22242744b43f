"""The weight-broadcast process group both sides build, the one collective they run on it, and the two
store writes both sides of the membership protocol make: used by the learner's sender and membership
manager and by the actors' receiver and follower.

Not pure (it imports torch.distributed), so it stays out of `shared/weights/protocol.py`. The group
is built directly on a store, apart from the default torch.distributed world (vLLM owns that one
in the actor's workers, FSDP in the learner), so a failure in it never touches the training group.

Failure semantics per backend (a receiver that died or stalled, a sender that died mid-push):
- gloo: a collective raises when the group's timeout expires or a peer's connection drops; the
  caller closes the group and rebuilds it without the dead member (`learner.weight_sync`).
- NCCL: `work.wait()` does not block the host (it orders the current stream), and the NCCL
  watchdog's default on a timeout is to tear the whole process down (TORCH_NCCL_ASYNC_ERROR_HANDLING
  3), which would take learner rank 0 with it. So the weight group is built with error handling 2
  (abort this communicator only) and a watchdog timeout twice the group's, and `broadcast_from_root`
  polls the work itself: past the timeout it aborts the communicator and raises RuntimeError, the same
  signal gloo gives, so the caller closes and rebuilds exactly as on gloo. An aborted broadcast
  leaves the receivers' buffers partly written; they already treat a failed push as unusable weights.
  Untested on NCCL here (no GPU in CI); the gloo half is tested for real.
"""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.weights import protocol as wp

_NCCL_ERRORS = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
_POLL_S = 0.0005  # between two looks at an NCCL broadcast's completion


def make_weight_group(
    store: dist.Store, rank: int, world_size: int, backend: str, timeout: timedelta
) -> dist.ProcessGroupGloo | dist.ProcessGroupNCCL:
    """A process group of `backend` ('gloo' or 'nccl') on `store`, apart from the default world."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = 2 * timeout  # the watchdog is a backstop: `broadcast_from_root` gives up first
        previous = os.environ.get(_NCCL_ERRORS)
        os.environ[_NCCL_ERRORS] = "2"  # read when the group is constructed: abort the communicator, keep the process
        try:
            return dist.ProcessGroupNCCL(store, rank, world_size, opts)
        finally:
            if previous is None:
                os.environ.pop(_NCCL_ERRORS, None)
            else:
                os.environ[_NCCL_ERRORS] = previous
    raise ValueError(f"weight group backend must be 'gloo' or 'nccl'; got {backend!r}")


def broadcast_from_root(
    group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL,
    tensor: torch.Tensor,
    timeout: timedelta | None = None,
    *,
    poll: bool | None = None,
) -> None:
    """Broadcast `tensor` in place from rank 0 of `group` and wait; a timeout or dead peer raises RuntimeError.

    With a `timeout`, on NCCL (`poll` None: any group but gloo's) the host polls the work and, past the
    timeout, aborts the communicator before raising (see the module docstring); gloo enforces the group's
    own timeout in `wait`. Tests pass `poll=True` to run the NCCL path's polling on gloo.
    """
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    work = group.broadcast([tensor], opts)  # type: ignore[union-attr]  # missing from the stubs
    poll = not isinstance(group, dist.ProcessGroupGloo) if poll is None else poll
    if timeout is None or not poll:
        work.wait()
        return
    deadline = time.monotonic() + timeout.total_seconds()
    while not work.is_completed():
        if time.monotonic() > deadline:
            group.abort()
            raise RuntimeError(f"weight broadcast did not complete within {timeout}; NCCL communicator aborted")
        time.sleep(_POLL_S)
    work.wait()  # raises an error the communicator recorded


def put(store: dist.Store, key: str, value: bytes) -> None:
    """store.set with bytes (the torch stubs say str; the binding takes bytes)."""
    store.set(key, value)  # type: ignore[arg-type]


def mark_member(store: dist.Store, member: wp.Member, raw: bytes, state: str) -> bool:
    """Compare-and-set the registration `raw` (as read) of `member` to `state`; whether it was written
    (a registration written meanwhile, e.g. by a restarted actor, is kept)."""
    marked = wp.encode_member(dataclasses.replace(member, state=state))
    return bytes(store.compare_set(wp.member_key(member.actor_id), raw, marked)) == marked  # type: ignore[arg-type]
