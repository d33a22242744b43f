"""`vapo train` end to end in a subprocess: local Ray, the queue, one learner rank, one vLLM actor.

On a random-init char-level model (building the trained tiny model takes minutes), three steps
with one of value pretraining: the policy's parameters change, the version lag never exceeds
max_staleness, the queue's accounting identity holds, and the metrics reach MLflow: every key of
DESIGN.md section 3 and the learner process's system figures, per step. At the end of the run the
MLflow run holds the training-curve plots and the exported policy (`policy/`, the same weights as
the last checkpoint), and `vapo report RUN_ID` draws the plots from the SQLite store.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deploy.cli import main as vapo
from shared.tracking.plots import OVERVIEW_FILE, PANELS
from shared.tracking.tracker import download_artifact, metric_history, run_artifacts, run_metric_keys
from tests.component.conftest import SHORT_RUN_ON_A_RANDOM_MODEL, build_random_model
from tests.component.test_queue_support import free_port

ROOT = Path(__file__).resolve().parents[2]

DESIGN_METRICS = (  # DESIGN.md section 3
    "loss/policy", "loss/value", "loss/nll_pos",
    "policy/clipfrac_high", "policy/clipfrac_low", "policy/approx_kl", "policy/entropy",
    "value/explained_var",
    "rollout/reward_mean", "rollout/acc", "rollout/len_mean",
    "async/version_lag_mean", "async/version_lag_max", "async/dropped_stale",
    "perf/gen_tokens_per_s", "perf/train_tokens_per_s", "perf/learner_idle_frac",
    "sync/push_seconds",
)  # fmt: skip
SYSTEM_METRICS = ("system/cpu_percent", "system/rss_gib", "system/host_mem_used_frac")
PNG_FILES = sorted([f"{p.name}.png" for p in PANELS] + [OVERVIEW_FILE])


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
        *SHORT_RUN_ON_A_RANDOM_MODEL,
        "learner.total_steps=3",
        "rollout.max_new_tokens=48",
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
    keys = run_metric_keys(run_id, uri)
    assert not [k for k in DESIGN_METRICS + SYSTEM_METRICS if k not in keys]
    per_step = metric_history(run_id, ["sync/push_seconds", "queue/num_actors", *SYSTEM_METRICS], uri)
    assert all([s for s, _ in points] == [1, 2, 3] for points in per_step.values()), per_step
    assert all(v > 0 for _, v in per_step["system/rss_gib"])

    artifacts = run_artifacts(run_id, uri)
    assert all(artifacts[f"plots/{name}"] > 5000 for name in PNG_FILES)
    assert {"config.yaml", "policy/config.json", "policy/model.safetensors", "policy/tokenizer.json"} <= set(artifacts)
    assert vapo(["report", run_id, "--tracking-uri", uri, "--out", str(tmp_path / "report")]) == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == PNG_FILES

    from transformers import AutoModelForCausalLM

    from learner.checkpoint import export_policy, latest

    trained = AutoModelForCausalLM.from_pretrained(export_policy(latest(tmp_path / "run"), tmp_path / "out"))
    initial = AutoModelForCausalLM.from_pretrained(model)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, initial.get_parameter(n))]
    assert changed, "the policy did not change"
    logged = AutoModelForCausalLM.from_pretrained(download_artifact(run_id, "policy", tmp_path / "dl", uri))
    assert all(torch.equal(p, logged.get_parameter(n)) for n, p in trained.named_parameters())


@pytest.mark.slow
def test_vapo_train_with_a_tensor_parallel_actor(tmp_path: Path) -> None:
    """`actors.tensor_parallel_size=2` under Ray: vLLM's multiprocessing executor with a core per worker
    (`actors.engine.cpu_thread_binding`), both workers in the weight group (world size 1 + 2), and every push
    after value pretraining received."""
    model = build_random_model(tmp_path / "model", tie_word_embeddings=True)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cmd = [
        sys.executable, "-m", "deploy.cli", "train", str(ROOT / "configs" / "tiny_cpu.yaml"), f"model.path={model}",
        *SHORT_RUN_ON_A_RANDOM_MODEL, "learner.total_steps=3", "rollout.max_new_tokens=32",
        "actors.tensor_parallel_size=2", f"queue.port={free_port()}", f"queue.pub_port={free_port()}",
        f"sync.master_port={free_port()}", f"run_dir={tmp_path / 'run'}", f"tracking.tracking_uri={uri}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "done: 3 steps, policy version 3" in proc.stdout, out[-3000:]
    assert "world size 3" in out  # the learner and the actor's two workers
    # version 1 was value pretraining (nothing pushed); versions 2 and 3 reached both workers
    assert "weights of version 2" in out and "weights of version 3" in out, out[-3000:]
    assert "weights of version 1 in" not in out
    assert "is dead" not in out
