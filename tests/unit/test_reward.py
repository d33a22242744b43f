"""The math verifier: extraction, normalisation, equivalence, hostile inputs, threads and the time limit."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.reward import math_verifier
from shared.reward.math_verifier import RewardResult, extract_answer, normalize_answer, score

# The math-verify child takes ~1.5 s to import sympy; start it while pytest collects the other modules.
math_verifier.warm_up()

MB = 1 << 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 5", "5"),
        ("**Answer:** 42\n", "42"),
        ("  > **Answer**: 12 cm.", "12 cm."),
        ("## Final Answer: 7", "7"),
        ("answer:   3  ", "3"),
        ("Reasoning.\nAnswer: 1\nWait, no.\nANSWER: 2\nDone.", "2"),
        ("Answer: 1\n\\boxed{3}", "1"),  # an Answer line beats a box
        ("Answer: $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("The answer: 5", None),  # not at a line start
        ("Answer:\n\\boxed{9}", "9"),  # an empty Answer line falls back to the box
        ("so \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("$\\boxed 5$", "5"),
        ("\\fbox{3}", "3"),
        ("\\boxed{1} and \\boxed{2", None),  # truncated last box: no answer, not the earlier box
        ("\\boxedx", None),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$5$", "5"),
        ("\\(5\\)", "5"),
        ("\\[5\\]", "5"),
        ("12 cm", "12"),
        ("5 dollars", "5"),
        ("\\$5", "5"),
        ("12\\text{ meters}", "12"),
        ("12 \\text{cm}^2", "12"),
        ("60 miles per hour", "60"),
        ("7.", "7"),
        ("x = 4", "4"),
        ("\\theta = 30^\\circ", "30"),
        ("90^{\\circ}", "90"),
        ("50\\%", "50"),
        ("\\text{5}", "5"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac12"),
        ("1,234", "1234"),
        ("-1,234,567.5", "-1234567.5"),
        ("1{,}000", "1000"),
        ("1\\,000", "1000"),
        ("1, 234", "1, 234"),  # a list: math-verify would read "1,234" as a number
        ("1,2", "1,2"),
        ("12,34", "12,34"),
        ("\u22123", "-3"),  # unicode minus
        ("\\left( 1,2 \\right)", "(1,2)"),
        ("(1 ,  2)", "(1, 2)"),
        ("\\pi r^2", "\\pi r^2"),  # the space after a command before a letter stays
        ("x = 1, y = 2", "x=1, y=2"),  # two assignments are not stripped
        ("3 or 4", "3or4"),  # "or" is not a unit
        ("5m", "5m"),  # no space: a product, not metres
        ("$\\boxed{\\text{5 cm}}$.", "5"),
        ("a\x00b\udcff", "ab"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("1/2", "1/2"),
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac12", "1/2"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("1,000", "1000"),
        ("$5$", "5"),
        ("12 cm", "12"),
        ("\u22123", "-3"),
        ("x = 4", "4"),
        ("-7", "-7"),
        ("-0.25", "-\\frac{1}{4}"),
        ("2.50", "5/2"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),  # symbolic: needs math-verify
        ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
        ("0.333333", "1/3"),  # math-verify rounds floats to 6 places
    ],
)
def test_equivalent_answers_are_correct(pred: str, gold: str) -> None:
    result = score(f"Some reasoning.\nAnswer: {pred}", gold)
    assert result == RewardResult(1.0, True, pred)
    assert score(f"so \\boxed{{{pred}}}", gold).correct


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("2", "3"),
        ("2", "1/2"),
        ("1/2", "2"),
        ("100", "10"),
        ("10", "100"),
        ("1,2", "12"),
        ("1, 234", "1234"),
        ("-3", "3"),
        ("0.33", "1/3"),
        ("\\sqrt{3}", "\\frac{\\sqrt{2}}{2}"),
        ("3 or 4", "3"),
    ],
)
def test_different_answers_are_wrong(pred: str, gold: str) -> None:
    assert score(f"Answer: {pred}", gold) == RewardResult(-1.0, False, pred)


def test_no_answer_is_wrong_with_no_prediction() -> None:
    assert score("I think it is 5.", "5") == RewardResult(-1.0, False, None)


def test_custom_rewards() -> None:
    assert score("Answer: 5", "5", correct_reward=2.5, wrong_reward=0.0) == RewardResult(2.5, True, "5")
    assert score("Answer: 6", "5", correct_reward=2.5, wrong_reward=0.0) == RewardResult(0.0, False, "6")
    assert score("", "5", correct_reward=2.5, wrong_reward=0.0) == RewardResult(0.0, False, None)


@pytest.mark.parametrize("ground_truth", ["", "   ", "$$", "\x00"])
def test_empty_ground_truth_raises(ground_truth: str) -> None:
    with pytest.raises(ValueError, match="ground_truth"):
        score("Answer: 5", ground_truth)


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan")])
def test_bad_timeout_raises(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        score("Answer: 5", "5", timeout_s=timeout_s)


def test_boxed_ground_truth_is_unwrapped() -> None:
    assert score("Answer: 5", "\\boxed{5}").correct


HOSTILE = {
    "empty": "",
    "whitespace": " \n\t" * 1000,
    "5 MB of letters": "x" * (5 * MB),
    "5 MB of newlines": "\n" * (5 * MB),
    "5 MB of open braces": "{" * (5 * MB),
    "5 MB of box openings": "\\boxed{" * (5 * MB // 7),
    "5 MB after a box": "\\boxed{" + "a" * (5 * MB),
    "5 MB answer line": "Answer: " + "9" * (5 * MB),
    "5 MB of spaces after Answer": "Answer: " + " " * (5 * MB) + "x",
    "5 MB of answer words on one line": "answer " * (5 * MB // 7),
    "5 MB of Answer lines": "Answer: 1\n" * (5 * MB // 10),
    "5 MB of markdown before answer": "*" * (5 * MB) + "answer",
    "unbalanced close": "\\boxed{1}}}}}",
    "unbalanced open": "\\boxed{{{{1}",
    "100k nested braces in a box": "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
    "lone surrogates": "Answer: \udcff\ud800",
    "replacement chars": "Answer: \ufffd\ufffd",
    "NUL bytes": "\x00Answer: \x00\x00",
    "control chars": "Answer: \x1b[31m\x07",
    "backslash at end": "\\boxed{\\",
    "box at end": "\\boxed",
    "box then spaces": "\\boxed   ",
    "dollars": "Answer: $$$$$$",
    "only delimiters": "Answer: \\(\\)",
    "unicode case change": "\u0130" * 1000 + "\nAnswer: 5",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_responses_never_raise(name: str) -> None:
    result = score(HOSTILE[name], "5", correct_reward=1.0, wrong_reward=-1.0)
    assert isinstance(result, RewardResult)
    assert result.correct == (name == "unicode case change")
    assert result.score == (1.0 if result.correct else -1.0)
    assert result.pred is None or len(result.pred) <= 1000


def test_the_innermost_of_100k_nested_boxes_is_the_answer() -> None:
    text = "\\boxed{" * 100_000 + "5" + "}" * 100_000
    assert score(text, "5") == RewardResult(1.0, True, "5")


def test_nul_and_surrogates_inside_a_correct_answer() -> None:
    assert score("Answer: 5\x00", "5").correct
    assert score("Answer: 5\udcff", "5").correct


def test_scoring_from_worker_threads_matches_the_main_thread() -> None:
    cases = [
        ("Answer: 0.5", "1/2"),
        ("Answer: 2", "3"),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
        ("\\boxed{\\sqrt{3}}", "\\frac{\\sqrt{2}}{2}"),
        ("Answer: x = 4", "4"),
        ("nothing", "4"),
    ]
    on_main = [score(r, g) for r, g in cases]
    assert threading.current_thread() is threading.main_thread()
    with ThreadPoolExecutor(max_workers=3) as pool:
        on_workers = list(pool.map(lambda case: score(*case), cases))
    assert on_workers == on_main
    assert [r.correct for r in on_main] == [True, False, True, False, True, False]


def test_overrunning_verification_is_wrong_and_the_next_call_still_works() -> None:
    """About 2 s: it pays one restart of the math-verify child. Thirty nested parentheses take seconds to parse."""
    nested = "(" * 30 + "1" + ")" * 30
    assert score("\\boxed{\\sqrt{4}}", "2").correct  # the child is up
    pid_before = math_verifier._VERIFIER._proc.pid if math_verifier._VERIFIER._proc else None
    with ThreadPoolExecutor(max_workers=1) as pool:  # off the main thread, as the actor scores
        result = pool.submit(score, f"Answer: {nested}", "1", timeout_s=0.5).result()
    assert result == RewardResult(-1.0, False, nested)
    assert math_verifier._VERIFIER._proc is not None and math_verifier._VERIFIER._proc.pid != pid_before
    assert score("\\boxed{\\sqrt{4}}", "2").correct
