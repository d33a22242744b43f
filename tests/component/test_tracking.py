"""The end-of-run artifacts with two FSDP ranks on gloo and a real MLflow SQLite store; `vapo report` errors.

Two ranks shard the same perturbed policy; only rank 0 holds a Tracker. `log_final_artifacts`
must not hang (the ranks agree by an all-reduce whether to gather), and the run must then hold
the plots and a `policy/` directory whose weights are exactly the perturbed full policy, tied
embeddings included. The single-rank path runs in the learner-loop and e2e smoke tests.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from deploy.cli import main as vapo
from shared.tracking.plots import OVERVIEW_FILE, PANELS, write_plots
from shared.tracking.tracker import download_artifact, run_artifacts
from tests.component.test_queue_support import free_port


def _perturbed_policy(model_dir: str) -> torch.nn.Module:
    from learner.model import load_policy

    policy = load_policy(model_dir)
    torch.manual_seed(123)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


def _rank_main(rank: int, world: int, port: int, model_dir: str, uri: str, run_id_file: str) -> None:
    import torch.distributed as dist

    from learner.final_artifacts import log_final_artifacts
    from learner.model import shard
    from shared.config import load_config
    from shared.tracking.tracker import Tracker

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    policy = _perturbed_policy(model_dir)
    shard(policy)
    cfg = load_config([], [f"tracking.tracking_uri={uri}", f"model.path={model_dir}"])
    tracker = None
    if rank == 0:
        tracker = Tracker(cfg, system_metrics=False)
        for step in (1, 2, 3):
            tracker.log_metrics({"rollout/acc": 0.2 * step, "async/version_lag_max": 1.0}, step=step)
    log_final_artifacts(cfg, policy, tracker)
    if tracker is not None:
        tracker.close()
        Path(run_id_file).write_text(tracker.run_id)
    dist.destroy_process_group()


def test_final_artifacts_from_two_fsdp_ranks(random_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    ctx = mp.get_context("spawn")
    port = free_port()
    args = (str(random_model_dir), uri, str(tmp_path / "run_id"))
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    run_id = (tmp_path / "run_id").read_text()

    artifacts = run_artifacts(run_id, uri)
    assert {f"plots/{p.name}.png" for p in PANELS} | {f"plots/{OVERVIEW_FILE}"} <= artifacts.keys()
    assert {"policy/config.json", "policy/model.safetensors", "policy/tokenizer.json"} <= artifacts.keys()

    policy_dir = download_artifact(run_id, "policy", tmp_path / "dl", uri)
    exported = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    expected = _perturbed_policy(str(random_model_dir))
    for name, param in expected.named_parameters():
        assert torch.equal(exported.get_parameter(name), param), name
    assert exported.get_output_embeddings().weight.data_ptr() == exported.get_input_embeddings().weight.data_ptr()
    text = "what is 12+7? 19."
    assert AutoTokenizer.from_pretrained(policy_dir)(text).input_ids == AutoTokenizer.from_pretrained(random_model_dir)(
        text
    ).input_ids


def test_report_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.db"
    assert vapo(["report", "abc", "--tracking-uri", f"sqlite:///{missing}", "--out", str(tmp_path / "out")]) == 2
    expected = f"vapo report: no MLflow store at sqlite:///{missing} (the file does not exist)"
    assert capsys.readouterr().err.strip() == expected
    assert not missing.exists() and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="nothing to plot"):
        write_plots({"rollout/acc": [], "unrelated": [(1, 1.0)]}, tmp_path / "empty")


def test_policy_upload_can_be_switched_off(random_model_dir: Path, tmp_path: Path) -> None:
    from learner.final_artifacts import log_final_artifacts
    from shared.config import load_config
    from shared.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    overrides = [f"tracking.tracking_uri={uri}", "tracking.log_policy=false", f"model.path={random_model_dir}"]
    cfg = load_config([], overrides)
    tracker = Tracker(cfg, system_metrics=False)
    tracker.log_metrics({"rollout/acc": 0.5}, step=1)
    log_final_artifacts(cfg, _perturbed_policy(str(random_model_dir)), tracker)
    tracker.close()
    artifacts = run_artifacts(tracker.run_id, uri)
    assert f"plots/{OVERVIEW_FILE}" in artifacts and not any(a.startswith("policy/") for a in artifacts)


def test_trackers_in_one_process_keep_their_own_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from shared.config import load_config
    from shared.tracking.tracker import Tracker, metric_history

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = []
    for name in ("a", "b"):  # mlflow.set_tracking_uri writes os.environ; the second must not log into the first
        uri = f"sqlite:///{tmp_path / name}.db"
        tracker = Tracker(load_config([], [f"tracking.tracking_uri={uri}"]), system_metrics=False)
        tracker.log_metrics({"rollout/acc": 0.5}, step=1)
        tracker.close()
        runs.append((tracker.run_id, uri))
        assert "MLFLOW_TRACKING_URI" not in os.environ
    for run_id, uri in runs:
        assert metric_history(run_id, ["rollout/acc"], uri)["rollout/acc"] == [(1, 0.5)]


def test_a_resume_continues_the_recorded_run_and_the_last_value_of_a_step_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import time

    from shared.config import load_config
    from shared.tracking.tracker import RUN_RECORD, Tracker, metric_history, record_run, recorded_run, run_artifacts

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config([], [f"tracking.tracking_uri={uri}", f"run_dir={tmp_path / 'run'}"])
    assert recorded_run(cfg) is None  # nothing recorded yet
    first = Tracker(cfg, system_metrics=False)
    record_run(cfg.run_dir, first)
    for step in (1, 2, 3):  # steps 2 and 3 come after the checkpoint at step 1 and before the crash
        first.log_metrics({"rollout/acc": 0.1 * step}, step=step)
    first.close("FAILED")

    time.sleep(0.01)  # the resumed values are logged later, by the clock too
    assert recorded_run(cfg) == first.run_id
    resumed = Tracker(load_config([], [f"tracking.tracking_uri={uri}", f"run_dir={tmp_path / 'run'}",
                                       "learner.total_steps=9"]), run_id=first.run_id, system_metrics=False)
    for step in (2, 3, 4):
        resumed.log_metrics({"rollout/acc": 0.5 + 0.1 * step}, step=step)
    resumed.close()
    assert resumed.run_id == first.run_id
    history = metric_history(first.run_id, ["rollout/acc"], uri)["rollout/acc"]
    assert [s for s, _ in history] == [1, 2, 3, 4]
    assert [round(v, 6) for _, v in history] == [0.1, 0.7, 0.8, 0.9]  # the resumed run's values win
    assert "resumes/1/config.yaml" in run_artifacts(first.run_id, uri) and "config.yaml" in run_artifacts(
        first.run_id, uri)

    record = tmp_path / "run" / RUN_RECORD
    other = load_config([], [f"tracking.tracking_uri=sqlite:///{tmp_path / 'other.db'}", f"run_dir={tmp_path / 'run'}"])
    assert recorded_run(other) is None and "starting a new MLflow run" in caplog.text  # another store
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).delete_run(first.run_id)
    assert recorded_run(cfg) is None  # deleted: MLflow would refuse to start it
    record.write_text(json.dumps({"tracking_uri": uri, "run_id": "0" * 32}))
    assert recorded_run(cfg) is None  # a run the store does not hold
    record.write_text("{not json")
    assert recorded_run(cfg) is None
