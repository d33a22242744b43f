"""What a run needs that is not Ray: placement arithmetic, address checks, the node processes, the progress
line of a learner step, the restart policy of actors that die (`StartFailures`: back off, give up on one that
never starts), and the error a failed run ends with (`RunFailed`, which the CLI prints as one line without
importing Ray).

Placement: a learner rank or an actor asks for one bundle (`resource_bundle`: its CPUs, GPUs and the
custom resources of `deploy.learner_resources` / `deploy.actor_resources`). `placement_problem` says, from
`ray.nodes()`, when the cluster could never hold the bundles (no node has a bundle's resources, or the
cluster has fewer in all), so `deploy.ray_actors.reserve` fails at once instead of waiting on a placement
group that Ray would keep pending forever; the message names what was asked and what each node has.

Connection: `ray.init` retries an address where nothing listens for many minutes, so `check_address`
opens the GCS port first. A head started by `ray start --head` uses token auth whenever a token file
exists, but Ray only sends the token for an explicit address when `RAY_AUTH_MODE=token`;
`use_token_if_available` sets it the way `ray start` decides.

Node processes (`stop_nodes`): `ray stop` stops every Ray process on the machine: other users'
clusters, a test cluster next to a real one, another run's local instance. So each node is started
with its own `--temp-dir DIR`, and its processes are found by that directory instead:

- the daemons (gcs_server, raylet, log monitor, dashboard, autoscaler monitor) name `DIR/session_...`
  on their command line;
- the head's Ray client server names only the cluster's GCS address (`--address=HOST:PORT`);
- worker processes (`ray::RolloutWorker`, `ray::IDLE`) and the node agents rewrite their command line,
  and vLLM's engine-core processes are children of a worker: all are found as descendants of the above.

The whole set is collected before anything is signalled: once a raylet or a worker dies, its children
are re-parented to init and can no longer be told apart from anyone else's. Then, each group with
SIGTERM and SIGKILL for what is left after its grace period: the driver (it may checkpoint, and its exit
ends the job's actors), the raylets (they stop their workers), everything else, and the GCS last, in
`ray stop`'s order (a GCS stopped before the others waits on them). Only processes of the current user
are considered, and never this process or its ancestors (the shell running start_cluster.sh names the
directory too).

Imports no Ray (psutil, lazily), so stopping works on a cluster that is already half gone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

# ---- placement arithmetic and progress lines (pure) -------------------------------------------


class RunFailed(RuntimeError):
    """The run ended because a process of it failed; the message says what and how to resume."""


RESTART_BACKOFF_CAP_S = 60.0


class StartFailures:
    """Consecutive failed starts of each actor: the wait before its restart, and when to give up on it.

    A death of an actor that never generated a group is a failed start: its count goes up by one and the
    wait before the next start is `backoff_s` after the first, then doubles per failure in a row (at most
    `RESTART_BACKOFF_CAP_S`); at `max_failures` in a row (0: never) `died` says give up. A death after
    the actor generated is no failed start: the count is reset and the restart waits `backoff_s`.
    """

    def __init__(self, max_failures: int, backoff_s: float) -> None:
        self.max_failures, self.backoff_s = max_failures, backoff_s
        self.failures: dict[int, int] = {}
        """Actor id -> failed starts in a row."""

    def died(self, actor_id: int, *, generated: bool) -> float | None:
        """Seconds to wait before starting `actor_id` again, or None: give up (`max_failures` in a row)."""
        n = 0 if generated else self.failures.get(actor_id, 0) + 1
        self.failures[actor_id] = n
        if self.max_failures and n >= self.max_failures:
            return None
        return min(self.backoff_s * 2.0 ** min(max(n - 1, 0), 32), RESTART_BACKOFF_CAP_S)

    def forget(self, actor_id: int) -> None:
        """An actor scaled away: a later actor under its id starts with a clean count."""
        self.failures.pop(actor_id, None)


def progress_line(m: dict[str, float], total: int | None = None, eta_s: float | None = None) -> str:
    """`step 7/40 | reward -0.500 | acc 0.250 | ... | ETA 1.2 min`: one learner step's metrics (`vapo train`,
    `vapo status`); `/total` and the ETA only when given."""
    step = f"step {int(m.get('train/version', 0))}" + (f"/{total}" if total is not None else "")
    line = (
        f"{step} | reward {m.get('rollout/reward_mean', 0):+.3f} | acc {m.get('rollout/acc', 0):.3f}"
        f" | len {m.get('rollout/len_mean', 0):.0f} | lag {m.get('async/version_lag_mean', 0):.2f}"
        f" | gen tok/s {m.get('perf/gen_tokens_per_s', 0):,.0f}"
        f" | train tok/s {m.get('perf/train_tokens_per_s', 0):,.0f}"
    )
    if m.get("sync/alert"):
        line += f" | SYNC ALERT lag-0 log-prob diff {m['sync/logprob_abs_diff_lag0']:.3g}"
    return line + (f" | ETA {eta_s / 60:.1f} min" if eta_s is not None else "")


def resource_bundle(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """The non-zero CPU, GPU and custom resources of one learner rank or actor."""
    return {k: float(v) for k, v in {"CPU": cpus, "GPU": gpus, **resources}.items() if v > 0}


def total_request(bundles: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each resource summed over the bundles."""
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def describe_nodes(nodes: Sequence[dict[str, Any]]) -> str:
    """`ip id8 {'CPU': 2.0, 'actor_node': 2.0}; ...`: what each live node has (entries of `ray.nodes()`)."""
    parts = []
    for n in nodes:
        if n["Alive"]:
            res = {k: v for k, v in n["Resources"].items() if "memory" not in k and not k.startswith("node:")}
            parts.append(f"{n['NodeManagerAddress']} {n['NodeID'][:8]} {res}")
    return "; ".join(parts) or "no live node"


