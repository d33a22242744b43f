"""learner.weight_sync -> actors.weight_receiver over gloo into live vLLM CPU engines, checked by log-prob parity.

Each push perturbs every parameter of a transformers copy (tied embedding, biases and norms
included; a separate lm_head for the untied model), pushes it through the real sender and
receiver, and compares vLLM's log-probs (prompt scoring and sampling) with a transformers
forward pass of the same weights. The receiver's blocking calls run in helper threads while
the test plays the learner (`deploy.doctor.with_peers`).

The wire itself is also checked without vLLM: plain receivers in helper threads join with
`join_weight_group`, receive with `BucketStream` (what the benchmark's receivers do) and must
get every byte, dtype and shape, across many buckets, an oversized tensor and two pushes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from actors.weight_receiver import BucketStream, join_weight_group
from deploy.doctor import (
    fixed_sequences,
    free_port,
    hf_logprobs,
    max_abs_diff,
    perturb_,
    weight_sync_doctor,
    with_peers,
)
from learner.weight_sender import WeightSender

TOL = 1e-4
HOST = "127.0.0.1"
PROMPTS = [[3, 4, 5, 6], [7, 8, 9, 10, 11]]


def _connect(lives, *, world_size: int | None = None, timeout_s: float = 30.0, bucket_bytes: int = 64 << 10):
    """A sender on a fresh port with every engine of `lives` joined (ranks 1, 2, ... in order)."""
    port = free_port()
    world = world_size or 1 + sum(live.engine.num_workers for live in lives)
    joins, offset = [], 1
    for live in lives:
        joins.append(
            lambda e=live.engine, o=offset: e.join_weight_group(
                HOST, port, rank_offset=o, world_size=world, group_name="weights/0", timeout_s=timeout_s
            )
        )
        offset += live.engine.num_workers
    sender, ranks = with_peers(
        joins, lambda: WeightSender(HOST, port, world, timeout_s=timeout_s, bucket_bytes=bucket_bytes)
    )
    assert [r for rs in ranks for r in rs] == list(range(1, world))
    return sender


def _push(sender: WeightSender, lives, named_tensors, version: int):
    stats, versions = with_peers(
        [live.engine.apply_weights for live in lives], lambda: sender.push(named_tensors, version)
    )
    assert versions == [version] * len(lives)
    return stats


def _parity(live, seed: int) -> float:
    """Max abs diff between the engine and its reference: prompt scores and sampled tokens' log-probs."""
    sequences = fixed_sequences(live.reference.config.vocab_size, seed)
    worst = max_abs_diff(live.engine.score(sequences), hf_logprobs(live.reference, sequences))
    for prompt, group in zip(PROMPTS, live.engine.generate(PROMPTS, n=2, max_tokens=16, seed=seed), strict=True):
        for s in group:
            expected = hf_logprobs(live.reference, [prompt + s.token_ids.tolist()])[0][len(prompt) - 1 :]
            worst = max(worst, float(np.max(np.abs(s.logprobs - expected))))
    return worst


def _perturbed(live, seed: int):
    model = copy.deepcopy(live.reference)
    perturb_(model, seed)
    return model


