"""The actor process: lease prompts, sample G responses each with vLLM, score, submit groups, follow the weights.

`python -m actors.main CONFIG [key=value ...] --actor-id N [--model-path DIR]` runs one actor;
`run_actor(cfg, actor_id)` is the same loop for launchers and tests. The policy is `cfg.model.path`,
a directory (the launcher resolves `builtin:tiny` once; `--model-path` overrides it).

Set up: tokenizer, engine (seed `rollout.seed + actor_id`; float32 with a directly sized KV
cache on CPU), two queue clients sharing one incarnation (the loop's, and the scoring thread's,
since a client is used from one thread), a heartbeat thread, the verifier's child process, and
the registration with the learner's weight-group store (`actors.weight_sync`).

Loop, reading top to bottom in `ActorLoop.run`:
1. control: the latest broadcast (stop exits; pause waits; a newer version announces a push);
2. weights: take part in every push whose spec lists this actor (join the generation when
   it changed, receive, take the version). When the learner announced a version newer than
   the actor's, the actor waits (up to `sync.timeout_s`) for the learner's spec of that
   version before it generates again, so it does not start a round the push would wait for
   (in `during` mode it only waits while it has no usable weights: the push lands mid-round);
3. lease `actors.prompts_per_lease` prompts with the actor's version; a refusal (capacity,
   stale_weights, paused, memory, exhausted) is waited out after the queue's retry hint;
   `replaced` (another process took this actor id) and `stopping` end the loop;
4. generate: ONE `Engine.generate` call for all leased prompts with n = G, so vLLM batches
   them and the engine stays saturated. With `actors.update_mode=during` the engine is stepped
   and, between two steps, the actor polls the learner's store (at most every `_PUSH_POLL_S`)
   and takes part in a push that lists it; the engine pauses around the apply, in-flight
   requests keep their KV cache, and every token carries the version that sampled it (see
   `actors.engine`). A push that fails mid-round abandons the round: its leases expire and are
   re-issued by the queue;
5. score and submit in a one-thread pool, so round k is scored (and sent) while round k+1
   generates; at most one round waits there, which bounds memory when scoring is slower.
   Each group is sent as soon as it is scored (`ActorClient.submit` takes the scoring
   generator and keeps several requests in flight), and the thread waits for the round's
   statuses once, after its last group; a `busy` queue is waited out there, so a full queue
   holds the next round back.

Weights at start: an actor holds `model.path`, which is version 0. It generates with them only
while the learner's weights are version 0's (it waits for the first broadcast to know: the
learner's version and the oldest version with the same weights, which stays 0 through value
pretraining, where the policy does not change and nothing is pushed); otherwise it waits
for a push that lists it (the learner includes registered actors at its next push, and pushes
at once after a resume). A push that failed in the engine leaves it without usable weights
until a later push succeeds (`version` is None meanwhile).

Failure modes: a queue restart costs timeouts, not the actor (requests are resent; a group the
queue no longer knows is counted by it); a garbled broadcast is skipped by the client and a
garbled group spec by the follower; SIGTERM/SIGINT (in `main`) finish the current round,
submit it, deregister and exit.

Reported: groups, statuses, tokens, generation seconds (tokens/s) and idle seconds (waiting
for leases or weights, and the engine's pauses for mid-round pushes), logged every `_LOG_EVERY`
rounds and returned as an `ActorReport`.

Must not import learner or deploy.

Longer than ~400 lines: `ActorLoop` is one class whose steps share the engine, both queue
clients and the weight follower; its setup and `main` are the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from actors.engine import Engine
from actors.rollout import Round, prompt_ids, score_round
from actors.weight_sync import WeightFollower
from shared.config import VapoConfig, load_config, resolve_auto
from shared.queue.client import ActorClient, Broadcast, ClientSettings
from shared.reward import math_verifier
from shared.types import Lease

log = logging.getLogger("vapo.actor")
_LOG_EVERY = 10
_IDLE_TICK_S = 0.05
_PUSH_POLL_S = 0.05  # how often a `during` round checks the learner's store for a push
_EXITS = {"replaced": "replaced", "stopping": "stop"}  # lease refusals that end the loop -> exit reason


@dataclass
class ActorReport:
    """What one actor did, returned when its loop ends."""

    actor_id: int
    exit_reason: str
    """stop (the queue said so), replaced (another process took this actor id) or stop_event."""
    rounds: int = 0
    groups: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    num_tokens: int = 0
    gen_seconds: float = 0.0
    idle_seconds: float = 0.0
    """Waiting for leases, for weights, or while paused."""
    weight_updates: int = 0
    mid_round_updates: int = 0
    """Of weight_updates, those applied in the middle of a round (update_mode=during)."""
    abandoned_rounds: int = 0
    """Rounds dropped because a push failed in their middle (their leases expire and are re-issued)."""
    failed_updates: int = 0
    version: int | None = None
    truncated_prompts: int = 0
    rejected_specs: int = 0
    """Group specs that did not decode (ignored)."""
    wall_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Response tokens per second of generation."""
        return self.num_tokens / self.gen_seconds if self.gen_seconds else 0.0


