"""The learner's process groups and its collectives on them: reductions of counts and metrics, the stop
vote, barriers and the scatter of a step's prompt groups from rank 0.

Two groups, joined by every rank in `init` (DESIGN.md section 7):
- the device group, the default world (`learner.backend`: NCCL on GPU, gloo on CPU), carries only
  tensors on the training device: FSDP's all-gathers and reduce-scatters, DTensor reductions (the
  gradient norm), `iter_full_params`. NCCL has no CPU tensors, so nothing else may go over it;
- the control group, always gloo, carries the control plane: every tensor this module moves (stop
  flags, counts and metric sums, the group scatter: all on CPU), barriers, and the coordination of
  `torch.distributed.checkpoint` (`control_group`), so a control message never takes GPU memory or
  waits behind the device's stream.
`all_reduce` picks the group by the tensor's device (CPU: control; else: device), so a caller never
names one. The weight push is a third communicator (`learner.weight_sync`), never either of these.
With no process group, or a world of one, every function is the identity, so one code path serves
one rank and many.

The scatter moves whole groups (group statistics stay on one rank), round-robin, as the bytes of
`shared.wire.encode_groups`: one broadcast of the size, one of the buffer; nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from shared.types import RolloutGroup
from shared.wire import decode_groups, encode_groups

_control: tuple[Any, dist.ProcessGroup] | None = None
"""(the world it was made in, the gloo group of the control plane over every rank of that world)."""


def init(backend: str, init_method: str, rank: int, world_size: int) -> None:
    """Join the device group (`learner.backend`: gloo on CPU, NCCL on GPU), then the gloo control group."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    control_group()


def destroy() -> None:
    global _control
    _control = None
    if dist.is_initialized():
        dist.destroy_process_group()


def control_group() -> dist.ProcessGroup | None:
    """The control plane's gloo group; None without a process group.

    `init` makes it; a process group joined by hand (tests that call `dist.init_process_group`
    themselves) gets its own on first use, made collectively: every rank reaches its first control
    collective at the same point, as for any collective.
    """
    global _control
    if not dist.is_initialized():
        return None
    if _control is None or _control[0] is not dist.group.WORLD:
        _control = (dist.group.WORLD, dist.new_group(backend="gloo"))
    return _control[1]


def initialized() -> bool:
    return dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank, on the control group."""
    if world_size() > 1:
        dist.barrier(group=control_group())


def all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """`t` reduced in place over every rank (SUM by default), and returned: a CPU tensor over the control
    group, a tensor on the training device over the device group."""
    if world_size() > 1:
        dist.all_reduce(t, op=op, group=control_group() if t.device.type == "cpu" else None)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """`t` reduced in place with MAX over every rank, and returned."""
    return all_reduce(t, dist.ReduceOp.MAX)


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank; every rank must call it at the same point."""
    return bool(all_reduce_max(torch.tensor([1 if flag else 0])).item())


def broadcast_code(code: int) -> int:
    """Rank 0's `code` on every rank (the others pass anything); over the control group."""
    t = torch.tensor([code], dtype=torch.long)
    dist.broadcast(t, src=0, group=control_group())
    return int(t.item())


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
    group = control_group()  # every rank of the world: its rank 0 is the world's
    dist.broadcast(size, src=0, group=group)
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if me == 0 \
        else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buf, src=0, group=group)
    return decode_groups(buf.numpy().tobytes())[me :: world_size()]
