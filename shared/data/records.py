"""Prompt data: loading users' jsonl/parquet files or the built-in task into `PromptRecord`s.

Owns the one place where rows become `PromptRecord`s, so every malformed row fails here,
fast, with one line naming the file, the row and the field:
`ValueError("data.jsonl row 17: missing field 'ground_truth'")`. Rows are numbered as a
person would find them: the 1-based line number in a jsonl file, the 0-based row index in
a parquet file.

Accepted rows (keys are dotted paths into nested objects, set by `prompt_key`,
`answer_key`, `source_key`):
- plain: `{"prompt": "...", "ground_truth": "...", "data_source": "..."}`, optionally with
  `"messages": [{"role": ..., "content": ...}, ...]` for chat models;
- verl / DAPO: `{"data_source": ..., "prompt": [{"role": "user", "content": ...}],
  "reward_model": {"style": "rule", "ground_truth": ...}, "extra_info": {...}}`, loaded
  with `answer_key="reward_model.ground_truth"`. A prompt that is a message list becomes
  the record's `messages`; its plain `prompt` is the contents joined by newlines.
A number as ground truth is kept as its text; a list or object as its JSON text (for
verifiers that expect structure). A row without the source field gets `default_source`.

`builtin:<task>` instead of a path generates the built-in task (only `builtin:arithmetic`
today) with `split`, `num` and `seed`; file paths ignore `split` and `seed` (a file is one
split) and `num`, when given, keeps the first `num` records.

`render_prompt` turns a record into the text the engine sees: the tokenizer's chat template
when it has one, the plain prompt otherwise. The order the training prompts are handed out in,
and its resumable cursor, are `shared.data.source`'s.

Imports: stdlib only; pyarrow lazily, for parquet files. Must not import torch, zmq, ray,
vllm or mlflow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"
BUILTIN_TASKS = ("arithmetic",)
VERL_ANSWER_KEY = "reward_model.ground_truth"
_MISSING = object()


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with its ground truth; `messages` holds (role, content) pairs for chat prompts."""

    prompt: str
    ground_truth: str
    data_source: str
    index: int
    messages: tuple[tuple[str, str], ...] | None = None

    def chat(self) -> list[dict[str, str]]:
        """The prompt as chat messages (a single user turn when the row had none)."""
        if self.messages is None:
            return [{"role": "user", "content": self.prompt}]
        return [{"role": role, "content": content} for role, content in self.messages]


def render_prompt(record: PromptRecord, tokenizer: Any = None) -> str:
    """The text the engine continues: the tokenizer's chat template if it has one, else the prompt."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(record.chat(), tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str), type(text)
        return text
    return record.prompt


def load_records(
    path: str | Path,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "ground_truth",
    source_key: str = "data_source",
    default_source: str = "math",
    split: str = "train",
    num: int | None = None,
    seed: int = 0,
) -> list[PromptRecord]:
    """Records from a .jsonl or .parquet file, or from `builtin:<task>` (see the module note)."""
    if num is not None and num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        return _builtin_records(text[len(BUILTIN_PREFIX) :], split=split, num=num, seed=seed)
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{file}: no such data file")
    if file.suffix == ".jsonl":
        rows: Iterator[tuple[int, dict[str, Any]]] = _jsonl_rows(file)
    elif file.suffix == ".parquet":
        rows = _parquet_rows(file, (prompt_key, answer_key, source_key, "messages"))
    else:
        raise ValueError(f"{file}: unknown data format {file.suffix!r}; use .jsonl, .parquet or builtin:<task>")
    keys = (prompt_key, answer_key, source_key)
    records: list[PromptRecord] = []
    for row_number, row in rows:
        if num is not None and len(records) >= num:
            break
        where = f"{file.name} row {row_number}"
        records.append(_record(row, keys, default_source, len(records), where))
    if not records:
        raise ValueError(f"{file}: no records")
    return records


def _builtin_records(task: str, *, split: str, num: int | None, seed: int) -> list[PromptRecord]:
    if task not in BUILTIN_TASKS:
        known = ", ".join(BUILTIN_PREFIX + t for t in BUILTIN_TASKS)
        raise ValueError(f"unknown built-in task {task!r}; known: {known}")
    if num is None:
        raise ValueError(f"{BUILTIN_PREFIX}{task}: num (the number of problems to generate) is required")
    from shared.data.tasks import arithmetic

    problems = arithmetic.generate(num, seed, split)
    return [PromptRecord(p.prompt, p.ground_truth, p.data_source, i) for i, p in enumerate(problems)]


def _jsonl_rows(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with file.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file.name} row {line_number}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file.name} row {line_number}: expected a JSON object, got {type(row).__name__}")
            yield line_number, row


def _parquet_rows(file: Path, keys: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq  # lazy: only parquet files need it

    # Read only the top-level columns the keys touch: verl files carry large extra_info columns.
    names = set(pq.read_schema(file).names)
    columns = sorted({key.split(".")[0] for key in keys} & names)
    table = pq.read_table(file, columns=columns)
    yield from enumerate(table.to_pylist())


def _lookup(row: dict[str, Any], key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _record(
    row: dict[str, Any], keys: tuple[str, str, str], default_source: str, index: int, where: str
) -> PromptRecord:
    prompt_key, answer_key, source_key = keys
    raw_prompt = _lookup(row, prompt_key)
    if raw_prompt is _MISSING or raw_prompt is None:
        raise ValueError(f"{where}: missing field {prompt_key!r}")
    messages = None
    if isinstance(raw_prompt, str):
        prompt = raw_prompt
        raw_messages = row.get("messages")
        if raw_messages is not None:
            messages = _messages(raw_messages, "messages", where)
    elif isinstance(raw_prompt, list):
        messages = _messages(raw_prompt, prompt_key, where)
        prompt = "\n".join(content for _, content in messages)
    else:
        raise ValueError(f"{where}: field {prompt_key!r} must be a string or a list of messages, "
                         f"got {type(raw_prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"{where}: field {prompt_key!r} is empty")
    answer = _lookup(row, answer_key)
    if answer is _MISSING or answer is None:
        hint = f" (verl files keep it at {VERL_ANSWER_KEY!r})" if VERL_ANSWER_KEY != answer_key else ""
        raise ValueError(f"{where}: missing field {answer_key!r}{hint}")
    source = _lookup(row, source_key)
    if source is _MISSING or source is None:
        source = default_source
    if not isinstance(source, str) or not source:
        raise ValueError(f"{where}: field {source_key!r} must be a non-empty string, got {source!r}")
    return PromptRecord(prompt, _answer_text(answer, answer_key, where), source, index, messages)


def _answer_text(answer: Any, key: str, where: str) -> str:
    if isinstance(answer, bool):
        raise ValueError(f"{where}: field {key!r} must be a string, number, list or object, got a bool")
    if isinstance(answer, str):
        text = answer
    elif isinstance(answer, int | float):
        text = str(answer)
    elif isinstance(answer, list | dict):
        text = json.dumps(answer)
    else:
        raise ValueError(f"{where}: field {key!r} must be a string, number, list or object, "
                         f"got {type(answer).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return text


def _messages(raw: Any, key: str, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: field {key!r} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: field {key}[{i}] must be an object with role and content")
        for part in ("role", "content"):
            if not isinstance(message.get(part), str):
                raise ValueError(f"{where}: field {key}[{i}].{part} must be a string")
        messages.append((message["role"], message["content"]))
    return tuple(messages)
