"""Faults of a running `vapo train`, with real processes: signals, killed actors, a killed learner, resumes.

CI (random-init model, a few steps): SIGTERM to the driver after the first step makes the learner
checkpoint at the next step boundary and the run end cleanly; `resume=true` continues from that
checkpoint with the next step and version numbers, in the same MLflow run, and the actor generates
only after it received the checkpoint's weights: the first resumed batch has version lag 0 and its
behavior log-probs match the learner's to vLLM/transformers parity, where one version of staleness
already differs 30x more. The driver's signal handler alone: the first signal forwards the stop
once, a second one aborts. An actor that can never start is restarted after a backoff, and its
`deploy.max_start_failures`-th failed start in a row stops the run (checkpoint, exit 1, one line
naming the actor, its error and its log).

Slow (the built tiny model):
- an actor SIGKILLed mid-run: training goes on, the controller starts a replacement under the same id,
  the dead one's leases are re-issued, the replacement receives the current weights before it generates,
  and the queue's accounting identity holds at the end;
- SIGTERM to the learner's own process (a Ray worker) stops the run cleanly with a checkpoint; then the
  learner process SIGKILLed ends the run with an error naming the checkpoint, and `resume=true` continues;
- the whole driver SIGKILLed: every process of the run goes away, and `resume=true` continues.

Processes are found by walking /proc from the driver (Ray's worker titles: `ray::LearnerRank`,
`ray::RolloutWorker`); every process a run started is remembered and, if still alive at the end of the
test, killed by pid.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learner import checkpoint
from shared.tracking.tracker import metric_history
from tests.component.conftest import SHORT_RUN_ON_A_RANDOM_MODEL, build_random_model
from tests.component.test_queue_support import free_port

ROOT = Path(__file__).resolve().parents[2]
PROGRESS = re.compile(r"^step (\d+)/(\d+) \|", re.M)
DONE = re.compile(r"^done: (\d+) steps, policy version (\d+), MLflow run (\w+)", re.M)
STOPPED = re.compile(r"^stopped at step (\d+) \(policy version (\d+)\)", re.M)
WEIGHTS = re.compile(r"\(RolloutWorker pid=(\d+)\).*actor 0: weights of version (\d+) ")
INITIAL = re.compile(r"\(RolloutWorker pid=(\d+)\).*generating with the initial weights")
PARITY = 1e-4
"""Mean |behavior - old| log-prob of a lag-0 batch is ~1e-6 (vLLM vs transformers); one version of lag is ~5e-3."""


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, command line) of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry)] = (int(fields[1]), fields[19], cmdline.strip())
    return out


class Train:
    """`vapo train` in a subprocess, its output in a file; remembers every process under it."""

    def __init__(self, tmp_path: Path, name: str, overrides: list[str]) -> None:
        self.log_path = tmp_path / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, "-m", "deploy.cli", "train", str(ROOT / "configs" / "tiny_cpu.yaml"), *overrides]
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.seen: dict[int, tuple[str, str]] = {}  # pid -> (start time, command line)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def snapshot(self) -> dict[int, str]:
        """The run's live processes (pid -> command line), remembered for the clean-up."""
        table = _processes()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        found, todo = {}, [self.proc.pid]
        while todo:
            pid = todo.pop()
            if pid in table:
                found[pid] = table[pid][2]
                self.seen.setdefault(pid, table[pid][1:])
            todo.extend(children.get(pid, []))
        return found

    def pids(self, title: str) -> list[int]:
        """Live processes of this run whose command line starts with `title` (e.g. `ray::LearnerRank`)."""
        return [pid for pid, cmd in self.snapshot().items() if cmd.startswith(title)]

    def wait_for(self, pattern: re.Pattern, timeout: float = 900.0, *, after: int = 0) -> re.Match:
        """The first match of `pattern` in the output at or after offset `after`; fails when the run ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.snapshot()
            match = pattern.search(self.output(), after)
            if match:
                return match
            if self.proc.poll() is not None:
                pytest.fail(f"vapo train exited ({self.proc.returncode}) before {pattern.pattern!r}:\n"
                            + self.output()[-6000:])
            time.sleep(0.3)
        pytest.fail(f"no {pattern.pattern!r} within {timeout:.0f}s:\n" + self.output()[-6000:])

    def finish(self, timeout: float = 900.0) -> int:
        """Wait for the driver to exit; its return code."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.snapshot()
            time.sleep(0.5)
        if self.proc.poll() is None:
            pytest.fail(f"vapo train did not exit within {timeout:.0f}s:\n" + self.output()[-6000:])
        return self.proc.returncode

    def survivors(self) -> dict[int, str]:
        """Remembered processes still alive (same pid and start time)."""
        table = _processes()
        return {pid: cmd for pid, (start, cmd) in self.seen.items() if pid in table and table[pid][1] == start}

    def wait_gone(self, timeout: float) -> dict[int, str]:
        """Wait until every process of the run has exited; the ones left after `timeout`."""
        deadline = time.monotonic() + timeout
        while (left := self.survivors()) and time.monotonic() < deadline:
            time.sleep(1.0)
        return left

    def kill_all(self) -> None:
        """SIGKILL the driver if it runs, then whatever of the run is still alive."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.wait_gone(30.0):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def runs():
    """Every `Train` a test starts; left-over processes are killed at the end."""
    started: list[Train] = []
    yield started
    for run in started:
        run.kill_all()


def _ports() -> list[str]:
    return [f"queue.port={free_port()}", f"queue.pub_port={free_port()}", f"sync.master_port={free_port()}"]


def _history(run_id: str, uri: str, *keys: str) -> dict[str, list[tuple[int, float]]]:
    return metric_history(run_id, list(keys), uri)


def _check_resumed(out: str, run_id: str, uri: str, from_step: int, total: int, max_staleness: int) -> None:
    """The resumes continued the first launch's MLflow run (the store holds that one run), which holds steps
    1..total with version == step; the resumed learner received the checkpoint's weights before generating,
    and its first batch was on-policy."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.run_id for r in client.search_runs(experiments)] == [run_id]
    h = _history(run_id, uri, "train/version", "async/version_lag_max", "sync/logprob_abs_diff_mean")
    assert h["train/version"] == [(s, float(s)) for s in range(1, total + 1)], h["train/version"]
    resumed = {key: [(s, v) for s, v in values if s > from_step] for key, values in h.items()}
    assert all(v <= max_staleness for _, v in resumed["async/version_lag_max"])
    assert resumed["async/version_lag_max"][0] == (from_step + 1, 0.0)  # the checkpoint's weights, labelled so
    assert resumed["sync/logprob_abs_diff_mean"][0][1] < PARITY, resumed["sync/logprob_abs_diff_mean"]
    first = WEIGHTS.search(out)
    assert first is not None and int(first.group(2)) == from_step, "the actor's first weights are the checkpoint's"
    assert INITIAL.search(out) is None, "an actor generated with model.path's weights after a resume"


