"""The learner's collectives over its process group: reductions of counts and metrics, and the scatter
of a step's prompt groups from rank 0.

Owns every collective the train step and the loop make besides FSDP's own (which `learner.model`
sets up) and the weight push (`learner.weight_sync`, its own communicator). With no process group,
or a world of one, every function is the identity, so one code path serves one rank and many.

The scatter moves whole groups (group statistics stay on one rank), round-robin, as the bytes of
`shared.wire.encode_groups`: one broadcast of the size, one of the buffer; nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from shared.types import RolloutGroup
from shared.wire import decode_groups, encode_groups


def init(backend: str, init_method: str, rank: int, world_size: int) -> None:
    """Join the learner's process group (`learner.backend`: gloo on CPU, NCCL on GPU)."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def initialized() -> bool:
    return dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """`t` reduced in place over every rank (SUM by default), and returned."""
    if world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """`t` reduced in place with MAX over every rank, and returned."""
    return all_reduce(t, dist.ReduceOp.MAX)


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank; every rank must call it at the same point."""
    return bool(all_reduce_max(torch.tensor([1 if flag else 0])).item())


def scatter_groups(groups: Sequence[RolloutGroup] | None) -> list[RolloutGroup]:
    """Rank 0 passes the step's groups (the others None); every rank gets its round-robin share."""
    if world_size() == 1:
        assert groups is not None
        return list(groups)
    me = rank()
    size = torch.zeros(1, dtype=torch.long)
    payload = b""
    if me == 0:
        assert groups is not None
        payload = encode_groups(groups)
        size[0] = len(payload)
    dist.broadcast(size, src=0)
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if me == 0 \
        else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    return decode_groups(buf.numpy().tobytes())[me :: world_size()]
