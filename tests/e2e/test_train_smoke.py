"""`vapo train` end to end in a subprocess: local Ray, the queue, one learner rank, one vLLM actor.

On a random-init char-level model (building the trained tiny model takes minutes), three steps
with one of value pretraining: the policy's parameters change, the version lag never exceeds
max_staleness, the queue's accounting identity holds, and the metrics reach MLflow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from shared.tracking import metric_history
from tests.component.conftest import build_random_model
from tests.component.test_queue_support import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_vapo_train_smoke(tmp_path: Path) -> None:
    model = build_random_model(tmp_path / "model", tie_word_embeddings=True)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cmd = [
        sys.executable,
        "-m",
        "deploy.cli",
        "train",
        str(ROOT / "configs" / "tiny_cpu.yaml"),
        f"model.path={model}",
        "learner.total_steps=3",
        "algo.value_pretrain_steps=1",
        "rollout.prompts_per_step=4",
        "learner.mini_batch_size=32",
        "rollout.max_new_tokens=48",
        "queue.max_staleness=1",
        f"queue.port={free_port()}",
        f"queue.pub_port={free_port()}",
        f"sync.master_port={free_port()}",
        f"run_dir={tmp_path / 'run'}",
        f"tracking.tracking_uri={uri}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "done: 3 steps, policy version 3" in proc.stdout, proc.stdout[-3000:]
    assert "identity holds: True" in proc.stdout
    run_id = re.search(r"MLflow run (\w+)", proc.stdout).group(1)

    history = metric_history(run_id, ["loss/value", "loss/policy", "async/version_lag_max", "rollout/len_mean"], uri)
    assert [s for s, _ in history["loss/value"]] == [1, 2, 3]
    assert [s for s, _ in history["loss/policy"]] == [2, 3]  # step 1 was value pretraining
    assert all(v <= 1 for _, v in history["async/version_lag_max"])

    from transformers import AutoModelForCausalLM

    from learner.checkpoint import export_policy, latest

    trained = AutoModelForCausalLM.from_pretrained(export_policy(latest(tmp_path / "run"), tmp_path / "out"))
    initial = AutoModelForCausalLM.from_pretrained(model)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, initial.get_parameter(n))]
    assert changed, "the policy did not change"