# ---- CI: SIGTERM to the driver, then resume (random-init model) --------------------------------------------


def test_driver_signal_forwards_the_stop_once_then_aborts() -> None:
    """The driver's handler (no Ray instance needed): the first signal calls the forwarder, the second aborts."""
    import threading

    from deploy.launch import _stop_on_signal

    forwarded = threading.Event()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with _stop_on_signal(forwarded.set) as signals:
        signal.raise_signal(signal.SIGTERM)
        assert forwarded.wait(10) and signals.event.is_set()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_to_the_driver_checkpoints_and_resume_continues(tmp_path: Path, runs: list[Train]) -> None:
    model = build_random_model(tmp_path / "model", tie_word_embeddings=True)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    common = [
        f"model.path={model}",
        *SHORT_RUN_ON_A_RANDOM_MODEL,
        "rollout.max_new_tokens=48",
        "learner.checkpoint_every=0",  # the only checkpoint is the one the stop writes
        f"run_dir={tmp_path / 'run'}",
        f"tracking.tracking_uri={uri}",
        *_ports(),
    ]
    first = Train(tmp_path, "first", [*common, "learner.total_steps=40"])
    runs.append(first)
    seen = int(first.wait_for(PROGRESS).group(1))
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 0, first.output()[-6000:]
    out = first.output()
    stopped = STOPPED.search(out)
    assert stopped is not None, out[-4000:]
    step = int(stopped.group(1))
    assert seen <= step <= seen + 4 and step < 40  # soon after the signal (the progress line lags a step or two)
    assert stopped.group(2) == str(step)
    ckpt = checkpoint.latest(tmp_path / "run")
    assert ckpt is not None and ckpt.name == f"step_{step:06d}"
    assert (checkpoint.read_meta(ckpt)["step"], checkpoint.read_meta(ckpt)["version"]) == (step, step)
    done = DONE.search(out)
    assert done is not None and done.groups()[:2] == (str(step), str(step))
    assert "identity holds: True" in out
    h = _history(done.group(3), uri, "train/version", "async/version_lag_max")
    assert h["train/version"] == [(s, float(s)) for s in range(1, step + 1)]
    assert all(v <= 1 for _, v in h["async/version_lag_max"])

    total = step + 2
    resumed = Train(tmp_path, "resumed", [*common, f"learner.total_steps={total}", "resume=true"])
    runs.append(resumed)
    assert resumed.finish() == 0, resumed.output()[-6000:]
    out = resumed.output()
    done = DONE.search(out)
    assert done is not None and done.groups()[:2] == (str(total), str(total)), out[-4000:]
    assert "identity holds: True" in out
    _check_resumed(out, done.group(3), uri, step, total, max_staleness=1)


