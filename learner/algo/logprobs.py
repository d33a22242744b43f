"""Log-probs and entropies of target tokens under a linear output head, in chunks of tokens.

Owns `chunked_logprobs`: for hidden states `h` [..., H], an output embedding `W` [V, H] and target
ids `t` [...], the log-probs log softmax(h W^T / T)[t] and the entropies of softmax(h W^T / T),
without ever holding the logits of all tokens. Imports torch only.

Decisions:
- Memory: the forward runs over chunks of `chunk_tokens` tokens and keeps, per token, only the
  logsumexp and the mean logit E_p[z]; the backward recomputes each chunk's logits from the saved
  hidden states and weight (a `torch.autograd.Function`). Beyond the inputs the extra memory is
  O(chunk x V) for the logits of one chunk plus O(V x H) for a float32 copy of a low-precision
  weight and the float32 gradient accumulator, never O(N x V). At V = 152k one float32 [chunk, V]
  buffer is 0.6 MB per token of the chunk; a chunk holds about three at its peak.
- Precision: the logits, softmax and both gradients are computed in float32 whatever the
  inputs' dtype (bf16 under mixed precision), so log-prob ratios do not inherit bf16's rounding of
  the logits; the gradients come back in the inputs' dtypes, accumulated over chunks in float32.
- Gradients, with z = h W^T / T and p = softmax(z): d log p_t / dz = onehot(t) - p and
  d H / dz = -p (z - E_p[z]), with H = logsumexp(z) - E_p[z]. The entropy's gradient is taken only
  with `entropy_grad` (an entropy bonus); otherwise the entropy is a non-differentiable output.
- No bias: the output heads of the models this learner trains (Qwen2, Llama) have none; the caller
  refuses a head with a bias.
"""

from __future__ import annotations

from typing import Any

import torch


def _chunk_logits(hidden: torch.Tensor, weight32: torch.Tensor, temperature: float) -> torch.Tensor:
    """[c, V] float32 logits of one chunk, divided by the temperature."""
    logits = hidden.float() @ weight32.T
    return logits / temperature if temperature != 1.0 else logits


class _ChunkedLogprobs(torch.autograd.Function):
    """Autograd of `chunked_logprobs`: saves hidden, weight, targets and two floats per token."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, shape: torch.Size,
        temperature: float, chunk_tokens: int, with_entropy: bool, entropy_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        weight32 = weight.float()
        # outputs allocated in the caller's shape (not views of flat buffers: FSDP hooks the root's outputs)
        logprobs = torch.empty(shape, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logprobs)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        mean_logit = torch.zeros_like(lse)  # E_p[z]; the entropy is lse - E_p[z]
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            logits = _chunk_logits(hidden[start:end], weight32, temperature)
            torch.logsumexp(logits, dim=-1, out=lse[start:end])
            picked = logits.gather(-1, targets[start:end, None]).squeeze(-1)
            logprobs.view(-1)[start:end] = picked - lse[start:end]
            if with_entropy:
                mean_logit[start:end] = (torch.exp(logits - lse[start:end, None]) * logits).sum(-1)
        if with_entropy:
            torch.sub(lse, mean_logit, out=entropy.view(-1))
        ctx.save_for_backward(hidden, weight, targets, lse, mean_logit)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.entropy_grad = with_entropy and entropy_grad
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, lse, mean_logit = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weight32 = weight.float()
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_logprobs = None if grad_logprobs is None else grad_logprobs.reshape(-1)
        grad_entropy = grad_entropy.reshape(-1) if ctx.entropy_grad and grad_entropy is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, hidden.shape[0])
            logits = _chunk_logits(hidden[start:end], weight32, ctx.temperature)
            probs = torch.exp(logits - lse[start:end, None])
            # d loss / dz = g_lp (onehot - p) - g_ent p (z - E_p[z]), built in the logits' buffer
            if grad_entropy is not None:
                g_ent = grad_entropy[start:end, None]
                grad_z = logits.sub_(mean_logit[start:end, None]).mul_(probs).mul_(-g_ent)
            else:
                grad_z = logits.zero_()
            if grad_logprobs is not None:
                g_lp = grad_logprobs[start:end, None]
                grad_z.sub_(probs.mul_(g_lp))
                grad_z.scatter_add_(-1, targets[start:end, None], g_lp)
            del probs
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_z @ weight32
            if grad_weight is not None:
                grad_weight.addmm_(grad_z.T, hidden[start:end].float())
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None, None, None, None, None, None,
        )


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and (with `with_entropy`) entropies of `targets` under softmax(hidden @ weight.T / temperature).

    hidden: [..., H] (any float dtype); weight: [V, H] (the output embedding); targets: [...] token
    ids in [0, V). Returns (logprobs [...] float32, entropy [...] float32 or None), computed
    `chunk_tokens` tokens at a time with the logits recomputed in the backward (module docstring).
    The entropy is differentiable only with `entropy_grad`. Equal to the unchunked
    `log_softmax(hidden @ weight.T / T)` up to float32 round-off.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden {tuple(hidden.shape)}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    logprobs, entropy = _ChunkedLogprobs.apply(
        flat_hidden, weight, flat_targets, targets.shape, float(temperature), chunk_tokens, with_entropy, entropy_grad
    )
    return logprobs, entropy if with_entropy else None
