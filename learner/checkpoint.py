"""Learner checkpoints: both models, both optimisers and schedules, counters, RNG and the data cursor.

Layout of one checkpoint, `RUN_DIR/checkpoints/step_000040/`:
- DCP files (`torch.distributed.checkpoint`): `policy`, `value`, `policy_opt`, `value_opt`,
  saved sharded by every rank from FSDP's DTensors (no full gather);
- `rng_rank{r}.pt`: each rank's torch RNG state (per-rank, so not in the deduplicated DCP);
- `meta.json`: step, policy version, scheduler counters, the learner's shuffling RNG, the
  model path (the learner's `model.path`, what `export_policy` builds the exported model
  from) and the queue's data cursor (whatever JSON the queue gave), written by rank 0 LAST,
  so a directory without `meta.json` is an incomplete checkpoint and is ignored.

`latest(run_dir)` finds the newest complete one; whoever starts a run looks it up once and
passes it to every rank. Resuming restores everything above, so the
next step computes exactly what an uninterrupted run would have.

DCP coordinates the ranks (plans, metadata, the commit) with object collectives; they run on the
learner's gloo control group (`learner.dist`), not on the device group, which carries only tensors
on the training device. The shards themselves are written and read by each rank, not communicated.

Failure modes: a crash mid-save leaves a directory without meta.json (skipped on resume);
a checkpoint from a different world size loads (DCP reshards) but per-rank RNG files of
missing ranks are ignored and those ranks re-seed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from learner import dist as ldist
from learner.train_step import Learner

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _state(learner: Learner) -> dict[str, Any]:
    state: dict[str, Any] = {
        "policy": get_model_state_dict(learner.policy),
        "policy_opt": get_optimizer_state_dict(learner.policy, learner.policy_opt),
    }
    if learner.value_model is not None:
        assert learner.value_opt is not None
        state["value"] = get_model_state_dict(learner.value_model)
        state["value_opt"] = get_optimizer_state_dict(learner.value_model, learner.value_opt)
    return state


def save(learner: Learner, run_dir: str | Path, *, version: int, data_cursor: Any, keep: int = 2) -> Path:
    """Write a checkpoint of `learner` (every rank calls this) and prune all but the newest `keep`."""
    out = Path(run_dir) / "checkpoints" / f"step_{learner.step:06d}"
    if ldist.rank() == 0 and out.exists():
        shutil.rmtree(out)
    ldist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    dcp.save(_state(learner), checkpoint_id=str(out), process_group=ldist.control_group())
    torch.save({"torch": torch.get_rng_state()}, out / f"rng_rank{ldist.rank()}.pt")
    ldist.barrier()
    if ldist.rank() == 0:
        meta = {
            "step": learner.step,
            "version": version,
            "model_path": learner.cfg.model.path,
            "data_cursor": data_cursor,
            "policy_sched": learner.policy_sched.state_dict(),
            "value_sched": learner.value_sched.state_dict() if learner.value_sched is not None else None,
            "shuffle_rng": learner._rng.bit_generator.state,
        }
        tmp = out / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, default=_jsonable))
        tmp.rename(out / "meta.json")
        for old in sorted(_complete(Path(run_dir)))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ldist.barrier()
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in meta.json")


def _complete(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of `run_dir`, or None."""
    found = sorted(_complete(Path(run_dir)))
    return found[-1] if found else None


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    """The meta.json of a checkpoint (step, version, model_path, data_cursor, ...)."""
    path = Path(ckpt) / "meta.json"
    if not path.is_file():
        raise ValueError(f"{ckpt} is not a complete checkpoint (no meta.json)")
    return json.loads(path.read_text())


def load(learner: Learner, ckpt: str | Path) -> dict[str, Any]:
    """Restore `learner` in place from `ckpt` (every rank calls this); returns the meta dict."""
    meta = read_meta(ckpt)
    state = _state(learner)
    dcp.load(state, checkpoint_id=str(ckpt), process_group=ldist.control_group())
    options = StateDictOptions(strict=True)
    set_model_state_dict(learner.policy, state["policy"], options=options)
    set_optimizer_state_dict(learner.policy, learner.policy_opt, state["policy_opt"])
    if learner.value_model is not None:
        assert learner.value_opt is not None and learner.value_sched is not None
        set_model_state_dict(learner.value_model, state["value"], options=options)
        set_optimizer_state_dict(learner.value_model, learner.value_opt, state["value_opt"])
        learner.value_sched.load_state_dict(meta["value_sched"])
    learner.policy_sched.load_state_dict(meta["policy_sched"])
    learner.step = int(meta["step"])
    learner._rng.bit_generator.state = meta["shuffle_rng"]
    rng_file = Path(ckpt) / f"rng_rank{ldist.rank()}.pt"
    if rng_file.is_file():
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    return meta


def export_policy(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint's policy as a standard Hugging Face directory (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_meta(ckpt)
    model = AutoModelForCausalLM.from_pretrained(meta["model_path"], dtype=torch.float32)
    state = {"policy": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(model, state["policy"], options=StateDictOptions(strict=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(meta["model_path"]).save_pretrained(out)
    return out
