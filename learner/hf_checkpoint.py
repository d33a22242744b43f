"""A Hugging Face checkpoint's tensors, read a slice of rows at a time: what sharded loading streams from.

Owns: finding a model's weight files (`model.safetensors`, a sharded `model.safetensors.index.json`,
or `pytorch_model*.bin`) and reading rows [start, end) of one tensor by its checkpoint key, in the
dtype it is stored in. A safetensors file is read by its header's offsets with plain reads (a
tensor's rows are contiguous bytes), not memory-mapped: mapped pages would count towards the
rank's resident memory as they are touched, so the high-water mark would grow by a whole file.
`.bin` files are opened with `torch.load(mmap=True)`, which maps them (their pages do count).
Nothing here holds more than the slice asked for, so a rank that reads its own shards' rows never
holds a whole model.

A hub id (`Qwen/Qwen2.5-7B`) resolves to its local snapshot through `huggingface_hub` (downloaded
once into its cache; offline, a snapshot already there).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def model_directory(path: str | Path) -> Path:
    """The local directory of `model.path`: the directory itself, or a hub id's snapshot."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists() or str(path).count("/") != 1:
        raise ValueError(f"model.path {str(path)!r} is neither a directory nor a hub id")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    return Path(snapshot_download(repo_id=str(path), allow_patterns=patterns))


class CheckpointReader:
    """The tensors of one model directory, by checkpoint key; `rows(key, a, b)` reads rows a..b of one."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._where: dict[str, Any] = {}  # key -> its safetensors file, or a mapped tensor of a .bin file
        index = self.model_dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
        for name in files:
            tensors = SafetensorsFile(self.model_dir / name)
            self._where.update(dict.fromkeys(tensors.entries, tensors))
        if files:
            return
        bins = sorted(self.model_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise ValueError(f"model.path {str(self.model_dir)!r} has no weights (*.safetensors or pytorch_model*.bin)")
        for name in bins:
            self._where.update(torch.load(name, map_location="cpu", mmap=True, weights_only=True))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        where = self._where[key]
        return tuple(where.shape) if isinstance(where, torch.Tensor) else where.shape(key)

    def rows(self, key: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of tensor `key` (the whole of a 0-d one), in its stored dtype."""
        where = self._where[key]
        if isinstance(where, torch.Tensor):
            return where if where.dim() == 0 else where[start:end]
        return where.rows(key, start, end)


# safetensors' dtype names (https://huggingface.co/docs/safetensors, "Format")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """One safetensors file: an 8-byte little-endian header length, a JSON header of
    {key: {dtype, shape, data_offsets}} and the tensors' row-major bytes after it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + size

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def rows(self, key: str, start: int, end: int) -> torch.Tensor:
        entry = self.entries[key]
        dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
        if not shape:
            start, end, shape = 0, 1, (1,)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        start, end = min(max(start, 0), shape[0]), min(max(end, 0), shape[0])
        buffer = torch.empty(max(end - start, 0) * row_bytes, dtype=torch.uint8)
        with self.path.open("rb", buffering=0) as f:
            f.seek(self.data_start + entry["data_offsets"][0] + start * row_bytes)
            view = memoryview(buffer.numpy())
            while view.nbytes:  # a raw read may return fewer bytes than asked
                got = f.readinto(view)
                if not got:
                    raise ValueError(f"{self.path}: tensor {key} is cut short (truncated file?)")
                view = view[got:]
        out = buffer.view(dtype).reshape(end - start, *shape[1:])
        return out.reshape(()) if not entry["shape"] else out
