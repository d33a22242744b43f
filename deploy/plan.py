"""`vapo plan CONFIG [key=value ...]`: the memory a run needs per learner GPU (rank) and per actor, term
by term, against `deploy.gpu_memory_gb`, before anything starts.

Owns: the model's shape (from its Hugging Face `config.json`, never its weights; the Qwen2.5
0.5B/7B/32B shapes are built in so the presets plan offline), the arithmetic of each term (pure
functions of the shape and a few numbers, tested in closed form in `tests/unit/test_plan.py`), and
the report. Imports no torch.distributed, vllm or ray; transformers only to read a local
`config.json`, and the tiny model's builder only for `builtin:tiny`'s configuration (nothing is
trained or written).

The learner rank (FSDP2 shards every parameter, gradient and optimiser state evenly over
`learner.num_ranks`; `learner.model.shard`, `learner.main.build_learner`):
- policy and value model (the value model only with `algo.uses_critic`): float32 master weights,
  float32 gradients and AdamW's two float32 states, 16 bytes per parameter over the world size;
- the reference policy (only with `algo.kl_coef > 0`): never optimised, so no float32 masters,
  gradients or optimiser; `build_learner` holds it in `model.dtype`, sharded: b bytes per parameter
  over the world size;
- FSDP's unsharded copies in `model.dtype`: the decoder block being computed plus the one prefetched,
  and the root unit (embeddings, final norm, untied head), which stays gathered from the root's
  forward to the end of its backward, with its unsharded gradient (in a tied model with a 152k
  vocabulary the root is the largest unit: 0.5B's is 136M parameters);
- activations of one micro-batch of `learner.micro_batch_tokens` tokens, or of the longest sequence
  (`rollout.max_prompt_tokens + rollout.max_new_tokens`) when that is longer: the token-budget plan
  gives such a sequence a micro-batch of its own (`learner.batch`) (policy and value model
  back-propagate one after the other, so one model's): without `model.gradient_checkpointing`
  every block's saved tensors; with it each block's input plus one block recomputed in the
  backward. Per token and block (the tensors Qwen2/Llama blocks under transformers save, b bytes
  of `model.dtype`): the two RMSNorms' float32 inputs and their outputs (2 x (4H + 2bH)), the
  rotated queries and the expanded keys and values (3bH), the attention output and its
  contiguous copy (2bH), and the MLP's gate, up, SiLU and product (4bI): 8H + 9bH + 4bI;
- the attention mask: a boolean [rows, 1, T, T] shared by every block, and each block's copy in
  `model.dtype` that SDPA saves, with rows x T^2 <= micro_batch_tokens x min(longest sequence,
  micro_batch_tokens / 2) (a micro-batch of one sequence has no padding and gets no mask);
- the chunked log-prob head (`learner.algo.logprobs`): a float32 copy of a low-precision head
  weight and the float32 gradient accumulator (V x H each), and about three float32
  [logprob_chunk_tokens, V] buffers at its peak;
- on CUDA a fixed allowance for the CUDA context, NCCL's buffers and allocator fragmentation. The
  CPU case has none: its figures are memory above the process's baseline (the torch runtime),
  which is what `bench/learner_memory.py` compares with.
The terms are summed although some never coexist (the log-prob head's buffers live only around the
head, the recomputed block only in the backward pass): the total is an upper estimate. On CPU it was
1.035 x the measured peak (`bench/learner_memory.py`; the issue asks for 25%).

An actor (one vLLM engine over `actors.tensor_parallel_size` GPUs, per GPU): the weights in
`model.dtype` divided by the tensor-parallel size, vLLM's profiled forward peak, and the KV cache,
which is what remains of `actors.gpu_memory_utilization` x `deploy.gpu_memory_gb` (vLLM sizes it
so); the report states how many tokens it holds (2 x layers x KV heads per GPU x head_dim x dtype
bytes per token). vLLM refuses to start when the cache cannot hold one sequence of
`rollout.max_prompt_tokens + rollout.max_new_tokens`, so the plan fails then too.

Failure: exits 1 with one line naming what does not fit and its largest term (`deploy/cli.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import VapoConfig

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_RUNTIME_BYTES = 2 * GIB
"""CUDA context, NCCL's communication buffers and the caching allocator's fragmentation, per learner GPU."""
VLLM_BATCHED_TOKENS = 8192
"""Tokens of the forward pass vLLM profiles at start-up (its default max_num_batched_tokens with chunked prefill)."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only causal LM (Qwen2 / Llama layout: GQA attention, SwiGLU MLP, RMSNorm)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tied: bool
    """Input and output embeddings share one matrix."""
    head_dim: int = 0
    """0: hidden_size // num_heads."""
    qkv_bias: bool = True
    """q, k and v projections have biases (Qwen2), or not (Llama)."""

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def block_params(self) -> int:
        """Parameters of one decoder block: attention (q, k, v, their biases, o), MLP (gate, up, down), two norms."""
        h, q, kv = self.hidden_size, self.num_heads * self.dim, self.num_kv_heads * self.dim
        attention = h * (q + 2 * kv) + (q + 2 * kv) * self.qkv_bias + q * h
        return attention + 3 * h * self.intermediate_size + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def root_params(self) -> int:
        """The root FSDP unit of the policy: input embedding, final norm and (untied) output head."""
        return self.embedding_params * (1 if self.tied else 2) + self.hidden_size

    @property
    def num_params(self) -> int:
        """Parameters of the causal LM (a tied matrix counted once)."""
        return self.num_layers * self.block_params + self.root_params

    @property
    def value_params(self) -> int:
        """The value model: the backbone (no output head) and a scalar head with a bias."""
        return self.num_layers * self.block_params + self.embedding_params + 2 * self.hidden_size + 1


