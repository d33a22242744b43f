"""The math verifier: find the final answer in a response, normalise it, and judge it against the ground truth.

`score` is the reward function for math data sources. It never raises on model output (empty text,
megabytes of text, unbalanced braces, lone surrogates, NUL bytes); a ground truth that is empty is bad
data, not model output, and raises ValueError.

Extraction: the last line that starts with `Answer:` (case-insensitive, optionally `Final Answer:`, optionally
wrapped in markdown such as `**Answer:**`) and has something after the colon; else the last `\\boxed{...}` /
`\\fbox{...}` (balanced braces, or `\\boxed 5` without braces); else no prediction, which scores as wrong.
An unbalanced last `\\boxed{` (a truncated response), or one not closed within 100k characters, is no
prediction: an earlier box is not used.
All scans are linear: `rfind` from the end and a single brace-counting pass, never a backtracking regex over
the whole response, so a 5 MB response costs tens of milliseconds.

Equivalence, cheapest first:
1. The normalised strings are equal.
2. Both are plain numbers (`-3`, `0.5`, `1/2`, `\\frac{1}{2}`): compared exactly as fractions. Unequal numbers
   are wrong without math-verify unless a decimal is within 1e-5 of the other (math-verify rounds floats to 6
   places, so `0.333333` may match `1/3`); those go to step 3. Most wrong answers in RL are numbers, so this
   keeps math-verify off the common path.
3. math-verify (`parse` + `verify`), symbolic, for predictions up to `_MAX_PRED_CHARS` characters; longer ones
   are wrong unless step 1 matched.

Time limit. math-verify's own timeout is `signal.alarm`, which raises ValueError outside the main thread (and
must then be switched off with `parsing_timeout=None` / `timeout_seconds=None`), and a signal cannot stop a
long C call or a memory blow-up anyway. Short inputs do hang it: `10^{10^{10}}` computes an integer with ten
billion digits, and `((((...1))))` with 30 levels takes seconds to parse. The actor scores in a worker thread,
so this process never calls math-verify: a persistent child process (`python -c`, not fork: safe in a threaded
parent, and it does not re-import `__main__`) answers one JSON line per request. The caller waits with `select`
up to `timeout_s` for the answer; past it the child is killed, the prediction is wrong, and a new child is
started for the next call. Inside the child math-verify runs in its main thread, where its signal timeout
works, as a backstop (`ceil(timeout_s) + 1` s), and the child caps its address space at 2 GiB, so an orphaned
child cannot spin or eat memory for long. A forked process forgets its parent's child and starts its own.

Failure modes: one child serves the whole process, so concurrent callers queue behind one lock; a call that
times out costs `timeout_s` plus a child restart (~1.5 s: importing sympy) for the call after it; a child
that cannot start (math-verify not installed) raises RuntimeError, because that is a broken environment, not
model output. `warm_up()` starts the child ahead of the first call.

Imports: stdlib only at import time; math-verify and sympy only inside the child. No zmq, ray, vllm, mlflow
or torch.distributed.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

_MAX_PRED_CHARS = 1000
_START_TIMEOUT_S = 120.0
_MAX_BOX_SCAN = 100_000
_CHILD_MEMORY_BYTES = 2 << 30
_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}

_MARKDOWN = " \t>#*_-"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DELETE = re.compile(
    r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\[!,;: ]|\\\$|\$|\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\%|%"
)
_UNITS = (
    "cm|mm|km|meters?|metres?|centimeters?|centimetres?|millimeters?|kilometers?|inch|inches|ft|feet|foot|yards?|"
    "yd|miles?|mph|kg|grams?|kilograms?|mg|lbs?|pounds?|ounces?|oz|sec|seconds?|mins?|minutes?|hrs?|hours?|days?|"
    "weeks?|months?|years?|dollars?|cents?|euros?|units?|degrees?|radians?|liters?|litres?|ml|gallons?|cups?"
)
_TRAILING_UNIT = re.compile(
    rf"\s+(?:(?:sq|square|cubic)\s+)?(?:{_UNITS})(?:\s*(?:/|per)\s*(?:{_UNITS}))?(?:\^\{{?[23]\}}?|²|³)?\.?\s*\Z",
    re.IGNORECASE,
)
_ASSIGNMENT = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?\s*=")
_THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?", re.ASCII)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+/[0-9]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
_LATEX_FRACTION = re.compile(r"([+-]?)\\frac(?:\{([0-9]+)\}|([0-9]))(?:\{([0-9]+)\}|([0-9]))", re.ASCII)
_LETTER_GAP = re.compile(r"(?<=[A-Za-z])\s+(?=[A-Za-z])")
_OTHER_SPACE = re.compile(r"(?<![A-Za-z ])\s+|\s+(?![A-Za-z])")
_LIST_COMMA = re.compile(r",\s+")
_BRACE_OR_ESCAPE = re.compile(r"[{}\\]")


@dataclass(frozen=True)
class RewardResult:
    """The verdict on one response: its reward, whether it was correct, and the extracted answer (cut to 1000 chars)."""

    score: float
    correct: bool
    pred: str | None


def score(
    response: str,
    ground_truth: str,
    *,
    correct_reward: float = 1.0,
    wrong_reward: float = -1.0,
    timeout_s: float = 5.0,
) -> RewardResult:
    """Score one response against its ground truth; raises ValueError only for an empty ground truth."""
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    gold = normalize_answer(ground_truth)
    if not gold:
        raise ValueError(f"ground_truth is empty after normalisation: {ground_truth!r}")
    raw = extract_answer(response)
    if raw is None:
        return RewardResult(wrong_reward, False, None)
    correct = _equivalent(gold, raw, timeout_s)
    return RewardResult(correct_reward if correct else wrong_reward, correct, raw[:_MAX_PRED_CHARS])


def extract_answer(text: str) -> str | None:
    """The final answer in a response: the last non-empty `Answer:` line, else the last box, else None."""
    line = _last_answer_line(text)
    if line is not None:
        boxed = _last_boxed(line)
        return boxed if boxed else line
    return _last_boxed(text)


def normalize_answer(s: str) -> str:
    """Canonical form of an answer: no delimiters, units, assignment, thousands commas, or spaces but ", "."""
    s = _sanitize(s)
    if len(s) > _MAX_PRED_CHARS:
        return s.strip()
    s = s.replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for _ in range(8):  # peel nested wrappers: "$\boxed{\text{5 cm}}$."
        before = s
        s = _strip_delimiters(s.strip().rstrip(".").strip())
        if s.startswith(_BOX_COMMANDS) and max(s.rfind(c) for c in _BOX_COMMANDS) == 0:
            s = _last_boxed(s) or s
        s = _TEXT_WRAPPER.sub(lambda m: " " + m.group(1), s)
        s = _DELETE.sub("", s)
        s = _TRAILING_UNIT.sub("", s)
        if s.count("=") == 1 and (m := _ASSIGNMENT.match(s.strip())):
            s = s.strip()[m.end() :]
        if s == before:
            break
    s = s.strip()
    if _THOUSANDS.fullmatch(s):  # before spaces go, so that the list "1, 234" stays a list
        s = s.replace(",", "")
    s = _LETTER_GAP.sub(" ", s)  # "\pi r" must not become "\pir"
    # ", " stays: math-verify reads "1,234" as a number, and "1, 234" must stay a list.
    return ", ".join(_OTHER_SPACE.sub("", part) for part in _LIST_COMMA.split(s))


def warm_up() -> None:
    """Start the math-verify child process now, so the first score() that needs it does not wait."""
    _VERIFIER.start()


def _equivalent(gold: str, raw_pred: str, timeout_s: float) -> bool:
    """Whether the extracted prediction equals the normalised ground truth (see the module docstring)."""
    pred = normalize_answer(raw_pred)
    if pred == gold:
        return True
    if not pred or len(pred) > _MAX_PRED_CHARS:
        return False
    gold_num, pred_num = _as_number(gold), _as_number(pred)
    if gold_num is not None and pred_num is not None:
        if gold_num == pred_num:
            return True
        has_decimal = "." in gold or "." in pred
        scale = max(Fraction(1), abs(gold_num), abs(pred_num))
        if not (has_decimal and abs(gold_num - pred_num) <= Fraction(1, 100_000) * scale):
            return False
    return _VERIFIER.equivalent(gold, pred, timeout_s)


def _sanitize(s: str) -> str:
    """Drop NULs and lone surrogates (remnants of bad decoding), and map unicode minus signs to ASCII."""
    s = s.encode("utf-8", "ignore").decode("utf-8").replace("\x00", "")
    return s.replace("\u2212", "-").replace("\u2013", "-").replace("\u00a0", " ")


def _strip_delimiters(s: str) -> str:
    """Remove one pair of surrounding math delimiters: $...$, $$...$$, \\(...\\), \\[...\\]."""
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s


def _as_number(s: str) -> Fraction | None:
    """The exact value of a plain number (int, decimal, a/b, \\frac{a}{b}, \\frac12), or None."""
    if len(s) > 200:
        return None
    if m := _LATEX_FRACTION.fullmatch(s):
        sign, numerator, denominator = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)
        s = f"{sign}{numerator}/{denominator}"
    if not _NUMBER.fullmatch(s) or re.search(r"/0+\Z", s):
        return None
    return Fraction(s)


def _last_answer_line(text: str) -> str | None:
    """Content of the last line that starts with `Answer:` and has content after it, scanning from the end."""
    lower = text.translate(_ASCII_LOWER)  # str.lower() can change the length, and so the indices
    end = len(text)
    while (i := lower.rfind("answer", 0, end)) >= 0:
        start = lower.rfind("\n", 0, i) + 1
        stop = lower.find("\n", i)
        stop = len(text) if stop < 0 else stop
        # The line must read `[markdown][final ]answer[markdown]:`. str methods, not a regex: a regex
        # prefix like `[*_ ]*answer` backtracks once per character of a megabyte line of asterisks.
        prefix = lower[start:i]
        if prefix.endswith((" ", "\t")) and prefix.rstrip(" \t").endswith("final"):
            prefix = prefix.rstrip(" \t")[: -len("final")]
        after = text[i + len("answer") : stop].lstrip(" \t*_")
        if not prefix.strip(_MARKDOWN) and after.startswith(":"):
            content = after[1:].strip().strip("*_").strip()
            if content:
                return content
        # At most one "answer" per line can open it, so skip to the line above.
        end = max(start - 1, 0)
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (balanced braces) or `\\boxed x`; None if absent or unclosed."""
    i, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if i < 0:
        return None
    j = i + len(command)
    while j < len(text) and text[j] in " \t":
        j += 1
    if j >= len(text):
        return None
    if text[j] != "{":
        if j == i + len(command):  # "\boxedx" is another macro, not a box
            return None
        m = re.match(r"[^\s$]+", text[j : j + _MAX_PRED_CHARS + 1])
        return m.group(0) if m else None
    depth = 0
    escaped_until = -1
    for m in _BRACE_OR_ESCAPE.finditer(text, j, j + _MAX_BOX_SCAN):
        k = m.start()
        if k < escaped_until:
            continue
        ch = text[k]
        if ch == "\\":
            escaped_until = k + 2  # "\{" and "\}" are literal braces
        elif ch == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return text[j + 1 : k].strip()
    return None


