"""The training prompts in the order the replay queue hands them out, with a cursor a checkpoint can hold.

`PromptSource` hands records out in a seeded, per-epoch shuffled order and saves its cursor
(epoch, index), so a run restored from a checkpoint neither repeats nor skips prompts; leases
in flight at checkpoint time are the replay queue's concern, not this cursor's. The cursor also
records the seed, the shuffle setting and the number of records, and a restore over different
ones fails with one line instead of silently handing out another order.

`open_prompt_source(cfg)` is the one place a process turns `cfg.data` into that source (the
queue's process, embedded in learner rank 0 or on its own, and `vapo queue`).

Imports: stdlib and `shared.data.records` only; must not import torch, zmq, ray, vllm or mlflow.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from shared.config import VapoConfig
from shared.data.records import PromptRecord, load_records


def open_prompt_source(cfg: VapoConfig) -> PromptSource:
    """The training prompts of `cfg.data` in their seeded, resumable order."""
    d = cfg.data
    records = load_records(
        d.train_path,
        prompt_key=d.prompt_key,
        answer_key=d.answer_key,
        source_key=d.source_key,
        split="train",
        num=d.builtin_train_size if d.train_path.startswith("builtin:") else None,
        seed=cfg.seed,
    )
    return PromptSource(records, seed=cfg.seed, shuffle=d.shuffle)


class PromptSource:
    """Hands records out in a seeded, per-epoch shuffled order; its cursor can be saved and restored."""

    def __init__(self, records: Sequence[PromptRecord], seed: int, shuffle: bool = True) -> None:
        if not records:
            raise ValueError("PromptSource needs at least one record")
        self._records = records
        self._seed = seed
        self._shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._records)))
        if self._shuffle:
            random.Random(f"prompts:{self._seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[PromptRecord]:
        return self

    def __next__(self) -> PromptRecord:
        if self.index == len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._epoch_order(self.epoch)
        record = self._records[self._order[self.index]]
        self.index += 1
        return record

    def take(self, num: int) -> list[PromptRecord]:
        """The next `num` records (crossing epoch boundaries as needed)."""
        if num < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        return [next(self) for _ in range(num)]

    def state_dict(self) -> dict[str, int | bool]:
        """The cursor: epoch and index within it, plus what must match on restore."""
        return {"epoch": self.epoch, "index": self.index, "seed": self._seed,
                "shuffle": self._shuffle, "num_records": len(self._records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cursor saved by `state_dict` over the same records, seed and shuffle setting."""
        for key, mine in (("seed", self._seed), ("shuffle", self._shuffle), ("num_records", len(self._records))):
            if state.get(key) != mine:
                raise ValueError(f"prompt cursor: saved {key}={state.get(key)!r} but this source has {mine!r}")
        epoch, index = state.get("epoch"), state.get("index")
        if not isinstance(epoch, int) or not isinstance(index, int):
            raise ValueError(f"prompt cursor: bad position epoch={epoch!r} index={index!r}")
        if epoch < 0 or not 0 <= index <= len(self._records):
            raise ValueError(f"prompt cursor: bad position epoch={epoch!r} index={index!r}")
        self.epoch, self.index = epoch, index
        self._order = self._epoch_order(epoch)