def _qwen2_5(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> ModelShape:
    return ModelShape(vocab, hidden, inter, layers, heads, kv, tied)


# The public config.json values of huggingface.co/Qwen/Qwen2.5-{0.5B,7B,32B} (the -Instruct models share them).
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-0.5B": _qwen2_5(896, 4864, 24, 14, 2, 151936, tied=True),
    "Qwen/Qwen2.5-7B": _qwen2_5(3584, 18944, 28, 28, 4, 152064, tied=False),
    "Qwen/Qwen2.5-32B": _qwen2_5(5120, 27648, 64, 40, 8, 152064, tied=False),
}


def shape_from_hf_config(config: Any) -> ModelShape:
    """The shape of a transformers `PretrainedConfig` (or anything with its attribute names)."""
    return ModelShape(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        head_dim=getattr(config, "head_dim", None) or 0,
        qkv_bias=bool(getattr(config, "attention_bias", config.model_type == "qwen2")),
    )


def model_shape(path: str) -> ModelShape:
    """The shape of `model.path`: a local directory's config.json, a built-in shape, or `builtin:tiny`."""
    if path == "builtin:tiny":
        from learner.tiny_model import TinyModelSpec, build_config, build_tokenizer

        return shape_from_hf_config(build_config(TinyModelSpec(), build_tokenizer()))
    if Path(path, "config.json").is_file():
        from transformers import AutoConfig

        return shape_from_hf_config(AutoConfig.from_pretrained(path))
    known = KNOWN_SHAPES.get(path.removesuffix("-Instruct"))
    if known is None:
        raise ValueError(
            f"model.path {path!r}: no config.json there, and not a built-in shape "
            f"({', '.join(KNOWN_SHAPES)}); give a local directory"
        )
    return known


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    note: str = ""


# ---- the learner rank -------------------------------------------------------------------


def sharded_state_bytes(num_params: int, world: int, *, trained: bool) -> float:
    """Float32 master weights (+ float32 gradients and AdamW's two float32 states when `trained`) of one rank."""
    return (16 if trained else 4) * num_params / world


def block_activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> float:
    """Saved tensors of one decoder block at `tokens` tokens: (8H + 9bH + 4bI) bytes per token (module docstring)."""
    h, i, b = shape.hidden_size, shape.intermediate_size, dtype_bytes
    return tokens * (8 * h + 9 * b * h + 4 * b * i)


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, *, checkpointing: bool) -> float:
    """One model's activations at `tokens` tokens: every block's, or (checkpointing) every block's input plus
    one block recomputed; and the final norm and the hidden states the log-prob head keeps."""
    block = block_activation_bytes(shape, tokens, dtype_bytes)
    head_input = tokens * (4 + 3 * dtype_bytes) * shape.hidden_size
    if checkpointing:
        return shape.num_layers * tokens * shape.hidden_size * dtype_bytes + block + head_input
    return shape.num_layers * block + head_input


