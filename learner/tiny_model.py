"""The tiny model: a char-level Qwen2 warm-started on the arithmetic task, so RL runs for real on 2 CPU cores.

Owns `build_tiny_model`, which `vapo make-tiny-model` and the `builtin:tiny` model path
call. It writes a standard Hugging Face directory (config.json, model.safetensors,
generation_config.json, tokenizer files) that transformers and vLLM (CPU or GPU) load as is.

Decisions:
- Tokenizer: one token per character of printable ASCII and newline, plus `<|pad|>` (id 0),
  `<|endoftext|>` (id 1, the EOS) and `<|unk|>` (id 2); no BOS. The EOS id is written into
  config.json and generation_config.json so vLLM stops at it. It is a byte-level BPE with
  *no merges*, with GPT-2 byte names (space is `Ġ`, newline `Ċ`) and exactly the normalizer,
  pre-tokenizer and decoder of Qwen2's tokenizer, because transformers' AutoTokenizer (and
  so vLLM) always loads a `qwen2` checkpoint's tokenizer as `Qwen2Tokenizer`, which rebuilds
  that pipeline around the saved vocabulary: a WordLevel char tokenizer silently loses its
  spaces and newlines that way. Characters outside the vocabulary (non-ASCII) are dropped.
- Prompt format: the tokenizer's chat template writes each message's content followed by a
  newline, so `shared.data.records.render_prompt` gives "Compute 3 + 4 * 5 - 2.\\n"; the model
  continues with the worked solution, then EOS. The format is also recorded in
  `vapo_tiny_model.json`.
- Architecture: Qwen2, 2 layers, hidden 128, 4 heads of head_dim 32 (vLLM's CPU attention
  does not support head_dim 16), 2 KV heads, tied input/output embeddings (so the weight
  sync path is tested on a tied model), 1024 positions, float32.
- Warm start: supervised training on train-split problems (loss on solution and EOS tokens
  only) for a fixed `max_steps`, with AdamW at `lr` (linear warm-up, then a cosine decay to
  `lr_floor` of it), on *noisy demonstrations*: each step of a solution slips with
  probability `slip_prob` (a result off by 1 to 3 that the rest of the solution builds on,
  `arithmetic.slipped_solution`). The model learns the arithmetic (its most likely
  continuation is right: greedy accuracy) and also the slips (sampling at temperature 1, the
  RL rollout setting, makes them: sampled accuracy), so RL has room to sharpen it. The
  step count is fixed, not "until an accuracy": a model stopped early is undertrained, and
  one whose samples and greedy answers are both mostly wrong leaves RL no room (README.md,
  "What runs today", has the figures of each recipe). Accuracy is measured every
  `eval_every` steps for the log and at the end, by sampling on held-out test-split problems
  (top-k and top-p off); the build fails unless the final sampled accuracy lies in
  [`min_accuracy`, `max_accuracy`] (default 0.1 to 0.6).
- Cache: `vapo_tiny_model.json` in the directory holds the settings, their hash and the
  measured accuracies; a directory that already holds a build with the same hash is returned
  at once. A build is written to a temporary sibling and renamed into place, so an
  interrupted build never leaves a half-written model that looks finished.
- Deterministic for a given seed, thread count and library versions (seeded torch and
  Python RNGs, evaluation under a forked RNG). One torch thread by default: on a 2-core
  machine shared with other processes, 2 OpenMP threads spin against them and ran 5 to 50
  times slower in our measurements, while 1 thread loses at most ~2x on an idle machine.

Imports torch and transformers; must not import actors, vllm, zmq, ray or mlflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from shared.data.tasks import arithmetic

BUILDER_VERSION = 3
"""Bump when the recipe changes in a way the settings do not show; it is part of the cache key."""
METADATA_FILE = "vapo_tiny_model.json"
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<|pad|>", "<|endoftext|>", "<|unk|>"
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
_BYTE_NAMES = {"\n": "\u010a", " ": "\u0120"}
"""GPT-2 byte-level names of newline and space (Ċ, Ġ); printable ASCII 33..126 are their own names."""
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
PROMPT_FORMAT = "each message's content followed by a newline; the response is the worked solution, then EOS"


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines a tiny model build; its hash is the cache key."""

    seed: int = 0
    num_layers: int = 2
    hidden_size: int = 128
    intermediate_size: int = 512
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    num_train_problems: int = 20000
    train_step_decay: float = 0.5
    """Step law of the warm-start problems: steeper than the task's 0.75, so short problems dominate."""
    slip_prob: float = 0.3
    """Per-step probability of an arithmetic slip in the warm-start solutions (noisy demonstrations, see
    `arithmetic.slipped_solution`); 0: clean solutions."""
    num_eval_problems: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    lr_floor: float = 0.1
    """The cosine decay ends at `lr_floor * lr` at `max_steps`."""
    warmup_steps: int = 50
    max_steps: int = 4000
    eval_every: int = 1000
    min_accuracy: float = 0.1
    max_accuracy: float = 0.6
    max_new_tokens: int = 600
    num_threads: int = 1
    """Torch threads while building; 1, because 2 OpenMP threads on a busy 2-core machine run 5-50x slower."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.hidden_size // self.num_attention_heads < 32:
            raise ValueError("hidden_size / num_attention_heads must be an integer >= 32 (vLLM CPU head sizes)")
        if not 0 <= self.min_accuracy <= self.max_accuracy <= 1:
            raise ValueError("need 0 <= min_accuracy <= max_accuracy <= 1")
        if self.max_steps < 1 or self.warmup_steps < 1 or not 0 <= self.lr_floor <= 1:
            raise ValueError("need max_steps >= 1, warmup_steps >= 1 and lr_floor in [0, 1]")

    def settings_hash(self) -> str:
        """A short hash of the settings and BUILDER_VERSION."""
        blob = json.dumps({"builder_version": BUILDER_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_tiny_model_dir(spec: TinyModelSpec | None = None) -> Path:
    """The cache directory of a build: `$VAPO_CACHE` (default ~/.cache/vapo) / tiny-model-<hash>."""
    spec = spec or TinyModelSpec()
    root = Path(os.environ.get("VAPO_CACHE") or Path.home() / ".cache" / "vapo")
    return root / f"tiny-model-{spec.settings_hash()}"


def read_metadata(model_dir: str | Path) -> dict[str, Any] | None:
    """The build record of a tiny model directory, or None if it holds none."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The char-level tokenizer: special tokens at ids 0..2, then one token per character (see the module note)."""
    vocab = {token: i for i, token in enumerate([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])}
    vocab |= {_BYTE_NAMES.get(c, c): len(vocab) + i for i, c in enumerate(CHARACTERS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    # The same pipeline transformers' Qwen2Tokenizer rebuilds around any qwen2 checkpoint's vocabulary.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=TinyModelSpec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def build_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    """The Qwen2 configuration of the tiny model."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )


def prompt_text(problem: arithmetic.Problem, tokenizer: PreTrainedTokenizerFast) -> str:
    """The rendered prompt (the chat template applied to the problem as one user message)."""
    messages = [{"role": "user", "content": problem.prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    return text


def encode_examples(
    problems: list[arithmetic.Problem], tokenizer: PreTrainedTokenizerFast, slip_prob: float = 0.0, seed: int = 0
) -> list[tuple[list[int], int]]:
    """(token ids of prompt + solution + EOS, prompt length) per problem; solutions slip with `slip_prob` per step."""
    examples = []
    rng = random.Random(f"slips:{seed}")
    for p in problems:
        prompt_ids = tokenizer.encode(prompt_text(p, tokenizer), add_special_tokens=False)
        solution = arithmetic.slipped_solution(p, rng, slip_prob) if slip_prob else p.solution
        solution_ids = tokenizer.encode(solution, add_special_tokens=False)
        examples.append((prompt_ids + solution_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    return examples


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, T] and labels [B, T] (-100 on prompt and padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, labels


@torch.no_grad()
def evaluate_accuracy(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[arithmetic.Problem],
    *,
    sample: bool,
    seed: int = 0,
    max_new_tokens: int = 600,
    batch_size: int = 100,
) -> float:
    """Share of problems whose generated `Answer:` matches; sampled at temperature 1 or greedy."""
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    correct = 0
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            batch = tokenizer(
                [prompt_text(p, tokenizer) for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False
            )
            kwargs: dict[str, Any] = (
                {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
            )
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(arithmetic.extract_answer(t) == p.ground_truth for t, p in zip(texts, chunk, strict=True))
    tokenizer.padding_side = padding_side
    model.train(was_training)
    return correct / len(problems)


def _length_bucketed_batches(
    examples: list[tuple[list[int], int]], batch_size: int, rng: random.Random, num_buckets: int = 8
) -> list[list[tuple[list[int], int]]]:
    """`num_buckets` batches of uniformly drawn examples, grouped by length so that little is padding."""
    pool = sorted(rng.sample(examples, batch_size * num_buckets), key=lambda e: len(e[0]))
    batches = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    rng.shuffle(batches)
    return batches


def _lr_at(step: int, spec: TinyModelSpec) -> float:
    """Linear warm-up, then a cosine decay from `lr` to `lr_floor * lr` at `max_steps`."""
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(step / spec.max_steps, 1.0)))
    return spec.lr * min(1.0, (step + 1) / spec.warmup_steps) * (spec.lr_floor + (1.0 - spec.lr_floor) * cosine)


def supervised_warm_start(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec, log: Callable[[str], None]
) -> dict[str, Any]:
    """Supervised warm start for `max_steps` steps; returns the accuracies and the history."""
    train = encode_examples(
        arithmetic.generate(spec.num_train_problems, spec.seed, "train", step_decay=spec.train_step_decay),
        tokenizer, spec.slip_prob, spec.seed,
    )
    held_out = arithmetic.generate(spec.num_eval_problems, spec.seed, "test")
    rng = random.Random(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)
    history: list[dict[str, float]] = []
    accuracy, step = 0.0, 0
    model.train()
    batches: list[list[tuple[list[int], int]]] = []
    started = time.monotonic()
    while step < spec.max_steps:
        if not batches:
            batches = _length_bucketed_batches(train, spec.batch_size, rng)
        input_ids, labels = collate(batches.pop(), tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % spec.eval_every == 0 or step == spec.max_steps:
            accuracy = evaluate_accuracy(
                model, tokenizer, held_out, sample=True, seed=spec.seed + step, max_new_tokens=spec.max_new_tokens
            )
            history.append({"step": step, "loss": loss.item(), "sampled_accuracy": accuracy})
            log(
                f"tiny model: step {step} loss {loss.item():.4f} sampled accuracy {accuracy:.3f} "
                f"({time.monotonic() - started:.0f} s)"
            )
    if not spec.min_accuracy <= accuracy <= spec.max_accuracy:
        raise RuntimeError(
            f"tiny model: sampled accuracy {accuracy:.3f} after {step} steps is outside "
            f"[{spec.min_accuracy}, {spec.max_accuracy}]; change the spec"
        )
    greedy = evaluate_accuracy(model, tokenizer, held_out, sample=False, max_new_tokens=spec.max_new_tokens)
    return {"steps": step, "sampled_accuracy": accuracy, "greedy_accuracy": greedy, "history": history}


def _save(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path, metadata: dict[str, Any]) -> None:
    # Only the token ids: sampling settings here would silently become vLLM's defaults.
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def build_tiny_model(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    spec: TinyModelSpec | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Build (or find cached) the tiny model in `out_dir` (default: `default_tiny_model_dir`); returns the dir.

    `spec` overrides the recipe (its own seed is replaced by `seed`). `force` rebuilds even
    when the directory already holds a build with the same settings.
    """
    spec = dataclasses.replace(spec or TinyModelSpec(), seed=seed)
    out = Path(out_dir) if out_dir is not None else default_tiny_model_dir(spec)
    existing = read_metadata(out) if out.is_dir() else None
    if existing is not None and existing.get("settings_hash") == spec.settings_hash() and not force:
        return out
    if out.exists() and existing is None and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not a tiny model directory; refusing to overwrite it")
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.num_threads)
    try:
        torch.manual_seed(spec.seed)
        tokenizer = build_tokenizer()
        model = Qwen2ForCausalLM(build_config(spec, tokenizer))
        log(f"tiny model: {sum(p.numel() for p in model.parameters())} parameters, building into {out}")
        result = supervised_warm_start(model, tokenizer, spec, log)
    finally:
        torch.set_num_threads(threads)
    metadata = {
        "settings_hash": spec.settings_hash(),
        "builder_version": BUILDER_VERSION,
        "spec": dataclasses.asdict(spec),
        "prompt_format": PROMPT_FORMAT,
        "data_source": arithmetic.DATA_SOURCE,
        "build_seconds": round(time.monotonic() - started, 1),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        **result,
    }
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save(model, tokenizer, tmp, metadata)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(
        f"tiny model: done in {metadata['build_seconds']} s, sampled accuracy {result['sampled_accuracy']:.3f}, "
        f"greedy accuracy {result['greedy_accuracy']:.3f}"
    )
    return out


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
