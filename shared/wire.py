"""The bytes of every message between actors, the replay queue and the learner.

Owns encoding and validated decoding. Pure: msgpack, numpy, hmac; no zmq (the transport
hands frames in and out as plain buffers).

Layout. A message is a list of frames. Frame 0 is a msgpack map: `schema` (SCHEMA_VERSION),
`kind`, then the kind's fields (`_BODIES`). A message that carries rollout groups (a submit,
a batch) lists their headers under `groups`, and each group owns the next four frames, in
order: prompt_token_ids, token_ids, behavior_logprobs, token_versions, as raw little-endian
array bytes. The group header describes each as `{"dtype": "<i4", "shape": [n]}`. Small
per-response values (offsets, rewards, correct, finish_reasons) are msgpack lists.

Why frames and not msgpack bin fields: the transport sends them with copy=False and
`np.frombuffer` on a received frame is a view, so decoding copies no array at all; the
queue forwards a group to the learner as the very frames it received, without re-encoding.
Nothing is pickled, msgpack ext types are refused, and every map key is a string.

Decoding never trusts the peer. It raises `WireError(reason)` for a wrong schema version,
an unknown kind, missing or extra fields, wrong types, lengths that disagree (tokens vs
log-probs vs versions, offsets vs responses, frames vs the header), non-finite log-probs or
rewards, token versions older than the group's `policy_version` (which would understate its
lag) and messages over the size limit. `reason` is a short code the receiver counts; the
receiver drops the message and keeps serving.

One exception, `trusted_groups`: the queue validated every group when it was submitted, so
the learner decodes a batch checking only the groups' structure (fields present, frame sizes,
offsets) and not each field's type nor the arrays' values again. That saves a second pass
over every array on the second hop (and the Python cost of the per-field checks).

`sign`/`verify` are the optional shared-secret mode: HMAC-SHA256 over the length-prefixed
frames, appended by the transport as one more frame. They authenticate a peer; they do not
stop a replay of a recorded message.

Longer than ~400 lines: the schema of every message kind and the validation of every field are
the module's whole job, and one file is where a reader checks what a peer may send.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack
import numpy as np

from shared.types import (
    FINISH_REASONS,
    LOGPROB_DTYPE,
    SCHEMA_VERSION,
    TOKEN_DTYPE,
    VERSION_DTYPE,
    Lease,
    QueueStats,
    RolloutGroup,
)

Buffer = bytes | bytearray | memoryview
EncodedGroup = tuple[dict[str, Any], list[Buffer]]
"""A group as its msgpack-ready header and its four array frames."""

MAX_STR = 1 << 20
MAX_LIST = 1 << 20
_ARRAYS = (("prompt_token_ids", TOKEN_DTYPE), ("token_ids", TOKEN_DTYPE),
           ("behavior_logprobs", LOGPROB_DTYPE), ("token_versions", VERSION_DTYPE))
FRAMES_PER_GROUP = len(_ARRAYS)
CONTROL_COMMANDS = ("pause", "resume", "stop", "shutdown")
BROADCAST_COMMANDS = ("run", "pause", "stop")


class WireError(ValueError):
    """A message that was refused; `reason` is a short code used as a counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Message:
    """A decoded message: its kind, its validated fields, and the groups it carried."""

    kind: str
    body: dict[str, Any]
    groups: list[RolloutGroup] = field(default_factory=list)
    encoded_groups: list[EncodedGroup] = field(default_factory=list)
    """The same groups as received (header, frames), to forward without re-encoding."""


# --- field checkers: each returns the (possibly converted) value or raises WireError -----------------------------

Check = Callable[[Any, str], Any]


def _int(lo: int = -(1 << 63), hi: int = (1 << 63) - 1) -> Check:
    def check(v: Any, name: str) -> int:
        if type(v) is not int:
            raise WireError("wrong_type", f"{name} must be an int")
        if not lo <= v <= hi:
            raise WireError("bad_value", f"{name}={v} out of [{lo}, {hi}]")
        return v
    return check