def test_actor_that_cannot_start_fails_the_run(tmp_path: Path, runs: list[Train]) -> None:
    """An actor whose engine can never be built (tensor parallelism 3: more vLLM CPU workers than this
    machine's cores, and 4 attention heads that 3 does not divide) is restarted after a backoff, and its
    second failed start ends the run: the learner checkpoints, the driver exits 1 with one line naming
    the actor, its error and its log, which holds that error."""
    model = build_random_model(tmp_path / "model", tie_word_embeddings=True)
    run = Train(tmp_path, "no-start", [
        f"model.path={model}",
        *SHORT_RUN_ON_A_RANDOM_MODEL,
        "actors.tensor_parallel_size=3",  # only the actor's engine checks it; the learner does not care
        "deploy.max_start_failures=2",
        "deploy.restart_backoff_s=0.5",
        "deploy.health_check_s=1",
        "learner.checkpoint_every=0",
        f"run_dir={tmp_path / 'run'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
        *_ports(),
    ])
    runs.append(run)
    started = time.monotonic()
    code = run.finish(timeout=300)
    took = time.monotonic() - started
    out = run.output()
    assert code == 1, out[-6000:]
    lines = [line for line in out.splitlines() if line.startswith("vapo train: ")]
    assert len(lines) == 1, out[-6000:]
    match = re.fullmatch(r"vapo train: actor 0 failed to start 2 times in a row \(deploy.max_start_failures\) "
                         r"without generating a group: (\w+: .+); its log: (/\S+\.err)", lines[0])
    assert match is not None, lines[0]
    error, log = match.groups()
    assert error.split(": ", 1)[1].removesuffix("...") in Path(log).read_text(errors="replace")
    assert len(re.findall(r"actor 0 is dead; restarting it in 0\.5 s", out)) == 1, out[-6000:]
    assert out.count("actor 0 failed to start 2 times in a row") == 2, out[-6000:]  # the controller's log, the line
    assert "failed to start 3 times" not in out  # given up on: no more health checks, restarts or lines
    assert DONE.search(out) is None and STOPPED.search(out) is not None  # stopped at a step boundary
    ckpt = checkpoint.latest(tmp_path / "run")
    assert ckpt is not None and checkpoint.read_meta(ckpt)["step"] == 0
    assert took < 240, took


# ---- slow: the tiny model ---------------------------------------------------------------------------------


def _tiny(tmp_path: Path, *overrides: str) -> list[str]:
    """The tiny configuration, smaller steps (8 prompts x 8 samples, 128 new tokens), its own ports and dirs."""
    return [
        "model.path=builtin:tiny",
        "algo.value_pretrain_steps=1",
        "rollout.prompts_per_step=8",
        "actors.prompts_per_lease=8",
        "learner.mini_batch_size=32",
        "rollout.max_new_tokens=128",
        "learner.checkpoint_every=2",
        "deploy.health_check_s=3",
        "sync.timeout_s=60",
        f"run_dir={tmp_path / 'run'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
        *_ports(),
        *overrides,
    ]


