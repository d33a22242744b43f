"""Chunked log-probs and entropy: equal to the unchunked softmax in values and gradients, whatever the chunk."""

from __future__ import annotations

import pytest
import torch

from learner.algo.logprobs import chunked_logprobs

VOCAB = 151_936  # Qwen2's vocabulary


def _inputs(n: int, hidden: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(VOCAB, hidden, generator=gen) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (n,), generator=gen)
    return h, w, targets


def _reference(h, w, targets, temperature):
    """The unchunked computation (today's, in float64 to be the exact answer): full logits, logsumexp, softmax."""
    logits = (h.double() @ w.double().T) / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    return logprobs, lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def _loss(logprobs, entropy, entropy_grad):
    """A loss with different weights per token, so a mixed-up token order shows."""
    weights = torch.linspace(-1.0, 2.0, logprobs.numel()).reshape(logprobs.shape)
    loss = (weights * logprobs).sum()
    return loss - 0.3 * (weights.flip(-1) * entropy).sum() if entropy_grad else loss


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def exact() -> dict[bool, tuple[torch.Tensor, ...]]:
    """The inputs, and the unchunked values and gradients without / with the entropy's gradient (computed once)."""
    h, w, targets = _inputs(64)
    want_lp, want_ent = _reference(h, w, targets, 0.7)
    out = {}
    for entropy_grad in (False, True):
        loss = _loss(want_lp, want_ent, entropy_grad)
        out[entropy_grad] = (h, w, targets, want_lp, want_ent, *torch.autograd.grad(loss, (h, w), retain_graph=True))
    return out


@pytest.mark.parametrize("chunk_tokens", [7, 64, 4096])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_chunked_equals_unchunked_in_values_and_gradients(exact: dict, chunk_tokens: int, entropy_grad: bool) -> None:
    h, w, targets, want_lp, want_ent, want_gh, want_gw = exact[entropy_grad]
    lp, ent = chunked_logprobs(h, w, targets, temperature=0.7, chunk_tokens=chunk_tokens, with_entropy=True,
                               entropy_grad=entropy_grad)
    assert ent is not None and lp.dtype == ent.dtype == torch.float32
    # float32 round-off of sums over 152k vocabulary terms (today's float32 softmax on CPU is off by 4e-4 here)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-4)
    gh, gw = _grads(_loss(lp, ent, entropy_grad), h, w)
    assert _max_rel(gh, want_gh) < 1e-4 and _max_rel(gw, want_gw) < 1e-4


def test_entropy_without_entropy_grad_is_outside_the_graph() -> None:
    h, w, targets = _inputs(8)
    lp, ent = chunked_logprobs(h, w, targets, chunk_tokens=3, with_entropy=True)
    assert ent is not None and lp.requires_grad and not ent.requires_grad
    assert chunked_logprobs(h, w, targets, chunk_tokens=3)[1] is None


def test_bf16_inputs_compute_in_float32_and_return_grads_in_bf16() -> None:
    h, w, targets = _inputs(16, dtype=torch.bfloat16)
    want_lp, want_ent = _reference(h, w, targets, 1.3)  # exact logits of the bf16 inputs
    want_gh, want_gw = _grads(_loss(want_lp, want_ent, True), h, w)
    lp, ent = chunked_logprobs(h, w, targets, temperature=1.3, chunk_tokens=10, with_entropy=True, entropy_grad=True)
    assert ent is not None
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-4)
    gh, gw = _grads(_loss(lp, ent, True), h, w)
    assert gh.dtype == gw.dtype == torch.bfloat16
    assert _max_rel(gh, want_gh) < 1e-2 and _max_rel(gw, want_gw) < 1e-2  # bf16 rounding of the gradients


def test_leading_dims_are_kept_and_no_tokens_is_empty() -> None:
    h, w, targets = _inputs(12)
    lp, ent = chunked_logprobs(h.reshape(3, 4, -1), w, targets.reshape(3, 4), chunk_tokens=5, with_entropy=True)
    assert lp.shape == (3, 4) and ent is not None and ent.shape == (3, 4) and lp._base is None
    torch.testing.assert_close(lp.reshape(-1), chunked_logprobs(h, w, targets, chunk_tokens=12)[0])
    empty_h = h[:0].detach().requires_grad_()
    lp0, ent0 = chunked_logprobs(empty_h, w, targets[:0], chunk_tokens=5, with_entropy=True, entropy_grad=True)
    assert lp0.shape == (0,) and ent0 is not None and ent0.shape == (0,)
    gh, gw = _grads(lp0.sum() + ent0.sum(), empty_h, w)
    assert gh.shape == (0, 32) and torch.count_nonzero(gw) == 0


def test_closed_forms_uniform_and_one_hot() -> None:
    # zero weight: uniform over V, log p = -log V and H = log V; a large logit on the target: log p -> 0, H -> 0
    h = torch.ones(2, 4)
    w = torch.zeros(VOCAB, 4)
    lp, ent = chunked_logprobs(h, w, torch.tensor([0, 5]), chunk_tokens=1, with_entropy=True)
    assert ent is not None
    torch.testing.assert_close(lp, torch.full((2,), -torch.log(torch.tensor(float(VOCAB)))))
    torch.testing.assert_close(ent, torch.full((2,), torch.log(torch.tensor(float(VOCAB)))))
    w[7] = 100.0
    lp, ent = chunked_logprobs(h, w, torch.tensor([7, 7]), chunk_tokens=2, with_entropy=True)
    assert ent is not None and float(lp.abs().max()) < 1e-6 and float(ent.abs().max()) < 1e-6


def test_identity_head_gives_categorical_log_probs_entropy_and_their_gradients() -> None:
    # weight = I: hidden states are the logits, so torch.distributions.Categorical is the answer
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 11, generator=g, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 11, (5,), generator=g)
    dist = torch.distributions.Categorical(logits=logits / 2.0)
    want_lp, want_ent = dist.log_prob(targets), dist.entropy()
    lp, ent = chunked_logprobs(logits, torch.eye(11, dtype=torch.float64), targets, temperature=2.0, chunk_tokens=2,
                               with_entropy=True, entropy_grad=True)
    assert ent is not None
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_grads(_loss(lp, ent, True), logits)[0],
                               _grads(_loss(want_lp, want_ent, True), logits)[0], rtol=1e-5, atol=1e-6)


def test_no_tensor_of_all_tokens_times_the_vocabulary_is_saved_for_backward() -> None:
    h, w, targets = _inputs(64)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        lp, ent = chunked_logprobs(h, w, targets, chunk_tokens=16, with_entropy=True, entropy_grad=True)
    assert saved and all(VOCAB not in shape or shape == tuple(w.shape) for shape in saved), saved
    assert ent is not None
    _grads(_loss(lp, ent, True), h, w)


def test_bad_arguments_are_refused() -> None:
    h, w, targets = _inputs(4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_logprobs(h, w, targets, chunk_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        chunked_logprobs(h, w, targets, temperature=0.0, chunk_tokens=4)
    with pytest.raises(ValueError, match="targets"):
        chunked_logprobs(h, w, targets[:3], chunk_tokens=4)
    with pytest.raises(ValueError, match="weight"):
        chunked_logprobs(h, w[:, :5], targets, chunk_tokens=4)
