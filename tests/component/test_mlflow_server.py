"""Our Tracker and `vapo report` against a real `mlflow server` on localhost.

The server runs as its own process (`python -m mlflow server`, the same entry point as the
`mlflow` command) on a free port, with a temporary SQLite backend store and a proxied artifact
destination, and is torn down with its whole process group. The client side only gets
`MLFLOW_TRACKING_URI=http://127.0.0.1:PORT`, as a user pointing a run at a team server would:
the config's own `tracking.tracking_uri` is ignored.

Checks: the resolved config as params and as a YAML artifact that loads back to the same
config, metrics per step (NaN dropped), the `system/*` figures, the end-of-run plots under
`plots/`, and `vapo report RUN_ID` writing non-empty PNG files (and failing with one line for
a run that does not exist). Most of the test's time is the server's start-up.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.cli import main as vapo
from shared.config import flatten, load_config, to_yaml
from shared.tracking.plots import OVERVIEW_FILE, PANELS
from shared.tracking.tracker import (
    Tracker,
    download_artifact,
    metric_history,
    run_artifacts,
    run_metric_keys,
    run_params,
)
from tests.component.test_queue_support import free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_FILES = sorted([f"{p.name}.png" for p in PANELS] + [OVERVIEW_FILE])


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    pytest.fail(f"mlflow server not healthy after {timeout_s:.0f} s: {log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a running `mlflow server` with a temporary backend store and artifact destination."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process to start
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path, timeout_s=240)  # start-up takes 15-45 s on 2 loaded cores
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _logged(step: int) -> dict[str, float]:
    """What a learner step logs, trimmed: entropy only after a value-pretraining step, a NaN at step 3."""
    m = {
        "rollout/reward_mean": -1.0 + 0.4 * step,
        "rollout/acc": 0.1 * step,
        "rollout/len_mean": 40.0 - step,
        "async/version_lag_mean": 0.5,
        "async/version_lag_max": 1.0,
        "loss/value": float("nan") if step == 3 else 1.0 / step,
    }
    if step > 1:
        m["policy/entropy"] = 2.0 - 0.1 * step
    return m


def _assert_pngs(out_dir: Path) -> None:
    assert sorted(p.name for p in out_dir.glob("*.png")) == PNG_FILES
    for path in out_dir.glob("*.png"):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


def test_tracker_and_report_against_a_real_server(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = load_config([], ["algo.clip_high=0.3", "tracking.experiment=server-test", "tracking.tracking_uri=x.db"])
    tracker = Tracker(cfg)
    assert tracker.uri == mlflow_server
    for step in range(1, 5):
        tracker.log_metrics(_logged(step), step=step)
    plots = tracker.log_plots()
    tracker.close()
    run_id = tracker.run_id

    params = run_params(run_id, mlflow_server)
    assert params["algo.clip_high"] == "0.3"
    assert params.keys() == flatten(cfg).keys()
    config_file = download_artifact(run_id, "config.yaml", tmp_path / "dl", mlflow_server)
    assert to_yaml(load_config([config_file])) == to_yaml(cfg)

    history = metric_history(run_id, ["rollout/acc", "policy/entropy", "loss/value"], mlflow_server)
    assert [s for s, _ in history["rollout/acc"]] == [1, 2, 3, 4]
    assert all(math.isclose(v, 0.1 * s) for s, v in history["rollout/acc"])
    assert [s for s, _ in history["policy/entropy"]] == [2, 3, 4]
    assert [s for s, _ in history["loss/value"]] == [1, 2, 4]  # the NaN was dropped, not stored
    keys = run_metric_keys(run_id, mlflow_server)
    assert {"system/cpu_percent", "system/rss_gib", "system/host_mem_used_frac"} <= keys
    assert [s for s, _ in metric_history(run_id, ["system/rss_gib"], mlflow_server)["system/rss_gib"]] == [1, 2, 3, 4]

    artifacts = run_artifacts(run_id, mlflow_server)
    assert sorted(plots) == sorted(f"plots/{name}" for name in PNG_FILES)
    assert all(artifacts[p] > 5000 for p in plots)

    # vapo report: the server from the environment, then named explicitly
    assert vapo(["report", run_id, "--out", str(tmp_path / "env")]) == 0
    _assert_pngs(tmp_path / "env")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert vapo(["report", run_id, "--out", str(tmp_path / "flag"), "--tracking-uri", mlflow_server]) == 0
    _assert_pngs(tmp_path / "flag")
    assert (tmp_path / "flag" / OVERVIEW_FILE).read_bytes() == (tmp_path / "env" / OVERVIEW_FILE).read_bytes()

    capsys.readouterr()
    assert vapo(["report", "0" * 32, "--out", str(tmp_path / "none"), "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vapo report: no MLflow run") and "\n" not in err
    assert not (tmp_path / "none").exists()
