"""shared.weights.protocol: bucket layout, grouping, header round trip and the header's validation."""

from __future__ import annotations

import msgpack
import pytest

from shared.weights import protocol as wp


def _header(tensors: list[tuple[str, str, list[int]]], *, version: int = 3, index: int = 0) -> wp.BucketHeader:
    metas, nbytes = wp.layout(tensors)
    return wp.BucketHeader(version, index, False, nbytes, metas)


def test_layout_aligns_every_tensor_and_counts_its_bytes() -> None:
    metas, nbytes = wp.layout(
        [("a", "float32", [3]), ("b", "bfloat16", [2, 5]), ("c", "int64", []), ("d", "bool", [0])]
    )
    assert [m.offset for m in metas] == [0, 64, 128, 192]
    assert [m.nbytes for m in metas] == [12, 20, 8, 0]
    assert nbytes == 192
    assert all(m.offset % wp.ALIGN == 0 for m in metas)


def test_data_start_is_aligned_and_after_the_header() -> None:
    assert wp.data_start(1) == 64 and wp.data_start(64) == 64 and wp.data_start(65) == 128


def test_tensor_nbytes_rejects_unknown_dtypes_and_negative_dims() -> None:
    assert wp.tensor_nbytes("float16", (4, 3)) == 24
    with pytest.raises(ValueError, match="unsupported dtype"):
        wp.tensor_nbytes("complex64", (1,))
    with pytest.raises(ValueError, match="negative"):
        wp.tensor_nbytes("float32", (2, -1))


def test_header_round_trip() -> None:
    header = _header([("model.embed_tokens.weight", "float32", [51, 128]), ("model.norm.weight", "bfloat16", [128])])
    assert wp.decode_header(wp.encode_header(header), header.nbytes) == header


def test_last_bucket_round_trip() -> None:
    header = wp.BucketHeader(7, 4, True, 0, ())
    assert wp.decode_header(wp.encode_header(header), 0) == header


def test_group_into_buckets_respects_the_bound_and_keeps_order() -> None:
    sizes = [10, 50, 64, 1, 200, 3, 3]
    buckets = list(wp.group_into_buckets(list(enumerate(sizes)), lambda item: item[1], bucket_bytes=128))
    assert [i for b in buckets for i, _ in b] == list(range(len(sizes)))
    for bucket in buckets:
        total = sum(wp.align(n) for _, n in bucket)
        assert total <= 128 or len(bucket) == 1  # only a single oversized item may exceed it
    assert [[i for i, _ in b] for b in buckets] == [[0, 1], [2, 3], [4], [5, 6]]


def test_group_into_buckets_is_lazy_and_handles_nothing() -> None:
    def items():
        yield 1
        yield 2
        raise AssertionError("read past the first bucket")

    first = next(wp.group_into_buckets(items(), lambda n: 64, bucket_bytes=64))
    assert first == [1]
    assert list(wp.group_into_buckets([], lambda n: 1, bucket_bytes=64)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(wp.group_into_buckets([1], lambda n: 1, bucket_bytes=0))


def _raw(header: wp.BucketHeader) -> dict:
    return msgpack.unpackb(wp.encode_header(header))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.update(schema=99), "schema"),
        (lambda r: r.pop("version"), "lacks"),
        (lambda r: r.update(nbytes=r["nbytes"] + 64), "data bytes"),
        (lambda r: r["tensors"][0].__setitem__(4, 11), "do not match"),
        (lambda r: r["tensors"][0].__setitem__(1, "complex64"), "unsupported dtype"),
        (lambda r: r["tensors"][1].__setitem__(3, 0), "overlaps"),
        (lambda r: r["tensors"][1].__setitem__(3, 65), "not a multiple"),
        (lambda r: r["tensors"][1].__setitem__(3, 4096), "outside"),
        (lambda r: r["tensors"].append(["x", "float32"]), "malformed"),
        (lambda r: r["tensors"][0].__setitem__(2, ["3", 4]), "malformed"),
        (lambda r: r.update(last=True), "last bucket"),
    ],
)
def test_decode_header_rejects_inconsistent_headers(mutate, match: str) -> None:
    header = _header([("a", "float32", [3, 4]), ("b", "float32", [5])])
    raw = _raw(header)
    mutate(raw)
    with pytest.raises(ValueError, match=match):
        wp.decode_header(msgpack.packb(raw), header.nbytes)


def test_decode_header_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        wp.decode_header(b"\xc1\xc1\xc1", 0)
    with pytest.raises(ValueError, match="schema"):
        wp.decode_header(msgpack.packb([1, 2, 3]), 0)