def test_push_into_tied_model_keeps_parity(random_engine) -> None:
    live = random_engine
    assert live.reference.config.tie_word_embeddings
    before = live.engine.score(fixed_sequences(live.reference.config.vocab_size, 5))
    live.engine.generate(PROMPTS, n=2, max_tokens=8, seed=0)  # leaves these prompts in the prefix cache
    sender = _connect([live])
    try:
        model = _perturbed(live, seed=21)
        names = [n for n, _ in model.named_parameters()]
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # the tied head is not pushed
        stats = _push(sender, [live], model.named_parameters(), version=1)
        live.reference = model
        assert stats.num_tensors == len(names) and stats.num_buckets > 3
        print(
            f"push of the tiny model: {stats.num_bytes / 2**20:.2f} MiB, {stats.num_buckets} buckets, "
            f"{stats.seconds * 1e3:.0f} ms; receiver {live.engine.last_push['seconds'] * 1e3:.0f} ms"
        )
        moved = max_abs_diff(before, live.engine.score(fixed_sequences(live.reference.config.vocab_size, 5)))
        assert moved > 0.05, "the push did not change the engine's log-probs"
        worst = _parity(live, seed=1)
        print(f"tied push: max_abs_logprob_diff {worst:.3g} (push moved log-probs by up to {moved:.3g})")
        assert worst < TOL

        model = _perturbed(live, seed=22)  # a state_dict push names the tied head explicitly as well
        assert "lm_head.weight" in model.state_dict()
        _push(sender, [live], model.state_dict().items(), version=2)
        live.reference = model
        worst = _parity(live, seed=2)
        print(f"tied push with explicit lm_head: max_abs_logprob_diff {worst:.3g}")
        assert worst < TOL
    finally:
        live.engine.leave_weight_group()
        sender.close()


def test_push_into_untied_model_updates_lm_head(random_untied_engine) -> None:
    live = random_untied_engine
    assert not live.reference.config.tie_word_embeddings
    sender = _connect([live])
    try:
        model = _perturbed(live, seed=31)
        assert "lm_head.weight" in dict(model.named_parameters())
        _push(sender, [live], model.named_parameters(), version=1)
        live.reference = model
        worst = _parity(live, seed=3)
        print(f"untied push: max_abs_logprob_diff {worst:.3g}")
        assert worst < TOL
    finally:
        live.engine.leave_weight_group()
        sender.close()


@pytest.mark.timeout(300)  # a hang guard: a timeout, not a hang
def test_a_missing_receiver_is_a_timeout_not_a_hang() -> None:
    with pytest.raises(TimeoutError, match=r"ranks \[1, 2\] did not join"):
        WeightSender(HOST, free_port(), 3, timeout_s=2.0)


@pytest.mark.timeout(300)  # a hang guard: a timeout, not a hang
def test_a_missing_sender_is_an_error_and_the_engine_keeps_serving(random_engine) -> None:
    live = random_engine
    with pytest.raises(Exception, match="(?i)timeout|timed out|connect"):
        live.engine.join_weight_group(
            HOST, free_port(), rank_offset=1, world_size=2, group_name="weights/0", timeout_s=2.0
        )
    assert _parity(live, seed=4) < TOL


