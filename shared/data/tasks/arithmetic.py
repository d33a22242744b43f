"""The built-in arithmetic reasoning task: multi-step integer expressions with worked solutions.

Owns problem generation for the tiny CPU run and for tests. Pure: stdlib only (no torch,
no numpy), so it is importable everywhere and its tests run in milliseconds.

A problem is an expression over single-digit operands with `+`, `-` and `*`:

    prompt:    Compute 3 + 4 * 5 - 2.
    solution:  4 * 5 = 20
               = 3 + 20 - 2
               3 + 20 = 23
               = 23 - 2
               23 - 2 = 21
               Answer: 21

Each step reduces one operator (the leftmost `*` first, then `+`/`-` left to right, i.e. the
usual precedence) and writes it as `a op b = c`; every step but the last is followed by the
rewritten remaining expression on a line starting with `= `. The rewrite makes the state
explicit, which a 2-layer char-level model can learn by copying; it also makes the length of
a solution grow roughly quadratically with its number of steps (a 1-step answer is ~15
characters, a 12-step one ~400), which gives the heterogeneous response lengths that
length-adaptive GAE is about. The last line is always `Answer: N`, which the verifier reads.

Decisions:
- The number of steps (operators) is drawn from a truncated geometric law on
  1..`max_steps`, P(k) proportional to `step_decay ** (k - 1)`: most problems are short,
  a few are long (defaults 12 and 0.75: P(1) ~ 0.26, P(12) ~ 0.011, mean ~ 3.4).
- Every intermediate value, and so the answer, lies in [0, `MAX_VALUE`] = [0, 999]: a draw
  whose reduction leaves that range is discarded and redrawn with the same step count (so
  the step law is the one above). No negative numbers means `-` is only ever an operator.
- Train and test are disjoint by construction: a problem belongs to the test split iff a
  stable hash (blake2b) of its prompt falls in the first `TEST_PERCENT` percent of buckets.
  Each split draws from its own seeded stream and keeps only its own problems, so no
  test prompt can appear in any train set, whatever the seeds or sizes. Short problems
  repeat within a split (there are only 300 one-step ones); that is not deduplicated.
- The alphabet is `ALPHABET` (digits, ` +-*=.:\\n` and the letters of "Compute" and
  "Answer"), so a char-level tokenizer stays tiny.

The export helpers write the row format users bring their own data in (see shared/data/records.py):
`{"prompt", "ground_truth", "data_source"}` per row, jsonl or parquet.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DATA_SOURCE = "arithmetic"
MAX_VALUE = 999
"""Largest intermediate value or answer; the smallest is 0."""
MAX_OPERAND = 9
TEST_PERCENT = 10
"""Share of the problem space (by prompt hash) that belongs to the test split, in percent."""
SPLITS = ("train", "test")
OPERATORS = ("+", "-", "*")

ALPHABET = "".join(sorted(set("0123456789 +-*=.:\n" + "Compute" + "Answer")))
"""Every character a prompt or solution of this task can contain."""


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem with its worked solution."""

    prompt: str
    ground_truth: str
    solution: str
    num_steps: int
    data_source: str = DATA_SOURCE

    def to_row(self) -> dict[str, str]:
        """The row users' data files hold: prompt, ground_truth, data_source."""
        return {"prompt": self.prompt, "ground_truth": self.ground_truth, "data_source": self.data_source}