def attention_mask_bytes(
    shape: ModelShape, tokens: int, longest: int, dtype_bytes: int, *, checkpointing: bool
) -> float:
    """The boolean [rows, 1, T, T] mask and the copies in the compute dtype SDPA saves: rows x T <= tokens, and
    rows >= 2 (one sequence has no padding, and transformers passes SDPA no mask for it), so T <= tokens / 2."""
    saved = 1 if checkpointing else shape.num_layers
    return tokens * min(longest, tokens // 2) * (1 + saved * dtype_bytes)


def logprob_head_bytes(shape: ModelShape, chunk_tokens: int, dtype_bytes: int) -> tuple[float, float]:
    """(chunk buffers, head copies) of `chunked_logprobs`: three float32 [chunk, V] buffers; the float32 copy of
    a low-precision head weight and the float32 gradient accumulator, V x H each."""
    chunk = 3 * chunk_tokens * shape.vocab_size * 4
    copies = shape.embedding_params * ((4 if dtype_bytes < 4 else 0) + 4)
    return chunk, copies


def learner_terms(
    shape: ModelShape,
    *,
    world: int,
    dtype_bytes: int,
    critic: bool,
    reference: bool,
    micro_batch_tokens: int,
    longest: int,
    checkpointing: bool,
    chunk_tokens: int,
    cuda: bool,
) -> list[Term]:
    """Every term of one learner rank, in bytes (module docstring)."""
    n, nv = shape.num_params, shape.value_params
    models = [("policy", n)] + ([("value", nv)] if critic else [])
    terms = []
    for name, params in models:
        terms += [
            Term(f"{name} parameters", 4 * params / world, f"float32 masters, {params / 1e9:.3f}B / {world}"),
            Term(f"{name} gradients", 4 * params / world, "float32, sharded"),
            Term(f"{name} AdamW states", 8 * params / world, "2 x float32, sharded"),
        ]
    if reference:
        terms.append(Term("reference parameters", dtype_bytes * n / world, "model.dtype, sharded, no gradients"))
    terms += [
        Term("fsdp gathered blocks", 2 * shape.block_params * dtype_bytes, "one computing, one prefetched"),
        Term(
            "fsdp root unit",
            2 * shape.root_params * dtype_bytes,
            "embeddings/norm/head gathered, and their unsharded gradient",
        ),
    ]
    act = activation_bytes(shape, micro_batch_tokens, dtype_bytes, checkpointing=checkpointing)
    how = "checkpointed" if checkpointing else "no checkpointing"
    terms.append(Term("activations", act, f"{micro_batch_tokens} tokens, {shape.num_layers} blocks, {how}"))
    terms.append(
        Term(
            "attention mask",
            attention_mask_bytes(shape, micro_batch_tokens, longest, dtype_bytes, checkpointing=checkpointing),
            f"rows x T^2 <= {micro_batch_tokens} x {min(longest, micro_batch_tokens // 2)}",
        )
    )
    chunk, copies = logprob_head_bytes(shape, chunk_tokens, dtype_bytes)
    terms.append(Term("log-prob chunk", chunk, f"3 x {chunk_tokens} x {shape.vocab_size} float32 logits"))
    terms.append(Term("log-prob head", copies, "float32 weight copy and gradient accumulator"))
    if cuda:
        terms.append(Term("cuda runtime", CUDA_RUNTIME_BYTES, "context, NCCL buffers, fragmentation"))
    return terms


# ---- an actor ---------------------------------------------------------------------------


def kv_bytes_per_token(shape: ModelShape, tp: int, dtype_bytes: int) -> int:
    """KV cache bytes per token on one GPU: 2 x layers x KV heads per GPU x head_dim x dtype bytes (vLLM
    replicates KV heads when there are fewer than GPUs)."""
    return 2 * shape.num_layers * math.ceil(shape.num_kv_heads / tp) * shape.dim * dtype_bytes


def actor_terms(
    shape: ModelShape, *, tp: int, dtype_bytes: int, utilization: float, gpu_bytes: float, max_num_seqs: int
) -> tuple[list[Term], int]:
    """(terms per GPU of one actor, tokens its KV cache holds): weights / tp, the profiled forward peak, and
    the KV cache = utilization x GPU memory minus both (negative when they do not fit)."""
    weights = shape.num_params * dtype_bytes / tp
    h, i = shape.hidden_size, shape.intermediate_size / tp
    forward = VLLM_BATCHED_TOKENS * (4 * h + 2 * i) * dtype_bytes + max_num_seqs * shape.vocab_size * 4
    kv = utilization * gpu_bytes - weights - forward
    tokens = max(0, int(kv // kv_bytes_per_token(shape, tp, dtype_bytes)))
    return [
        Term("vLLM weights", weights, f"{shape.num_params / 1e9:.3f}B x {dtype_bytes} bytes / tp {tp}"),
        Term("vLLM forward peak", forward, f"{VLLM_BATCHED_TOKENS} batched tokens, sampler logits"),
        Term("KV cache", kv, f"{utilization} x {gpu_bytes / GIB:g} GiB minus the above: {tokens} tokens"),
    ], tokens


# ---- the plan of a configuration ----------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    learner: list[Term]
    actor: list[Term]
    """Per GPU of one actor; empty with actors.num_actors = 0."""
    kv_tokens: int
    gpu_bytes: float
    num_ranks: int
    num_actors: int
    tp: int
    shape: ModelShape

    @property
    def learner_bytes(self) -> float:
        return sum(t.bytes for t in self.learner)


def make_plan(cfg: VapoConfig, shape: ModelShape | None = None) -> Plan:
    """The plan of `cfg` (the shape of `cfg.model.path` unless given)."""
    shape = shape or model_shape(cfg.model.path)
    b = DTYPE_BYTES[cfg.model.dtype]
    gpu_bytes = cfg.deploy.gpu_memory_gb * GIB
    longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    learner = learner_terms(
        shape,
        world=cfg.learner.num_ranks,
        dtype_bytes=b,
        critic=cfg.algo.uses_critic,
        reference=cfg.algo.kl_coef > 0,
        micro_batch_tokens=max(cfg.learner.micro_batch_tokens, longest),
        longest=longest,
        checkpointing=cfg.model.gradient_checkpointing,
        chunk_tokens=cfg.learner.logprob_chunk_tokens,
        cuda=cfg.learner.device != "cpu",
    )
    tp = cfg.actors.tensor_parallel_size
    actor, tokens = actor_terms(
        shape,
        tp=tp,
        dtype_bytes=b,
        utilization=cfg.actors.gpu_memory_utilization,
        gpu_bytes=gpu_bytes,
        max_num_seqs=cfg.actors.max_num_seqs,
    )
    return Plan(
        learner,
        actor if cfg.actors.num_actors else [],
        tokens,
        gpu_bytes,
        cfg.learner.num_ranks,
        cfg.actors.num_actors,
        tp,
        shape,
    )


def misfit(plan: Plan, cfg: VapoConfig) -> str | None:
    """One line naming what does not fit (and its largest term), or None when everything fits."""
    limit = f"deploy.gpu_memory_gb={cfg.deploy.gpu_memory_gb:g}"
    if plan.learner_bytes > plan.gpu_bytes:
        top = max(plan.learner, key=lambda t: t.bytes)
        return (
            f"learner rank does not fit: {plan.learner_bytes / GIB:.1f} GiB needed of {limit} "
            f"(largest term: {top.name} {top.bytes / GIB:.1f} GiB, {top.note})"
        )
    if not plan.actor:
        return None
    kv = plan.actor[-1]
    if kv.bytes <= 0:
        top = max(plan.actor[:-1], key=lambda t: t.bytes)
        return (
            f"actor does not fit: weights and forward need more than actors.gpu_memory_utilization="
            f"{cfg.actors.gpu_memory_utilization} x {limit} (largest term: {top.name} {top.bytes / GIB:.1f} GiB)"
        )
    longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    if plan.kv_tokens < longest:
        return (
            f"actor KV cache does not fit: it holds {plan.kv_tokens} tokens, fewer than one sequence of "
            f"rollout.max_prompt_tokens + rollout.max_new_tokens = {longest} ({kv.bytes / GIB:.1f} GiB)"
        )
    return None


def report_lines(plan: Plan) -> list[str]:
    """The plan as a table: one line per term, a total per learner rank and per actor GPU."""
    s = plan.shape
    lines = [
        f"model: {s.num_params / 1e9:.3f}B parameters ({s.num_layers} blocks, hidden {s.hidden_size}, vocab "
        f"{s.vocab_size}, {'tied' if s.tied else 'untied'}); GPU memory {plan.gpu_bytes / GIB:g} GiB",
        f"learner rank (1 of {plan.num_ranks}):",
    ]
    lines += [f"  {t.name:<24} {t.bytes / GIB:8.2f} GiB  {t.note}" for t in plan.learner]
    lines.append(f"  {'total':<24} {plan.learner_bytes / GIB:8.2f} GiB")
    if plan.actor:
        lines.append(f"actor ({plan.num_actors} of them), per GPU of {plan.tp}:")
        lines += [f"  {t.name:<24} {t.bytes / GIB:8.2f} GiB  {t.note}" for t in plan.actor]
        lines.append(
            f"  {'total':<24} {sum(t.bytes for t in plan.actor) / GIB:8.2f} GiB  "
            f"KV cache: {plan.kv_tokens} tokens per actor"
        )
    return lines
