"""The wire format of a weight push, shared by the learner's sender and the actors' receiver.

Owns the bucket header (msgpack bytes), the byte layout of a bucket, the grouping of tensors
into buckets and the names of the rendezvous keys. Pure: no torch, no torch.distributed, so
both sides (and their tests) agree on one definition and it can be checked in milliseconds.

A push of policy version v is a sequence of buckets. Each bucket travels as two broadcasts
from rank 0:
  1. an int64 pair `[header_nbytes, buffer_nbytes]`;
  2. one uint8 buffer of `buffer_nbytes`: the msgpack header at offset 0, then the tensors'
     raw bytes from `data_start(header_nbytes)`, each at an `ALIGN`-aligned offset, so that
     the receiver can view them in place with their dtype.
The header names every tensor of the bucket (Hugging Face parameter name, dtype name as torch
spells it without the `torch.` prefix, shape, offset and byte count relative to the data start),
the policy version and the bucket index. The final bucket carries no tensors and `last=True`,
so a push can stream from a lazy iterator without knowing its length in advance, and memory
stays bounded by one bucket (a tensor larger than the bucket size travels alone).

Handshake keys (under the group's store prefix): the sender writes `world_size`; each receiver
increments `joined/<rank>` (a count above 1 means two peers claimed one rank) and the sender
waits for all of them with a timeout, so a missing peer is an error, not a hang.

Failure modes: a header that does not decode, has the wrong schema version, names an unknown
dtype, or whose offsets do not fit the buffer raises ValueError on the receiver.

Membership (who is in the broadcast group). The set of actors changes while a run goes on,
so the learner (`learner.weight_sync.MembershipManager`) and each actor
(`actors.weight_sync.WeightFollower`) agree on it through the learner's TCPStore on
`sync.master_port`, which stays up across group generations. Keys (raw store keys, no prefix):
- `members/<actor_id>`: a `Member` record written by the actor: its number of workers (its
  TP size, one rank each), its incarnation (random per process) and a registration epoch, and
  a state: `active`; `dropped` (written by the learner, with compare-and-set, when the actor
  missed a rebuild: the actor registers again with epoch + 1); `left` (written by the actor
  when it exits; records are never deleted, so a reader never waits on a vanished key).
- `group/current`: the `GroupSpec` of the latest push: generation name (`weights/<n>`),
  world size, the policy version and a push id that grows by one per push attempt, and one
  entry per member: actor id, first rank (`rank_offset`, 1 + the TP sizes of the members
  before it, in actor-id order), number of workers, incarnation, epoch. An empty name and no
  entries means no group (nobody registered).
- `<name>/ready/<actor_id>` and `<name>/go`: the two-phase join of a new generation. An actor
  listed in a spec whose name differs from the group it is in writes `ready` and waits for
  `go`; the learner waits (with a timeout) until every listed actor is ready, then writes
  `go` = 1 and everyone, the learner's `WeightSender.rebuild` included, builds the gloo/NCCL
  group. If some actor is not ready in time the learner writes `go` = 0 (those waiting go back
  to reading the spec), marks the missing ones dropped and writes a new generation for the
  rest. So nobody enters the collective rendezvous of a generation that will not complete.
Push of version v: the learner publishes v through the queue, then `MembershipManager.push`
reads the registrations, rebuilds when the set changed (or the last push failed), writes the
spec with v and a new push id, and broadcasts. An actor, between generation rounds, reads the
spec; when its push id is new and the spec lists this actor (by incarnation) it joins the
generation if needed and receives the push. A spec that does not list it (registered too
late, or dropped) makes it check its registration (re-registering when dropped) and carry on;
it is included at the next push. Anything that does not decode is rejected with ValueError;
readers log it and keep the state they had.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import msgpack

SCHEMA_VERSION = 1
"""Bumped when the header or bucket layout changes; a receiver rejects any other."""
ALIGN = 64
"""Byte alignment of every tensor inside a bucket (and of the data start)."""
DTYPE_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
"""Element sizes of the dtypes a push may carry, keyed by torch's name without `torch.`."""
WORLD_SIZE_KEY = "world_size"
MEMBER_PREFIX = "members/"
GROUP_SPEC_KEY = "group/current"
MEMBER_STATES = ("active", "dropped", "left")

