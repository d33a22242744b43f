"""Where the replay queue should run: in a thread of learner rank 0 (`queue.embedded`) or in its own process.

The queue's own throughput favours embedding (`bench/queue.py`: rollouts cross the network once
instead of twice). What embedding could cost is the rest of the system: the queue thread shares the
learner's interpreter (GIL), so the learner's train steps could slow down, and the actors' requests
could wait while the learner holds the GIL. This measures both, side by side in one run, on the
tiny configuration's shapes: the real VAPO train step (`bench/learner.py`'s Qwen2-style model, CPU,
float32) on 16 prompts x 8 responses of 16-64 tokens per step (short steps: more queue traffic per
second of training, the harder case for embedding), fed through the real queue by
synthetic actor processes that lease and submit as fast as admission control lets them (no
generation time: the heaviest queue traffic a learner of this speed can see), with the queue
(a) embedded, the learner's client on inproc, (b) in its own process, the learner's client on TCP,
and (c) no queue at all: the same train steps on batches taken beforehand (the learner's own speed).

    python bench/queue_placement.py [--actors 2] [--steps 4] [--repeats 3]

Prints, per placement, learner steps/s, seconds per train step and per batch wait, and the
actors' request round trips (median and 99th percentile); last, `embedded/own-process learner
throughput ratio: X`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where bench/queue.py would shadow the
# standard library; the repository root goes there instead.
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from bench.learner import VOCAB, make_learner  # noqa: E402
from bench.queue import EndlessSource  # noqa: E402
from deploy.doctor import free_port  # noqa: E402
from shared.config import LearnerConfig, QueueConfig, RolloutConfig, VapoConfig  # noqa: E402
from shared.queue.client import ActorClient, ClientSettings, LearnerClient  # noqa: E402
from shared.queue.service import QueueThread, serve  # noqa: E402
from shared.types import make_group  # noqa: E402

SPAWN = mp.get_context("spawn")
PROMPTS, G, MAX_TOKENS = 16, 8, 64


def actor_main(settings: ClientSettings, actor_id: int, stop: Any, out: Any) -> None:
    """Lease 4 prompts, answer each with a group at once, repeat; report (time, round trip) of every request."""
    client = ActorClient(settings, actor_id)
    rng = np.random.default_rng(actor_id)
    version, trips = 0, []
    try:
        while not stop.is_set():
            t = time.perf_counter()
            reply = client.lease(4, version)
            trips.append((time.time(), time.perf_counter() - t))
            version = max(version, reply.version)
            if reply.reason == "stopping":
                break
            if not reply.leases:
                time.sleep(reply.retry_after_s)
                continue
            groups = []
            for lease in reply.leases:
                lengths = rng.integers(16, MAX_TOKENS + 1, G)
                correct = rng.random(G) < 0.5
                groups.append(make_group(
                    lease=lease, actor_id=actor_id, prompt_token_ids=rng.integers(3, VOCAB, 16),
                    responses=[(rng.integers(3, VOCAB, n), -rng.exponential(1.0, n), version) for n in lengths],
                    finish_reasons=["stop"] * G, rewards=np.where(correct, 1.0, -1.0), correct=correct))
            t = time.perf_counter()
            client.submit(groups, timeout_s=30)
            trips.append((time.time(), time.perf_counter() - t))
    except TimeoutError:  # the queue has shut down
        pass
    client.close()
    out.put(trips)


def make_cfg(max_staleness: int) -> VapoConfig:
    """The tiny configuration's step shape, on free ports."""
    return VapoConfig(queue=QueueConfig(port=free_port(), pub_port=free_port(), max_staleness=max_staleness),
                      rollout=RolloutConfig(prompts_per_step=PROMPTS, samples_per_prompt=G),
                      learner=LearnerConfig(mini_batch_size=PROMPTS * G))


