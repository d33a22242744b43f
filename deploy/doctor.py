"""`vapo doctor weight-sync`: proves that a weight push reaches vLLM intact, by log-prob parity.

Starts a real engine (`actors.engine.Engine`, in `dtype`: float32 or bfloat16, with
`tensor_parallel_size` workers, on the GPU when there is one) on a model, perturbs every parameter
of a transformers copy of the same model (the tied embedding included, so the push must update
vLLM's lm_head through `embed_tokens`), pushes the perturbed weights in the engine's dtype, as the
learner does, through the real `learner.weight_sender.WeightSender` ->
`actors.weight_receiver.WeightReceiver` path (over NCCL on a GPU, else gloo), and compares vLLM's
prompt log-probs (`Engine.score`) on fixed token sequences with a float32 transformers forward pass
of the pushed weights (log-softmax at temperature 1). It also checks that the push changed vLLM's
log-probs at all, so a push that silently did nothing fails. `max_model_len` is the model's
context (`max_position_embeddings`), at most 512, so a short-context model works too.

The default tolerance is the dtype's (`TOLERANCES`): in bfloat16, vLLM computes with bf16
activations while the reference keeps float32 ones. On the component tier's random model (peaked
distributions, logits of ~10-20) that alone gives a max abs difference of 0.067 before the push and
0.076 after it, where float32 gives 5e-6 and the push itself moves log-probs by 6.3; a missing or
stale tensor shows as a difference of the push's size, far above 0.2.

Lives in `deploy/` because it needs both sides. The receiver's blocking calls (join, apply)
run in a helper thread while this thread plays the learner, which is how the two sides meet in
one process; in a run they live in different processes.

Prints `max_abs_logprob_diff: X` as its last line; the CLI returns 1 when X exceeds the
tolerance. Builds its engine and needs the `__main__` guard of whatever script calls it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

R = TypeVar("R")
T = TypeVar("T")


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback (for tests and the doctor, not for runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hf_logprobs(model: torch.nn.Module, sequences: list[list[int]], temperature: float = 1.0) -> list[np.ndarray]:
    """Log-prob of each token after the first under a transformers causal LM: [T - 1] each."""
    out = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            logits = model(input_ids=ids).logits[0, :-1].float() / temperature
            logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
            out.append(logp.numpy().astype(np.float32))
    return out


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Add seeded Gaussian noise of `scale` times each parameter's std (at least 0.01) to every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = max(float(p.float().std()) if p.numel() > 1 else 0.0, 0.01)
            p.add_(scale * std * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest absolute difference between two lists of equally shaped arrays."""
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b, strict=True))
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def with_peers(peers: list[Callable[[], R]], main: Callable[[], T]) -> tuple[T, list[R]]:
    """Run each peer in a helper thread while `main` runs here; returns main's and the peers' results.

    An error of `main` is raised after the peers finish (they fail on their own timeouts); a peer's error is
    raised after main returns.
    """
    with ThreadPoolExecutor(max_workers=len(peers)) as pool:
        futures = [pool.submit(peer) for peer in peers]
        result = main()
        return result, [f.result() for f in futures]


def fixed_sequences(vocab_size: int, seed: int, num: int = 4, length: int = 48) -> list[list[int]]:
    """Seeded random token sequences of varied lengths for parity probes."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=length - 7 * i).tolist() for i in range(num)]


TOLERANCES = {"float32": 1e-4, "bfloat16": 0.2}
"""Default tolerance of the doctor's max abs log-prob difference, by engine dtype."""


def weight_sync_doctor(
    model_path: str,
    *,
    tolerance: float | None = None,
    seed: int = 0,
    bucket_bytes: int = 1 << 20,
    tensor_parallel_size: int = 1,
    dtype: str = "float32",
) -> float:
    """Push perturbed weights into a fresh vLLM engine; returns the max abs log-prob diff vs transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from actors.engine import Engine
    from learner.weight_sender import WeightSender

    if dtype not in TOLERANCES:
        raise ValueError(f"--dtype must be one of {', '.join(TOLERANCES)}; got {dtype!r}")
    tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    on_gpu = torch.cuda.is_available()
    context = int(getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 512) or 512)
    max_len = min(512, context)
    memory = {"gpu_memory_utilization": 0.3} if on_gpu else {"kv_cache_memory_bytes": 64 << 20}
    t0 = time.perf_counter()
    engine = Engine(
        model_path,
        dtype=dtype,
        seed=seed,
        max_num_seqs=16,
        enforce_eager=True,
        max_model_len=max_len,
        tensor_parallel_size=tensor_parallel_size,
        **memory,
    )
    print(f"engine_start_s: {time.perf_counter() - t0:.1f}")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        sequences = fixed_sequences(model.config.vocab_size, seed, length=min(48, max_len))
        before = engine.score(sequences)
        print(f"before_push_max_abs_logprob_diff: {max_abs_diff(before, hf_logprobs(model, sequences)):.3g}")
        perturb_(model, seed + 1)
        push_dtype = getattr(torch, dtype)
        with torch.no_grad():  # the reference computes in float32 with exactly the weights the engine gets
            for p in model.parameters():
                p.copy_(p.to(push_dtype))
        expected = hf_logprobs(model, sequences)
        device = "cuda" if on_gpu else "cpu"
        pushed = lambda: ((n, p.detach().to(device=device, dtype=push_dtype)) for n, p in model.named_parameters())
        port = free_port()
        world_size = 1 + engine.num_workers
        join = lambda: engine.join_weight_group(
            "127.0.0.1", port, rank_offset=1, world_size=world_size, group_name="weights/0", timeout_s=60
        )
        backend = "nccl" if on_gpu else "gloo"
        sender, _ = with_peers(
            [join],
            lambda: WeightSender(
                "127.0.0.1", port, world_size, backend=backend, timeout_s=60, bucket_bytes=bucket_bytes
            ),
        )
        stats, versions = with_peers([engine.apply_weights], lambda: sender.push(pushed(), 1))
        assert versions == [1]
        print(
            f"push: {stats.num_tensors} tensors, {stats.num_bytes / 2**20:.2f} MiB in {stats.num_buckets} "
            f"buckets, {stats.seconds:.3f} s"
        )
        after = engine.score(sequences)
        moved = max_abs_diff(before, after)
        diff = max_abs_diff(after, expected)
        engine.leave_weight_group()
        sender.close()
    finally:
        engine.shutdown()
    if moved <= 10 * tolerance:
        raise RuntimeError(f"the push did not change vLLM's log-probs (max change {moved:.3g})")
    print(f"max_abs_logprob_diff: {diff:.3g}")
    return diff


def builtin_model_path(model_path: str) -> str:
    """`builtin:tiny` -> the tiny model's directory (built on first use); any other path as is."""
    if model_path != "builtin:tiny":
        return model_path
    from learner.tiny_model import build_tiny_model, default_tiny_model_dir

    return str(build_tiny_model(default_tiny_model_dir()))


def cmd_weight_sync(
    model_path: str,
    tolerance: float | None = None,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    dtype: str = "float32",
) -> int:
    """CLI entry of `vapo doctor weight-sync --model PATH`: 0 when parity holds within `tolerance` (the dtype's
    by default), else 1."""
    diff = weight_sync_doctor(
        builtin_model_path(model_path), tolerance=tolerance, seed=seed, tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
    )
    return 0 if diff <= (TOLERANCES[dtype] if tolerance is None else tolerance) else 1
