"""A checking wrapper (tests only) around torch.distributed's collectives: with the learner's device declared
non-CPU, our code may put a CPU tensor on no group but the learner's gloo control group.

Why a wrapper and not a GPU: NCCL has no CPU tensors, so on GPUs a control message (a stop flag, a
count, the group scatter, a barrier) sent over the device group fails at once. Here every tensor is
on CPU and the device group is gloo, so nothing would fail; `DeviceGroupCheck` makes the same
mistake fail loudly. It replaces the collectives of the `torch.distributed` namespace (the ones
`learner.dist` and FSDP call) while active, and for each call looks at who called it:
- from torch itself (FSDP's all-gathers and reduce-scatters, DTensor, DCP's coordination): the
  tensors are the model's, on the training device by construction, or placed by torch; counted
  under `torch`, not checked;
- from anywhere else (the learner's code): on the control group it is counted under `control`; on
  any other group (the device group) it is a violation when the declared device is not CPU and a
  tensor is on CPU, or when there is no tensor at all (a barrier, an object collective: the control
  plane by nature). The violation raises before the collective is issued, so no rank is left
  waiting in it.
The counts let a test show the check was live (it saw control traffic and torch's device traffic),
so it cannot pass vacuously.
"""

from __future__ import annotations

import inspect
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from learner import dist as ldist

COLLECTIVES = tuple(name for name in (
    "all_reduce", "broadcast", "barrier", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "gather", "scatter", "all_to_all",
    "all_to_all_single", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
) if hasattr(dist, name))
"""The collectives of the torch.distributed namespace that this torch has (FSDP2 calls the `_single` ones)."""


class DeviceGroupViolation(AssertionError):
    """A CPU tensor (or a control-plane message) on the device group while the device is declared non-CPU."""


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


class DeviceGroupCheck:
    """Counts of the collectives seen, by `torch`, `control` and `device` (our code on the device group)."""

    def __init__(self, declared_device: str) -> None:
        self.declared_device = declared_device
        self.counts: Counter[str] = Counter()

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        def checked(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller == "torch" or caller.startswith("torch."):
                self.counts["torch"] += 1
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            group = bound.arguments.get("group")
            if group is not None and group is ldist.control_group():
                self.counts["control"] += 1
                return original(*args, **kwargs)
            self.counts["device"] += 1
            tensors = [t for k, v in bound.arguments.items() if k != "group" for t in _tensors(v)]
            on_cpu = [t for t in tensors if t.device.type == "cpu"]
            if self.declared_device != "cpu" and (on_cpu or not tensors):
                what = f"{len(on_cpu)} CPU tensor(s)" if tensors else "no tensor (control plane)"
                raise DeviceGroupViolation(f"{name} from {caller} on the device group with {what} while the "
                                           f"learner's device is {self.declared_device}")
            return original(*args, **kwargs)

        return checked

    @contextmanager
    def active(self) -> Iterator[DeviceGroupCheck]:
        """Replace torch.distributed's collectives with checked ones until the block ends."""
        originals = {name: getattr(dist, name) for name in COLLECTIVES}
        try:
            for name, original in originals.items():
                setattr(dist, name, self._wrap(name, original))
            yield self
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)
