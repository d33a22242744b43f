"""What a finished run leaves in MLflow besides its metrics: the training curves and the exported policy.

`log_final_artifacts` is the end-of-run hook of `learner.main.run_learner`, called by every
rank after the final checkpoint. Rank 0 (the tracker's owner) uploads the plots of the run's
logged history under `plots/` (`Tracker.log_plots`, the same figures as `vapo report`) and the
policy as a Hugging Face directory under `policy/` (float32 safetensors, config and tokenizer:
what `vapo export` writes from a checkpoint, loadable by transformers and vLLM).

Why the policy is gathered from the live model rather than exported from the checkpoint just
written: `export_policy` reads the checkpoint with torch.distributed.checkpoint, whose load is
collective over the default process group, so rank 0 could not run it alone with several
ranks. Here every rank takes part in the same one-tensor-at-a-time gathers a weight push does
(`iter_full_params`), and rank 0 copies each tensor into a CPU model built from `model.path`,
so memory beyond that model stays one tensor. The weights equal the final checkpoint's.

Whether to do anything at all is agreed by an all-reduce (only rank 0 knows whether it has a
tracker), so the other ranks never wait in a gather rank 0 does not join. A run with tracking
disabled, or a test that passes no tracker, skips everything.

Failure modes: an upload error (tracking server gone) propagates, like a failed `log_metrics`:
the run's checkpoint is already written, so nothing of the training is lost.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from learner import dist as ldist
from learner.model import iter_full_params
from shared.config import VapoConfig

if TYPE_CHECKING:
    from shared.tracking.tracker import Tracker

log = logging.getLogger("vapo.learner")


def write_policy(policy: nn.Module, model_path: str, out_dir: str | Path) -> Path | None:
    """Every rank calls this; rank 0 writes the policy's full weights as a Hugging Face directory and returns it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    is_rank0 = ldist.rank() == 0
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32) if is_rank0 else None
    copied: set[str] = set()
    for name, tensor in iter_full_params(policy):  # collective on every rank, so every rank iterates
        if model is None:
            continue
        target = model.get_parameter(name)
        assert target.shape == tensor.shape, f"{name}: policy {tuple(tensor.shape)} vs {model_path} {target.shape}"
        with torch.no_grad():
            target.copy_(tensor.to(device="cpu", dtype=target.dtype))
        copied.add(name)
    if model is None:
        return None
    missing = {name for name, _ in model.named_parameters()} - copied
    assert not missing, f"the policy has no tensors for {sorted(missing)[:5]}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


def log_final_artifacts(cfg: VapoConfig, policy: nn.Module, tracker: Tracker | None) -> None:
    """End of a run, on every rank: rank 0 uploads the plots under `plots/` and (with `tracking.log_policy`)
    the policy under `policy/`, built on `model.path`."""
    if not ldist.any_rank(tracker is not None):
        return
    t0 = time.perf_counter()
    if tracker is not None:
        tracker.log_plots()  # first: small, and the most useful if the policy upload fails
    if not cfg.tracking.log_policy:
        return
    with tempfile.TemporaryDirectory(prefix="vapo-policy-") as tmp:
        out = write_policy(policy, cfg.model.path, Path(tmp) / "policy")
        if tracker is not None:
            assert out is not None, "rank 0 holds the tracker and writes the policy"
            tracker.log_artifact(out, "policy")
            log.info("logged plots and policy/ to MLflow run %s in %.1f s", tracker.run_id, time.perf_counter() - t0)
