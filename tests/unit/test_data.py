"""Prompt data loading (jsonl, parquet, verl layout, built-in task), fail-fast errors, rendering, the cursor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.data.records import PromptRecord, load_records, render_prompt
from shared.data.source import PromptSource
from shared.data.tasks import arithmetic


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


VERL_ROWS = [
    {
        "data_source": "math_dapo",
        "prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": "What is 2+2?"}],
        "ability": "MATH",
        "reward_model": {"style": "rule", "ground_truth": "4"},
        "extra_info": {"index": "a-0", "split": "train"},
    },
    {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": "What is 3*3?"}],
        "ability": "MATH",
        "reward_model": {"style": "rule", "ground_truth": "9"},
        "extra_info": {"index": "a-1", "split": "train"},
    },
]


class FakeChatTokenizer:
    """A tokenizer with a chat template: renders `<role>content` turns, then `<assistant>`."""

    chat_template = "fake"

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class PlainTokenizer:
    chat_template = None


def test_jsonl_plain_rows(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "1+1?", "ground_truth": "2", "data_source": "arithmetic"},
        "",
        {"prompt": "2+2?", "ground_truth": 4},
    ])
    records = load_records(path)
    assert records == [
        PromptRecord("1+1?", "2", "arithmetic", 0),
        PromptRecord("2+2?", "4", "math", 1),
    ]
    assert load_records(path, default_source="gsm8k")[1].data_source == "gsm8k"
    assert load_records(path, num=1) == records[:1]


def test_verl_parquet_rows(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "dapo.parquet", VERL_ROWS)
    records = load_records(path, answer_key="reward_model.ground_truth")
    assert [r.ground_truth for r in records] == ["4", "9"]
    assert records[0].data_source == "math_dapo"
    assert records[0].messages == (("system", "Think."), ("user", "What is 2+2?"))
    assert records[0].prompt == "Think.\nWhat is 2+2?"
    assert render_prompt(records[0], FakeChatTokenizer()) == "<system>Think.<user>What is 2+2?<assistant>"
    assert render_prompt(records[1], None) == "What is 3*3?"


def test_verl_rows_in_jsonl_too(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "dapo.jsonl", VERL_ROWS)
    assert [r.ground_truth for r in load_records(path, answer_key="reward_model.ground_truth")] == ["4", "9"]


def test_messages_column_and_plain_prompt_rendering(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": "hi", "ground_truth": "x", "messages": [{"role": "user", "content": "hi there"}]},
        {"prompt": "plain", "ground_truth": "y"},
    ])
    chat, plain = load_records(path)
    assert render_prompt(chat, FakeChatTokenizer()) == "<user>hi there<assistant>"
    assert render_prompt(chat, PlainTokenizer()) == "hi"
    assert render_prompt(plain, FakeChatTokenizer()) == "<user>plain<assistant>"


def test_structured_ground_truth_kept_as_json(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "ground_truth": {"tests": [1, 2]}}])
    assert json.loads(load_records(path)[0].ground_truth) == {"tests": [1, 2]}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p"}', "d.jsonl row 2: missing field 'ground_truth' (verl files keep it at"),
        ('{"ground_truth": "1"}', "d.jsonl row 2: missing field 'prompt'"),
        ('{"prompt": 5, "ground_truth": "1"}', "d.jsonl row 2: field 'prompt' must be a string or a list"),
        ('{"prompt": "  ", "ground_truth": "1"}', "d.jsonl row 2: field 'prompt' is empty"),
        ('{"prompt": "p", "ground_truth": ""}', "d.jsonl row 2: field 'ground_truth' is empty"),
        ('{"prompt": "p", "ground_truth": true}', "d.jsonl row 2: field 'ground_truth' must be"),
        ('{"prompt": "p", "ground_truth": "1", "data_source": 3}', "d.jsonl row 2: field 'data_source' must be"),
        ('{"prompt": [{"role": "user"}], "ground_truth": "1"}', "d.jsonl row 2: field prompt[0].content must be"),
        ('{"prompt": [], "ground_truth": "1"}', "d.jsonl row 2: field 'prompt' must be a non-empty list"),
        ('{"prompt": "p", "ground_truth": "1", "messages": "hi"}', "d.jsonl row 2: field 'messages' must be"),
        ('{"prompt": "p", "ground_truth": "1"', "d.jsonl row 2: invalid JSON"),
        ("[1, 2]", "d.jsonl row 2: expected a JSON object, got list"),
    ],
)
def test_malformed_jsonl_row_fails_with_file_row_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "ground_truth": "1"}, line])
    with pytest.raises(ValueError) as info:
        load_records(path)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_malformed_parquet_row_names_its_index(tmp_path: Path) -> None:
    rows = [dict(VERL_ROWS[0]), dict(VERL_ROWS[1], reward_model={"style": "rule", "ground_truth": None})]
    path = _write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match=r"^bad.parquet row 1: missing field 'reward_model.ground_truth'$"):
        load_records(path, answer_key="reward_model.ground_truth")


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such data file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data format '.csv'"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="unknown built-in task 'gsm8k'"):
        load_records("builtin:gsm8k", num=1)
    with pytest.raises(ValueError, match="num .* is required"):
        load_records("builtin:arithmetic")


def test_builtin_task_matches_the_generator_and_round_trips_through_export(tmp_path: Path) -> None:
    records = load_records("builtin:arithmetic", split="test", num=20, seed=4)
    problems = arithmetic.generate(20, 4, "test")
    assert [(r.prompt, r.ground_truth, r.data_source) for r in records] == [
        (p.prompt, p.ground_truth, "arithmetic") for p in problems
    ]
    assert [r.index for r in records] == list(range(20))
    assert load_records(arithmetic.write_jsonl(problems, tmp_path / "a.jsonl")) == records
    pytest.importorskip("pyarrow")
    assert load_records(arithmetic.write_parquet(problems, tmp_path / "a.parquet")) == records


def _records(num: int) -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", str(i), "math", i) for i in range(num)]


def test_prompt_source_epochs_are_permutations_and_deterministic() -> None:
    records = _records(10)
    source = PromptSource(records, seed=3)
    first, second = source.take(10), source.take(10)
    assert sorted(r.index for r in first) == list(range(10)) == sorted(r.index for r in second)
    assert first != second  # reshuffled per epoch
    assert source.state_dict()["epoch"] == 1
    assert PromptSource(records, seed=3).take(20) == first + second
    assert PromptSource(records, seed=4).take(10) != first
    assert PromptSource(records, seed=3, shuffle=False).take(12) == records + records[:2]


def test_prompt_source_resume_neither_repeats_nor_skips() -> None:
    records = _records(7)
    uninterrupted = PromptSource(records, seed=1).take(30)
    source = PromptSource(records, seed=1)
    head = source.take(13)
    state = json.loads(json.dumps(source.state_dict()))  # survives a checkpoint file
    resumed = PromptSource(records, seed=1)
    resumed.load_state_dict(state)
    assert head + resumed.take(17) == uninterrupted


def test_prompt_source_refuses_a_cursor_from_other_data() -> None:
    state = PromptSource(_records(7), seed=1).state_dict()
    with pytest.raises(ValueError, match="num_records"):
        PromptSource(_records(8), seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSource(_records(7), seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="bad position"):
        PromptSource(_records(7), seed=1).load_state_dict(dict(state, index=9))
    with pytest.raises(ValueError, match="at least one record"):
        PromptSource([], seed=0)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_vapo_make_data_writes_the_builtin_task_as_a_dataset_file(tmp_path: Path, suffix: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.cli import main

    out = tmp_path / f"arith{suffix}"
    assert main(["make-data", str(out), "--num", "7", "--split", "test", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert load_records(out) == load_records("builtin:arithmetic", split="test", num=7, seed=3)
    assert main(["make-data", str(tmp_path / "arith.csv")]) == 2
    assert "must end in .jsonl or .parquet" in capsys.readouterr().err
