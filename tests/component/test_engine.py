"""actors.engine on the real vLLM CPU engine: group sampling, behavior log-probs and scoring vs transformers.

The reference is a transformers forward pass of the weights the engine holds (float32), so the
log-prob of every sampled token must agree to ~1e-4 at temperature 1, and at temperature T with
logits / T (the engine reports the sampling distribution's log-probs).
"""

from __future__ import annotations

import numpy as np
import pytest

from deploy.doctor import fixed_sequences, hf_logprobs

TOL = 1e-4
EOS = 1
PROMPTS = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [20]]


def _response_logprobs(reference, prompt: list[int], token_ids: np.ndarray, temperature: float) -> np.ndarray:
    full = hf_logprobs(reference, [prompt + token_ids.tolist()], temperature)[0]
    return full[len(prompt) - 1 :]


def test_group_sampling_gives_g_samples_with_one_behavior_logprob_per_token(random_engine) -> None:
    groups = random_engine.engine.generate(PROMPTS, n=4, temperature=1.0, max_tokens=24, seed=1)
    assert len(groups) == len(PROMPTS) and all(len(g) == 4 for g in groups)
    worst = 0.0
    for prompt, group in zip(PROMPTS, groups, strict=True):
        assert len({tuple(s.token_ids.tolist()) for s in group}) > 1, "the samples of a group are all equal"
        for s in group:
            assert s.token_ids.dtype == np.int32 and s.logprobs.dtype == np.float32
            assert 1 <= len(s.token_ids) == len(s.logprobs) <= 24
            assert np.all(np.isfinite(s.logprobs)) and np.all(s.logprobs <= 0)
            assert s.finish_reason in ("stop", "length")
            assert (s.finish_reason == "length") == (len(s.token_ids) == 24 and s.token_ids[-1] != EOS)
            expected = _response_logprobs(random_engine.reference, prompt, s.token_ids, 1.0)
            worst = max(worst, float(np.max(np.abs(s.logprobs - expected))))
    print(f"max_abs_logprob_diff(temperature=1): {worst:.3g}")
    assert worst < TOL


def test_behavior_logprobs_follow_the_sampling_temperature(random_engine) -> None:
    temperature = 0.6
    groups = random_engine.engine.generate(PROMPTS[:2], n=3, temperature=temperature, max_tokens=16, seed=2)
    worst, gap = 0.0, 0.0
    for prompt, group in zip(PROMPTS[:2], groups, strict=True):
        for s in group:
            expected = _response_logprobs(random_engine.reference, prompt, s.token_ids, temperature)
            at_t1 = _response_logprobs(random_engine.reference, prompt, s.token_ids, 1.0)
            worst = max(worst, float(np.max(np.abs(s.logprobs - expected))))
            gap = max(gap, float(np.max(np.abs(s.logprobs - at_t1))))
    print(f"max_abs_logprob_diff(temperature={temperature}): {worst:.3g}; gap to temperature 1: {gap:.3g}")
    assert worst < TOL
    assert gap > 100 * TOL  # the check above can tell the two distributions apart


def test_seeded_generation_repeats_and_stop_strings_end_samples(random_engine) -> None:
    engine = random_engine.engine
    first = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=16, seed=7)
    again = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=16, seed=7)
    assert [[s.token_ids.tolist() for s in g] for g in first] == [[s.token_ids.tolist() for s in g] for g in again]
    stopped = engine.generate(PROMPTS, n=4, temperature=1.0, max_tokens=64, stop=["a", "e"], seed=3)
    samples = [s for g in stopped for s in g]
    assert all("a" not in s.text and "e" not in s.text for s in samples)
    assert any(s.finish_reason == "stop" and s.token_ids[-1] != EOS for s in samples)
    assert all(len(s.token_ids) == len(s.logprobs) for s in samples)


