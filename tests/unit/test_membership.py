"""shared.weights.protocol membership: rank assignment, eligibility, rebuild decisions, record and spec encodings."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from shared.weights import protocol as wp


def _m(actor_id: int, num_workers: int = 1, incarnation: int = 7, epoch: int = 1, state: str = "active") -> wp.Member:
    return wp.Member(actor_id, num_workers, incarnation, epoch, state)


def _spec(members: list[wp.Member], name: str = "weights/1", version: int = 3, push_id: int = 4) -> wp.GroupSpec:
    slots, world_size = wp.assign_slots(members)
    return wp.GroupSpec(name, world_size, version, push_id, slots)


def test_ranks_follow_actor_ids_and_tp_sizes() -> None:
    slots, world_size = wp.assign_slots([_m(5, 2), _m(0, 1), _m(9, 4), _m(3, 1, state="left")])
    assert [(s.actor_id, s.rank_offset, s.num_workers) for s in slots] == [(0, 1, 1), (5, 2, 2), (9, 4, 4)]
    assert world_size == 8  # the sender plus 1 + 2 + 4 workers
    assert wp.assign_slots([]) == ((), 1)


def test_an_actor_id_registered_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        wp.assign_slots([_m(1, incarnation=1), _m(1, incarnation=2)])


def test_eligible_members_skip_dropped_left_and_excluded_identities() -> None:
    records = [_m(4), _m(2, state="dropped"), _m(3, state="left"), _m(1, epoch=1), _m(0, epoch=2)]
    excluded = {(1, 7, 1), (0, 7, 1)}  # actor 0's epoch 1 was dropped; it registered again with epoch 2
    assert [m.actor_id for m in wp.eligible_members(records, excluded)] == [0, 4]


def test_rebuild_only_when_the_members_or_the_group_change() -> None:
    members = [_m(0), _m(1, 2)]
    spec = _spec(members)
    assert not wp.needs_rebuild(spec, members, group_alive=True)
    assert not wp.needs_rebuild(spec, list(reversed(members)), group_alive=True)  # order does not matter
    assert wp.needs_rebuild(spec, members, group_alive=False)  # the last push failed: the group is gone
    assert wp.needs_rebuild(spec, [*members, _m(2)], group_alive=True)  # a new actor
    assert wp.needs_rebuild(spec, members[:1], group_alive=True)  # one left or was dropped
    assert wp.needs_rebuild(spec, [members[0], dataclasses.replace(members[1], epoch=2)], group_alive=True)
    assert wp.needs_rebuild(spec, [members[0], dataclasses.replace(members[1], incarnation=8)], group_alive=True)
    assert wp.needs_rebuild(None, members, group_alive=False)
    assert not wp.needs_rebuild(None, [], group_alive=False)  # nobody to build for
    assert wp.needs_rebuild(spec, [], group_alive=True)  # everyone left: close the group


def test_member_round_trip_and_rejections() -> None:
    member = _m(3, 2, incarnation=2**47, epoch=5, state="dropped")
    assert wp.decode_member(wp.encode_member(member)) == member
    good = msgpack.unpackb(wp.encode_member(member))
    for bad in [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({**good, "schema": 99}),
                msgpack.packb({**good, "num_workers": 0}), msgpack.packb({**good, "state": "zombie"}),
                msgpack.packb({**good, "actor_id": -1}), msgpack.packb({**good, "epoch": True}),
                msgpack.packb({**good, "extra": 1}), msgpack.packb({k: v for k, v in good.items() if k != "epoch"})]:
        with pytest.raises(ValueError):
            wp.decode_member(bad)


def test_spec_round_trip_and_lookup() -> None:
    spec = _spec([_m(0, incarnation=11), _m(4, 2, incarnation=12, epoch=3)])
    assert wp.decode_spec(wp.encode_spec(spec)) == spec
    assert spec.slot(4, 12) == wp.Slot(4, 2, 2, 12, 3)
    assert spec.slot(4, 99) is None and spec.slot(5, 12) is None  # another process with that id is not listed
    assert spec.identities == {(0, 11, 1), (4, 12, 3)}
    empty = wp.GroupSpec("", 1, 3, 5, ())
    assert wp.decode_spec(wp.encode_spec(empty)) == empty


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(world_size=5),  # ranks 1..3 covered, 4 missing
        lambda d: d.update(slots=[[0, 1, 1, 1, 1], [1, 1, 1, 2, 1]], world_size=3),  # rank 1 twice
        lambda d: d.update(slots=[[0, 1, 1, 1, 1], [0, 2, 1, 2, 1]], world_size=3),  # actor 0 twice
        lambda d: d.update(slots=[[0, 1, 0, 1, 1]], world_size=1),  # no workers
        lambda d: d.update(slots=[[0, 1, 1, 1]]),  # short slot
        lambda d: d.update(slots=[[0, 1, 1, 1, "x"]]),
        lambda d: d.update(name=""),  # members without a name
        lambda d: d.update(slots=[], world_size=1),  # a name without members
        lambda d: d.update(version=-1),
        lambda d: d.update(push_id="1"),
        lambda d: d.pop("version"),
        lambda d: d.update(schema=2),
    ],
)
def test_malformed_specs_are_rejected(mutate) -> None:
    raw = msgpack.unpackb(wp.encode_spec(_spec([_m(0), _m(1, 2)])))
    mutate(raw)
    with pytest.raises(ValueError):
        wp.decode_spec(msgpack.packb(raw))


def test_garbage_is_not_a_spec() -> None:
    for data in [b"", b"\x93not a spec", b"\xff" * 10, msgpack.packb({1: 2})]:
        with pytest.raises(ValueError):
            wp.decode_spec(data)


def test_key_names() -> None:
    assert wp.member_key(12) == "members/12" and wp.member_key(12).startswith(wp.MEMBER_PREFIX)
    assert wp.group_name(3) == "weights/3"
    assert wp.ready_key("weights/3", 12) == "weights/3/ready/12" and wp.go_key("weights/3") == "weights/3/go"
