"""The learner process loop against the real replay queue (ZeroMQ) and a real MLflow store.

A synthetic actor thread leases prompts and returns groups of random tokens (no vLLM: the
actor tests cover generation); the learner trains, publishes versions, checkpoints, logs to
MLflow, and a resumed run continues with the same step and version numbers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch

from learner.main import run_learner
from shared.config import load_config
from shared.queue_client import ActorClient, ClientSettings, LearnerClient
from shared.queue_service import serve
from shared.tracking import Tracker, metric_history
from shared.types import make_group
from tests.component.test_queue_support import ListSource, free_port


def _synthetic_actor(settings: ClientSettings, stop: threading.Event, vocab: int) -> None:
    client = ActorClient(settings, 7)
    rng = np.random.default_rng(0)
    version = 0
    while not stop.is_set():
        reply = client.lease(2, version)
        version = max(version, reply.version)
        if not reply.leases:
            time.sleep(0.02)
            continue
        groups = []
        for lease in reply.leases:
            lengths = rng.integers(1, 12, 4)
            correct = rng.random(4) < 0.5
            groups.append(
                make_group(
                    lease=lease,
                    actor_id=7,
                    prompt_token_ids=rng.integers(3, vocab, 5),
                    responses=[
                        (rng.integers(3, vocab, n), -3.5 + 0.1 * rng.standard_normal(n), version) for n in lengths
                    ],
                    finish_reasons=["stop"] * 4,
                    rewards=np.where(correct, 1.0, -1.0),
                    correct=correct,
                    gen_started_at=time.time(),
                    gen_seconds=0.01,
                )
            )
        client.submit(groups)
    client.close()


def _run(random_model_dir: Path, tmp_path: Path, total_steps: int, resume: bool) -> tuple:
    cfg = load_config(
        [],
        [
            f"queue.port={free_port()}",
            f"queue.pub_port={free_port()}",
            "queue.max_staleness=1",
            "queue.lease_timeout_s=5",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=4",
            "learner.mini_batch_size=8",
            "learner.micro_batch_tokens=128",
            "algo.value_pretrain_steps=1",
            f"learner.total_steps={total_steps}",
            "learner.checkpoint_every=2",
            "learner.device=cpu",
            f"run_dir={tmp_path / 'run'}",
            f"resume={str(resume).lower()}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
        ],
    )
    stop = threading.Event()
    queue = threading.Thread(target=serve, args=(cfg, ListSource(1000)), kwargs={"stop_event": stop})
    queue.start()
    settings = ClientSettings.from_config(cfg)
    actor = threading.Thread(target=_synthetic_actor, args=(settings, stop, 50))
    actor.start()
    learner_client = LearnerClient(settings)
    tracker = Tracker(cfg)
    try:
        report = run_learner(
            cfg,
            model_path=str(random_model_dir),
            source=learner_client,
            pusher=None,
            device=torch.device("cpu"),
            tracker=tracker,
        )
        stats = learner_client.stats()
    finally:
        tracker.close()
        stop.set()
        learner_client.close()
        actor.join()
        queue.join()
    return cfg, report, stats, tracker.run_id


def test_learner_loop_trains_checkpoints_logs_and_resumes(random_model_dir: Path, tmp_path: Path) -> None:
    cfg, report, stats, run_id = _run(random_model_dir, tmp_path, total_steps=3, resume=False)
    assert (report.steps, report.version) == (3, 3)
    assert stats.identity_holds()
    assert all(m["async/version_lag_max"] <= cfg.queue.max_staleness for m in report.metrics)
    assert report.metrics[0]["train/value_only"] == 1.0 and report.metrics[1]["train/value_only"] == 0.0
    history = metric_history(run_id, ["loss/value", "async/version_lag_mean", "rollout/acc"], cfg.tracking.tracking_uri)
    assert [s for s, _ in history["loss/value"]] == [1, 2, 3]
    assert len(history["async/version_lag_mean"]) == 3

    _, resumed, _, _ = _run(random_model_dir, tmp_path, total_steps=5, resume=True)
    assert (resumed.steps, resumed.version) == (5, 5)
    assert len(resumed.metrics) == 2  # steps 4 and 5 only
