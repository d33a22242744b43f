"""`deploy/start_cluster.sh` on this machine: a Ray head and a second Ray node with its own resources.

The head has 1 CPU and `learner_node: 1`, the second node 2 CPUs and `actor_node: 2`; a short run on
the random-init model asks for those labels, so the learner rank lands on the head and every actor on
the second node (checked by the node id each actor process reports). The run is scaled to 2 actors and
back, a third actor that cannot be placed fails after `deploy.placement_timeout_s` with one line, and
`stop` leaves no process of the cluster behind (the vLLM engine-core children of the actors included).

The cluster tests are `slow` (two Ray nodes, two vLLM engines starting on 2 cores: several minutes).
The error paths that need no cluster (nothing at the address, a missing model, a port in use) run
without one, in CI; tests/component/test_placement.py covers placement failures on a local Ray.
Every cluster started here has its own temp dir and ports and is stopped in the fixture's teardown
by that temp dir only: `ray stop` would also stop other Ray instances on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from deploy.cluster import node_processes, stop_nodes
from tests.component.conftest import SHORT_RUN_ON_A_RANDOM_MODEL, build_random_model
from tests.component.test_queue_support import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "start_cluster.sh"
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def _env(state: Path) -> dict[str, str]:
    env = {**os.environ, "VAPO_CLUSTER_DIR": str(state), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _script(state: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run([str(SCRIPT), *args], _env(state), state, timeout)


def _vapo(state: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "deploy.cli", *args], _env(state), state, timeout)


def _run_args(state: Path, model: Path, *extra: str) -> list[str]:
    """A short, tiny run on the random model, with its own ports, run dir and MLflow store."""
    return [
        str(TINY),
        f"model.path={model}",
        *SHORT_RUN_ON_A_RANDOM_MODEL,
        "rollout.max_new_tokens=24",
        f"queue.port={free_port()}",
        f"queue.pub_port={free_port()}",
        f"sync.master_port={free_port()}",
        f"run_dir={state / 'run'}",
        f"tracking.tracking_uri=sqlite:///{state / 'mlruns.db'}",
        *extra,
    ]


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    """A short state dir (Ray's socket paths live under it), removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def model(state: Path) -> Path:
    return build_random_model(state / "model", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def cluster(state: Path) -> Iterator[str]:
    """A head (1 CPU, learner_node) and a second node (2 CPUs, actor_node: 2); yields the head's address."""
    try:
        head = _script(
            state, "head", "--port", str(free_port()), "--num-cpus", "1", "--resource", "learner_node=1",
            "--dashboard-port", str(free_port()), "--client-port", str(free_port()),
        )  # fmt: skip
        assert head.returncode == 0, head.stdout + head.stderr
        address = (state / "address").read_text().strip()
        worker = _script(state, "worker", address, "--num-cpus", "2", "--resource", "actor_node=2")
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield address
    finally:
        nodes = (state / "nodes").read_text().split() if (state / "nodes").exists() else []
        stop = _script(state, "stop", "--grace", "15", timeout=180)
        if node_processes(nodes):  # the script failed: stop what is left, by temp dir only
            stop_nodes(nodes, grace_s=10)
        assert stop.returncode == 0, stop.stdout + stop.stderr


def _status(state: Path) -> dict:
    proc = _script(state, "status", "--json", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wait_status(state: Path, ok, what: str, driver: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = _status(state)
        if status["job"] is not None and ok(status["job"]):
            return status
        log = (state / "run" / "driver.log").read_text()[-3000:]
        assert psutil.pid_exists(driver), f"the driver died while waiting for {what}: {log}"
        assert time.monotonic() < deadline, f"{what}: {status['job']} {log}"
        time.sleep(3)


@pytest.mark.slow
def test_unplaceable_learner_fails_fast_with_one_line(cluster: str, state: Path, model: Path) -> None:
    # At once, not after the placement timeout: with a placement timeout of 10 hours, waiting for
    # it would run into the script's own 300 s limit (TimeoutExpired) instead of this error.
    proc = _script(state, "submit", *_run_args(state, model, "deploy.learner_resources.gpu_node=1",
                                                 "deploy.placement_timeout_s=36000"))
    _one_line_error(proc, "learner (1 rank(s)): no node has {'CPU': 1.0, 'gpu_node': 1.0}", "actor_node")
    assert _status(state)["job"] is None and cluster


@pytest.mark.slow
def test_submit_places_actors_on_the_labelled_node_scales_and_stops(cluster: str, state: Path, model: Path) -> None:
    run = _run_args(
        state, model, "learner.total_steps=100000", "learner.checkpoint_every=100000",
        "deploy.actor_resources.actor_node=1", "deploy.learner_resources.learner_node=1",
        "deploy.placement_timeout_s=5",
    )  # fmt: skip
    submit = _script(state, "submit", *run)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "running: 1 learner rank(s), 1 actor(s), Ray cluster of 2 node(s)" in submit.stdout
    driver = int((state / "job").read_text().split("pid=")[1].split()[0])

    status = _status(state)
    actor_node = next(n["node_id"] for n in status["nodes"] if "actor_node" in n["resources"])
    assert status["available"].get("learner_node", 0.0) == 0.0  # the learner rank holds the head's label

    scaled = _script(state, "scale", "2")
    assert scaled.returncode == 0 and scaled.stdout.strip() == "[0, 1]", scaled.stdout + scaled.stderr
    status = _wait_status(
        state,
        lambda job: job["progress"].get("train/version", 0) >= 1 and None not in job["actor_nodes"].values(),
        "a learner step and both actors placed",
        driver,
        timeout=600,
    )
    assert status["job"]["actors"] == [0, 1]
    assert set(status["job"]["actor_nodes"].values()) == {actor_node}  # both on the second node

    # The second node's actor_node: 2 is taken: a third actor fails after the placement timeout, in one line.
    third = _script(state, "scale", "3", timeout=120)  # the error names the 5 s it waited (the default is 60 s)
    _one_line_error(third, "actor 2: {'CPU': 1.0, 'actor_node': 1.0} not free after 5 s", "2 actor(s) run")

    assert _script(state, "scale", "1").stdout.strip() == "[0]"
    human = _script(state, "status")
    assert human.returncode == 0, human.stderr
    assert "job: 1 actor(s) [0@" + actor_node[:8] in human.stdout, human.stdout
    assert "cluster: 2 node(s)" in human.stdout and f"driver: pid {driver} running" in human.stdout

    nodes = (state / "nodes").read_text().split()
    procs = node_processes(nodes, cluster) + [psutil.Process(driver)]
    assert any(p.name().startswith("VLLM::") for p in procs)  # the engine core is found under its worker
    stop = _script(state, "stop", "--grace", "30", timeout=240)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    left = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.name()) for p in left]
    assert not (state / "address").exists() and not (state / "job").exists()
    again = _script(state, "status")
    assert again.returncode == 2 and "no cluster address" in again.stderr


def test_error_paths_without_a_cluster(tmp_path: Path) -> None:
    model = tmp_path / "model"  # these checks run before the model is loaded: an existing directory will do
    model.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: nothing answers there
        dead = f"127.0.0.1:{s.getsockname()[1]}"
        # each within its hang guard (the scripts' timeout), not after a connection timeout of minutes
        _one_line_error(_vapo(tmp_path, "scale", "2", "--address", dead, timeout=120),
                        f"--address={dead}: no Ray cluster there")
        _one_line_error(_vapo(tmp_path, "status", "--address", dead, timeout=120), "no Ray cluster there")
        _one_line_error(
            _vapo(tmp_path, "train", *_run_args(tmp_path, model, f"deploy.ray_address={dead}"), timeout=120),
            f"vapo train: deploy.ray_address={dead}: no Ray cluster there",
        )
        _one_line_error(_script(tmp_path, "worker", dead, timeout=120), f"no Ray cluster at {dead}")
    _one_line_error(_script(tmp_path, "scale", "2"), "no cluster address")
    missing = tmp_path / "no-such-model"
    _one_line_error(_vapo(tmp_path, "train", *_run_args(tmp_path, missing)), f"model.path '{missing}' does not exist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        busy = _vapo(tmp_path, "train", *_run_args(tmp_path, model, f"queue.port={taken}"))
        _one_line_error(busy, f"queue.port={taken} on 127.0.0.1 is not free")
        _one_line_error(_script(tmp_path, "head", "--port", str(taken)), f"port {taken} is in use")
    assert not (tmp_path / "address").exists()