class _Verifier:
    """One math-verify child process, restarted after a call that overran its time limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._buffer = b""

    def forget(self) -> None:
        """In a forked process: drop the parent's child (not ours to kill) and a lock another thread may hold."""
        self._lock = threading.Lock()
        self._proc = None
        self._ready = False
        self._buffer = b""

    def start(self) -> None:
        """Spawn the child if none is running; does not wait for it to be ready."""
        with self._lock:
            self._spawn_if_needed()

    def equivalent(self, gold: str, pred: str, timeout_s: float) -> bool:
        """math-verify's verdict on (gold, pred); False when it takes longer than timeout_s."""
        request = (json.dumps([gold, pred, max(1, math.ceil(timeout_s)) + 1]) + "\n").encode()
        with self._lock:
            try:
                self._send(request)
            except BrokenPipeError:  # killed from outside between calls: one retry with a new child
                self._kill()
                self._send(request)
            line = self._read_line(time.monotonic() + timeout_s)
            if line is None:
                self._kill()
                self._spawn_if_needed()
                return False
            return line == b"1"

    def _spawn_if_needed(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        assert __name__ != "__main__", "the child imports this module by name"
        root = Path(__file__).resolve().parents[__name__.count(".")]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", f"import {__name__} as m; m._serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        self._ready = False
        self._buffer = b""

    def _send(self, request: bytes) -> None:
        """Write one request to a ready child, starting one and waiting for it if needed."""
        self._spawn_if_needed()
        assert self._proc is not None and self._proc.stdin is not None
        if not self._ready:
            line = self._read_line(time.monotonic() + _START_TIMEOUT_S)
            if line != b"ready":
                self._kill()
                raise RuntimeError(f"the math-verify child did not start (got {line!r}); is math-verify installed?")
            self._ready = True
        self._proc.stdin.write(request)
        self._proc.stdin.flush()

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the child, or None on timeout or end of file."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()
        self._proc = None
        self._ready = False
        self._buffer = b""

    def close(self) -> None:
        """Kill the child (at interpreter exit)."""
        with self._lock:
            self._kill()


_VERIFIER = _Verifier()
atexit.register(_VERIFIER.close)
os.register_at_fork(after_in_child=_VERIFIER.forget)


def _serve() -> None:
    """The child's loop: read [gold, pred, backstop_s] JSON lines from stdin, answer b"1" or b"0" per line."""
    import logging
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_CHILD_MEMORY_BYTES, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, not into the protocol
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    out.write(b"ready\n")
    for line in sys.stdin.buffer:
        gold, pred, backstop_s = json.loads(line)
        gold_parsed = parse(f"${gold}$", extraction_config=config, parsing_timeout=backstop_s)
        pred_parsed = parse(f"${pred}$", extraction_config=config, parsing_timeout=backstop_s)
        ok = bool(gold_parsed) and bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=backstop_s)
        out.write(b"1\n" if ok else b"0\n")
