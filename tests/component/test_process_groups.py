"""The learner's two process groups: a CPU tensor never goes over the device group.

Two gloo ranks run the real learner loop (`run_learner`: the stop votes, the scatter of rank 0's
groups, two bf16 FSDP train steps, the weight gathers, the final checkpoint and the end-of-run
vote) under `DeviceGroupCheck` with the device declared `cuda`: on GPUs the device group is NCCL,
which has no CPU tensors, so every control message must take the gloo control group. The same
ranks then show that the check is live: a CPU all-reduce on the device group, and the learner's
own stop vote with its control group swapped for the device group (what the code did before
there were two groups), both trip it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from learner import dist as ldist
from shared.config import load_config
from shared.types import QueueStats, RolloutGroup
from tests.component.device_group_check import DeviceGroupCheck, DeviceGroupViolation
from tests.component.test_learner import _free_port, _groups


@dataclass
class _Batch:
    groups: list[RolloutGroup]
    stats: QueueStats = field(default_factory=QueueStats)
    stopping: bool = False


class ListBatches:
    """Rank 0's batch source: a fresh set of four prompt groups per call."""

    def __init__(self) -> None:
        self.calls = 0
        self.versions: list[int] = []

    def get_batch(self, num_groups: int, timeout_s: float) -> _Batch:
        self.calls += 1
        return _Batch(_groups(seed=self.calls, num_groups=num_groups))

    def publish_version(self, version: int, weights_version: int | None = None) -> None:
        self.versions.append(version)


def _trips(fn) -> bool:
    try:
        fn()
    except DeviceGroupViolation:
        return True
    return False


def _rank_main(rank: int, port: int, model_dir: str, run_dir: str) -> None:
    from learner.main import run_learner

    torch.set_num_threads(1)
    ldist.init("gloo", f"tcp://127.0.0.1:{port}", rank, 2)
    cfg = load_config([], [
        f"model.path={model_dir}", "learner.device=cpu", "model.dtype=bfloat16", f"run_dir={run_dir}",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "learner.mini_batch_size=16",
        "learner.micro_batch_tokens=96", "algo.value_pretrain_steps=1", "algo.kl_coef=0.01",
        "learner.total_steps=2", "learner.checkpoint_every=0",
    ])
    check = DeviceGroupCheck("cuda")
    try:
        with check.active():
            report = run_learner(cfg, source=ListBatches() if rank == 0 else None, pusher=None,
                                 device=torch.device("cpu"))
        seen = dict(check.counts)
        with check.active():
            cpu_on_device_group = _trips(lambda: dist.all_reduce(torch.zeros(1)))
            real_control = ldist.control_group
            ldist.control_group = lambda: None  # type: ignore[assignment]  # one group for everything, as before
            try:
                old_stop_vote = _trips(lambda: ldist.any_rank(False))
                old_scatter = _trips(lambda: ldist.scatter_groups(_groups() if rank == 0 else None))
            finally:
                ldist.control_group = real_control  # type: ignore[assignment]
        result = {"steps": report.steps, "seen": seen, "cpu_on_device_group": cpu_on_device_group,
                  "old_stop_vote": old_stop_vote, "old_scatter": old_scatter,
                  "losses": [m["loss/value"] for m in report.metrics]}
        Path(run_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        ldist.destroy()


def test_control_messages_never_use_the_device_group(random_model_dir: Path, tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(random_model_dir), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["steps"] == 2
        # the check was live: it saw the learner's control traffic and FSDP's device traffic, and
        # nothing of ours on the device group
        assert got["seen"].get("control", 0) >= 10 and got["seen"].get("torch", 0) >= 10, got["seen"]
        assert got["seen"].get("device", 0) == 0, got["seen"]
        assert got["cpu_on_device_group"] and got["old_stop_vote"] and got["old_scatter"], got
    assert (tmp_path / "checkpoints" / "step_000002" / "meta.json").is_file()
