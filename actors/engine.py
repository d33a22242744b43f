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
- `score` uses prompt log-probs (`prompt_logprobs=0`), which vLLM computes at temperature 1
  whatever the mode; it is the parity probe against a transformers forward pass.
- After every weight update the prefix cache is reset: cached KV blocks were computed with
  the old weights and would otherwise be reused for prompts that share a prefix.
- On CPU, `gpu_memory_utilization` is vLLM's share of the NUMA node's memory minus what the
  worker already holds, which is easy to get wrong on small machines; `kv_cache_memory_bytes`
  sets the KV cache size directly and takes precedence.
- vLLM starts its engine core and workers as processes, so any script that builds an Engine
  needs the `if __name__ == "__main__":` guard.

Weight updates go through the receiver (`join_weight_group`, `apply_weights`,
`leave_weight_group`); those calls block until the learner's `WeightSender` takes part, so
the actor loop calls them when the learner announces a group or a version.

Must not import learner or deploy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

RECEIVER_CLS = "actors.weight_receiver.WeightReceiver"


@dataclass
class Sample:
    """One sampled response: its tokens, their behavior log-probs [T], why it stopped, and its text."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    text: str


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
        self.llm = LLM(
            model=str(model_path),
            seed=seed,
            dtype=dtype,  # type: ignore[arg-type]  # vLLM types it as a Literal of dtype names
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_num_seqs=max_num_seqs,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=RECEIVER_CLS,
        )

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
    ) -> list[list[Sample]]:
        """Sample n responses per prompt (one vLLM call for all prompts); one list of n Samples per prompt."""
        if n < 1 or max_tokens < 1:
            raise ValueError(f"n and max_tokens must be positive; got n={n}, max_tokens={max_tokens}")
        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop, seed=seed, logprobs=0
        )
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[_to_sample(c) for c in out.outputs] for out in outputs]

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
        """Receive and apply one push in every worker, reset the prefix cache; returns the policy version."""
        try:
            results = self.llm.collective_rpc("receive_weights")
        finally:  # even a failed push may have changed some weights
            self.llm.reset_prefix_cache()
        versions = {int(r["policy_version"]) for r in results}
        assert len(versions) == 1, f"workers applied different versions {versions}"
        self.last_push = results[0]
        return versions.pop()

    def leave_weight_group(self) -> None:
        """Leave the broadcast group (before re-joining a rebuilt one)."""
        self.llm.collective_rpc("close_weight_group")

    def shutdown(self) -> None:
        """Stop the engine core and its workers."""
        self.llm.llm_engine.engine_core.shutdown()  # LLM has no public shutdown in this vLLM


def _to_sample(completion) -> Sample:  # vllm.outputs.CompletionOutput
    token_ids = np.asarray(completion.token_ids, dtype=np.int32)
    entries = completion.logprobs
    assert entries is not None and len(entries) == len(token_ids)
    logprobs = np.array([e[int(t)].logprob for e, t in zip(entries, token_ids, strict=True)], dtype=np.float32)
    return Sample(token_ids, logprobs, completion.finish_reason, completion.text)
