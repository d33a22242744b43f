"""Replay-queue throughput against a bare ZeroMQ PUSH/PULL pair, measured side by side in one run.

Queue path: actor processes lease prompts and submit real `RolloutGroup` messages to the
real service the way the real actor does: one `submit` per lease of 8 prompts, fed by a
generator, so each group leaves as it is made (pipelined: up to 8 submit requests and, beyond
the first, 8 MiB of groups in flight per actor; groups made while that window is full travel
together, so large groups reach the queue several per message) and the actor waits for the
statuses once per lease; leases on a connection of their own, as the real actor has; this
process is the learner, taking
batches of 16 and publishing a new version after each. The service runs in a thread of the
learner (`QueueThread`, inproc to the learner: how the launcher runs it by default,
`queue.embedded=true`) and, second, in its own process (`queue.embedded=false`, and `vapo
queue`), the learner on TCP. Raw path: PUSH processes send the very same
frames (the same bytes: header and array frames) to a PULL socket here, with the same
high-water marks as a minimal hand-written pipeline would use (8 messages each way).

Steady state: every round of every path runs in fresh processes (`isolated`), first moves
`--warmup` x the timed count of groups untimed (process start-up, socket buffers, the
allocator's first requests), then times the next `--large-groups` / `--small-groups`; rounds
interleave the paths and medians count. The CPU of every process of a path (user + system,
all threads, zmq's I/O threads included) is read at both ends of its window and printed per
group, with the cores it kept busy.

What the figures say on the 2-core machine (session 11):
- The raw pair alternates between two regimes, about 1,750 groups/s at ~0.9 ms of CPU per
  group and about 1,050 groups/s at ~1.5 ms, and switches between them within one window
  (250-group slices of one run: 990 1,066 ... 912 then 1,417 1,577 ... 1,608); pinning the
  two processes to different cores or glibc's mmap/trim thresholds (MALLOC_MMAP_THRESHOLD_,
  MALLOC_TRIM_THRESHOLD_) did not remove the slow regime. It also depends on the process's
  history: received in this script's own long-lived process after the small-group rounds,
  large groups came at ~820/s and ~2 ms of CPU each, hence a fresh process per round.
- The embedded queue moves 770-1,060 groups/s at 1.7-2.2 ms of CPU per group. The extra
  ~0.8-1 ms is Python and the value scans: in a `perf record -a` of 3,000 groups, the queue
  thread spent ~0.35 ms a group (half of it in the isfinite/min scans, which read all 3 MB
  of a group just copied in by the I/O thread), the actors' client ~0.3 ms (encoding, the
  pipeline, zero-copy send tracking) and the learner ~0.15 ms (batch decode). Both paths
  keep ~1.6-1.8 of the 2 cores busy, so the throughput ratio follows the CPU per group:
  0.54, 0.64 and 0.77 in three full runs with fresh processes, up to 1.23 when the raw
  receiver sat in its slow regime.
- The earlier default of 400 large groups timed from the first one (under half a second)
  caught the raw pair mostly in its slow first phase, which is why its ratio looked like
  ~0.97: the target of 0.8 is not met in steady state on this machine. Reaching it would
  take the queue's whole per-group work (actor client, validation, accounting, hand-out)
  within ~0.25 ms of CPU beside the copies; the value scans alone take ~0.17 ms.

A diagnostic, not the baseline: the raw frames through a bare `zmq.proxy` process in
between (PUSH -> forwarder -> PULL). A queue in its own process moves every byte over the
loopback twice, so this second hop is its ceiling; `queue (its own process) / raw two hops`
says how far the queue is from it.

Sizes: small groups are 16 responses of 256 tokens, large ones 16 of 16,384 tokens (about
3 MB: int32 tokens, float32 behavior log-probs, int32 token versions).

    python bench/queue.py [--actors 2] [--raw-pushers 1] [--large-groups 2000] [--small-groups 8000]
                          [--warmup 1.0] [--repeats 5] [--verbose]

Prints groups/s, MB/s and CPU per group for each path and size, the encode+decode time of a
large group, and, last, `queue/raw_zmq throughput ratio (large groups): X` for the placement
the launcher uses by default (`queue.embedded`), after the same ratio of the other placement.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where this very file would shadow the
# standard library's `queue`; the repository root goes there instead, so `shared` imports too.
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402

from shared.config import LearnerConfig, QueueConfig, RolloutConfig, VapoConfig  # noqa: E402
from shared.queue.client import ActorClient, ClientSettings, LearnerClient  # noqa: E402
from shared.queue.service import QueueThread, serve  # noqa: E402
from shared.types import Lease, RolloutGroup, make_group  # noqa: E402
from shared.wire import decode, encode, encode_group  # noqa: E402

SPAWN = mp.get_context("spawn")
G = 16
SMALL, LARGE = 256, 16_384
PROMPTS_PER_STEP = 16


@dataclasses.dataclass(frozen=True)
class Record:
    prompt: str
    ground_truth: str
    data_source: str
    index: int
    messages: Any = None


class EndlessSource:
    """Prompts 0, 1, 2, ... (the benchmark never runs out)."""

    def __init__(self) -> None:
        self.pos = 0

    def __next__(self) -> Record:
        self.pos += 1
        return Record(f"q{self.pos}", "0", "bench", self.pos - 1)

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = state["pos"]


def template_group(tokens: int, seed: int = 0) -> RolloutGroup:
    """One group of G responses of `tokens` tokens each, with random content."""
    rng = np.random.default_rng(seed)
    lease = Lease(0, 0, "q", "0", "bench", None, 0)
    return make_group(lease=lease, actor_id=0, prompt_token_ids=rng.integers(0, 32000, 256),
                      responses=[(rng.integers(0, 32000, tokens), -rng.exponential(1.0, tokens), 0) for _ in range(G)],
                      finish_reasons=["length"] * G, rewards=rng.choice([-1.0, 1.0], G),
                      correct=rng.random(G) < 0.5)


def group_frames(group: RolloutGroup) -> list[Any]:
    return encode("submit", {"actor_id": 0, "incarnation": 0}, [encode_group(group)])


def actor_main(settings: ClientSettings, actor_id: int, tokens: int) -> None:
    """Lease, then submit one group per leased prompt (pipelined, as the real actor does), until the queue says stop.

    Like the real actor, leases and submits use two connections, so a lease is not queued
    behind the submits in flight.
    """
    client = ActorClient(settings, actor_id)
    submitter = ActorClient(settings, actor_id, incarnation=client.incarnation)
    template = dataclasses.replace(template_group(tokens, seed=actor_id), actor_id=actor_id)
    version, statuses = 0, Counter[str]()
    versions = (-1, template.token_versions)
    try:
        while True:
            reply = client.lease(8, version)
            version = max(version, reply.version)
            if reply.reason == "stopping":
                break
            if not reply.leases:  # no room until the learner publishes a version, which the queue broadcasts
                client.poll_broadcast(timeout_s=max(reply.retry_after_s, 0.05))
                continue
            if versions[0] != version:  # one read-only array per version: no per-group allocation the raw path lacks
                versions = (version, np.full_like(template.token_versions, version))
            statuses.update(submitter.submit(
                dataclasses.replace(template, lease_id=lease.lease_id, prompt_id=lease.prompt_id,
                                    policy_version=version, token_versions=versions[1])
                for lease in reply.leases))
    except TimeoutError:  # the queue has shut down
        pass
    if set(statuses) - {"accepted", "stale"}:
        print(f"actor {actor_id}: unexpected statuses {dict(statuses)}", file=sys.stderr)
    submitter.close()
    client.close()


@dataclasses.dataclass
class Run:
    """One timed window of one path: groups, seconds, bytes, and the CPU seconds of every process involved."""

    groups: int
    seconds: float
    nbytes: int
    cpu_s: float


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (all their threads: zmq's I/O threads included)."""
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def run_queue(num_groups: int, tokens: int, num_actors: int, port: int, *, embedded: bool,
              warmup: int = 0) -> Run:
    """At least `num_groups` groups through the real service, timed after `warmup` more.

    `embedded`: the service runs in a thread of this (the learner's) process and the learner
    talks to it over inproc; otherwise it is its own process and the learner uses TCP.
    """
    cfg = VapoConfig(queue=QueueConfig(port=port, pub_port=port + 1, max_staleness=4, lease_timeout_s=60.0,
                                       max_message_bytes=64 * 2**20, request_timeout_s=10.0, retry_after_s=0.002),
                     rollout=RolloutConfig(prompts_per_step=PROMPTS_PER_STEP, samples_per_prompt=G),
                     learner=LearnerConfig(mini_batch_size=G))
    if embedded:  # as learner rank 0 runs it (queue.embedded): bound before the actors start
        service: Any = QueueThread(cfg, EndlessSource())
    else:
        service = SPAWN.Process(target=serve, args=(cfg, EndlessSource()), daemon=True)
        service.start()
    settings = ClientSettings.from_config(cfg)
    actors = [SPAWN.Process(target=actor_main, args=(settings, i, tokens), daemon=True) for i in range(num_actors)]
    for p in actors:
        p.start()
    learner = LearnerClient(ClientSettings.from_config(cfg, in_process=embedded))
    version, warm = 0, 0
    while warm < max(warmup, 1):  # process start-up and the first allocations are not measured
        warm += len(learner.get_batch(PROMPTS_PER_STEP, timeout_s=60).groups)
        version += 1
        learner.publish_version(version)
    pids = [os.getpid(), *(p.pid for p in actors), *([] if embedded else [service.pid])]
    received, nbytes, cpu, start = 0, 0, cpu_seconds(pids), time.perf_counter()
    while received < num_groups:
        batch = learner.get_batch(PROMPTS_PER_STEP, timeout_s=60)
        nbytes += sum(g.nbytes for g in batch.groups)
        received += len(batch.groups)
        version += 1
        learner.publish_version(version)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu  # the actors still run: they wait on leases
    learner.control("stop")  # actors see `stopping` and exit; then the service
    for p in actors:
        p.join(20)
    learner.control("shutdown")
    learner.close()
    if embedded:
        service.stop(20)
    else:
        service.join(20)
    for p in actors:
        if p.is_alive():
            p.kill()
    return Run(received, elapsed, nbytes, cpu)