T = TypeVar("T")


def align(nbytes: int) -> int:
    """Round `nbytes` up to a multiple of ALIGN."""
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def data_start(header_nbytes: int) -> int:
    """Offset of the first tensor byte in a bucket buffer whose header has `header_nbytes`."""
    return align(header_nbytes)


def joined_key(rank: int) -> str:
    """Store key a receiver of `rank` increments when it joins the group."""
    return f"joined/{rank}"


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Byte count of a dense tensor of `dtype` (torch name) and `shape`."""
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_SIZES)}")
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {list(shape)}")
    return math.prod(shape) * DTYPE_SIZES[dtype]


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lies in a bucket's data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BucketHeader:
    """Metadata of one bucket of a push; `nbytes` is the size of its data section."""

    policy_version: int
    bucket_index: int
    last: bool
    nbytes: int
    tensors: tuple[TensorMeta, ...]


def layout(entries: Iterable[tuple[str, str, Sequence[int]]]) -> tuple[tuple[TensorMeta, ...], int]:
    """Assign aligned offsets to (name, dtype, shape) entries; returns the metas and the data size."""
    metas = []
    offset = 0
    for name, dtype, shape in entries:
        nbytes = tensor_nbytes(dtype, shape)
        metas.append(TensorMeta(name, dtype, tuple(int(d) for d in shape), offset, nbytes))
        offset = align(offset + nbytes)
    return tuple(metas), offset


def group_into_buckets(items: Iterable[T], nbytes_of: Callable[[T], int], bucket_bytes: int) -> Iterator[list[T]]:
    """Group items, in order, into lists whose aligned sizes sum to at most `bucket_bytes`.

    An item larger than `bucket_bytes` forms a bucket of its own. Lazy: holds one bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive; got {bucket_bytes}")
    bucket: list[T] = []
    size = 0
    for item in items:
        nbytes = align(nbytes_of(item))
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += nbytes
    if bucket:
        yield bucket


def encode_header(header: BucketHeader) -> bytes:
    """Serialise a bucket header to msgpack bytes."""
    return msgpack.packb(
        {
            "schema": SCHEMA_VERSION,
            "version": header.policy_version,
            "bucket": header.bucket_index,
            "last": header.last,
            "nbytes": header.nbytes,
            "tensors": [[t.name, t.dtype, list(t.shape), t.offset, t.nbytes] for t in header.tensors],
        }
    )


def decode_header(data: bytes, buffer_data_nbytes: int) -> BucketHeader:
    """Parse and validate a bucket header whose data section holds `buffer_data_nbytes` bytes."""
    try:
        raw = msgpack.unpackb(data)
    except (msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"weight header is not valid msgpack: {e}") from e
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA_VERSION:
        schema = raw.get("schema") if isinstance(raw, dict) else None
        raise ValueError(f"weight header schema {schema!r} is not {SCHEMA_VERSION}")
    missing = {"version", "bucket", "last", "nbytes", "tensors"} - raw.keys()
    if missing:
        raise ValueError(f"weight header lacks {sorted(missing)}")
    if raw["nbytes"] != buffer_data_nbytes:
        raise ValueError(f"weight header says {raw['nbytes']} data bytes; the buffer holds {buffer_data_nbytes}")
    tensors = []
    end = 0
    for entry in raw["tensors"]:
        if not (isinstance(entry, list) and len(entry) == 5):
            raise ValueError(f"malformed tensor entry {entry!r} in weight header")
        name, dtype, shape, offset, nbytes = entry
        if not (
            isinstance(name, str)
            and isinstance(dtype, str)
            and isinstance(shape, list)
            and all(isinstance(d, int) for d in shape)
            and isinstance(offset, int)
            and isinstance(nbytes, int)
        ):
            raise ValueError(f"malformed tensor entry {entry!r} in weight header")
        if tensor_nbytes(dtype, shape) != nbytes:
            raise ValueError(f"tensor {name!r}: {nbytes} bytes do not match dtype {dtype} and shape {shape}")
        if offset % ALIGN:
            raise ValueError(f"tensor {name!r}: offset {offset} is not a multiple of {ALIGN}")
        if offset < end:
            raise ValueError(f"tensor {name!r}: offset {offset} overlaps the previous tensor (ends at {end})")
        if offset + nbytes > buffer_data_nbytes:
            raise ValueError(
                f"tensor {name!r}: bytes {offset}..{offset + nbytes} lie outside the {buffer_data_nbytes}-byte bucket"
            )
        end = offset + nbytes
        tensors.append(TensorMeta(name, dtype, tuple(shape), offset, nbytes))
    if raw["last"] and tensors:
        raise ValueError("the last bucket of a push must carry no tensors")
    return BucketHeader(int(raw["version"]), int(raw["bucket"]), bool(raw["last"]), int(raw["nbytes"]), tuple(tensors))


