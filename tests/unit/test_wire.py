"""shared/wire.py: round trips, zero-copy decoding, and every rejection reason of the issue."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from shared import wire
from shared.types import Lease, QueueStats, RolloutGroup, make_group
from shared.wire import WireError, decode, encode, encode_group

LIMIT = 1 << 26
LEASE = Lease(lease_id=7, prompt_id=42, prompt="1+1=?", ground_truth="2", data_source="arith",
              messages=(("user", "1+1=?"),), policy_version=3)


def _group(num_responses: int = 3, seed: int = 0) -> RolloutGroup:
    rng = np.random.default_rng(seed)
    responses = []
    for i in range(num_responses):
        n = 4 + i
        versions = np.array([3] * (n - 1) + [4])  # a weight update landed before the last token
        responses.append((rng.integers(0, 1000, n), -rng.random(n).astype(np.float32), versions))
    return make_group(lease=LEASE, actor_id=2, prompt_token_ids=[5, 6, 7], responses=responses,
                      finish_reasons=["stop"] * (num_responses - 1) + ["length"],
                      rewards=[1.0] + [-1.0] * (num_responses - 1), correct=[True] + [False] * (num_responses - 1),
                      gen_started_at=1.7e9, gen_seconds=1.5, reward_seconds=0.25)


def _submit(group: RolloutGroup | None = None) -> list[wire.Buffer]:
    return encode("submit", {"actor_id": 2, "incarnation": 9}, [encode_group(group or _group())])


def _mutate(frames: list[wire.Buffer], fn: Callable[[dict[str, Any]], None]) -> list[wire.Buffer]:
    header = msgpack.unpackb(frames[0])
    fn(header)
    return [msgpack.packb(header), *frames[1:]]


def _reason(frames: list[wire.Buffer], **kw: Any) -> str:
    with pytest.raises(WireError) as info:
        decode(frames, max_bytes=kw.pop("max_bytes", LIMIT), **kw)
    return info.value.reason


def test_group_round_trip_keeps_every_field() -> None:
    group = _group()
    msg = decode(_submit(group), max_bytes=LIMIT)
    assert msg.kind == "submit" and msg.body == {"actor_id": 2, "incarnation": 9}
    (got,) = msg.groups
    for name in ("prompt_token_ids", "token_ids", "behavior_logprobs", "token_versions", "offsets", "rewards",
                 "correct"):
        np.testing.assert_array_equal(getattr(got, name), getattr(group, name))
        assert getattr(got, name).dtype == getattr(group, name).dtype
    for name in ("lease_id", "prompt_id", "ground_truth", "data_source", "actor_id", "policy_version",
                 "finish_reasons", "gen_started_at", "gen_seconds", "reward_seconds"):
        assert getattr(got, name) == getattr(group, name)
    assert got.policy_version == 3 and got.token_versions.max() == 4
    assert got.num_responses == 3 and got.response_lengths.tolist() == [4, 5, 6]
    np.testing.assert_array_equal(got.response(1)[0], group.token_ids[4:9])


def test_arrays_travel_as_raw_little_endian_frames_and_decode_without_copy() -> None:
    group = _group()
    frames = [bytes(f) for f in _submit(group)]  # as they would arrive: one buffer per frame
    assert len(frames) == 1 + wire.FRAMES_PER_GROUP
    assert frames[2] == group.token_ids.astype("<i4").tobytes()
    assert frames[3] == group.behavior_logprobs.astype("<f4").tobytes()
    got = decode(frames, max_bytes=LIMIT).groups[0]
    for array, frame in ((got.token_ids, frames[2]), (got.behavior_logprobs, frames[3]),
                         (got.token_versions, frames[4]), (got.prompt_token_ids, frames[1])):
        assert np.shares_memory(array, np.frombuffer(frame, np.uint8))


def test_encode_does_not_copy_arrays_of_the_right_dtype() -> None:
    group = _group()
    header, frames = encode_group(group)
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), group.token_ids)
    assert header["token_ids"] == {"dtype": "<i4", "shape": [group.num_tokens]}


def test_lease_and_stats_round_trip() -> None:
    stats = QueueStats(leased=5, consumed=2, queued=3, rejected={"malformed": 1},
                       cursor={"source": {"i": 1}, "skip": [2]})
    msg = decode(encode("leases", {"leases": [wire.lease_to_wire(LEASE)], "retry_after_s": 0.0, "reason": "",
                                   "version": 3, "weights_version": 1}), max_bytes=LIMIT)
    assert msg.body["leases"] == [LEASE]
    assert decode(encode("stats", {"stats": wire.stats_to_wire(stats)}), max_bytes=LIMIT).body["stats"] == stats


def test_batch_of_several_groups() -> None:
    groups = [_group(2, seed=s) for s in range(3)]
    frames = encode("batch", {"stats": wire.stats_to_wire(QueueStats()), "short": False, "timed_out": False,
                              "stopping": False}, [encode_group(g) for g in groups])
    got = decode(frames, max_bytes=LIMIT).groups
    assert [g.token_ids.tolist() for g in got] == [g.token_ids.tolist() for g in groups]


def test_trusted_groups_give_the_same_groups_and_skip_only_the_value_scans() -> None:
    """A batch from the queue (which validated each group on submit) is checked for structure, not values."""
    group = _group()
    checked, trusted = (decode(_submit(group), max_bytes=LIMIT, trusted_groups=t).groups[0] for t in (False, True))
    for name in ("prompt_token_ids", "token_ids", "behavior_logprobs", "token_versions", "offsets", "rewards",
                 "correct"):
        np.testing.assert_array_equal(getattr(trusted, name), getattr(checked, name))
    assert vars(trusted).keys() == vars(checked).keys() and trusted.finish_reasons == checked.finish_reasons
    bad = group.behavior_logprobs.copy()
    bad[3] = np.nan
    assert np.isnan(decode(_with_frame(3, bad), max_bytes=LIMIT, trusted_groups=True).groups[0].behavior_logprobs[3])
    assert _reason(_with_frame(3, bad[:-1]), trusted_groups=True) == "length_mismatch"
    assert _reason(_submit()[:-1], trusted_groups=True) == "length_mismatch"
    assert _reason(_mutate(_submit(), _set_group("offsets", [0, 4, 9])), trusted_groups=True) == "length_mismatch"
    assert _reason(_mutate(_submit(), _set_group("colour", "blue")), trusted_groups=True) == "malformed"
    assert _reason(_mutate(_submit(), lambda h: h.update(schema=99)), trusted_groups=True) == "schema_version"


def _set_group(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(header: dict[str, Any]) -> None:
        target = header["groups"][0]
        *parents, last = path.split(".")
        for p in parents:
            target = target[p]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return fn


_DELETE = object()


@pytest.mark.parametrize(("fn", "reason"), [
    (lambda h: h.update(schema=99), "schema_version"),
    (lambda h: h.pop("schema"), "schema_version"),
    (lambda h: h.update(kind="launch_missiles"), "unknown_kind"),
    (lambda h: h.pop("actor_id"), "missing_field"),
    (lambda h: h.update(extra=1), "extra_field"),
    (lambda h: h.update(actor_id="2"), "wrong_type"),
    (lambda h: h.update(actor_id=True), "wrong_type"),
    (_set_group("ground_truth", _DELETE), "missing_field"),
    (_set_group("colour", "blue"), "extra_field"),
    (_set_group("prompt_id", 1.5), "wrong_type"),
    (_set_group("rewards", ["1", "0", "0"]), "wrong_type"),
    (_set_group("token_ids.dtype", "<f4"), "wrong_type"),
    (_set_group("token_ids.dtype", ">i4"), "wrong_type"),
    (_set_group("token_ids.shape", [3, 5]), "wrong_type"),
    (_set_group("token_ids.shape", [14]), "length_mismatch"),
    (_set_group("offsets", [0, 4, 9]), "length_mismatch"),
    (_set_group("offsets", [0, 9, 4, 15]), "length_mismatch"),
    (_set_group("rewards", [1.0, 0.0]), "length_mismatch"),
    (_set_group("finish_reasons", ["stop"]), "length_mismatch"),
    (_set_group("rewards", [math.nan, 0.0, 0.0]), "non_finite"),
    (_set_group("rewards", [math.inf, 0.0, 0.0]), "non_finite"),
    (_set_group("gen_seconds", -math.inf), "non_finite"),
    (_set_group("finish_reasons", ["stop", "stop", "abort"]), "bad_value"),
    (_set_group("policy_version", 4), "bad_value"),  # tokens of version 3 would have their lag understated
    (_set_group("prompt_id", -1), "bad_value"),
    (lambda h: h.update(groups=[]), "length_mismatch"),  # four frames nobody owns
])
def test_malformed_headers_are_rejected_with_a_reason(fn: Callable[[dict[str, Any]], None], reason: str) -> None:
    assert _reason(_mutate(_submit(), fn)) == reason


def _with_frame(index: int, array: np.ndarray) -> list[wire.Buffer]:
    frames = list(_submit())
    frames[index] = array.tobytes()
    return frames


def test_frames_that_disagree_with_their_header_are_rejected() -> None:
    group = _group()
    shorter = group.behavior_logprobs[:-1]
    assert _reason(_with_frame(3, shorter)) == "length_mismatch"
    assert _reason(_submit()[:-1]) == "length_mismatch"  # a frame missing
    assert _reason([*_submit(), b"\x00" * 8]) == "length_mismatch"  # a frame too many
    assert _reason(_with_frame(2, group.token_ids.astype("<i4")[:-1].copy())) == "length_mismatch"


def test_versions_of_a_different_length_than_tokens_are_rejected() -> None:
    def fn(h: dict[str, Any]) -> None:
        h["groups"][0]["token_versions"]["shape"] = [14]
    frames = _mutate(_submit(), fn)
    frames[4] = np.zeros(14, "<i4").tobytes()
    assert _reason(frames) == "length_mismatch"


def test_non_finite_logprobs_and_negative_tokens_are_rejected() -> None:
    group = _group()
    bad = group.behavior_logprobs.copy()
    bad[3] = np.nan
    assert _reason(_with_frame(3, bad)) == "non_finite"
    bad[3] = -np.inf
    assert _reason(_with_frame(3, bad)) == "non_finite"
    tokens = group.token_ids.copy()
    tokens[0] = -5
    assert _reason(_with_frame(2, tokens)) == "bad_value"


def test_size_limits() -> None:
    frames = _submit()
    total = sum(memoryview(f).nbytes for f in frames)
    assert _reason(frames, max_bytes=total - 1) == "too_large"
    decode(frames, max_bytes=total)
    assert _reason(frames, max_bytes=LIMIT, max_group_bytes=16) == "too_large"


@pytest.mark.parametrize(("frames", "reason"), [
    ([], "empty"),
    ([b""], "empty"),
    ([b"\xc1"], "malformed"),  # a byte msgpack never uses
    ([msgpack.packb([1, 2, 3])], "malformed"),
    ([msgpack.packb({1: 2})], "malformed"),  # non-string key
    ([msgpack.packb(msgpack.ExtType(5, b"boom"))], "malformed"),
    ([msgpack.packb({"schema": 2, "kind": "get_stats"}) + b"trailing"], "malformed"),
])
def test_garbage_is_rejected(frames: list[bytes], reason: str) -> None:
    assert _reason(frames) == reason


def test_fuzz_random_bytes_and_mutations_only_raise_wire_error() -> None:
    rng = random.Random(0)
    valid = [bytes(f) for f in _submit()]
    outcomes = {"ok": 0, "rejected": 0}
    for i in range(3000):
        if i % 3 == 0:
            frames = [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 6))]
        else:
            frames = list(valid)
            k = rng.randrange(len(frames))
            data = bytearray(frames[k])
            for _ in range(rng.randrange(1, 4)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            frames[k] = bytes(data)
        try:
            decode(frames, max_bytes=LIMIT)
            outcomes["ok"] += 1
        except WireError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 1000


def test_hmac_authenticates_content_and_frame_boundaries() -> None:
    key = b"k" * 32
    frames = [b"abc", b"def"]
    tag = wire.sign(key, frames)
    assert wire.verify(key, frames, tag)
    assert not wire.verify(key, [b"abd", b"def"], tag)
    assert not wire.verify(key, [b"abcd", b"ef"], tag)  # same bytes, different framing
    assert not wire.verify(b"x" * 32, frames, tag)


_ODD_VALUES: list[Any] = [None, True, False, 0, -1, 1 << 63, -(1 << 63) - 1, 1.5, -0.0, math.nan, math.inf, -math.inf,
                          "", "stop", "x" * 3, [], [0], [1, 2], [True], ["stop"], [1.0, -1.0], [math.nan], {},
                          {"dtype": "<i4", "shape": [3]}, {"dtype": "<i4"}, b"raw"]


def _fields_accept(header: Any) -> bool:
    try:
        wire._fields(header, wire._GROUP, "g")
    except WireError:
        return False
    return True


def test_the_quick_group_header_check_agrees_with_the_field_checks() -> None:
    """`_group_header_ok` (the fast path of a valid header) never accepts what the per-field checks refuse."""
    header = msgpack.unpackb(_submit()[0])["groups"][0]
    assert wire._group_header_ok(header) and _fields_accept(header)
    rng = random.Random(0)
    paths = [(k,) for k in header] + [(k, sub) for k, v in header.items() if isinstance(v, dict) for sub in v]
    for _ in range(4000):
        mutated = msgpack.unpackb(msgpack.packb(header))
        for _ in range(rng.randrange(1, 3)):
            *parents, last = rng.choice(paths)
            target = mutated
            for p in parents:
                target = target[p] if isinstance(target.get(p), dict) else {}
            action = rng.random()
            if action < 0.1:
                target.pop(last, None)
            elif action < 0.2 and isinstance(target.get(last), list) and target[last]:
                target[last][rng.randrange(len(target[last]))] = rng.choice(_ODD_VALUES)
            else:
                target[last] = rng.choice(_ODD_VALUES)
        assert wire._group_header_ok(mutated) <= _fields_accept(mutated), mutated


def test_validating_without_building_groups_checks_the_same_and_keeps_the_received_frames() -> None:
    """The queue decodes submits with build_groups=False: the same checks, no RolloutGroup, the frames to forward."""
    frames = [bytes(f) for f in _submit()]
    msg = decode(frames, max_bytes=LIMIT, build_groups=False)
    assert msg.groups == [] and len(msg.encoded_groups) == 1
    header, group_frames = msg.encoded_groups[0]
    assert header == msgpack.unpackb(frames[0])["groups"][0]
    assert all(a is b for a, b in zip(group_frames, frames[1:], strict=True))
    bad = _group().behavior_logprobs.copy()
    bad[0] = np.inf
    assert _reason(_with_frame(3, bad), build_groups=False) == "non_finite"
    assert _reason(_mutate(_submit(), _set_group("policy_version", 4)), build_groups=False) == "bad_value"