def _float(lo: float = -math.inf) -> Check:
    def check(v: Any, name: str) -> float:
        if type(v) not in (int, float):
            raise WireError("wrong_type", f"{name} must be a number")
        if not math.isfinite(v):
            raise WireError("non_finite", name)
        if v < lo:
            raise WireError("bad_value", f"{name}={v} < {lo}")
        return float(v)
    return check


def _str(choices: Sequence[str] = ()) -> Check:
    def check(v: Any, name: str) -> str:
        if type(v) is not str or len(v) > MAX_STR:
            raise WireError("wrong_type", f"{name} must be a string")
        if choices and v not in choices:
            raise WireError("bad_value", f"{name}={v!r}")
        return v
    return check


def _bool(v: Any, name: str) -> bool:
    if type(v) is not bool:
        raise WireError("wrong_type", f"{name} must be a bool")
    return v


def _list(item: Check) -> Check:
    def check(v: Any, name: str) -> list:
        if type(v) is not list or len(v) > MAX_LIST:
            raise WireError("wrong_type", f"{name} must be a list")
        return [item(x, name) for x in v]
    return check


def _optional(inner: Check) -> Check:
    return lambda v, name: None if v is None else inner(v, name)


def _plain(v: Any, name: str, depth: int = 0) -> Any:
    """Any tree of maps with string keys, lists and scalars (a cursor's source state)."""
    if depth > 32:
        raise WireError("wrong_type", f"{name} nests too deep")
    if v is None or type(v) in (bool, int, str, bytes):
        return v
    if type(v) is float:
        return _float()(v, name)
    if type(v) is list:
        return [_plain(x, name, depth + 1) for x in v]
    if type(v) is dict and all(type(k) is str for k in v):
        return {k: _plain(x, name, depth + 1) for k, x in v.items()}
    raise WireError("wrong_type", f"{name} holds a {type(v).__name__}")


def _fields(d: Any, spec: dict[str, Check], where: str) -> dict[str, Any]:
    if type(d) is not dict:
        raise WireError("wrong_type", f"{where} must be a map")
    missing = spec.keys() - d.keys()
    if missing:
        raise WireError("missing_field", f"{where}: {sorted(missing)}")
    extra = d.keys() - spec.keys()
    if extra:
        raise WireError("extra_field", f"{where}: {sorted(map(str, extra))}")
    return {k: check(d[k], f"{where}.{k}") for k, check in spec.items()}


_pair = _list(_str())
_LEASE: dict[str, Check] = {
    "lease_id": _int(), "prompt_id": _int(0), "prompt": _str(), "ground_truth": _str(), "data_source": _str(),
    "messages": _optional(_list(_pair)), "policy_version": _int(0),
}
_ARRAY: dict[str, Check] = {"dtype": _str(), "shape": _list(_int(0))}
_GROUP: dict[str, Check] = {
    "lease_id": _int(), "prompt_id": _int(0), "ground_truth": _str(), "data_source": _str(), "actor_id": _int(0),
    "policy_version": _int(0), **{name: lambda v, n: _fields(v, _ARRAY, n) for name, _ in _ARRAYS},
    "offsets": _list(_int(0)), "finish_reasons": _list(_str(FINISH_REASONS)), "rewards": _list(_float()),
    "correct": _list(_bool), "gen_started_at": _float(), "gen_seconds": _float(0.0), "reward_seconds": _float(0.0),
}


# The group header is the per-group Python cost of a submit: checking its ~80 values one closure
# call at a time costs more than scanning the arrays. `_group_header_ok` checks the same rules
# with C-level passes (type sets, min/max) and only answers yes or no; a no falls back to
# `_fields(header, _GROUP, ...)`, which finds the reason. So a valid header takes the fast
# path and the reasons stay those of the generic checks.
_INT_LO, _INT_HI = -(1 << 63), (1 << 63) - 1
_INT_TYPES = frozenset((int,))
_NUMBER_TYPES = frozenset((int, float))
_BOOL_TYPES = frozenset((bool,))
_STR_TYPES = frozenset((str,))
_FINISH = frozenset(FINISH_REASONS)


def _ints_ok(v: Any, lo: int) -> bool:
    return type(v) is list and len(v) <= MAX_LIST and (
        not v or (set(map(type, v)) <= _INT_TYPES and min(v) >= lo and max(v) <= _INT_HI))


