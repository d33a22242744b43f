"""Experiment tracking: the one module that imports mlflow.

Owns: starting (or resuming) an MLflow run, logging the resolved config once (flat params and
a YAML artifact), per-step metrics, and artifacts. The learner's rank 0 is the only writer,
so one run holds the learner's, the actors' and the queue's figures. Reading a finished run
back (`metric_history`, `run_params`) lives here too, for `vapo report` and the tests.

System figures: every `log_metrics` call adds `system/*` figures of the logging process (the
learner's rank 0) measured at that step: its CPU use since the previous call, its resident
memory, the host's memory, and CUDA memory when a GPU is in use. They are logged at the
learner's step rather than by MLflow's own sampling thread (`log_system_metrics`), so they line
up with the training metrics and need no extra thread.

Resume: a run records its MLflow run in `run_dir/mlflow_run.json` (`record_run`); `resume=true`
from a checkpoint of that `run_dir` continues that run (`recorded_run`: same store, run still
there), so one MLflow run holds the whole training curve however often it was resumed. The
resumed run's config goes to `resumes/<n>/config.yaml` (params, once logged, are immutable) and
the tag `vapo.resumes` counts the resumes. Steps logged after the checkpoint and before the
crash are logged again by the resumed run; `metric_history` keeps, per step, the value logged
last. Otherwise (no record, another store, the run gone or deleted) a new run starts, with the reason
in the log.

End of run: `log_plots` draws the training curves (`shared.tracking.plots`) from the run's own logged
history, the same input `vapo report` uses, so a resumed run's plots cover all its steps.

Store: `tracking.tracking_uri` (default a local SQLite file); a `MLFLOW_TRACKING_URI` in the
environment wins, so a real MLflow server works unchanged.

Failure modes: a tracking server that goes away makes `log_metrics` raise after mlflow's own
retries; the learner treats that as fatal rather than training unobserved. Param values longer
than MLflow's limit are truncated (the YAML artifact keeps the full config).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import VapoConfig, flatten, to_yaml
from shared.tracking.plots import PLOT_KEYS, write_plots

_URI_ENV = "MLFLOW_TRACKING_URI"
RUN_RECORD = "mlflow_run.json"
"""In `run_dir`: the store and id of the MLflow run whose checkpoints the directory holds."""
_RESUMES_TAG = "vapo.resumes"

log = logging.getLogger("vapo.tracking")
_MAX_PARAM_LEN = 500
_GIB = float(1 << 30)


class SystemProbe:
    """CPU and memory figures of this process (and CUDA memory when in use), as `system/*` metrics."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # the first call only starts the interval

    def metrics(self) -> dict[str, float]:
        """Figures now; cpu_percent covers the time since the previous call (100 = one core busy)."""
        mem = self._psutil.virtual_memory()
        out = {
            "system/cpu_percent": self._proc.cpu_percent(None),
            "system/rss_gib": self._proc.memory_info().rss / _GIB,
            "system/num_threads": float(self._proc.num_threads()),
            "system/host_mem_used_frac": 1.0 - mem.available / mem.total,
        }
        out.update(_cuda_metrics())
        return out


def _cuda_metrics() -> dict[str, float]:
    torch = sys.modules.get("torch")  # a process that never imported torch holds no CUDA memory
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {
        "system/gpu_mem_allocated_gib": torch.cuda.memory_allocated() / _GIB,
        "system/gpu_mem_reserved_gib": torch.cuda.memory_reserved() / _GIB,
        "system/gpu_mem_max_allocated_gib": torch.cuda.max_memory_allocated() / _GIB,
    }


