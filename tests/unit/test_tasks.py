"""The built-in arithmetic task: correct worked solutions, the step law, split disjointness, export."""

from __future__ import annotations

import ast
import collections
import json
import operator

import pytest

from shared.data.tasks import arithmetic
from shared.data.tasks.arithmetic import Problem, extract_answer, generate, make_problem, solve


def _python_value(prompt: str) -> int:
    """Evaluate the prompt's expression with Python's own parser (the reference)."""
    expr = prompt.removeprefix("Compute ").removesuffix(".")
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp):
            return ops[type(node.op)](ev(node.left), ev(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return node.value

    return ev(ast.parse(expr, mode="eval").body)


def test_example_from_the_brief() -> None:
    problem = make_problem([3, 4, 5, 2], ["+", "*", "-"])
    assert problem is not None
    assert problem.prompt == "Compute 3 + 4 * 5 - 2."
    assert problem.solution == "4 * 5 = 20\n= 3 + 20 - 2\n3 + 20 = 23\n= 23 - 2\n23 - 2 = 21\nAnswer: 21"
    assert problem.ground_truth == "21"
    assert problem.num_steps == 3
    assert problem.data_source == "arithmetic"


def test_one_step_problem_has_one_line_of_work() -> None:
    problem = make_problem([7, 8], ["*"])
    assert problem is not None
    assert problem.solution == "7 * 8 = 56\nAnswer: 56"


def test_answers_match_python_precedence_and_every_step_is_right() -> None:
    for problem in generate(300, seed=3):
        assert problem.ground_truth == str(_python_value(problem.prompt))
        lines = problem.solution.splitlines()
        assert lines[-1] == f"Answer: {problem.ground_truth}"
        work = lines[:-1]
        assert len(work) == 2 * problem.num_steps - 1
        for line in work[0::2]:
            lhs, rhs = line.split(" = ")
            assert _python_value(lhs) == int(rhs)
        for line in work[1::2]:  # each rewrite keeps the expression's value
            assert _python_value(line.removeprefix("= ")) == int(problem.ground_truth)


def test_out_of_range_values_are_refused() -> None:
    assert solve([1, 2], ["-"]) is None  # negative
    assert solve([9, 9, 9, 9], ["*", "*", "*"]) is None  # 6561 > 999
    assert solve([9, 9, 9], ["*", "*"]) == (["9 * 9 = 81", "= 81 * 9", "81 * 9 = 729"], 729)
    with pytest.raises(ValueError, match="operators"):
        make_problem([1, 2], ["/"])
    with pytest.raises(ValueError, match="n operators and n \\+ 1 operands"):
        solve([1, 2, 3], ["+"])


def test_all_values_in_range_and_alphabet_small() -> None:
    for problem in generate(500, seed=1):
        for token in problem.solution.replace("\n", " ").split():
            if token.isdigit():
                assert 0 <= int(token) <= arithmetic.MAX_VALUE
        assert set(problem.prompt + problem.solution) <= set(arithmetic.ALPHABET)
    assert len(arithmetic.ALPHABET) < 40


def test_step_law_is_skewed_and_lengths_heterogeneous() -> None:
    problems = generate(3000, seed=0)
    counts = collections.Counter(p.num_steps for p in problems)
    assert set(counts) <= set(range(1, 13))
    assert counts[1] > counts[3] > counts[6] > counts[10] > 0
    probs = arithmetic.step_probabilities()
    assert abs(counts[1] / len(problems) - probs[0]) < 0.03
    lengths = sorted(len(p.solution) for p in problems)
    assert lengths[0] < 20 and lengths[-1] > 250


def test_generation_is_deterministic_and_seeds_differ() -> None:
    assert generate(50, seed=7) == generate(50, seed=7)
    assert generate(50, seed=7) != generate(50, seed=8)
    assert generate(20, seed=7) == generate(50, seed=7)[:20]


def test_train_and_test_splits_are_disjoint_across_seeds() -> None:
    train = {p.prompt for seed in (0, 1) for p in generate(1000, seed=seed, split="train")}
    test = [p.prompt for seed in (0, 1) for p in generate(100, seed=seed, split="test")]
    assert not train & set(test)
    assert all(arithmetic.split_of(prompt) == "test" for prompt in test)
    with pytest.raises(ValueError, match="split"):
        generate(1, seed=0, split="validation")


def test_extract_answer_takes_the_last_answer_line() -> None:
    assert extract_answer("1 + 1 = 2\nAnswer: 2") == "2"
    assert extract_answer("Answer: 3\nAnswer:  4 ") == "4"
    assert extract_answer("no answer here") is None


def test_export_writes_the_users_row_format(tmp_path) -> None:
    problems = generate(5, seed=0)
    path = arithmetic.write_jsonl(problems, tmp_path / "sub" / "a.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"prompt": p.prompt, "ground_truth": p.ground_truth, "data_source": "arithmetic"} for p in problems]
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(arithmetic.write_parquet(problems, tmp_path / "a.parquet"))
    assert table.to_pylist() == rows


def test_problem_is_frozen() -> None:
    problem = Problem("Compute 1 + 1.", "2", "1 + 1 = 2\nAnswer: 2", 1)
    with pytest.raises(AttributeError):
        problem.prompt = "x"  # type: ignore[misc]


def test_the_run_verifier_accepts_every_worked_solution() -> None:
    math_verifier = pytest.importorskip("shared.reward.math_verifier")
    for problem in generate(50, seed=9):
        assert math_verifier.score(problem.solution, problem.ground_truth).correct
        wrong = problem.solution.rsplit("Answer:", 1)[0] + f"Answer: {int(problem.ground_truth) + 1}"
        assert not math_verifier.score(wrong, problem.ground_truth).correct


def test_parse_prompt_inverts_the_prompt_and_refuses_other_text() -> None:
    for problem in generate(30, seed=4):
        operands, operators = arithmetic.parse_prompt(problem.prompt)
        assert make_problem(operands, operators) == problem
    for bad in ["Compute 1 +.", "Compute 1 / 2.", "Add 1 + 2.", "Compute 1 + 2"]:
        with pytest.raises(ValueError, match="not an arithmetic prompt"):
            arithmetic.parse_prompt(bad)


def test_slipped_solutions_stay_self_consistent_and_slip_at_the_asked_rate() -> None:
    import random

    problems = generate(400, seed=5)
    rng = random.Random(0)
    assert all(arithmetic.slipped_solution(p, rng, 0.0) == p.solution for p in problems)
    slipped_steps = total_steps = 0
    for p in problems:
        text = arithmetic.slipped_solution(p, rng, 0.3)
        lines = text.splitlines()
        steps = [line for line in lines if not line.startswith(("=", "Answer:"))]
        assert len(steps) == p.num_steps and lines[-1].startswith("Answer: ")
        for line in steps:  # "a op b = c": a slip is a wrong c, and later lines build on it
            left, c = line.split(" = ")
            a, op, b = left.split(" ")
            truth = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert 0 <= int(c) <= arithmetic.MAX_VALUE and abs(int(c) - truth) <= 3
            slipped_steps += int(c) != truth
        total_steps += p.num_steps
        assert lines[-1] == f"Answer: {steps[-1].split(' = ')[1]}"  # the answer follows the last step
    assert 0.2 < slipped_steps / total_steps < 0.32  # a slip is skipped only when it would leave the range
