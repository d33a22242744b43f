"""Experiment tracking: the one module that imports mlflow.

Owns: starting (or resuming) an MLflow run, logging the resolved config once (flat params and
a YAML artifact), per-step metrics, and artifacts. The learner's rank 0 is the only writer,
so one run holds the learner's, the actors' and the queue's figures.

Store: `tracking.tracking_uri` (default a local SQLite file); a `MLFLOW_TRACKING_URI` in the
environment wins, so a real MLflow server works unchanged.

Failure modes: a tracking server that goes away makes `log_metrics` raise after mlflow's own
retries; the learner treats that as fatal rather than training unobserved. Param values longer
than MLflow's limit are truncated (the YAML artifact keeps the full config).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import VapoConfig, flatten, to_yaml

_MAX_PARAM_LEN = 500


class Tracker:
    """An MLflow run: params once, metrics per step, artifacts at the end."""

    def __init__(self, cfg: VapoConfig, *, run_id: str | None = None) -> None:
        import mlflow

        self._mlflow = mlflow
        self.uri = cfg.tracking.resolved_uri
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(cfg.tracking.experiment)
        self.run = mlflow.start_run(run_id=run_id, run_name=cfg.tracking.run_name)
        self.run_id: str = self.run.info.run_id
        if run_id is None:
            self._log_config(cfg)

    def _log_config(self, cfg: VapoConfig) -> None:
        params = {k: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(cfg).items()}
        items = list(params.items())
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._mlflow.log_params(dict(items[start : start + 100]))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(to_yaml(cfg))
            self._mlflow.log_artifact(str(path))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite metrics at `step` (NaN/inf are dropped: MLflow rejects them on some stores)."""
        clean = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory to the run."""
        p = Path(path)
        if p.is_dir():
            self._mlflow.log_artifacts(str(p), artifact_path)
        else:
            self._mlflow.log_artifact(str(p), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED)."""
        self._mlflow.end_run(status=status)


def metric_history(run_id: str, keys: list[str], tracking_uri: str) -> dict[str, list[tuple[int, float]]]:
    """`{key: [(step, value), ...]}` of a finished or running run, sorted by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    out: dict[str, list[tuple[int, float]]] = {}
    for key in keys:
        history = client.get_metric_history(run_id, key)
        out[key] = sorted((m.step, m.value) for m in history)
    return out


def run_params(run_id: str, tracking_uri: str) -> dict[str, Any]:
    """The params logged for a run."""
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.params)