def cpu_kv_cache_bytes(model_path: str, cfg: VapoConfig) -> int:
    """KV cache for a CPU engine: room for the sequences a lease runs at full length, capped by the memory share."""
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
    per_token = 2 * mc.num_hidden_layers * kv_heads * head_dim * 4  # keys and values, float32
    max_len = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    seqs = min(cfg.actors.max_num_seqs, cfg.actors.prompts_per_lease * cfg.rollout.samples_per_prompt)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    wanted = min(per_token * max_len * seqs, int(cfg.actors.gpu_memory_utilization * available))
    return max(wanted, per_token * max_len, 64 << 20)


def build_engine(cfg: VapoConfig, actor_id: int, model_path: str) -> Engine:
    """The actor's vLLM engine: `model.dtype` on GPU, float32 with a sized KV cache on CPU."""
    common: dict[str, Any] = dict(seed=cfg.rollout.seed + actor_id, max_num_seqs=cfg.actors.max_num_seqs,
                                  tensor_parallel_size=cfg.actors.tensor_parallel_size,
                                  max_model_len=cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens)
    if torch.cuda.is_available():
        return Engine(model_path, dtype=cfg.model.dtype, gpu_memory_utilization=cfg.actors.gpu_memory_utilization,
                      enforce_eager=cfg.actors.enforce_eager, **common)
    return Engine(model_path, dtype="float32", kv_cache_memory_bytes=cpu_kv_cache_bytes(model_path, cfg),
                  enforce_eager=True, **common)