def free_port() -> int:
    """A free loopback port p such that p + 1 is free too (request and publish sockets)."""
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port


def pusher_main(address: str, tokens: int, count: int) -> None:
    frames = group_frames(template_group(tokens))
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 8)
    sock.connect(address)
    for _ in range(count):
        sock.send_multipart(frames, copy=False)
    sock.close(linger=-1)
    zmq.Context.instance().term()  # waits until zmq is done with the zero-copy frames, before they are freed


def forwarder_main(pull_address: str, push_address: str) -> None:
    """A bare zmq.proxy PULL -> PUSH (C, no Python per message): the least a hop through a process costs."""
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock, option in ((pull, zmq.RCVHWM), (push, zmq.SNDHWM)):
        sock.setsockopt(option, 8)
        sock.setsockopt(zmq.LINGER, -1)
    pull.bind(pull_address)
    push.connect(push_address)
    try:
        zmq.proxy(pull, push)
    except zmq.ContextTerminated:
        pass


def run_raw(num_groups: int, tokens: int, num_pushers: int, *, forwarded: bool = False, warmup: int = 0) -> Run:
    """`num_groups` messages of the same frames from `num_pushers` PUSH sockets to one PULL, timed after `warmup` more.

    `forwarded`: through a forwarding process in between (a diagnostic, not the baseline: the
    ceiling of any queue that runs as its own process and so adds a second hop).
    """
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 8)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    target, forwarder = f"tcp://127.0.0.1:{port}", None
    if forwarded:
        target = f"tcp://127.0.0.1:{free_port()}"
        forwarder = SPAWN.Process(target=forwarder_main, args=(target, f"tcp://127.0.0.1:{port}"), daemon=True)
        forwarder.start()
    extra = 8 * num_pushers  # sent after the timed window: the pushers are still alive when it ends, for their CPU
    total = max(warmup, 1) + num_groups + extra
    shares = [total // num_pushers + (i < total % num_pushers) for i in range(num_pushers)]
    pushers = [SPAWN.Process(target=pusher_main, args=(target, tokens, n)) for n in shares]
    for p in pushers:
        p.start()
    for _ in range(max(warmup, 1)):  # as for the queue: start-up and the first allocations are not measured
        sock.recv_multipart(copy=False)
    pids = [os.getpid(), *(p.pid for p in pushers), *([] if forwarder is None else [forwarder.pid])]
    nbytes, cpu, start = 0, cpu_seconds(pids), time.perf_counter()
    for _ in range(num_groups):
        nbytes += sum(f.buffer.nbytes for f in sock.recv_multipart(copy=False)[1:])
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu
    for _ in range(extra):
        sock.recv_multipart(copy=False)
    for p in pushers:
        p.join()
    if forwarder is not None:
        forwarder.kill()
        forwarder.join()
    sock.close()
    return Run(num_groups, elapsed, nbytes, cpu)


def codec_ms(tokens: int, repeats: int = 50) -> float:
    """Median milliseconds to encode and decode one group (the actor's and the learner's work per group)."""
    group = template_group(tokens)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        frames = [bytes(f) if i == 0 else f for i, f in enumerate(group_frames(group))]
        decode(frames, max_bytes=1 << 30)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@dataclasses.dataclass
class Median:
    """The medians of one path's rounds."""

    groups_per_s: float
    bytes_per_s: float
    cpu_ms_per_group: float
    cores_busy: float
    """CPU seconds of its processes per second of the window: how many cores the path kept busy."""


def _child(conn: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    conn.send(fn(*args, **kwargs))
    conn.close()


def isolated(fn: Any, *args: Any, **kwargs: Any) -> Run:
    """`fn(*args, **kwargs)` in a fresh process: each round's receiver starts with its own heap and zmq context.

    In one long-lived process the raw receiver's throughput depended on what ran before it
    (after the small-group rounds it received large groups at ~820/s and ~2 ms of CPU each,
    against 1,050-1,800/s fresh), while the queue's did not.
    """
    parent, child = SPAWN.Pipe(duplex=False)
    proc = SPAWN.Process(target=_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()
    try:
        run: Run = parent.recv()
    except EOFError:
        raise RuntimeError(f"{fn.__name__} failed in its process (exit code {proc.join() or proc.exitcode})") from None
    proc.join()
    return run


def measure(tokens: int, count: int, warmup: int, args: argparse.Namespace) -> dict[str, Median]:
    """The medians of each path over `args.repeats` interleaved rounds, each round in fresh processes."""
    paths: dict[str, Any] = {
        "raw": lambda: isolated(run_raw, count, tokens, args.raw_pushers, warmup=warmup),
        "raw_two_hops": lambda: isolated(run_raw, count, tokens, args.raw_pushers, forwarded=True, warmup=warmup),
        "process": lambda: isolated(run_queue, count, tokens, args.actors, free_port(), embedded=False, warmup=warmup),
        "embedded": lambda: isolated(run_queue, count, tokens, args.actors, free_port(), embedded=True, warmup=warmup),
    }
    runs: dict[str, list[Run]] = {k: [] for k in paths}
    for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits every path alike
        for path, run in paths.items():
            runs[path].append(run())
        if args.verbose:
            print({k: round(v[-1].groups / v[-1].seconds) for k, v in runs.items()}, flush=True)
    med = statistics.median
    return {k: Median(med(r.groups / r.seconds for r in v), med(r.nbytes / r.seconds for r in v),
                      med(1e3 * r.cpu_s / r.groups for r in v), med(r.cpu_s / r.seconds for r in v))
            for k, v in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--raw-pushers", type=int, default=1, help="PUSH processes of the raw baseline")
    parser.add_argument("--large-groups", type=int, default=2000, help="timed large groups per path and round")
    parser.add_argument("--small-groups", type=int, default=8000, help="timed small groups; 0 skips the small groups")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="groups received before the clock starts, as a share of the timed ones")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--verbose", action="store_true", help="print every measurement")
    args = parser.parse_args()
    print(f"encode+decode of a large group ({G} x {LARGE} tokens): {codec_ms(LARGE):.2f} ms (median of 50)")
    print(f"encode+decode of a small group ({G} x {SMALL} tokens): {codec_ms(SMALL):.3f} ms (median of 50)")
    ratios: dict[tuple[str, str], float] = {}
    sizes = [s for s in (("small", SMALL, args.small_groups), ("large", LARGE, args.large_groups)) if s[2] > 0]
    actors = f"{args.actors} actor{'s' * (args.actors > 1)}"
    labels = {"raw": f"raw zmq PUSH/PULL ({args.raw_pushers} pusher{'s' * (args.raw_pushers > 1)})",
              "raw_two_hops": "raw zmq PUSH -> forwarding process -> PULL (diagnostic)",
              "process": f"queue (its own process, {actors})", "embedded": f"queue (embedded in the learner, {actors})"}
    for name, tokens, count in sizes:
        median = measure(tokens, count, int(args.warmup * count), args)
        head = f"{name} groups ({G} x {tokens} tokens), median of {args.repeats}:"
        for path, label in labels.items():
            m = median[path]
            ratio = ""
            if path != "raw":
                ratios[name, path] = m.groups_per_s / median["raw"].groups_per_s
                ratio = f" | ratio {ratios[name, path]:.2f}"
            print(f"{head} {label} {m.groups_per_s:,.0f} groups/s {m.bytes_per_s / 1e6:,.0f} MB/s, "
                  f"CPU {m.cpu_ms_per_group:.2f} ms/group on {m.cores_busy:.1f} of {os.cpu_count()} cores{ratio}")
        print(f"{head} queue (its own process) / raw two hops: "
              f"{median['process'].groups_per_s / median['raw_two_hops'].groups_per_s:.2f}")
        print(f"{head} CPU per group, raw / queue embedded: "
              f"{median['raw'].cpu_ms_per_group / median['embedded'].cpu_ms_per_group:.2f} "
              "(the ratio's ceiling when both keep every core busy)")
    if ("large", "process") in ratios:
        flag = {"embedded": "queue.embedded=true", "process": "queue.embedded=false"}
        default = "embedded" if QueueConfig().embedded else "process"
        other = "process" if default == "embedded" else "embedded"
        print(f"{labels[other]}, {flag[other]}: queue/raw_zmq throughput ratio (large groups): "
              f"{ratios['large', other]:.2f}")
        print(f"the launcher's default, {flag[default]}, is the {labels[default]}; its ratio comes last")
        print(f"queue/raw_zmq throughput ratio (large groups): {ratios['large', default]:.2f}")


if __name__ == "__main__":
    main()