def step_probabilities(max_steps: int = 12, step_decay: float = 0.75) -> list[float]:
    """P(num_steps = k) for k = 1..max_steps: a truncated geometric law."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not 0.0 < step_decay <= 1.0:
        raise ValueError(f"step_decay must be in (0, 1], got {step_decay}")
    weights = [step_decay**k for k in range(max_steps)]
    total = sum(weights)
    return [w / total for w in weights]


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    assert op == "*", op
    return a * b


def _format_expr(operands: list[int], operators: list[str]) -> str:
    parts = [str(operands[0])]
    for op, x in zip(operators, operands[1:], strict=True):
        parts += [op, str(x)]
    return " ".join(parts)


def solve(
    operands: list[int], operators: list[str], slips: dict[int, int] | None = None
) -> tuple[list[str], int] | None:
    """Worked solution lines (without the Answer line) and the value, or None if out of range.

    `slips` maps a step index to an error added to that step's result (an arithmetic slip the
    rest of the solution then builds on); None or {} gives the correct solution.
    """
    if len(operands) != len(operators) + 1 or not operators:
        raise ValueError(f"need n operators and n + 1 operands, got {len(operators)} and {len(operands)}")
    nums, ops = list(operands), list(operators)
    lines: list[str] = []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        value = _apply(nums[i], ops[i], nums[i + 1]) + (slips or {}).get(len(operators) - len(ops), 0)
        if not 0 <= value <= MAX_VALUE:
            return None
        lines.append(f"{nums[i]} {ops[i]} {nums[i + 1]} = {value}")
        nums[i : i + 2] = [value]
        del ops[i]
        if ops:
            lines.append("= " + _format_expr(nums, ops))
    return lines, nums[0]


def make_problem(operands: list[int], operators: list[str]) -> Problem | None:
    """The problem for one expression, or None if an intermediate value leaves [0, MAX_VALUE]."""
    if any(not 0 <= x <= MAX_VALUE for x in operands):
        raise ValueError(f"operands must lie in [0, {MAX_VALUE}], got {operands}")
    if any(op not in OPERATORS for op in operators):
        raise ValueError(f"operators must be among {OPERATORS}, got {operators}")
    solved = solve(operands, operators)
    if solved is None:
        return None
    lines, value = solved
    solution = "\n".join([*lines, f"Answer: {value}"])
    prompt = f"Compute {_format_expr(operands, operators)}."
    return Problem(prompt=prompt, ground_truth=str(value), solution=solution, num_steps=len(operators))


def parse_prompt(prompt: str) -> tuple[list[int], list[str]]:
    """Operands and operators of a prompt `Compute <expression>.`; raises ValueError for any other text."""
    if not (prompt.startswith("Compute ") and prompt.endswith(".")):
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    parts = prompt[len("Compute ") : -1].split(" ")
    operands, operators = parts[0::2], parts[1::2]
    if len(parts) % 2 == 0 or not all(x.isdigit() for x in operands) or any(op not in OPERATORS for op in operators):
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return [int(x) for x in operands], operators


def slipped_solution(problem: Problem, rng: random.Random, slip_prob: float, max_slip: int = 3) -> str:
    """The worked solution with arithmetic slips: each step's result is off by 1..`max_slip` with
    probability `slip_prob`, and the rest of the solution, the answer included, follows from it.

    A noisy demonstration, as human-written solutions are: a model trained on such text makes
    the same kind of slip when it samples, while its most likely continuation stays right.
    A slip that would take a later value out of [0, MAX_VALUE] is not made.
    """
    if not 0.0 <= slip_prob <= 1.0 or max_slip < 1:
        raise ValueError(f"need slip_prob in [0, 1] and max_slip >= 1; got {slip_prob}, {max_slip}")
    operands, operators = parse_prompt(problem.prompt)
    slips: dict[int, int] = {}
    for step in range(len(operators)):
        if rng.random() < slip_prob:
            trial = {**slips, step: rng.choice([-1, 1]) * rng.randint(1, max_slip)}
            if solve(operands, operators, trial) is not None:
                slips = trial
    solved = solve(operands, operators, slips)
    assert solved is not None, "every accepted slip keeps the values in range"
    lines, value = solved
    return "\n".join([*lines, f"Answer: {value}"])


def extract_answer(response: str) -> str | None:
    """The text after the last `Answer:` line of a response, stripped; None if there is none.

    A task-local check for builders and tests; the run's verifier is shared/reward/math_verifier.py.
    """
    for line in reversed(response.splitlines()):
        if line.startswith("Answer:"):
            return line[len("Answer:") :].strip()
    return None


def split_of(prompt: str) -> str:
    """The split ("train" or "test") a prompt belongs to, from a stable hash of its text."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % 100 < TEST_PERCENT else "train"


def _draw(rng: random.Random, num_steps: int) -> Problem:
    while True:
        operands = [rng.randint(0, MAX_OPERAND) for _ in range(num_steps + 1)]
        operators = [rng.choice(OPERATORS) for _ in range(num_steps)]
        problem = make_problem(operands, operators)
        if problem is not None:
            return problem


def generate(
    num: int, seed: int, split: str = "train", *, max_steps: int = 12, step_decay: float = 0.75
) -> list[Problem]:
    """`num` problems of one split, the same for the same arguments (see the module note)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    probs = step_probabilities(max_steps, step_decay)
    steps = list(range(1, max_steps + 1))
    # A string seed is hashed deterministically by random.Random (sha512), unlike hash().
    rng = random.Random(f"arithmetic:{seed}:{split}")
    problems: list[Problem] = []
    while len(problems) < num:
        problem = _draw(rng, rng.choices(steps, weights=probs)[0])
        if split_of(problem.prompt) == split:
            problems.append(problem)
    return problems


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems as jsonl rows {prompt, ground_truth, data_source}; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(problem.to_row()) + "\n")
    return path


def write_parquet(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems as a parquet table with columns prompt, ground_truth, data_source."""
    import pyarrow as pa  # lazy: only parquet export needs it
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [problem.to_row() for problem in problems]
    columns = ("prompt", "ground_truth", "data_source")
    table = pa.table({key: pa.array([row[key] for row in rows], type=pa.string()) for key in columns})
    pq.write_table(table, path)
    return path