# ---------------------------------------------------------------------------------------
# Membership: registrations, the group spec and the rank assignment (see the module note).


def member_key(actor_id: int) -> str:
    """Store key of an actor's registration."""
    return f"{MEMBER_PREFIX}{actor_id}"


def group_name(generation: int) -> str:
    """Store prefix (and name) of broadcast-group generation `generation`."""
    return f"weights/{generation}"


def ready_key(name: str, actor_id: int) -> str:
    """Key an actor sets when it is ready to join generation `name`."""
    return f"{name}/ready/{actor_id}"


def go_key(name: str) -> str:
    """Key the learner sets to 1 (join now) or 0 (abandoned) for generation `name`."""
    return f"{name}/go"


@dataclass(frozen=True)
class Member:
    """An actor's registration: how many ranks it needs and which process (incarnation, epoch) it is."""

    actor_id: int
    num_workers: int
    incarnation: int
    epoch: int
    state: str = "active"

    @property
    def identity(self) -> tuple[int, int, int]:
        """(actor_id, incarnation, epoch): a new process or a new registration is a new identity."""
        return self.actor_id, self.incarnation, self.epoch


@dataclass(frozen=True)
class Slot:
    """A member's place in a group: ranks `rank_offset .. rank_offset + num_workers - 1`."""

    actor_id: int
    rank_offset: int
    num_workers: int
    incarnation: int
    epoch: int


@dataclass(frozen=True)
class GroupSpec:
    """The group of one push: generation name, world size, policy version, push id and the members' slots."""

    name: str
    world_size: int
    version: int
    push_id: int
    slots: tuple[Slot, ...]

    def slot(self, actor_id: int, incarnation: int) -> Slot | None:
        """The slot of this actor process, or None when the spec does not list it."""
        for s in self.slots:
            if s.actor_id == actor_id and s.incarnation == incarnation:
                return s
        return None

    @property
    def identities(self) -> frozenset[tuple[int, int, int]]:
        """(actor_id, incarnation, epoch) of every member."""
        return frozenset((s.actor_id, s.incarnation, s.epoch) for s in self.slots)


