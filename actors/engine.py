"""The actor's vLLM engine: group sampling with behavior log-probs, scoring, and in-place weight updates.

Owns one `vllm.LLM` (the only other vllm importer is `actors.weight_receiver`, whose
`WeightReceiver` this engine installs as vLLM's `worker_extension_cls`). One `generate` call
takes every prompt of a lease at once, so vLLM's scheduler batches them and the engine stays
saturated; each prompt gets n samples (a group).

Decisions:
- Behavior log-probs: the engine runs with `logprobs_mode="processed_logprobs"` and asks for
  `SamplingParams(logprobs=0)`, which returns exactly the sampled token's log-prob, computed
  on the distribution the token was actually drawn from (after temperature, top-k and top-p;
  vLLM's default `raw_logprobs` would report the temperature-1 distribution instead). That is
  the behavior policy PPO's importance ratios need. The learner must therefore compute
  `old_logprobs` on logits / temperature; with top_p or top_k below their neutral values the
  truncation renormalises the distribution as well, which the learner does not reproduce, so
  RL runs keep top_p = 1 and top_k off (at temperature 1 both modes agree).
- Output cost: on a small model vLLM's front-end process, not the model, limits tokens/s (it
  handles every sampled token of every sequence). `generate` therefore asks for flat log-probs
  (`flat_logprobs`: a few lists per request instead of a dict and a `Logprob` object per token)
  and, when there are no stop strings, `detokenize=False`: no incremental detokenization and no
  decoding of each log-prob's token; the actor decodes each response once when it ends
  (`skip_special_tokens`, as vLLM's detokenizer). Stop strings need vLLM's detokenizer, so a
  call with `stop` keeps it. On the tiny model at 256 sequences a decode step went from ~62-69
  to ~39-49 ms (2 cores, load ~4.5).
- Tensor parallelism uses vLLM's multiprocessing executor (`distributed_executor_backend="mp"`),
  named explicitly: left to choose, vLLM 0.32 picks its Ray executor whenever the process runs in
  a Ray placement group, as every actor does (`deploy.ray_actors`), and that executor rejects a
  bundle of more than one GPU (and does not exist on CPU). The workers are this process's
  children and use the devices Ray gave the actor (its one bundle of `tensor_parallel_size` GPUs).
  On CPU each worker gets its own run of this process's cores (`cpu_thread_binding`) unless
  `VLLM_CPU_OMP_THREADS_BIND` is set: vLLM's automatic binding gives each worker a NUMA node and
  refuses TP 2 on a one-node machine.
- `score` uses prompt log-probs (`prompt_logprobs=0`), which vLLM computes at temperature 1
  whatever the mode; it is the parity probe against a transformers forward pass.
- After every weight update the prefix cache is reset: cached KV blocks were computed with
  the old weights and would otherwise be reused for prompts that share a prefix. vLLM refuses
  that reset while requests hold blocks, so an update in the middle of a round marks the cache
  stale and the round resets it when its last request is done (and every `generate` checks
  before adding requests): stale blocks never serve a later round.
- Updates in the middle of a round (`generate(..., between_steps=...)`, `actors.update_mode=
  during`): the requests go in with `LLM.enqueue` and this thread drives `LLMEngine.step()`
  itself, calling `between_steps` after each step. vLLM's engine core runs in its own process
  and keeps stepping meanwhile, so an `apply_weights` called from there first pauses it
  (`sleep(level=0, mode="keep")`: scheduling stops between two core steps, requests keep their
  KV cache), receives the push, labels the weights with `set_weight_version(str(version))` and
  resumes (`wake_up(["scheduling"])`). The core stamps every step's output with the label it
  had, and vLLM turns that into per-response spans (`CompletionOutput.weight_versions`), so
  each Sample gets the version that sampled each of its tokens. The round's label is set, and
  its requests added, under one such pause, so they enter the scheduler together (the core
  would otherwise start on the first before the last arrives).
- In-flight requests continue from the KV cache the old weights computed (as PipelineRL's
  in-flight updates do): a token sampled after the switch comes from the new weights attending
  to that cached prefix, and its behavior log-prob is exactly that distribution's; a request
  of the same round that starts after the switch (it waited for a slot) may likewise reuse
  prompt blocks the old weights cached. The learner recomputes `old_logprobs` over the whole
  sequence with its own weights, and the truncated importance weight corrects the difference
  as it corrects any staleness. `between_steps` returning False (a push failed, the weights
  are unusable) aborts the round's requests; `generate` then returns an empty list.
- On CPU, `gpu_memory_utilization` is vLLM's share of the NUMA node's memory minus what the
  worker already holds, which is easy to get wrong on small machines; `kv_cache_memory_bytes`
  sets the KV cache size directly and takes precedence.
- vLLM starts its engine core and workers as processes, so any script that builds an Engine
  needs the `if __name__ == "__main__":` guard.
- vLLM's processes talk over ZeroMQ IPC sockets whose files it creates in
  `VLLM_RPC_BASE_PATH` (default the temp directory) and never removes: 7 files per engine,
  clean shutdown or not (about 770 had gathered in /tmp over a few days of tests and runs).
  Each Engine therefore gives vLLM a directory of its own, `<base>/vapo-vllm-<pid>-*`
  (`private_ipc_dir`; base: a `VLLM_RPC_BASE_PATH` the user set, else the temp directory),
  removed at `shutdown` or when the process exits; the directories of processes that died
  without either (SIGKILL) are removed by the next Engine on the host.

Weight updates go through the receiver (`join_weight_group`, `apply_weights`,
`leave_weight_group`); those calls block until the learner's `WeightSender` takes part, so
the actor loop calls them when the learner announces a group or a version.

Must not import learner or deploy.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.logprobs import FlatLogprobs
from vllm.platforms import current_platform

RECEIVER_CLS = "actors.weight_receiver.WeightReceiver"
IPC_DIR_PREFIX = "vapo-vllm-"
_IPC_DIR = re.compile(re.escape(IPC_DIR_PREFIX) + r"(\d+)-")
_IPC_ENV = "VLLM_RPC_BASE_PATH"
_CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def sweep_ipc_dirs(root: str | Path | None = None) -> list[Path]:
    """Remove the IPC directories (`<root>/vapo-vllm-<pid>-*`) whose process is gone; returns them."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(IPC_DIR_PREFIX + "*"):
        match = _IPC_DIR.match(path.name)
        if match and path.is_dir() and not psutil.pid_exists(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def cpu_thread_binding(cores: list[int], workers: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `workers` tensor-parallel CPU workers: `cores` split into that many
    disjoint, near-equal runs (`[0..15]`, 2 -> `0-7|8-15`). vLLM's own `auto` binding splits by NUMA
    node and refuses more workers than nodes, the usual case on one socket."""
    cores = sorted(cores)
    if workers > len(cores):
        raise ValueError(f"{workers} tensor-parallel CPU workers need as many cores; this process may use {cores}")
    size, extra = divmod(len(cores), workers)
    parts, start = [], 0
    for w in range(workers):
        chunk = cores[start : start + size + (w < extra)]
        start += len(chunk)
        contiguous = chunk[-1] - chunk[0] == len(chunk) - 1
        parts.append(str(chunk[0]) if len(chunk) == 1 else f"{chunk[0]}-{chunk[-1]}" if contiguous
                     else ",".join(map(str, chunk)))
    return "|".join(parts)


def private_ipc_dir(root: str | Path | None = None) -> Path:
    """A new directory of this process for vLLM's IPC socket files (see the module note), after a sweep."""
    sweep_ipc_dirs(root)
    path = Path(tempfile.mkdtemp(prefix=f"{IPC_DIR_PREFIX}{os.getpid()}-", dir=root))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@dataclass
class Sample:
    """One sampled response: its tokens, their behavior log-probs [T], why it stopped, and its text."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    text: str
    token_versions: np.ndarray | None = None
    """[T] int32: the policy version that sampled each token (rounds with `between_steps`); None otherwise."""


class Engine:
    """A vLLM engine with the weight receiver installed in its workers."""

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int = 256,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
    ) -> None:
        self.tensor_parallel_size = tensor_parallel_size
        self.last_push: dict[str, float] = {}
        """What the last applied push moved, as worker 0 reports it (version, counts, seconds)."""
        self.paused_seconds = 0.0
        """Seconds the engine core spent paused for updates in the middle of rounds, in total."""
        self._in_round = False  # a stepped round is running: updates pause the core and defer the cache reset
        self._stale_prefix_cache = False
        self._tokenizer = None  # vLLM's, fetched on first use
        self.ipc_dir = private_ipc_dir(os.environ.get(_IPC_ENV))
        env = {_IPC_ENV: str(self.ipc_dir)}  # read here and by the engine core and workers as they start
        if tensor_parallel_size > 1 and current_platform.is_cpu() and not os.environ.get(_CPU_BIND_ENV):
            env[_CPU_BIND_ENV] = cpu_thread_binding(sorted(os.sched_getaffinity(0)), tensor_parallel_size)
        previous = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            self.llm = LLM(
                model=str(model_path),
                seed=seed,
                dtype=dtype,  # type: ignore[arg-type]  # vLLM types it as a Literal of dtype names
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                max_num_seqs=max_num_seqs,
                tensor_parallel_size=tensor_parallel_size,
                distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
                enforce_eager=enforce_eager,
                max_model_len=max_model_len,
                logprobs_mode="processed_logprobs",
                worker_extension_cls=RECEIVER_CLS,
            )
        except BaseException:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
            raise
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    @property
    def num_workers(self) -> int:
        """vLLM workers of this engine, each one rank of the weight group."""
        return self.tensor_parallel_size

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        stop: list[str] | None = None,
        seed: int | None = None,
        between_steps: Callable[[], bool] | None = None,
        version: int | None = None,
    ) -> list[list[Sample]]:
        """Sample n responses per prompt (one vLLM call for all prompts); one list of n Samples per prompt.

        With `between_steps`, the engine is stepped here and `between_steps()` runs between two steps
        (it may call `apply_weights`); `version` labels the weights the round starts with, and each
        Sample carries its `token_versions`. An empty list means `between_steps` abandoned the round.
        """
        if n < 1 or max_tokens < 1:
            raise ValueError(f"n and max_tokens must be positive; got n={n}, max_tokens={max_tokens}")
        if between_steps is not None and version is None:
            raise ValueError("generate with between_steps needs the version of the weights the round starts with")
        self._reset_stale_prefix_cache()
        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop, seed=seed, logprobs=0,
            flat_logprobs=True, detokenize=bool(stop),  # see the module docstring: output cost
        )
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        if between_steps is None:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        else:
            assert version is not None
            outputs = self._generate_stepped(prompts, params, version, between_steps)
        decode = None if params.detokenize else self._decode
        with_versions = between_steps is not None
        return [[_to_sample(c, decode, with_versions=with_versions) for c in out.outputs] for out in outputs]

    def _decode(self, token_ids: np.ndarray) -> str:
        """A response's text, as vLLM's detokenizer gives it (special tokens skipped)."""
        if self._tokenizer is None:
            self._tokenizer = self.llm.get_tokenizer()
        return self._tokenizer.decode(token_ids.tolist(), skip_special_tokens=True)

    def _generate_stepped(self, prompts: list[TokensPrompt], params: SamplingParams, version: int,
                          between_steps: Callable[[], bool]) -> list:  # list[vllm.RequestOutput]
        """Drive the engine step by step, calling `between_steps` in between; [] when it abandons the round."""
        engine = self.llm.llm_engine
        assert not engine.has_unfinished_requests(), "another round is still running in this engine"
        self.llm.sleep(level=0, mode="keep")  # the requests reach the scheduler together, under this round's label
        try:
            engine.set_weight_version(str(version))
            request_ids = self.llm.enqueue(prompts, params, use_tqdm=False)
        finally:
            self.llm.wake_up(tags=["scheduling"])
        finished = []
        self._in_round = True
        try:
            while engine.has_unfinished_requests():
                finished += [out for out in engine.step() if out.finished]
                if engine.has_unfinished_requests() and not between_steps():
                    return []  # the next generate resets the prefix cache (the aborts reach the core first)
        finally:
            self._in_round = False
            if engine.has_unfinished_requests():  # abandoned, or between_steps raised: no request outlives its round
                engine.abort_request(request_ids, internal=True)
        self._reset_stale_prefix_cache()
        assert len(finished) == len(prompts), f"{len(finished)} of {len(prompts)} requests finished"
        return sorted(finished, key=lambda out: int(out.request_id))  # prompt order, as LLM.generate returns

    def score(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """Log-prob of each token after the first under the current weights, at temperature 1: [T - 1] each."""
        if any(len(s) < 2 for s in sequences):
            raise ValueError("every sequence to score needs at least 2 tokens")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        scores = []
        for seq, out in zip(sequences, outputs, strict=True):
            entries = out.prompt_logprobs
            assert entries is not None and len(entries) == len(seq) and entries[0] is None
            values = []
            for entry, token in zip(entries[1:], seq[1:], strict=True):
                assert entry is not None and token in entry
                values.append(entry[token].logprob)
            scores.append(np.array(values, dtype=np.float32))
        return scores

    def join_weight_group(
        self,
        master_addr: str,
        master_port: int,
        *,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "gloo",
        timeout_s: float = 120.0,
    ) -> list[int]:
        """Join the learner's broadcast group; worker w becomes rank rank_offset + w. Returns the ranks."""
        args = (master_addr, master_port, rank_offset, world_size, backend, timeout_s, group_name)
        return self.llm.collective_rpc("init_weight_group", args=args)

    def apply_weights(self) -> int:
        """Receive and apply one push in every worker, reset the prefix cache; returns the policy version.

        During a stepped round the engine core is paused around the push (requests keep their KV
        cache), the new weights are labelled with their version, and the cache reset waits for the
        round's end.
        """
        if not self._in_round:
            return self._receive_weights()
        t0 = time.perf_counter()
        self.llm.sleep(level=0, mode="keep")
        try:
            version = self._receive_weights()
            self.llm.llm_engine.set_weight_version(str(version))
            return version
        finally:
            self.llm.wake_up(tags=["scheduling"])
            self.paused_seconds += time.perf_counter() - t0

    def _receive_weights(self) -> int:
        try:
            results = self.llm.collective_rpc("receive_weights")
        finally:  # even a failed push may have changed some weights
            self._stale_prefix_cache = True
            if not self._in_round:
                self._reset_stale_prefix_cache()
        versions = {int(r["policy_version"]) for r in results}
        assert len(versions) == 1, f"workers applied different versions {versions}"
        self.last_push = results[0]
        return versions.pop()

    def _reset_stale_prefix_cache(self) -> None:
        """Drop the cached KV blocks of earlier weights; only possible while no request holds blocks."""
        if self._stale_prefix_cache:
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset the prefix cache with no round running")
            self._stale_prefix_cache = False

    def leave_weight_group(self) -> None:
        """Leave the broadcast group (before re-joining a rebuilt one)."""
        self.llm.collective_rpc("close_weight_group")

    def shutdown(self) -> None:
        """Stop the engine core and its workers, and remove their IPC socket files."""
        try:
            self.llm.llm_engine.engine_core.shutdown()  # LLM has no public shutdown in this vLLM
        finally:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


def _to_sample(completion, decode: Callable[[np.ndarray], str] | None = None, *,
               with_versions: bool = False) -> Sample:  # completion: vllm.outputs.CompletionOutput
    """A Sample from vLLM's output; `decode` gives the text when vLLM did not detokenize."""
    token_ids = np.asarray(completion.token_ids, dtype=np.int32)
    logprobs = _sampled_logprobs(completion.logprobs, token_ids)
    versions = _token_versions(completion.weight_versions, len(token_ids)) if with_versions else None
    text = completion.text if decode is None else decode(token_ids)
    return Sample(token_ids, logprobs, completion.finish_reason, text, versions)


def _sampled_logprobs(entries, token_ids: np.ndarray) -> np.ndarray:  # entries: vllm.logprobs.FlatLogprobs
    """[T] float32: the sampled token's log-prob at each position (`logprobs=0`: one entry per position)."""
    assert isinstance(entries, FlatLogprobs), "generate asks for flat_logprobs"
    assert len(entries) == len(token_ids) and len(entries.logprobs) == len(token_ids), "one entry per token"
    assert np.array_equal(np.asarray(entries.token_ids, dtype=np.int32), token_ids), "entries of other tokens"
    return np.asarray(entries.logprobs, dtype=np.float32)


def _token_versions(spans, num_tokens: int) -> np.ndarray:  # list[vllm.outputs.WeightVersionSpan] | None
    """[T] int32 versions from vLLM's spans of tokens sampled under each weight label (our labels are versions)."""
    versions = np.empty(num_tokens, dtype=np.int32)
    if num_tokens == 0:
        return versions
    assert spans, "vLLM reported no weight version for these tokens"
    assert spans[0].start == 0 and spans[-1].end == num_tokens, f"spans {spans} do not cover {num_tokens} tokens"
    for span, after in zip(spans, spans[1:] + [None], strict=True):
        assert after is None or after.start == span.end, f"spans {spans} are not contiguous"
        versions[span.start : span.end] = int(span.version)
    return versions