class Tracker:
    """An MLflow run: params once, metrics per step, artifacts at the end."""

    def __init__(self, cfg: VapoConfig, *, run_id: str | None = None, system_metrics: bool = True) -> None:
        import mlflow

        self._mlflow = mlflow
        self._probe = SystemProbe() if system_metrics else None
        self.uri = cfg.tracking.resolved_uri
        env_uri = os.environ.get(_URI_ENV)
        mlflow.set_tracking_uri(self.uri)
        # mlflow also writes the URI into os.environ, which would override the config of every later
        # Tracker in this process and of every process it starts: keep the environment as the user set it.
        if env_uri is None:
            os.environ.pop(_URI_ENV, None)
        else:
            os.environ[_URI_ENV] = env_uri
        mlflow.set_experiment(cfg.tracking.experiment)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.tracking.run_name)
        self.run_id: str = self.run.info.run_id
        if run_id is None:
            self._log_config(cfg)
        else:
            resumes = int(self.run.data.tags.get(_RESUMES_TAG, "0")) + 1
            mlflow.set_tag(_RESUMES_TAG, str(resumes))
            self._log_yaml(cfg, f"resumes/{resumes}")

    def _log_config(self, cfg: VapoConfig) -> None:
        params = {k: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(cfg).items()}
        items = list(params.items())
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._mlflow.log_params(dict(items[start : start + 100]))
        self._log_yaml(cfg, None)

    def _log_yaml(self, cfg: VapoConfig, artifact_path: str | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(to_yaml(cfg))
            self._mlflow.log_artifact(str(path), artifact_path)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite metrics, plus this process's `system/*` figures, at `step` (NaN/inf are dropped)."""
        merged = {**(self._probe.metrics() if self._probe is not None else {}), **metrics}
        clean = {k: float(v) for k, v in merged.items() if math.isfinite(float(v))}
        self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory to the run."""
        p = Path(path)
        if p.is_dir():
            self._mlflow.log_artifacts(str(p), artifact_path)
        else:
            self._mlflow.log_artifact(str(p), artifact_path)

    def log_plots(self) -> list[str]:
        """Draw the training curves from this run's logged metrics and upload them under `plots/`."""
        history = metric_history(self.run_id, list(PLOT_KEYS), self.uri)
        if not any(history.values()):
            log.warning("run %s logged none of the plotted metrics; no plots", self.run_id)
            return []
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_plots(history, tmp, title=f"run {self.run_id}")
            self._mlflow.log_artifacts(tmp, "plots")
        return [f"plots/{p.name}" for p in paths]

    def close(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED)."""
        self._mlflow.end_run(status=status)


def record_run(run_dir: str | Path, tracker: Tracker) -> None:
    """Write `run_dir/mlflow_run.json` naming the tracker's store and run (what a resume continues)."""
    path = Path(run_dir) / RUN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"tracking_uri": tracker.uri, "run_id": tracker.run_id}) + "\n")
    tmp.rename(path)


def recorded_run(cfg: VapoConfig) -> str | None:
    """The MLflow run recorded in `cfg.run_dir`, when it exists in the store this config tracks to; else None."""
    path = Path(cfg.run_dir) / RUN_RECORD
    if not path.is_file():
        return None
    uri = cfg.tracking.resolved_uri
    try:
        record = json.loads(path.read_text())
        recorded_uri, run_id = str(record["tracking_uri"]), str(record["run_id"])
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s: %s); starting a new MLflow run", path, type(e).__name__, e)
        return None
    if recorded_uri != uri:
        log.warning("%s names run %s in %s, but this run tracks to %s; starting a new MLflow run", path, run_id,
                    recorded_uri, uri)
        return None
    try:
        stage = _client(run_id, uri).get_run(run_id).info.lifecycle_stage
    except ValueError as e:
        log.warning("%s: %s; starting a new MLflow run", path, e)
        return None
    if stage != "active":  # MLflow refuses to start a deleted run
        log.warning("%s: run %s is %s; starting a new MLflow run", path, run_id, stage)
        return None
    return run_id


def _client(run_id: str, tracking_uri: str) -> Any:
    """An MlflowClient on `tracking_uri` after checking that `run_id` exists there (ValueError if not)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).is_file():
        raise ValueError(f"no MLflow store at {tracking_uri} (the file does not exist)")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"no MLflow run {run_id!r} at {tracking_uri} ({e.error_code})") from None
    return client


def metric_history(run_id: str, keys: list[str], tracking_uri: str) -> dict[str, list[tuple[int, float]]]:
    """`{key: [(step, value), ...]}` of a finished or running run, sorted by step (ValueError: no such run).

    A step logged more than once (a resumed run repeats the steps after its checkpoint) keeps the value
    logged last.
    """
    client = _client(run_id, tracking_uri)
    out: dict[str, list[tuple[int, float]]] = {}
    for key in keys:
        latest: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        out[key] = [(step, value) for step, (_, value) in sorted(latest.items())]
    return out


def run_params(run_id: str, tracking_uri: str) -> dict[str, Any]:
    """The params logged for a run."""
    return dict(_client(run_id, tracking_uri).get_run(run_id).data.params)


def run_metric_keys(run_id: str, tracking_uri: str) -> set[str]:
    """Every metric key the run has logged at least once."""
    return set(_client(run_id, tracking_uri).get_run(run_id).data.metrics)


def run_artifacts(run_id: str, tracking_uri: str, path: str | None = None) -> dict[str, int]:
    """`{artifact path: size in bytes}` of the run's files, recursively under `path` (all when None)."""
    client = _client(run_id, tracking_uri)
    out: dict[str, int] = {}
    pending = [path]
    while pending:
        for info in client.list_artifacts(run_id, pending.pop()):
            if info.is_dir:
                pending.append(info.path)
            else:
                out[info.path] = int(info.file_size or 0)
    return out


def download_artifact(run_id: str, artifact_path: str, out_dir: str | Path, tracking_uri: str) -> Path:
    """Download a file or directory of the run into `out_dir`; returns the local path."""
    client = _client(run_id, tracking_uri)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact_path, str(out_dir)))