def _is_int(x: object, lo: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def encode_member(member: Member) -> bytes:
    """A registration as msgpack bytes."""
    return msgpack.packb(
        {"schema": SCHEMA_VERSION, "actor_id": member.actor_id, "num_workers": member.num_workers,
         "incarnation": member.incarnation, "epoch": member.epoch, "state": member.state}
    )


def decode_member(data: bytes) -> Member:
    """Parse and validate a registration; ValueError when it is not one."""
    raw = _unpack_map(data, "member record", {"actor_id", "num_workers", "incarnation", "epoch", "state"})
    if not (_is_int(raw["actor_id"]) and _is_int(raw["num_workers"], 1) and _is_int(raw["incarnation"])
            and _is_int(raw["epoch"]) and raw["state"] in MEMBER_STATES):
        raise ValueError(f"malformed member record {raw!r}")
    return Member(raw["actor_id"], raw["num_workers"], raw["incarnation"], raw["epoch"], raw["state"])


def encode_spec(spec: GroupSpec) -> bytes:
    """A group spec as msgpack bytes."""
    return msgpack.packb(
        {"schema": SCHEMA_VERSION, "name": spec.name, "world_size": spec.world_size, "version": spec.version,
         "push_id": spec.push_id,
         "slots": [[s.actor_id, s.rank_offset, s.num_workers, s.incarnation, s.epoch] for s in spec.slots]}
    )


def decode_spec(data: bytes) -> GroupSpec:
    """Parse and validate a group spec: the slots must tile ranks 1 .. world_size - 1 exactly once."""
    raw = _unpack_map(data, "group spec", {"name", "world_size", "version", "push_id", "slots"})
    if not (isinstance(raw["name"], str) and _is_int(raw["world_size"], 1) and _is_int(raw["version"])
            and _is_int(raw["push_id"]) and isinstance(raw["slots"], list)):
        raise ValueError(f"malformed group spec {raw!r}")
    slots = []
    for entry in raw["slots"]:
        if not (isinstance(entry, list) and len(entry) == 5 and all(_is_int(x) for x in entry) and entry[2] >= 1):
            raise ValueError(f"malformed slot {entry!r} in group spec")
        slots.append(Slot(*entry))
    spec = GroupSpec(raw["name"], raw["world_size"], raw["version"], raw["push_id"], tuple(slots))
    ranks = sorted(r for s in slots for r in range(s.rank_offset, s.rank_offset + s.num_workers))
    if ranks != list(range(1, spec.world_size)):
        raise ValueError(f"group spec slots cover ranks {ranks}; expected 1..{spec.world_size - 1} once each")
    if len({s.actor_id for s in slots}) != len(slots):
        raise ValueError("group spec lists an actor twice")
    if bool(slots) != bool(spec.name):
        raise ValueError("a group spec has a name exactly when it has members")
    return spec


def _unpack_map(data: bytes, what: str, keys: set[str]) -> dict:
    try:
        raw = msgpack.unpackb(data, strict_map_key=True)
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise ValueError(f"{what} is not valid msgpack: {e}") from e
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{what} has schema {raw.get('schema') if isinstance(raw, dict) else None!r}, "
                         f"not {SCHEMA_VERSION}")
    if set(raw) != keys | {"schema"}:
        raise ValueError(f"{what} has fields {sorted(raw)}; expected {sorted(keys | {'schema'})}")
    return raw


def assign_slots(members: Iterable[Member]) -> tuple[tuple[Slot, ...], int]:
    """Ranks for the active members, in actor-id order: the first gets rank 1; returns (slots, world_size).

    Raises ValueError when two active members share an actor id.
    """
    active = sorted((m for m in members if m.state == "active"), key=lambda m: m.actor_id)
    if len({m.actor_id for m in active}) != len(active):
        raise ValueError(f"actor ids registered twice: {[m.actor_id for m in active]}")
    slots, offset = [], 1
    for m in active:
        slots.append(Slot(m.actor_id, offset, m.num_workers, m.incarnation, m.epoch))
        offset += m.num_workers
    return tuple(slots), offset


def eligible_members(records: Iterable[Member], excluded: set[tuple[int, int, int]]) -> list[Member]:
    """The active registrations whose identity the learner has not dropped, in actor-id order."""
    return sorted((m for m in records if m.state == "active" and m.identity not in excluded),
                  key=lambda m: m.actor_id)


def needs_rebuild(current: GroupSpec | None, members: Sequence[Member], *, group_alive: bool) -> bool:
    """Whether the next push needs a new generation: the members (or their sizes) changed, or the group is gone."""
    if current is None or not group_alive:
        return bool(members)
    have = {(s.actor_id, s.incarnation, s.epoch, s.num_workers) for s in current.slots}
    return have != {(*m.identity, m.num_workers) for m in members}