def _number_ok(v: Any, lo: float = -math.inf) -> bool:
    return type(v) in _NUMBER_TYPES and math.isfinite(v) and v >= lo


def _str_ok(v: Any) -> bool:
    return type(v) is str and len(v) <= MAX_STR


def _group_header_ok(h: Any) -> bool:
    """Whether `_fields(h, _GROUP, ...)` would accept `h` (a quick yes or no; see above)."""
    if type(h) is not dict or h.keys() != _GROUP.keys():
        return False
    for key in ("lease_id", "prompt_id", "actor_id", "policy_version"):
        v = h[key]
        if type(v) is not int or not (_INT_LO if key == "lease_id" else 0) <= v <= _INT_HI:
            return False
    for name, _ in _ARRAYS:
        desc = h[name]
        if type(desc) is not dict or desc.keys() != _ARRAY.keys() or not _str_ok(desc["dtype"]) \
                or not _ints_ok(desc["shape"], 0):
            return False
    finish, rewards, correct = h["finish_reasons"], h["rewards"], h["correct"]
    return (_str_ok(h["ground_truth"]) and _str_ok(h["data_source"]) and _ints_ok(h["offsets"], 0)
            and type(finish) is list and len(finish) <= MAX_LIST and set(map(type, finish)) <= _STR_TYPES
            and set(finish) <= _FINISH
            and type(rewards) is list and len(rewards) <= MAX_LIST and set(map(type, rewards)) <= _NUMBER_TYPES
            and all(map(math.isfinite, rewards))
            and type(correct) is list and len(correct) <= MAX_LIST and set(map(type, correct)) <= _BOOL_TYPES
            and _number_ok(h["gen_started_at"]) and _number_ok(h["gen_seconds"], 0.0)
            and _number_ok(h["reward_seconds"], 0.0))


def _counts(v: Any, name: str) -> dict[str, int]:
    if type(v) is not dict:
        raise WireError("wrong_type", f"{name} must be a map")
    return {_str()(k, name): _int(0)(x, name) for k, x in v.items()}