class ActorLoop:
    """The loop's state: engine, clients, weights follower, the learner's version and the counters."""

    def __init__(self, cfg: VapoConfig, actor_id: int, engine: Any, tokenizer: Any, client: ActorClient,
                 submitter: ActorClient, follower: WeightFollower, stop_event: Any) -> None:
        self.cfg, self.actor_id, self.engine, self.tokenizer = cfg, actor_id, engine, tokenizer
        self.client, self.submitter, self.follower = client, submitter, follower
        self.stop_event = stop_event or threading.Event()
        self.learner_version: int | None = None
        self.command = "run"
        self.version: int | None = None
        """The version of the engine's weights; None while they are unknown or unusable."""
        self.report = ActorReport(actor_id, exit_reason="")
        self._awaited: int | None = None  # the announced version whose spec was already waited for
        self._initial_weights = True  # the engine holds model.path's weights (no push was taken part in yet)
        self._next_poll = 0.0  # monotonic time of the next store poll in a `during` round

    def run(self) -> ActorReport:
        """Loop until told to stop; returns the report."""
        t_start = time.perf_counter()
        pending: Future[None] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix=f"score-{self.actor_id}") as pool:
            while not (exit_reason := self._control()):
                self._update_weights()
                if self.version is None or self.command == "pause":
                    self._idle(_IDLE_TICK_S)
                    continue
                leases = self._lease()
                if isinstance(leases, str):
                    exit_reason = leases
                    break
                if not leases:
                    continue
                rnd = self._generate(leases)
                if rnd is None:
                    continue
                if pending is not None:
                    pending.result()  # round k-1 is scored and sent before round k is queued
                pending = pool.submit(self._score_and_submit, rnd)
            if pending is not None:
                pending.result()
        self.report.exit_reason = exit_reason
        self.report.version = self.version
        self.report.rejected_specs = self.follower.num_rejected
        self.report.wall_seconds = time.perf_counter() - t_start
        log.info("actor %d exits (%s): %s", self.actor_id, exit_reason, self._summary())
        return self.report

    # --- control and weights ----------------------------------------------------------------------------------

    def _control(self) -> str:
        """Read the broadcasts; an exit reason, or '' to go on."""
        broadcast: Broadcast | None = self.client.poll_broadcast()
        if broadcast is not None:
            self._saw_version(broadcast.version, broadcast.weights_version)
            self.command = broadcast.command
        if self.stop_event.is_set():
            return "stop_event"
        return "stop" if self.command == "stop" else ""

    def _saw_version(self, version: int, weights_version: int) -> None:
        """The learner is at `version`, whose weights are those of every version from `weights_version` on: an
        engine holding one of them (model.path holds version 0's) takes `version` without a push."""
        self.learner_version = max(version, self.learner_version or 0)
        held = 0 if self._initial_weights else self.version
        if version != self.learner_version or held is None or not weights_version <= held <= version:
            return
        if self.version is None:
            log.info("actor %d: the learner is at version %d, with the initial weights; generating with them",
                     self.actor_id, version)
        self.version = version

    def _update_weights(self) -> None:
        """Take part in the pushes that list this actor; wait for the spec of an announced version first."""
        t0 = time.perf_counter()
        announced = self.learner_version
        behind = self.version is None or (announced is not None and announced > self.version
                                          and self.cfg.actors.update_mode == "between")
        wait = announced is not None and announced != self._awaited and behind
        deadline = time.monotonic() + (self.cfg.sync.timeout_s if wait else 0.0)
        while True:
            spec = self.follower.next_push()
            if spec is not None:
                self._take_part(spec)
                continue
            latest = self.follower.latest
            if not wait or (latest is not None and latest.version >= (announced or 0)):
                break
            if self._control():
                break
            if time.monotonic() >= deadline:
                log.warning("actor %d: version %s was announced but no push for it came within %.0fs",
                            self.actor_id, announced, self.cfg.sync.timeout_s)
                break
            time.sleep(_IDLE_TICK_S)
        if wait:
            self._awaited = announced
        self.report.idle_seconds += time.perf_counter() - t0

    def _take_part(self, spec: Any) -> None:
        t0 = time.perf_counter()
        self._initial_weights = False
        try:
            version = self.follower.take_part(spec)
        except Exception as e:  # vLLM reports a worker's failure as a plain Exception; see actors.weight_sync
            self.version = None
            self.report.failed_updates += 1
            log.warning("actor %d: weight push %d failed (%s); waiting for the next one", self.actor_id,
                        spec.push_id, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return
        if version is not None:
            self.version = version
            self.learner_version = max(version, self.learner_version or 0)
            self.report.weight_updates += 1
            log.info("actor %d: weights of version %d in %.2fs (%s)", self.actor_id, version,
                     time.perf_counter() - t0, self.follower.group)

    # --- leases, generation, scoring ------------------------------------------------------------------------

    def _lease(self) -> list[Lease] | str:
        """Leases, [] after waiting out a refusal, or an exit reason."""
        assert self.version is not None
        try:
            reply = self.client.lease(self.cfg.actors.prompts_per_lease, self.version)
        except TimeoutError:  # the queue is away (restarting?): the client reconnects on the next request
            log.warning("actor %d: the queue did not answer; retrying", self.actor_id)
            return []
        self._saw_version(reply.version, reply.weights_version)
        if reply.leases:
            return reply.leases
        if reply.reason in _EXITS:
            log.info("actor %d: the queue refused a lease (%s)", self.actor_id, reply.reason)
            return _EXITS[reply.reason]
        self._idle(max(reply.retry_after_s, _IDLE_TICK_S))
        return []

    def _generate(self, leases: list[Lease]) -> Round | None:
        """One generate call for the leases; None when a push failed in its middle (the round is dropped)."""
        prompts = []
        for lease in leases:
            ids, truncated = prompt_ids(lease, self.tokenizer, self.cfg.rollout.max_prompt_tokens)
            if truncated:
                self.report.truncated_prompts += 1
                log.warning("prompt %d is longer than rollout.max_prompt_tokens; kept its last %d tokens",
                            lease.prompt_id, len(ids))
            prompts.append(ids)
        r = self.cfg.rollout
        version = self.version
        assert version is not None
        during: dict[str, Any] = {}
        if self.cfg.actors.update_mode == "during":
            during = dict(between_steps=self._between_steps, version=version)
        started_at, t0, paused0 = time.time(), time.perf_counter(), self.engine.paused_seconds
        samples = self.engine.generate(prompts, n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p,
                                       max_tokens=r.max_new_tokens, stop=r.stop or None, **during)
        paused = self.engine.paused_seconds - paused0  # the engine stood still for mid-round pushes
        self.report.idle_seconds += paused
        if not samples:
            self.report.abandoned_rounds += 1
            log.warning("actor %d: a push failed in the middle of a round; dropped its %d leases (they expire and "
                        "are re-issued)", self.actor_id, len(leases))
            return None
        rnd = Round(leases, prompts, samples, version, started_at, time.perf_counter() - t0 - paused)
        self.report.rounds += 1
        self.report.num_tokens += rnd.num_tokens
        self.report.gen_seconds += rnd.gen_seconds
        if self.report.rounds % _LOG_EVERY == 0:
            log.info("actor %d: %s", self.actor_id, self._summary())
        return rnd

    def _between_steps(self) -> bool:
        """Between two engine steps of a `during` round: take part in a push that lists this actor; False drops it."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + _PUSH_POLL_S
            spec = self.follower.next_push()
            if spec is not None:
                applied = self.report.weight_updates
                self._take_part(spec)
                self.report.mid_round_updates += self.report.weight_updates - applied
        return self.version is not None

    def _score_and_submit(self, rnd: Round) -> None:
        """Runs in the scoring thread: each group goes to the queue once scored; waits for every status."""
        groups = score_round(rnd, self.cfg.reward, self.actor_id)  # a generator: scored as the submit takes them
        while True:
            try:
                statuses = self.submitter.submit(groups, timeout_s=3 * self.cfg.queue.request_timeout_s)
                break
            except TimeoutError:  # the groups taken so far wait in the client; the next call carries them on
                if self.stop_event.is_set():
                    statuses = ["unsent"] * len(rnd.leases)
                    break
                log.warning("actor %d: the queue has not taken this round's groups yet (full or away); still trying",
                            self.actor_id)
        self.report.groups += len(statuses)
        for status, count in Counter(statuses).items():
            self.report.statuses[status] = self.report.statuses.get(status, 0) + count

    def _idle(self, seconds: float) -> None:
        t0 = time.perf_counter()
        self.stop_event.wait(seconds)
        self.report.idle_seconds += time.perf_counter() - t0

    def _summary(self) -> str:
        r = self.report
        return (f"{r.rounds} rounds, {r.groups} groups, {r.num_tokens} tokens, {r.tokens_per_s:.0f} tokens/s, "
                f"idle {r.idle_seconds:.1f}s, version {self.version}, statuses {dict(r.statuses)}")


def run_actor(cfg: VapoConfig, actor_id: int, *, stop_event: Any = None, engine: Any = None) -> ActorReport:
    """Run one actor until the queue says stop (or `stop_event` is set); returns its report.

    `engine`: an `actors.engine.Engine` already running on `cfg.model.path` (it is then not shut
    down here); None builds one from the config.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    own_engine = engine is None
    engine = build_engine(cfg, actor_id, cfg.model.path) if own_engine else engine
    settings = ClientSettings.from_config(cfg)
    client = ActorClient(settings, actor_id)
    submitter = ActorClient(settings, actor_id, incarnation=client.incarnation)
    follower = WeightFollower(engine, cfg.sync.master_addr, cfg.sync.master_port, actor_id,
                              incarnation=client.incarnation,
                              backend=resolve_auto(cfg, torch.cuda.is_available()).sync.backend,
                              timeout_s=cfg.sync.timeout_s)
    try:
        client.start_heartbeat(cfg.queue.lease_timeout_s / 3)
        math_verifier.warm_up()
        follower.connect(cfg.sync.timeout_s)
        return ActorLoop(cfg, actor_id, engine, tokenizer, client, submitter, follower, stop_event).run()
    finally:
        follower.leave()
        if follower.group is not None:
            engine.leave_weight_group()
        submitter.close()
        client.close()
        if own_engine:
            engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    """`python -m actors.main CONFIG [key=value ...] --actor-id N [--model-path DIR]`: run one actor."""
    parser = argparse.ArgumentParser(prog="python -m actors.main", description="Run one vLLM actor.")
    parser.add_argument("items", nargs="*", metavar="CONFIG|key=value", help="YAML files, then overrides")
    parser.add_argument("--actor-id", type=int, required=True)
    parser.add_argument("--model-path", default=None, help="the policy directory (default: model.path)")
    args = parser.parse_args(argv)
    cfg = load_config([x for x in args.items if "=" not in x], [x for x in args.items if "=" in x])
    if args.model_path is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=args.model_path))
    if cfg.model.path.startswith("builtin:"):
        raise ValueError(f"model.path {cfg.model.path!r} must be resolved to a directory first (pass --model-path)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    report = run_actor(cfg, args.actor_id, stop_event=stop)
    print(json.dumps({**asdict(report), "tokens_per_s": report.tokens_per_s}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
