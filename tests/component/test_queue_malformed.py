"""Hostile input against the running queue: every kind is rejected and counted while valid traffic goes on."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from test_queue_support import ListSource, make_cfg, queue_thread, synthetic_group

from shared import wire
from shared.queue.client import ActorClient, ClientSettings, LearnerClient
from shared.queue.transport import Requester
from shared.types import Lease

LIMIT = 1 << 20
RNG = np.random.default_rng(0)


def _valid_round(actor: ActorClient) -> None:
    """A well-behaved actor leases and submits between the attacks."""
    reply = actor.lease(1, 0)
    assert len(reply.leases) == 1, reply
    assert actor.submit([synthetic_group(reply.leases[0], actor.actor_id, 0, 2, 8, RNG)]) == ["accepted"]


def _lease(actor: ActorClient) -> Lease:
    (lease,) = actor.lease(1, 0).leases
    return lease


def _group_frames(lease: Lease, mutate: Callable[[dict[str, Any], list[Any]], None] | None = None) -> list[Any]:
    group = synthetic_group(lease, 7, 0, 2, 8, RNG)
    frames = [bytes(f) for f in wire.encode("submit", {"actor_id": 7, "incarnation": 1}, [wire.encode_group(group)])]
    if mutate is not None:
        header = msgpack.unpackb(frames[0])
        mutate(header, frames)
        frames[0] = msgpack.packb(header)
    return frames


def _nan_logprob(header: dict[str, Any], frames: list[Any]) -> None:
    logprobs = np.frombuffer(frames[3], "<f4").copy()
    logprobs[0] = np.nan
    frames[3] = logprobs.tobytes()


def _short_logprobs(header: dict[str, Any], frames: list[Any]) -> None:
    header["groups"][0]["behavior_logprobs"]["shape"][0] -= 1
    frames[3] = frames[3][:-4]


def _resize(header: dict[str, Any], num_responses: int) -> None:
    """A well-formed group with a different number of responses."""
    g = header["groups"][0]
    g["offsets"] = [0] * num_responses + [g["token_ids"]["shape"][0]]
    g["finish_reasons"], g["rewards"] = ["stop"] * num_responses, [1.0] * num_responses
    g["correct"] = [True] * num_responses


def _group_field(name: str, value: Any) -> Callable[[dict[str, Any], list[Any]], None]:
    return lambda header, frames: header["groups"][0].__setitem__(name, value)


MESSAGE_ATTACKS: list[tuple[str, Callable[[Lease], list[Any]]]] = [
    ("malformed", lambda lease: [os.urandom(64)]),
    ("empty", lambda lease: [b""]),
    ("schema_version", lambda lease: [msgpack.packb({"schema": 99, "kind": "get_stats"})]),
    ("unknown_kind", lambda lease: [msgpack.packb({"schema": 2, "kind": "format_disk"})]),
    ("missing_field", lambda lease: [msgpack.packb({"schema": 2, "kind": "lease", "actor_id": 7, "incarnation": 1,
                                                    "policy_version": 0})]),
    ("extra_field", lambda lease: [msgpack.packb({"schema": 2, "kind": "get_stats", "please": True})]),
    ("wrong_type", lambda lease: [msgpack.packb({"schema": 2, "kind": "set_version", "version": "7",
                                                 "weights_version": 0})]),
    ("wrong_type", lambda lease: _group_frames(lease, _group_field("rewards", ["a", "b"]))),
    ("length_mismatch", lambda lease: _group_frames(lease, _short_logprobs)),
    ("length_mismatch", lambda lease: _group_frames(lease, _group_field("correct", [True]))),
    ("length_mismatch", lambda lease: _group_frames(lease)[:-1]),
    ("non_finite", lambda lease: _group_frames(lease, _nan_logprob)),
    ("non_finite", lambda lease: _group_frames(lease, _group_field("rewards", [float("inf"), 0.0]))),
    ("wrong_group_size", lambda lease: _group_frames(lease, lambda h, f: _resize(h, 3))),  # well formed, G = 3
]


def test_malformed_messages_are_rejected_counted_and_answered_while_valid_traffic_goes_on() -> None:
    cfg = make_cfg(max_staleness=100, max_message_bytes=LIMIT)
    settings = ClientSettings.from_config(cfg)
    with queue_thread(cfg, ListSource(10_000)):
        actor, learner = ActorClient(settings, actor_id=7, incarnation=1), LearnerClient(settings)
        attacker = Requester(settings.address, name="attacker")
        expected: dict[str, int] = {}
        for reason, make in MESSAGE_ATTACKS:
            frames = make(_lease(actor))
            reply = wire.decode(attacker.request(frames, timeout_s=5, attempt_s=5), max_bytes=LIMIT)
            if reply.kind == "submitted":  # decoded fine, refused by the queue's rules
                assert reply.body["statuses"] == [f"rejected:{reason}"]
            else:
                assert reply.kind == "error" and reply.body["reason"] == reason
            expected[reason] = expected.get(reason, 0) + 1
            _valid_round(actor)
        stats = learner.stats()
        assert stats.rejected == expected
        assert stats.identity_holds()
        actor.close()
        learner.close()
        attacker.close()


def _raw_dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def test_garbage_envelopes_and_huge_frames_are_dropped_and_counted() -> None:
    cfg = make_cfg(max_message_bytes=LIMIT)
    settings = ClientSettings.from_config(cfg)
    with queue_thread(cfg, ListSource(10_000)):
        actor, learner = ActorClient(settings, actor_id=7), LearnerClient(settings)
        raw = _raw_dealer(settings.address)
        raw.send(b"")  # an empty frame
        raw.send_multipart([os.urandom(200) for _ in range(3)])  # random frames, no valid envelope
        raw.send_multipart([b"me", b"\x01" * 8, b"\x00" * (2 * LIMIT)])  # a huge frame
        raw.send_multipart([b"me", b"\x01" * 5, msgpack.packb({"schema": 2, "kind": "get_stats"})])  # bad req id
        _valid_round(actor)
        deadline = time.monotonic() + 5  # the raw socket's messages race the clients' on other connections
        while learner.stats().rejected != {"bad_envelope": 3, "too_large": 1}:
            assert time.monotonic() < deadline, learner.stats().rejected
            time.sleep(0.02)
        _valid_round(actor)
        raw.close()
        actor.close()
        learner.close()


def test_shared_secret_mode_rejects_unauthenticated_peers(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(os.urandom(32).hex().encode())
    cfg = make_cfg(secret_file=str(secret_file))
    settings = ClientSettings.from_config(cfg)
    assert settings.secret is not None
    with queue_thread(cfg, ListSource(100)):
        actor, learner = ActorClient(settings, actor_id=1), LearnerClient(settings)
        _valid_round(actor)
        for secret in (None, b"wrong secret, sixteen bytes or more"):
            intruder = LearnerClient(ClientSettings(settings.address, settings.pub_address, secret, 0.2))
            with pytest.raises(TimeoutError):
                intruder.stats()
            intruder.close()
        _valid_round(actor)
        assert learner.stats().rejected["unauthenticated"] >= 2
        assert actor.poll_broadcast(1.0) is not None  # broadcasts are signed too
        actor.close()
        learner.close()