def _plain_map(v: Any, name: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise WireError("wrong_type", f"{name} must be a map")
    return _plain(v, name)


_STATS: dict[str, Check] = {
    f.name: _int() for f in fields(QueueStats) if f.name not in ("rejected", "cursor")
} | {"rejected": _counts, "cursor": _plain_map}
_groups_of = _list(lambda v, n: v)  # group headers are checked with their frames, in _validate_group

_BODIES: dict[str, dict[str, Check]] = {
    # requests (actor or learner -> queue)
    "lease": {"actor_id": _int(0), "incarnation": _int(), "policy_version": _int(0), "num_prompts": _int(1, 1 << 20)},
    "submit": {"actor_id": _int(0), "incarnation": _int(), "groups": _groups_of},
    # between learner ranks: one step's groups, scattered by rank 0 (`encode_groups`)
    "groups": {"groups": _groups_of},
    "heartbeat": {"actor_id": _int(0), "incarnation": _int()},
    "get_batch": {"num_groups": _int(1, 1 << 24), "wait_s": _float(0.0)},
    "set_version": {"version": _int(0), "weights_version": _int(0)},
    "get_stats": {},
    "get_cursor": {},
    "control": {"command": _str(CONTROL_COMMANDS)},
    # replies (queue -> requester)
    "leases": {"leases": _list(lambda v, n: _lease_from_wire(_fields(v, _LEASE, n))), "retry_after_s": _float(0.0),
               "reason": _str(), "version": _int(0), "weights_version": _int(0)},
    "ack": {"status": _str(), "reason": _str(), "retry_after_s": _float(0.0)},
    "submitted": {"statuses": _list(_str()), "retry_after_s": _float(0.0)},
    "batch": {"groups": _groups_of, "stats": lambda v, n: QueueStats(**_fields(v, _STATS, n)),
              "short": _bool, "timed_out": _bool, "stopping": _bool},
    "stats": {"stats": lambda v, n: QueueStats(**_fields(v, _STATS, n))},
    "cursor": {"cursor": _plain_map},
    "error": {"reason": _str()},
    # broadcast (queue -> everyone, on the publish socket)
    "state": {"version": _int(0), "weights_version": _int(0), "command": _str(BROADCAST_COMMANDS)},
}
KINDS = tuple(_BODIES)


def _lease_from_wire(d: dict[str, Any]) -> Lease:
    msgs = d["messages"]
    if msgs is not None and any(len(p) != 2 for p in msgs):
        raise WireError("length_mismatch", "lease.messages entries must be [role, content]")
    return Lease(**{**d, "messages": None if msgs is None else tuple((r, c) for r, c in msgs)})


def lease_to_wire(lease: Lease) -> dict[str, Any]:
    """A lease as a msgpack-ready map."""
    return {"lease_id": lease.lease_id, "prompt_id": lease.prompt_id, "prompt": lease.prompt,
            "ground_truth": lease.ground_truth, "data_source": lease.data_source,
            "messages": None if lease.messages is None else [list(p) for p in lease.messages],
            "policy_version": lease.policy_version}


_STATS_SCALARS = tuple(f.name for f in fields(QueueStats) if f.name not in ("rejected", "cursor"))


def stats_to_wire(stats: QueueStats) -> dict[str, Any]:
    """Queue counters as a msgpack-ready map."""
    return {**{name: getattr(stats, name) for name in _STATS_SCALARS}, "rejected": dict(stats.rejected),
            "cursor": stats.cursor}


# --- encoding ----------------------------------------------------------------------------------------------------


def _as_frame(a: np.ndarray, dtype: np.dtype) -> memoryview:
    contiguous: Any = np.ascontiguousarray(a, dtype=dtype)
    return memoryview(contiguous).cast("B")


def encode_group(group: RolloutGroup) -> EncodedGroup:
    """A group's header and its four array frames (views of the group's arrays, no copy when dtypes match)."""
    header: dict[str, Any] = {
        "lease_id": group.lease_id, "prompt_id": group.prompt_id, "ground_truth": group.ground_truth,
        "data_source": group.data_source, "actor_id": group.actor_id, "policy_version": group.policy_version,
        "offsets": [int(x) for x in group.offsets], "finish_reasons": list(group.finish_reasons),
        "rewards": [float(x) for x in group.rewards], "correct": [bool(x) for x in group.correct],
        "gen_started_at": group.gen_started_at, "gen_seconds": group.gen_seconds,
        "reward_seconds": group.reward_seconds,
    }
    frames: list[Buffer] = []
    for name, dtype in _ARRAYS:
        array = getattr(group, name)
        header[name] = {"dtype": dtype.str, "shape": [int(array.size)]}
        frames.append(_as_frame(array, dtype))
    return header, frames


def encode(kind: str, body: dict[str, Any] | None = None, groups: Sequence[EncodedGroup] = ()) -> list[Buffer]:
    """Frames of one message: the msgpack header, then each group's four array frames."""
    if kind not in _BODIES:
        raise ValueError(f"unknown message kind {kind!r}")
    header: dict[str, Any] = {"schema": SCHEMA_VERSION, "kind": kind, **(body or {})}
    if "groups" in _BODIES[kind]:
        header["groups"] = [h for h, _ in groups]
    frames: list[Buffer] = [msgpack.packb(header, use_bin_type=True)]
    for _, group_frames in groups:
        assert len(group_frames) == FRAMES_PER_GROUP
        frames.extend(group_frames)
    return frames


# --- decoding ----------------------------------------------------------------------------------------------------


def _no_ext(code: int, data: bytes) -> Any:
    raise WireError("malformed", f"msgpack ext type {code}")


def _unpack(buf: Buffer) -> Any:
    try:
        return msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext, timestamp=0)
    except WireError:
        raise
    except (ValueError, TypeError, OverflowError) as e:  # msgpack's errors are ValueError subclasses
        raise WireError("malformed", f"not msgpack: {type(e).__name__}") from None