def test_text_decoded_after_generation_equals_vllms_detokenizer(random_engine) -> None:
    # Without stop strings the engine skips vLLM's detokenizer and decodes each response once; a stop
    # string that cannot occur keeps vLLM's detokenizer on the same seeded samples: the texts must agree.
    engine = random_engine.engine
    decoded = engine.generate(PROMPTS, n=3, temperature=1.0, max_tokens=32, seed=5)
    detokenized = engine.generate(PROMPTS, n=3, temperature=1.0, max_tokens=32, stop=["\x00never\x00"], seed=5)
    pairs = [(a, b) for ga, gb in zip(decoded, detokenized, strict=True) for a, b in zip(ga, gb, strict=True)]
    assert all(a.token_ids.tolist() == b.token_ids.tolist() for a, b in pairs)
    assert all(np.array_equal(a.logprobs, b.logprobs) for a, b in pairs)
    assert [a.text for a, _ in pairs] == [b.text for _, b in pairs]
    assert any(a.text for a, _ in pairs) and any(a.token_ids[-1] == EOS for a, _ in pairs)


def test_many_prompts_in_one_call(random_engine) -> None:
    prompts = [[3 + i % 40, 4 + i % 30] for i in range(48)]
    groups = random_engine.engine.generate(prompts, n=2, temperature=1.0, max_tokens=8, seed=0)
    assert len(groups) == 48 and all(len(g) == 2 and all(len(s.token_ids) >= 1 for s in g) for g in groups)


def test_score_matches_transformers(random_engine) -> None:
    sequences = fixed_sequences(random_engine.reference.config.vocab_size, seed=11)
    got = random_engine.engine.score(sequences)
    expected = hf_logprobs(random_engine.reference, sequences)
    assert [g.shape for g in got] == [(len(s) - 1,) for s in sequences]
    worst = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected, strict=True))
    print(f"score max_abs_logprob_diff: {worst:.3g}")
    assert worst < TOL


def test_bad_arguments_are_rejected(random_engine) -> None:
    with pytest.raises(ValueError, match="n and max_tokens"):
        random_engine.engine.generate(PROMPTS, n=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        random_engine.engine.score([[3]])


def test_vllms_ipc_socket_files_live_in_the_engines_own_directory(random_engine) -> None:
    import os
    import stat

    ipc_dir = random_engine.engine.ipc_dir
    assert ipc_dir.name.startswith(f"vapo-vllm-{os.getpid()}-")
    sockets = [p for p in ipc_dir.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)]
    assert sockets, f"vLLM created no IPC socket in {ipc_dir}"
    assert "VLLM_RPC_BASE_PATH" not in os.environ  # set only while the engine started


def test_sweep_removes_the_ipc_directories_of_dead_processes_only(tmp_path) -> None:
    import subprocess
    import sys

    from actors.engine import private_ipc_dir, sweep_ipc_dirs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    gone = tmp_path / f"vapo-vllm-{int(dead.stdout)}-abc"
    gone.mkdir()
    (gone / "socket-file").touch()
    other = tmp_path / "vapo-vllm-notapid"
    other.mkdir()
    mine = private_ipc_dir(tmp_path)  # sweeps first
    assert not gone.exists() and other.is_dir() and mine.is_dir()
    assert sweep_ipc_dirs(tmp_path) == [] and mine.is_dir()  # this process is alive


def test_cpu_thread_binding_gives_each_tensor_parallel_worker_its_own_cores() -> None:
    from actors.engine import cpu_thread_binding

    assert cpu_thread_binding([1, 0], 2) == "0|1"
    assert cpu_thread_binding(list(range(16)), 2) == "0-7|8-15"
    assert cpu_thread_binding(list(range(10)), 4) == "0-2|3-5|6-7|8-9"  # the first workers take the remainder
    assert cpu_thread_binding([0, 2, 3, 5], 2) == "0,2|3,5"  # cores with gaps are listed
    with pytest.raises(ValueError, match="need as many cores"):
        cpu_thread_binding([0, 1], 4)
