"""Policy and value models of the learner, their FSDP2 wrapping and their forward passes.

Owns: loading a Hugging Face causal LM as the policy, building the value model (the same
kind of backbone with a scalar head, or a reward model's), sharding both with FSDP2 (`fully_shard` per decoder
block, then the root) and the two forward passes the train step needs.

Token layout (the whole learner uses it): a micro-batch is `[b, P + R]` with prompts
LEFT-padded to width P and responses RIGHT-padded to width R. Every per-token tensor of the
algorithm is response-aligned `[b, R]`: position j is response token j, predicted from the
hidden state at P - 1 + j. Position ids count real tokens only, so left padding does not
shift them. Right padding of responses is what `learner.algo.gae` requires.

Decisions:
- The value head reads the backbone's last hidden state at P - 1 + j, i.e. V(s_j) is the value
  of the state *before* response token j is emitted, matching GAE's r_j + V(s_{j+1}) - V(s_j).
- Tied input/output embeddings stay tied: the root FSDP unit holds both.
- Loading is sharded: a model is built on the meta device (buffers such as the rotary frequencies
  are real), wrapped with FSDP2 while still empty, allocated on the training device and filled
  from the checkpoint, each rank reading only the rows of its own dim-0 shards
  (`learner.hf_checkpoint`). A rank never holds more than its shards plus one tensor's slice; no
  rank reads for another (no broadcast from rank 0), so every rank needs the model directory.
  The reference policy, never optimised, is held in the compute dtype when sharded.
- Mixed precision is FSDP2's MixedPrecisionPolicy, on CPU as on CUDA (DESIGN.md section 7):
  float32 master weights (what is loaded, optimised and checkpointed), `model.dtype` compute
  (bf16 by default) and float32 gradient reduction. Without a process group nothing is sharded,
  so there is no mixed precision and the models compute in float32 (`learner.main.build_learner`
  warns). Every learner process has one, also at world size 1 (`run_rank`); only tests and tools
  that build a learner in-process go without. An autocast there instead would be a second
  mixed-precision scheme with other numerics (per-op casts, float32 norms and embeddings).
- The value head computes in its weights' dtype (bf16 under the policy above), and its output is
  cast to float32 after it: the backbone's bf16 hidden state goes into the head unconverted.
- The policy's logits are never materialised for a whole micro-batch: `policy_forward` keeps the
  final hidden states of the response positions (`logits_to_keep`) and `learner.algo.logprobs`
  computes log-probs and entropies `learner.logprob_chunk_tokens` tokens at a time, recomputing
  the logits in the backward (memory O(chunk x vocab), not O(R x vocab)), in float32 under bf16.
  The chunked head runs inside the root module's call (hooks on the Hugging Face model, see
  `_output_head_replaced`), so FSDP2 unshards the root's parameters for it as for the logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from learner.algo.logprobs import chunked_logprobs
from learner.hf_checkpoint import CheckpointReader, model_directory

log = logging.getLogger("vapo.learner")


@dataclass
class MicroBatch:
    """One micro-batch in the learner's token layout (see the module docstring)."""

    input_ids: torch.Tensor
    """[b, P + R] prompt (left-padded) then response (right-padded) token ids."""
    attention_mask: torch.Tensor
    """[b, P + R] 1 on real tokens."""
    response_mask: torch.Tensor
    """[b, R] 1 on response tokens."""
    prompt_width: int
    """P: width of the left-padded prompt block."""
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    """[b, R] per-token fields of these rows (old_logprobs, advantages, ...: `learner.batch.RESULT_FIELDS`)."""
    correct: torch.Tensor | None = None
    """[b] bool: the verifier's judgement of each response."""
    weight: float = 1.0
    """1, or 0 for a padding micro-batch (it only keeps the ranks' collectives in step)."""

    @property
    def position_ids(self) -> torch.Tensor:
        """[b, P + R] positions counting real tokens only (left padding gets 0)."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device), self.prompt_width,
            {k: v.to(device) for k, v in self.data.items()},
            None if self.correct is None else self.correct.to(device), self.weight,
        )


class ValueModel(nn.Module):
    """A causal-LM backbone with a scalar head: V(s) for every position."""

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Values `[b, P + R]` in float32, computed in the dtype of the head's weights."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        head = self.value_head
        values = head(out.last_hidden_state.to(head.weight.dtype)).squeeze(-1)
        # a fresh tensor, not a view: FSDP2 hooks the root's output for the backward pass
        return values.to(torch.float32, copy=True)


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of `model.dtype` (float32, bfloat16, float16): what the models compute in."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_policy(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """The policy: the Hugging Face causal LM of `path`, its parameters in `dtype` (float32 master weights for a
    trained model), built on the meta device, wrapped by `wrap` (FSDP2's `shard`) and then filled with this
    rank's rows of every checkpoint tensor (see `_materialise`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = model_directory(path)
    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = False
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    reader = CheckpointReader(model_dir)
    keys = {name: _checkpoint_key(reader, name, model_dir) for name, _ in model.named_parameters()}
    return _materialise(model, device=device, wrap=wrap, read=lambda name, a, b: reader.rows(keys[name], a, b))


def load_value_model(
    policy_path: str | Path,
    value_path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> ValueModel:
    """The value model in float32 master weights, loaded like the policy: the backbone of `value_path` (a causal
    LM, or a reward model) or of the policy, and a scalar head.

    The head is a reward model's score head when `value_path` has one of the head's shape (`score.weight`
    [1, hidden], as Hugging Face's sequence- and token-classification models with one label save it; its
    bias, when there is one), else zero-initialised: V = 0 everywhere until value pretraining.
    """
    from transformers import AutoConfig, AutoModel

    model_dir = model_directory(value_path or policy_path)
    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = False
    with _parameters_on_meta():
        backbone = AutoModel.from_config(config, dtype=torch.float32)
        model = ValueModel(backbone, config.hidden_size)
    reader = CheckpointReader(model_dir)
    prefix = "backbone."
    keys = {
        name: _checkpoint_key(reader, name.removeprefix(prefix), model_dir, backbone.base_model_prefix)
        for name, _ in model.named_parameters()
        if name.startswith(prefix)
    }
    head = model.value_head
    score = {"value_head.weight": "score.weight", "value_head.bias": "score.bias"}
    for name, param in (("value_head.weight", head.weight), ("value_head.bias", head.bias)):
        if score[name] in reader and reader.shape(score[name]) == tuple(param.shape):
            keys[name] = score[name]
    if "value_head.weight" not in keys:
        keys.pop("value_head.bias", None)  # a bias without its weight is no head
    log.info("value model from %s: %s head", model_dir, "its score" if "value_head.weight" in keys else "a zero")

    def read(name: str, start: int, end: int) -> torch.Tensor:
        if name in keys:
            return reader.rows(keys[name], start, end)
        shape = tuple(model.get_parameter(name).shape)  # a value-head tensor the checkpoint does not have
        return torch.zeros((end - start, *shape[1:]) if shape else ())

    return _materialise(model, device=device, wrap=wrap, read=read)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside the block get their parameters on the meta device (no memory) and their buffers
    (rotary frequencies, computed in `__init__`) as usual; tied parameters stay one parameter."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _checkpoint_key(reader: CheckpointReader, name: str, model_dir: Path, prefix: str = "") -> str:
    """The checkpoint key of parameter `name` (a backbone's may carry the prefix of its causal LM, or not)."""
    candidates = [f"{prefix}.{name}", name] if prefix else [name]
    for key in candidates:
        if key in reader:
            return key
    raise ValueError(f"model.path {str(model_dir)!r}: the checkpoint has no tensor {' or '.join(candidates)}")


def _materialise(
    model: nn.Module,
    *,
    device: str | torch.device,
    wrap: Callable[[nn.Module], nn.Module] | None,
    read: Callable[[str, int, int], torch.Tensor],
) -> nn.Module:
    """Wrap the meta-device `model`, allocate its (local) parameters on `device` and fill them from `read`.

    `read(name, start, end)` returns rows [start, end) of parameter `name`'s full tensor. Under FSDP2 a
    parameter is a DTensor sharded on dim 0 and this rank reads only its shard's rows, so a rank's peak
    while loading is its shards plus one slice, never a whole model; unsharded, a rank reads every row.
    Buffers keep the values they were built with.
    """
    buffers = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]
    if wrap is not None:
        model = wrap(model)
    places: dict[int, list[tuple[nn.Module, str]]] = {}  # a parameter -> where it is registered (tied: 2 places)
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((module, name))
    model.to_empty(device=device)
    for (first, first_name), *others in places.values():  # to_empty makes a new parameter per registration
        for module, name in others:
            module._parameters[name] = first._parameters[first_name]
    for module, name, buffer in buffers:
        module._buffers[name] = buffer.to(device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local, start = _local_rows(param)
            name = name.replace("_checkpoint_wrapped_module.", "")
            rows = read(name, start, start + (local.shape[0] if local.dim() else 0))
            if tuple(rows.shape[1:]) != tuple(local.shape[1:]) or rows.dim() != local.dim():
                raise ValueError(f"checkpoint tensor of {name} has shape {tuple(rows.shape)}, the model's rows "
                                 f"{tuple(local.shape)}")
            local.copy_(rows)
    return model


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of `param` (a tensor to write into) and the row of the full tensor it starts at."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param.data, 0
    mesh = param.device_mesh
    if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise ValueError(f"sharded loading reads dim-0 shards of a 1-d mesh; got {param.placements}")
    local = param.to_local()
    rows, world, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    per_rank = -(-rows // world)  # FSDP2 shards like torch.chunk: equal chunks, the last ones short or empty
    start = min(rank * per_rank, rows)
    assert local.shape[0] == min(per_rank, rows - start), (param.shape, local.shape, rank)
    return local, start


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a policy or value model (the FSDP and checkpointing units)."""
    backbone = model.backbone if isinstance(model, ValueModel) else model.get_decoder()
    return list(backbone.layers)


def shard(
    model: nn.Module,
    *,
    mesh=None,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Wrap `model` with FSDP2: one unit per decoder block, then the root (embeddings, norm, heads).

    A `dtype` other than float32 is the compute dtype of FSDP's MixedPrecisionPolicy: parameters
    are all-gathered and used in `dtype`, gradients reduced in float32 into the float32 master
    weights. float32 adds no policy, so it computes exactly as unsharded float32 does.

    FSDP2 averages gradients over ranks; the train step, whose losses are already divided by
    global counts, multiplies them by the world size to turn that mean into the sum it needs
    (a divide factor of 1 would need ReduceOp.PREMUL_SUM, which gloo lacks).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        blocks = set(decoder_layers(model))
        apply_activation_checkpointing(model, check_fn=lambda m: m in blocks)
    kwargs: dict = {"mesh": mesh}
    if dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in decoder_layers(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def policy_forward(
    policy: nn.Module,
    mb: MicroBatch,
    *,
    temperature: float = 1.0,
    chunk_tokens: int,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[b, R]` float32 of the response tokens (and their entropies `[b, R]` when asked).

    `temperature` divides the logits, so the log-probs are those of the distribution the
    actors sampled from (vLLM applies the same scaling). The logits exist only `chunk_tokens`
    tokens at a time (`learner.algo.logprobs`); the entropy is outside the autograd graph unless
    `entropy_grad` (an entropy bonus) asks for its gradient.
    """
    targets = mb.input_ids[:, mb.prompt_width :]

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # hidden [b, R + 1, H]: the state at P - 1 + j predicts response token j (the last one, past the response)
        return chunked_logprobs(
            hidden[:, :-1], weight, targets, temperature=temperature, chunk_tokens=chunk_tokens,
            with_entropy=with_entropy, entropy_grad=entropy_grad and torch.is_grad_enabled(),
        )

    with _output_head_replaced(policy, head):
        logprobs, entropy = policy(
            input_ids=mb.input_ids,
            attention_mask=mb.attention_mask,
            position_ids=mb.position_ids,
            logits_to_keep=mb.response_mask.shape[1] + 1,
        )
    return logprobs, entropy


@contextmanager
def _output_head_replaced(policy: nn.Module, head_fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> Iterator[None]:
    """For calls of `policy` inside the block: its output head computes no logits, and the call returns
    `head_fn(hidden, weight)` instead of the Hugging Face output.

    `hidden` is what the head would have read (the final norm's output at the `logits_to_keep`
    positions), `weight` the head's weight as the forward uses it: under FSDP2 the unsharded
    parameter in the compute dtype. The result replaces the root's output in a forward hook that
    runs before FSDP2's post-forward hook, so FSDP2 treats it as the root's output: its
    pre-backward hook on it unshards the root's parameters (embeddings, norm, head) for the
    backward's recomputation of the logits, and gradients reach the head's weight (the input
    embedding in a tied model) as they would through logits.
    """
    head = policy.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"the output head of {type(policy).__name__} has a bias; chunked log-probs support none")
    if getattr(policy.config, "final_logit_softcapping", None) is not None:
        raise ValueError(f"{type(policy).__name__} soft-caps its logits; chunked log-probs do not")
    seen: dict[str, torch.Tensor] = {}

    def take_head_input(module: nn.Module, args: tuple) -> tuple:
        seen["hidden"], seen["weight"] = args[0], module.weight
        return (args[0][:, :0],)  # the head computes [b, 0, V] logits

    def replace_output(module: nn.Module, args: tuple, output: Any) -> Any:
        assert "hidden" in seen, f"{type(policy).__name__}'s forward did not call its output head"
        return head_fn(seen.pop("hidden"), seen.pop("weight"))

    handles = [
        head.register_forward_pre_hook(take_head_input),
        policy.register_forward_hook(replace_output, prepend=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def value_forward(value_model: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Values `[b, R]`: V of the state before each response token."""
    values = value_model(mb.input_ids, mb.attention_mask, mb.position_ids)  # [b, P + R]
    p = mb.prompt_width
    return values[:, p - 1 : p - 1 + mb.response_mask.shape[1]]


def iter_full_params(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) of every parameter, one at a time; every rank must iterate.

    FSDP shards are all-gathered one parameter at a time, so memory beyond the model stays
    bounded by the largest tensor; tied weights appear once (under the input embedding).
    """
    for name, param in model.named_parameters():
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        yield name.replace("_checkpoint_wrapped_module.", ""), tensor.detach()