def placement_problem(bundles: Sequence[dict[str, float]], nodes: Sequence[dict[str, Any]]) -> str | None:
    """Why the live `nodes` (entries of `ray.nodes()`) could never hold `bundles`; None when they could."""
    live = [n for n in nodes if n["Alive"]]
    for b in bundles:
        if not any(all(n["Resources"].get(k, 0.0) >= v for k, v in b.items()) for n in live):
            return f"no node has {b} (cluster: {describe_nodes(live)})"
    needed = total_request(bundles)
    have = {k: sum(n["Resources"].get(k, 0.0) for n in live) for k in needed}
    if any(have[k] < v for k, v in needed.items()):
        return f"needs {needed} in all, the cluster has {have} (cluster: {describe_nodes(live)})"
    return None


# ---- connecting -----------------------------------------------------------------------------


def check_address(address: str, label: str) -> None:
    """One-line ValueError when nothing listens at a `host:port` address (`auto` and `ray://` are left to Ray)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(f"{label}={address}: no Ray cluster there ({e.strerror or e})") from None


def use_token_if_available() -> None:
    """Set RAY_AUTH_MODE=token when unset and a Ray auth token exists, as `ray start --head` decides."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


# ---- the processes of the nodes started on this machine ----------------------------------------


def _cmdline(proc: psutil.Process) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _session_markers(temp_dirs: Iterable[str]) -> list[str]:
    markers = []
    for d in temp_dirs:
        for path in {d.rstrip("/"), os.path.realpath(d)}:
            markers.append(f"{path}/session_")
    return markers


def node_processes(temp_dirs: Sequence[str], address: str | None = None) -> list[psutil.Process]:
    """The Ray processes of the nodes with these temp dirs (and the head's client server at `address`), with
    all their descendants; never this process or its ancestors."""
    import psutil

    markers = _session_markers(temp_dirs)
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    uid = os.getuid()
    roots = []
    for proc in psutil.process_iter():
        try:
            if proc.pid in mine or proc.uids().real != uid:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        cmd = _cmdline(proc)
        client_server = address is not None and "ray.util.client.server" in cmd and f"--address={address}" in cmd
        if client_server or any(m in cmd for m in markers):
            roots.append(proc)
    return _with_descendants(roots, mine)


def _with_descendants(roots: Iterable[psutil.Process], exclude: set[int]) -> list[psutil.Process]:
    import psutil

    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        found.update((p.pid, p) for p in family if p.pid not in exclude)
    return list(found.values())


def stop_nodes(
    temp_dirs: Sequence[str], address: str | None = None, driver_pid: int | None = None, grace_s: float = 30.0
) -> tuple[list[int], list[int]]:
    """Stop the driver (if given) and the processes of these nodes; returns (pids that ran, pids SIGKILLed).

    The driver gets `grace_s` to exit after SIGTERM; the raylets, the other processes and the GCS a third
    of it each."""
    import psutil

    procs = node_processes(temp_dirs, address)
    driver: list[psutil.Process] = []
    if driver_pid is not None and psutil.pid_exists(driver_pid):
        driver = _with_descendants([psutil.Process(driver_pid)], {os.getpid()})
    rest = [p for p in procs if p.pid not in {d.pid for d in driver}] + driver[1:]
    raylets, gcs = [p for p in rest if _name(p) == "raylet"], [p for p in rest if _name(p) == "gcs_server"]
    others = [p for p in rest if p not in raylets and p not in gcs]
    killed = _terminate(driver[:1], grace_s)
    for group in (raylets, others, gcs):
        killed += _terminate(group, grace_s / 3)
    return sorted({p.pid for p in [*driver, *procs]}), killed


def _name(proc: psutil.Process) -> str:
    import psutil

    try:
        return proc.name()
    except psutil.Error:
        return ""


def _terminate(procs: list[psutil.Process], grace_s: float) -> list[int]:
    """SIGTERM, wait up to `grace_s`, SIGKILL; returns the pids that needed SIGKILL."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s) if procs else ([], [])
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return [p.pid for p in alive]