def _array(frame: Buffer, nbytes: int, desc: dict[str, Any], dtype: np.dtype, name: str) -> np.ndarray:
    if desc["dtype"] != dtype.str or len(desc["shape"]) != 1:
        raise WireError("wrong_type", f"{name} must be 1-d {dtype.str}, got {desc['dtype']} {desc['shape']}")
    if nbytes != desc["shape"][0] * dtype.itemsize:
        raise WireError("length_mismatch", f"{name}: frame of {nbytes} bytes for {desc['shape']}")
    return np.frombuffer(frame, dtype=dtype)


def _check_values(prompt_token_ids: np.ndarray, token_ids: np.ndarray, behavior_logprobs: np.ndarray,
                  token_versions: np.ndarray, policy_version: int, where: str) -> None:
    """The scans over a group's arrays: finite log-probs, token ids >= 0, token versions >= policy_version."""
    if not np.isfinite(behavior_logprobs).all():
        raise WireError("non_finite", f"{where}.behavior_logprobs")
    if token_ids.size and (token_ids.min() < 0 or token_versions.min() < policy_version):
        raise WireError("bad_value", f"{where}: negative token id or token version older than policy_version")
    if prompt_token_ids.size and prompt_token_ids.min() < 0:
        raise WireError("bad_value", f"{where}.prompt_token_ids negative")