def test_world_size_disagreement_is_rejected(random_engine) -> None:
    live = random_engine
    port = free_port()
    join = lambda: live.engine.join_weight_group(
        HOST, port, rank_offset=1, world_size=2, group_name="weights/0", timeout_s=3.0
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        joined = pool.submit(join)
        with pytest.raises(TimeoutError, match=r"ranks \[1, 2\]"):
            WeightSender(HOST, port, 3, timeout_s=3.0)
        with pytest.raises(Exception, match="has world size 3; this worker expected 2"):
            joined.result()
    sender = _connect([live])  # the failed join left nothing behind: the engine joins a good group
    live.engine.leave_weight_group()
    sender.close()


def test_rebuild_for_a_new_world_and_push_again(random_engine, random_untied_engine) -> None:
    tied, untied = random_engine, random_untied_engine
    sender = _connect([tied])
    try:
        model = _perturbed(tied, seed=41)
        _push(sender, [tied], model.named_parameters(), version=5)
        tied.reference = model
        assert _parity(tied, seed=5) < TOL

        # an actor joins: a new generation with world size 3; both engines re-join under its name
        tied.engine.leave_weight_group()
        port = sender.port
        joins = [
            lambda: tied.engine.join_weight_group(
                HOST, port, rank_offset=1, world_size=3, group_name="weights/1", timeout_s=30
            ),
            lambda: untied.engine.join_weight_group(
                HOST, port, rank_offset=2, world_size=3, group_name="weights/1", timeout_s=30
            ),
        ]
        with_peers(joins, lambda: sender.rebuild(3, "weights/1"))
        with pytest.raises(ValueError, match="used by an earlier generation"):
            sender.rebuild(2, "weights/0")
        # the tied model's full state (lm_head included) fits both architectures: both engines end up equal to it
        model = _perturbed(tied, seed=42)
        _push(sender, [tied, untied], model.state_dict().items(), version=6)
        tied.reference = untied.reference = model
        worst = max(_parity(tied, seed=6), _parity(untied, seed=6))
        print(f"push to a rebuilt world of 3: max_abs_logprob_diff {worst:.3g}")
        assert worst < TOL
    finally:
        tied.engine.leave_weight_group()
        untied.engine.leave_weight_group()
        sender.close()


def test_a_failed_apply_keeps_the_group_in_step(random_engine) -> None:
    live = random_engine
    sender = _connect([live])
    try:
        model = _perturbed(live, seed=51)
        params = list(model.named_parameters())
        bogus = [*params[:5], ("model.layers.0.no_such_proj.weight", torch.zeros(4, 4)), *params[5:]]
        with pytest.raises(Exception, match="no_such_proj"):
            _push(sender, [live], bogus, version=7)  # the sender finishes: the receiver drained the push
        _push(sender, [live], model.named_parameters(), version=8)
        live.reference = model
        assert _parity(live, seed=7) < TOL
    finally:
        live.engine.leave_weight_group()
        sender.close()


@pytest.mark.timeout(300)  # a hang guard: a timeout, not a hang
def test_apply_without_a_push_times_out_and_leaves_the_weights_alone(random_engine) -> None:
    live = random_engine
    sender = _connect([live], timeout_s=2.0)
    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        live.engine.apply_weights()
    assert _parity(live, seed=8) < TOL
    live.engine.leave_weight_group()
    sender.close()


@pytest.mark.slow
def test_doctor_with_two_tensor_parallel_workers(random_model_dir, monkeypatch, capsys) -> None:
    """Each TP worker is its own rank and receives the full tensors; vLLM's loaders shard them."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per worker; auto binding keeps a core spare
    diff = weight_sync_doctor(str(random_model_dir), tensor_parallel_size=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"max_abs_logprob_diff: {diff:.3g}"
    print(f"doctor, 2 TP workers: max_abs_logprob_diff {diff:.3g}")
    assert diff < TOL


def test_doctor_in_bf16_on_a_model_with_a_256_token_context(tmp_path, capsys) -> None:
    """The doctor sizes max_model_len from the model (512 would be refused here) and pushes bf16 into a bf16 engine."""
    import json

    from deploy.doctor import TOLERANCES
    from tests.component.conftest import build_random_model

    model_dir = build_random_model(tmp_path / "short", tie_word_embeddings=True)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    diff = weight_sync_doctor(str(model_dir), dtype="bfloat16")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"max_abs_logprob_diff: {diff:.3g}"
    print(f"doctor, bf16, 256-token context: max_abs_logprob_diff {diff:.3g}")
    assert diff < TOLERANCES["bfloat16"]


def _mixed_tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Tensors of every kind a push meets: dtypes, scalars, empty, non-contiguous, larger than a bucket."""
    g = torch.Generator().manual_seed(seed)
    return [
        ("a.weight", torch.randn(37, 11, generator=g)),
        ("b.weight", torch.randn(1000, generator=g).to(torch.bfloat16)),
        ("c.steps", torch.randint(-(2**40), 2**40, (3,), generator=g)),
        ("d.mask", torch.rand(5, generator=g) > 0.5),
        ("e.scalar", torch.randn((), generator=g)),
        ("f.empty", torch.empty(0, 4)),
        ("g.big", torch.randn(5000, generator=g).to(torch.float16)),  # 10,000 bytes: a bucket of its own
        ("h.transposed", torch.randn(8, 24, generator=g).t()),
        *[(f"i.{k}", torch.randn(64, generator=g)) for k in range(20)],
    ]


def _receive_plain(port: int, rank: int, num_pushes: int) -> list[tuple[int, int, dict[str, torch.Tensor]]]:
    """Join as `rank` and receive `num_pushes` pushes with BucketStream: (version, buckets, tensors) of each."""
    group, _ = join_weight_group(HOST, port, rank, 3, "gloo", 30.0, "weights/0")
    pushes = []
    try:
        for _ in range(num_pushes):
            stream = BucketStream(group, torch.device("cpu"))
            stream.fetch_first()
            got = {name: t.clone() for name, t in stream}
            assert stream.done and stream.version is not None
            pushes.append((stream.version, stream.num_buckets, got))
    finally:
        group.shutdown()
    return pushes


def test_push_reaches_plain_receivers_bit_for_bit() -> None:
    port = free_port()
    receivers = [lambda r=r: _receive_plain(port, r, num_pushes=2) for r in (1, 2)]
    pushed = [_mixed_tensors(seed=1), _mixed_tensors(seed=2)]

    def learner() -> list:
        sender = WeightSender(HOST, port, 3, timeout_s=30.0, bucket_bytes=2048)
        try:
            return [sender.push(iter(tensors), version) for version, tensors in enumerate(pushed, start=7)]
        finally:
            sender.close()

    stats, received = with_peers(receivers, learner)
    assert [s.num_tensors for s in stats] == [len(t) for t in pushed]
    assert all(s.num_buckets > 5 for s in stats)
    for pushes in received:
        for (version, num_buckets, got), tensors, s in zip(pushes, pushed, stats, strict=True):
            assert (version, num_buckets) == (s.policy_version, s.num_buckets)
            assert list(got) == [name for name, _ in tensors]
            for name, t in tensors:
                assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
                assert torch.equal(got[name], t), name


@pytest.mark.timeout(300)  # a hang guard: a timeout, not a hang
def test_a_failing_tensor_iterator_fails_the_push_not_the_group() -> None:
    """The learner's gather fails part way: the sender raises that error and keeps its group; receivers time out."""
    port = free_port()

    def failing() -> Iterator[tuple[str, torch.Tensor]]:
        yield "a.weight", torch.ones(1024)  # 4096 bytes: a bucket of its own, sent before the gather fails
        yield "b.weight", torch.ones(1024)
        raise RuntimeError("gather failed")

    def receiver() -> tuple[list[str], str]:
        group, _ = join_weight_group(HOST, port, 1, 2, "gloo", 3.0, "weights/0")
        stream = BucketStream(group, torch.device("cpu"))
        names = []
        try:
            with pytest.raises(RuntimeError) as failure:  # the push never ends: an error, not a hang
                stream.fetch_first()
                for name, t in stream:
                    assert torch.equal(t, torch.ones(1024))
                    names.append(name)
        finally:
            group.shutdown()
        return names, str(failure.value)

    def learner() -> None:
        sender = WeightSender(HOST, port, 2, timeout_s=30.0, bucket_bytes=4096)
        try:
            with pytest.raises(RuntimeError, match="gather failed"):
                sender.push(failing(), 1)
            assert sender.has_group  # not a collective failure: the group stays
        finally:
            sender.close()

    _, [(names, error)] = with_peers([receiver], learner)
    assert names == ["a.weight"] and "gather failed" not in error


def test_a_polled_broadcast_past_its_timeout_aborts_the_group_and_raises() -> None:
    """The NCCL path's wait (poll, abort, raise), run on gloo: a receiver whose sender never sends gives up
    after the timeout with RuntimeError, as a gloo timeout does, and its group is aborted."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from deploy.doctor import free_port
    from shared.weights.group import broadcast_from_root, make_weight_group

    port = free_port()
    long = timedelta(seconds=60)  # the group's own timeout: the poll must give up long before it
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=long)
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=long)
    with ThreadPoolExecutor(2) as pool:
        ends = [(master, 0), (client, 1)]
        sender, receiver = pool.map(lambda end: make_weight_group(end[0], end[1], 2, "gloo", long), ends)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="did not complete within 0:00:01.*aborted"):
        broadcast_from_root(receiver, torch.empty(4), timedelta(seconds=1), poll=True)
    assert 1.0 <= time.monotonic() - t0 < 30
    sender.abort()
