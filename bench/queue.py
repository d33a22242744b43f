"""Replay-queue throughput against a bare ZeroMQ PUSH/PULL pair, measured side by side in one run.

Queue path: actor processes lease prompts and submit real `RolloutGroup` messages (one group
per submit) to the real service in its own process; this process is the learner, taking
batches and publishing a new version after each. Raw path: one process PUSHes the very same
frames (the same bytes: header and array frames) to a PULL socket here. Both count from the
first message received to the last.

Sizes: small groups are 16 responses of 256 tokens, large ones 16 of 16,384 tokens (about
3 MB: int32 tokens, float32 behavior log-probs, int32 token versions).

    python bench/queue.py [--actors 2] [--large-groups 400] [--small-groups 4000]

Prints groups/s and MB/s for each path and size, the encode+decode time of a large group,
and, last, `queue/raw_zmq throughput ratio (large groups): X`.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import LearnerConfig, QueueConfig, RolloutConfig, VapoConfig  # noqa: E402
from shared.queue_client import ActorClient, ClientSettings, LearnerClient  # noqa: E402
from shared.queue_service import serve  # noqa: E402
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
    """Lease, then send one group per leased prompt (pipelined submits), until the queue says stop.

    Like the real actor, leases and submits use two connections, so a lease is not queued
    behind the submits in flight.
    """
    client = ActorClient(settings, actor_id)
    submitter = ActorClient(settings, actor_id, incarnation=client.incarnation)
    template = dataclasses.replace(template_group(tokens, seed=actor_id), actor_id=actor_id)
    version, statuses = 0, Counter[str]()
    try:
        while True:
            reply = client.lease(8, version)
            version = max(version, reply.version)
            if reply.reason == "stopping":
                break
            if not reply.leases:
                for ticket_statuses in submitter.results(reply.retry_after_s).values():
                    statuses.update(ticket_statuses)
                continue
            for lease in reply.leases:
                group = dataclasses.replace(template, lease_id=lease.lease_id, prompt_id=lease.prompt_id,
                                            policy_version=version,
                                            token_versions=np.full_like(template.token_versions, version))
                submitter.send([group])
            for ticket_statuses in submitter.results().values():
                statuses.update(ticket_statuses)
        for ticket_statuses in submitter.flush(timeout_s=10).values():
            statuses.update(ticket_statuses)
    except TimeoutError:  # the queue has shut down
        pass
    if set(statuses) - {"accepted", "stale"}:
        print(f"actor {actor_id}: unexpected statuses {dict(statuses)}", file=sys.stderr)
    submitter.close()
    client.close()


def run_queue(num_groups: int, tokens: int, num_actors: int, port: int, *, embedded: bool) -> tuple[float, int, int]:
    """Seconds, bytes and groups for at least `num_groups` groups through the real service.

    `embedded`: the service runs in a thread of this (the learner's) process and the learner
    talks to it over inproc; otherwise it is its own process and the learner uses TCP.
    """
    cfg = VapoConfig(queue=QueueConfig(port=port, pub_port=port + 1, max_staleness=4, lease_timeout_s=60.0,
                                       max_message_bytes=64 * 2**20, request_timeout_s=10.0, retry_after_s=0.002),
                     rollout=RolloutConfig(prompts_per_step=PROMPTS_PER_STEP, samples_per_prompt=G),
                     learner=LearnerConfig(mini_batch_size=G))
    if embedded:
        service: Any = threading.Thread(target=serve, args=(cfg, EndlessSource()), daemon=True)
    else:
        service = SPAWN.Process(target=serve, args=(cfg, EndlessSource()), daemon=True)
    service.start()
    settings = ClientSettings.from_config(cfg)
    actors = [SPAWN.Process(target=actor_main, args=(settings, i, tokens), daemon=True) for i in range(num_actors)]
    for p in actors:
        p.start()
    learner = LearnerClient(ClientSettings.from_config(cfg, in_process=embedded))
    learner.get_batch(PROMPTS_PER_STEP, timeout_s=60)  # warm-up: process start-up is not measured
    learner.publish_version(1)
    received, nbytes, version, start = 0, 0, 1, time.perf_counter()
    while received < num_groups:
        batch = learner.get_batch(PROMPTS_PER_STEP, timeout_s=60)
        nbytes += sum(g.nbytes for g in batch.groups)
        received += len(batch.groups)
        version += 1
        learner.publish_version(version)
    elapsed = time.perf_counter() - start
    learner.stop()  # actors see `stopping` and exit; then the service
    for p in actors:
        p.join(20)
    learner.control("shutdown")
    learner.close()
    service.join(20)
    for p in actors:
        if p.is_alive():
            p.kill()
    return elapsed, nbytes, received


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


def run_raw(num_groups: int, tokens: int) -> tuple[float, int]:
    """Seconds and bytes for the same frames through a bare PUSH/PULL pair."""
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 8)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    pusher = SPAWN.Process(target=pusher_main, args=(f"tcp://127.0.0.1:{port}", tokens, num_groups + 1))
    pusher.start()
    sock.recv_multipart(copy=False)  # the first one starts the clock, as for the queue
    start, nbytes = time.perf_counter(), 0
    for _ in range(num_groups):
        nbytes += sum(f.buffer.nbytes for f in sock.recv_multipart(copy=False)[1:])
    elapsed = time.perf_counter() - start
    pusher.join()
    sock.close()
    return elapsed, nbytes


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--large-groups", type=int, default=400)
    parser.add_argument("--small-groups", type=int, default=4000, help="0 skips the small groups")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--verbose", action="store_true", help="print every measurement")
    args = parser.parse_args()
    print(f"encode+decode of a large group ({G} x {LARGE} tokens): {codec_ms(LARGE):.2f} ms (median of 50)")
    print(f"encode+decode of a small group ({G} x {SMALL} tokens): {codec_ms(SMALL):.3f} ms (median of 50)")
    ratios: dict[tuple[str, str], float] = {}
    sizes = [s for s in (("small", SMALL, args.small_groups), ("large", LARGE, args.large_groups)) if s[2] > 0]
    for name, tokens, count in sizes:
        rates: dict[str, list[tuple[float, float]]] = {"raw": [], "process": [], "embedded": []}
        for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits every path alike
            r_s, r_bytes = run_raw(count, tokens)
            rates["raw"].append((count / r_s, r_bytes / r_s))
            for mode in ("process", "embedded"):
                q_s, q_bytes, q_count = run_queue(count, tokens, args.actors, free_port(), embedded=mode == "embedded")
                rates[mode].append((q_count / q_s, q_bytes / q_s))
            if args.verbose:
                print({k: round(v[-1][0]) for k, v in rates.items()}, flush=True)
        median = {k: (statistics.median(g for g, _ in v), statistics.median(b for _, b in v)) for k, v in rates.items()}
        print(f"{name} groups ({G} x {tokens} tokens), median of {args.repeats}: raw zmq PUSH/PULL "
              f"{median['raw'][0]:,.0f} groups/s {median['raw'][1] / 1e6:,.0f} MB/s")
        for mode in ("process", "embedded"):
            ratios[name, mode] = median[mode][0] / median["raw"][0]
            print(f"{name} groups ({G} x {tokens} tokens), median of {args.repeats}: queue ({mode}, "
                  f"{args.actors} actor{'s' * (args.actors > 1)}) {median[mode][0]:,.0f} groups/s "
                  f"{median[mode][1] / 1e6:,.0f} MB/s | ratio {ratios[name, mode]:.2f}")
    if ("large", "process") in ratios:
        print(f"queue (embedded in the learner)/raw_zmq throughput ratio (large groups): "
              f"{ratios['large', 'embedded']:.2f}")
        print(f"queue/raw_zmq throughput ratio (large groups): {ratios['large', 'process']:.2f}")


if __name__ == "__main__":
    main()