def _validate_group(header: Any, frames: Sequence[Buffer], sizes: Sequence[int], where: str, *,
                    trusted: bool = False) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Validate one group header against its four frames (of `sizes` bytes); its fields and arrays (views).

    `trusted`: the sender validated the group (the queue's batches); only the structure (fields
    present, array sizes, offsets) is checked, not each field's type nor the arrays' values.
    """
    if trusted:
        if type(header) is not dict or header.keys() != _GROUP.keys():
            raise WireError("malformed", f"{where}: not a group header")
        h = header
    elif _group_header_ok(header):
        h = header
    else:
        h = _fields(header, _GROUP, where)
    arrays = [_array(frames[i], sizes[i], h[name], dtype, f"{where}.{name}") for i, (name, dtype) in enumerate(_ARRAYS)]
    prompt_token_ids, token_ids, behavior_logprobs, token_versions = arrays
    offsets = h["offsets"]
    num_responses = len(offsets) - 1
    if num_responses < 1:
        raise WireError("length_mismatch", f"{where}: no responses")
    if not len(h["finish_reasons"]) == len(h["rewards"]) == len(h["correct"]) == num_responses:
        raise WireError("length_mismatch", f"{where}: {num_responses} responses but per-response lists disagree")
    num_tokens = token_ids.size
    if behavior_logprobs.size != num_tokens or token_versions.size != num_tokens:
        raise WireError("length_mismatch", f"{where}: tokens, log-probs and versions differ in length")
    if offsets[0] != 0 or offsets[-1] != num_tokens or not all(map(operator.le, offsets, offsets[1:])):
        raise WireError("length_mismatch", f"{where}: offsets do not partition {num_tokens} tokens")
    if not trusted:
        _check_values(prompt_token_ids, token_ids, behavior_logprobs, token_versions, h["policy_version"], where)
    return h, arrays


def _group_of(h: dict[str, Any], arrays: list[np.ndarray]) -> RolloutGroup:
    prompt_token_ids, token_ids, behavior_logprobs, token_versions = arrays
    return RolloutGroup(
        lease_id=h["lease_id"], prompt_id=h["prompt_id"], prompt_token_ids=prompt_token_ids,
        ground_truth=h["ground_truth"], data_source=h["data_source"], actor_id=h["actor_id"],
        policy_version=h["policy_version"], token_ids=token_ids, behavior_logprobs=behavior_logprobs,
        token_versions=token_versions, offsets=np.array(h["offsets"], np.int64), finish_reasons=h["finish_reasons"],
        rewards=np.array(h["rewards"], np.float32), correct=np.array(h["correct"], bool),
        gen_started_at=float(h["gen_started_at"]), gen_seconds=float(h["gen_seconds"]),
        reward_seconds=float(h["reward_seconds"]),
    )


def decode(frames: Sequence[Buffer], *, max_bytes: int, kinds: Sequence[str] = KINDS,
           max_group_bytes: int | None = None, trusted_groups: bool = False, build_groups: bool = True) -> Message:
    """Validate and decode one message; raises WireError(reason) for anything off.

    `max_bytes` bounds the whole message, `max_group_bytes` (default: max_bytes) each group in it.
    `trusted_groups`: its groups were validated by the sender (a batch from the queue, which
    validated each on submit): check their structure only (see `_validate_group`).
    `build_groups=False`: validate the groups but keep them only as `encoded_groups` (the queue,
    which forwards them as received, needs no `RolloutGroup`; its header has every field).
    """
    sizes = [memoryview(f).nbytes for f in frames]
    if not sizes or sizes[0] == 0:
        raise WireError("empty")
    total = sum(sizes)
    if total > max_bytes:
        raise WireError("too_large", f"{total} bytes > {max_bytes}")
    header = _unpack(frames[0])
    if type(header) is not dict:
        raise WireError("malformed", "header is not a map")
    if header.get("schema") != SCHEMA_VERSION:
        raise WireError("schema_version", f"got {header.get('schema')!r}, expected {SCHEMA_VERSION}")
    kind = header.get("kind")
    if type(kind) is not str or kind not in kinds:
        raise WireError("unknown_kind", repr(kind)[:40])
    body = _fields({k: v for k, v in header.items() if k not in ("schema", "kind")}, _BODIES[kind], kind)
    msg = Message(kind=kind, body=body)
    headers = body.pop("groups", [])
    if len(frames) != 1 + FRAMES_PER_GROUP * len(headers):
        raise WireError("length_mismatch", f"{len(frames)} frames for {len(headers)} groups")
    limit = max_bytes if max_group_bytes is None else max_group_bytes
    for i, gh in enumerate(headers):
        lo, hi = 1 + FRAMES_PER_GROUP * i, 1 + FRAMES_PER_GROUP * (i + 1)
        gframes, gsizes = list(frames[lo:hi]), sizes[lo:hi]
        if sum(gsizes) > limit:
            raise WireError("too_large", f"group {i} over {limit} bytes")
        h, arrays = _validate_group(gh, gframes, gsizes, f"{kind}.groups[{i}]", trusted=trusted_groups)
        if build_groups:
            msg.groups.append(_group_of(h, arrays))
        msg.encoded_groups.append((gh, gframes))
    return msg


def encode_groups(groups: Sequence[RolloutGroup]) -> bytes:
    """Groups as one buffer (the learner's scatter to its ranks): msgpack of a `groups` message's frames."""
    frames = encode("groups", groups=[encode_group(g) for g in groups])
    return msgpack.packb([bytes(memoryview(f)) for f in frames], use_bin_type=True)


def decode_groups(data: Buffer) -> list[RolloutGroup]:
    """The groups of an `encode_groups` buffer; raises WireError for anything else."""
    frames = _unpack(data)
    if type(frames) is not list or not all(type(f) is bytes for f in frames):
        raise WireError("malformed", "not a list of frames")
    return decode(frames, max_bytes=len(data), kinds=("groups",)).groups


def group_nbytes(group: EncodedGroup) -> int:
    """Bytes a queued group holds (its frames)."""
    return sum(memoryview(f).nbytes for f in group[1])


def encoded_nbytes(group: EncodedGroup) -> int:
    """Bytes a group adds to a message: its frames and its packed header."""
    return group_nbytes(group) + len(msgpack.packb(group[0], use_bin_type=True))


# --- shared-secret mode ------------------------------------------------------------------------------------------

MAC_BYTES = hashlib.sha256().digest_size


def sign(key: bytes, frames: Sequence[Buffer]) -> bytes:
    """HMAC-SHA256 over the frames, each prefixed by its length (so frame boundaries are authenticated)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for f in frames:
        view = memoryview(f)
        mac.update(view.nbytes.to_bytes(8, "little"))
        mac.update(view)
    return mac.digest()


def verify(key: bytes, frames: Sequence[Buffer], tag: Buffer) -> bool:
    """Whether `tag` is the HMAC of `frames` under `key` (constant-time comparison)."""
    return hmac.compare_digest(sign(key, frames), bytes(tag))
