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