@pytest.mark.slow
def test_killed_actor_is_replaced_and_catches_up(tmp_path: Path, runs: list[Train]) -> None:
    # max_staleness=0: right after a step's push the actor holds the next batch's leases while it generates
    run = Train(tmp_path, "actor", _tiny(tmp_path, "learner.total_steps=5", "queue.max_staleness=0"))
    runs.append(run)
    at_kill = int(run.wait_for(PROGRESS).group(1))
    (victim,) = run.pids("ray::RolloutWorker")
    os.kill(victim, signal.SIGKILL)
    killed_at = len(run.output())
    run.wait_for(re.compile(r"actor 0 is dead; restarting it"), 300, after=killed_at)
    assert run.finish() == 0, run.output()[-6000:]
    out = run.output()
    done = DONE.search(out)
    assert done is not None and done.groups()[:2] == ("5", "5"), out[-4000:]
    assert "identity holds: True" in out
    replacement = [(int(pid), int(v)) for pid, v in WEIGHTS.findall(out) if int(pid) != victim]
    assert replacement, "the replacement never received weights"
    assert replacement[0][1] >= at_kill, replacement  # the current version, not model.path's
    assert all(int(pid) == victim for pid in INITIAL.findall(out))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    h = _history(done.group(3), uri, "train/version", "async/version_lag_max", "queue/expired_and_reissued",
                 "queue/rejected_late")
    assert [s for s, _ in h["train/version"]] == [1, 2, 3, 4, 5]
    assert all(v == 0 for _, v in h["async/version_lag_max"])
    reissued = h["queue/expired_and_reissued"][-1][1] + h["queue/rejected_late"][-1][1]
    assert reissued >= 1, "the killed actor's leases were not re-issued"


@pytest.mark.slow
def test_learner_sigterm_then_sigkill_and_resume(tmp_path: Path, runs: list[Train]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    first = Train(tmp_path, "first", _tiny(tmp_path, "learner.total_steps=40", "queue.max_staleness=1"))
    runs.append(first)
    first.wait_for(PROGRESS)
    (learner,) = first.pids("ray::LearnerRank")
    os.kill(learner, signal.SIGTERM)  # the learner's own process, not the driver
    assert first.finish() == 0, first.output()[-6000:]
    stopped = STOPPED.search(first.output())
    assert stopped is not None, first.output()[-4000:]
    step = int(stopped.group(1))
    assert checkpoint.latest(tmp_path / "run").name == f"step_{step:06d}"

    second = Train(tmp_path, "second", _tiny(tmp_path, "learner.total_steps=40", "queue.max_staleness=1",
                                             "resume=true"))
    runs.append(second)
    seen = int(second.wait_for(PROGRESS).group(1))
    (learner,) = second.pids("ray::LearnerRank")
    os.kill(learner, signal.SIGKILL)
    assert second.finish() != 0
    ckpt = checkpoint.latest(tmp_path / "run")
    assert ckpt is not None and step <= checkpoint.read_meta(ckpt)["step"] <= seen + 3  # the line may lag
    assert re.search(rf"learner rank 0 died .*resume=true continues from {re.escape(str(ckpt))}", second.output())
    assert not second.wait_gone(180), "processes of the killed run are still alive"

    resume_step = checkpoint.read_meta(ckpt)["step"]
    total = resume_step + 2
    third = Train(tmp_path, "third", _tiny(tmp_path, f"learner.total_steps={total}", "queue.max_staleness=1",
                                           "resume=true"))
    runs.append(third)
    assert third.finish() == 0, third.output()[-6000:]
    out = third.output()
    done = DONE.search(out)
    assert done is not None and done.groups()[:2] == (str(total), str(total)), out[-4000:]
    assert "identity holds: True" in out
    _check_resumed(out, done.group(3), uri, resume_step, total, max_staleness=1)


@pytest.mark.slow
def test_killed_driver_leaves_nothing_behind_and_resume_continues(tmp_path: Path, runs: list[Train]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    ports = _ports()  # the resumed run binds the same ports: the killed one must have let them go
    first = Train(tmp_path, "first", _tiny(tmp_path, "learner.total_steps=40", *ports))
    runs.append(first)
    first.wait_for(re.compile(r"^step ([3-9]|\d\d+)/", re.M))  # past the checkpoint of step 2
    first.snapshot()
    first.proc.kill()
    first.proc.wait()
    assert not first.wait_gone(180), "processes of the killed run are still alive"
    ckpt = checkpoint.latest(tmp_path / "run")
    assert ckpt is not None
    step = checkpoint.read_meta(ckpt)["step"]
    assert step >= 2 and checkpoint.read_meta(ckpt)["version"] == step

    total = step + 2
    resumed = Train(tmp_path, "resumed", _tiny(tmp_path, f"learner.total_steps={total}", "resume=true", *ports))
    runs.append(resumed)
    assert resumed.finish() == 0, resumed.output()[-6000:]
    out = resumed.output()
    done = DONE.search(out)
    assert done is not None and done.groups()[:2] == (str(total), str(total)), out[-4000:]
    assert "identity holds: True" in out
    _check_resumed(out, done.group(3), uri, step, total, max_staleness=2)