def run(placement: str, steps: int, num_actors: int) -> dict[str, float]:
    """Train `steps` steps (after one warm-up) with the queue `embedded` or in its own `process`."""
    cfg = make_cfg(max_staleness=2)
    service = (QueueThread(cfg, EndlessSource()) if placement == "embedded"
               else SPAWN.Process(target=serve, args=(cfg, EndlessSource()), daemon=True))
    if placement == "process":
        service.start()
    stop, out = SPAWN.Event(), SPAWN.Queue()
    actors = [SPAWN.Process(target=actor_main, args=(ClientSettings.from_config(cfg), i, stop, out), daemon=True)
              for i in range(num_actors)]
    for p in actors:
        p.start()
    client = LearnerClient(ClientSettings.from_config(cfg, in_process=placement == "embedded"))
    learner = make_learner(["learner.mini_batch_size=128"])
    wait = compute = 0.0
    for step in range(steps + 1):
        if step == 1:  # the first step (start-up, warm-up) is not measured
            start, wait, compute = time.time(), 0.0, 0.0
        t0 = time.perf_counter()
        batch = client.get_batch(PROMPTS, timeout_s=120)
        t1 = time.perf_counter()
        learner.train_step(batch.groups)
        client.publish_version(step + 1)
        wait, compute = wait + t1 - t0, compute + time.perf_counter() - t1
    end = time.time()
    stop.set()
    trips = [rtt for _ in actors for at, rtt in out.get(timeout=60) if start <= at <= end]
    if placement == "process":
        client.control("shutdown")
    else:
        service.stop()
    client.close()
    for p in [*actors, *([service] if placement == "process" else [])]:
        p.join(20)
    return {"steps_per_s": steps / (end - start), "compute_s": compute / steps, "wait_s": wait / steps,
            "rtt_p50_ms": 1e3 * float(np.percentile(trips, 50)), "rtt_p99_ms": 1e3 * float(np.percentile(trips, 99))}


def run_alone(steps: int) -> dict[str, float]:
    """The same train steps on batches gathered beforehand from an embedded queue: no queue traffic while training."""
    cfg = make_cfg(max_staleness=steps + 1)
    service, stop, out = QueueThread(cfg, EndlessSource()), SPAWN.Event(), SPAWN.Queue()
    actor = SPAWN.Process(target=actor_main, args=(ClientSettings.from_config(cfg), 0, stop, out), daemon=True)
    actor.start()
    client = LearnerClient(ClientSettings.from_config(cfg, in_process=True))
    batches = [client.get_batch(PROMPTS, timeout_s=120).groups for _ in range(steps + 1)]
    stop.set()
    out.get(timeout=60)
    actor.join(20)
    service.stop()
    client.close()
    learner = make_learner(["learner.mini_batch_size=128"])
    learner.train_step(batches[0])
    start = time.perf_counter()
    for groups in batches[1:]:
        learner.train_step(groups)
    return {"steps_per_s": steps / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"embedded": [], "process": [], "alone": []}
    for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits every placement alike
        for placement in ("embedded", "process"):
            results[placement].append(run(placement, args.steps, args.actors))
        results["alone"].append(run_alone(args.steps))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    head = f"learner, {args.steps} steps x {PROMPTS} prompts x {G} responses, median of {args.repeats}:"
    print(f"{head} no queue traffic (batches taken beforehand) {med['alone']['steps_per_s']:.3f} steps/s")
    for placement, label in (("embedded", "queue embedded in the learner"), ("process", "queue in its own process")):
        m = med[placement]
        print(f"{head} {label} ({args.actors} actors) {m['steps_per_s']:.3f} steps/s | train step "
              f"{m['compute_s']:.2f} s, batch wait {m['wait_s']:.3f} s | actor request round trip "
              f"p50 {m['rtt_p50_ms']:.1f} ms p99 {m['rtt_p99_ms']:.1f} ms")
    ratio = med["embedded"]["steps_per_s"] / med["process"]["steps_per_s"]
    print(f"embedded/own-process learner throughput ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
