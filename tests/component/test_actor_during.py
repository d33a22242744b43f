"""Weight pushes in the middle of a generation round (`actors.update_mode=during`) on the real vLLM CPU engine.

The session's `random_engine` generates while the test plays the learner: a real
`learner.weight_sender.WeightSender` (engine level) or `MembershipManager` (the actor loop's
`ActorLoop._generate` with a real `WeightFollower`) pushes perturbed weights over gloo while the
round runs. Each response's token versions must switch from v to v + 1 at most once and never go
back, and every behavior log-prob must be the one of the weights that sampled the token: the
reference (`_mixed_logprobs`) is a transformers forward pass of the OLD weights over the prompt
and the tokens before the switch, continued by the NEW weights from the switch on over the old
weights' KV cache of that prefix, which is what an engine that keeps in-flight KV computes. A
later round must not reuse the prefix-cache blocks the old weights computed (its prompt is
longer than one 128-token CPU block, so a stale block would show in its log-probs).

Rounds here are short (a few prompts, G = 3, tens of tokens) so the file stays cheap.
"""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch

from deploy.doctor import free_port, hf_logprobs, perturb_, with_peers
from learner.weight_sender import WeightSender
from learner.weight_sync import MembershipManager
from shared.config import ActorConfig, RewardConfig, RolloutConfig, SyncConfig, VapoConfig
from shared.types import Lease

TOL = 1e-4
HOST = "127.0.0.1"
G = 3
LONG = [3 + (7 * i) % 48 for i in range(140)]  # more than one 128-token block: cached across rounds
PROMPTS = [[3, 4, 5, 6], [7, 8, 9, 10, 11], LONG]


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    out = copy.deepcopy(model)
    perturb_(out, seed)
    return out


def _mixed_logprobs(old: torch.nn.Module, new: torch.nn.Module, prompt: list[int], tokens: list[int],
                    switch: int) -> np.ndarray:
    """[T] log-probs of `tokens` when tokens[:switch] were sampled by `old`, the rest by `new` over `old`'s KV.

    The step that samples token `switch` feeds token `switch - 1` through the new weights, so the
    old weights computed the KV of the prompt and of tokens[:switch - 1].
    """
    assert 1 <= switch <= len(tokens)
    seq = torch.tensor([prompt + tokens])
    split = len(prompt) + switch - 1
    with torch.no_grad():
        head = old(input_ids=seq[:, :split], use_cache=True)
        rest = new(input_ids=seq[:, split:], past_key_values=head.past_key_values, use_cache=True)
        logits = torch.cat([head.logits, rest.logits], dim=1)[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, seq[0, len(prompt) :, None])[:, 0].numpy()


def _switch(versions: np.ndarray, old: int) -> int:
    """Index of the first token of version old + 1 (len when none); asserts one switch at most, never back."""
    assert set(versions.tolist()) <= {old, old + 1} and np.all(np.diff(versions) >= 0), versions.tolist()
    return int(np.searchsorted(versions, old + 1))


def _check_round(prompts: list[list[int]], samples, old_model, new_model, old: int) -> tuple[int, float, float, float]:
    """Every response against the weights that sampled each token: (switched responses, worst diff, gaps).

    Gaps, over the tokens after a switch: the smallest max distance to the old weights alone (the
    push took effect), and the largest to the new weights recomputing the whole prefix (what
    keeping the in-flight KV cache changes).
    """
    switched, worst, gap, recompute_gap = 0, 0.0, float("inf"), 0.0
    for prompt, group in zip(prompts, samples, strict=True):
        assert len(group) == G
        for s in group:
            assert s.token_versions is not None and len(s.token_versions) == len(s.token_ids) == len(s.logprobs)
            k = _switch(s.token_versions, old)
            assert k >= 1, "the push landed after the first step, so the first token is the old weights'"
            tokens = s.token_ids.tolist()
            expected = _mixed_logprobs(old_model, new_model, prompt, tokens, k)
            worst = max(worst, float(np.max(np.abs(s.logprobs - expected))))
            if k < len(tokens):
                switched += 1
                all_old = hf_logprobs(old_model, [prompt + tokens])[0][len(prompt) - 1 :]
                gap = min(gap, float(np.max(np.abs(s.logprobs[k:] - all_old[k:]))))
                all_new = hf_logprobs(new_model, [prompt + tokens])[0][len(prompt) - 1 :]
                recompute_gap = max(recompute_gap, float(np.max(np.abs(s.logprobs[k:] - all_new[k:]))))
    return switched, worst, gap, recompute_gap


def _full_parity(live, prompts: list[list[int]], samples) -> float:
    """Max |behavior - transformers| with the engine's current weights over whole sequences."""
    worst = 0.0
    for prompt, group in zip(prompts, samples, strict=True):
        for s in group:
            expected = hf_logprobs(live.reference, [prompt + s.token_ids.tolist()])[0][len(prompt) - 1 :]
            worst = max(worst, float(np.max(np.abs(s.logprobs - expected))))
    return worst


def test_a_push_mid_round_switches_versions_once_and_logprobs_follow_the_weights(random_engine) -> None:
    live = random_engine
    port = free_port()
    join = lambda: live.engine.join_weight_group(  # noqa: E731
        HOST, port, rank_offset=1, world_size=2, group_name="weights/0", timeout_s=60.0)
    sender, _ = with_peers([join], lambda: WeightSender(HOST, port, 2, timeout_s=60.0, bucket_bytes=64 << 10))
    old_model, new_model = live.reference, _perturbed(live.reference, seed=71)
    calls: list[float] = []

    def between_steps() -> bool:
        calls.append(time.perf_counter())
        if len(calls) == 1:  # after the first step: every request has its first token, sampled by the old weights
            with_peers([live.engine.apply_weights], lambda: sender.push(new_model.named_parameters(), 8))
        return True

    try:
        paused0 = live.engine.paused_seconds
        samples = live.engine.generate(PROMPTS, n=G, max_tokens=40, seed=5, version=7, between_steps=between_steps)
        live.reference = new_model
        paused = live.engine.paused_seconds - paused0
        switched, worst, gap, recompute_gap = _check_round(PROMPTS, samples, old_model, new_model, old=7)
        print(f"mid-round push: {switched} of {G * len(PROMPTS)} responses switched; max |behavior - reference| "
              f"{worst:.3g}; after the switch the old weights alone are {gap:.3g} away, the new weights over a "
              f"recomputed prefix {recompute_gap:.3g}; engine paused {paused:.3f}s over {len(calls)} steps")
        assert switched >= G and worst < TOL and gap > 100 * TOL and paused > 0
        assert recompute_gap > 100 * TOL  # the in-flight KV cache was kept, not recomputed

        # the next round finds no prefix-cache block of the old weights (LONG spans a full block), one version
        again = live.engine.generate(PROMPTS, n=G, max_tokens=16, seed=6, version=8, between_steps=lambda: True)
        assert all(set(s.token_versions.tolist()) == {8} for g in again for s in g)
        worst = _full_parity(live, PROMPTS, again)
        print(f"next round, new weights only: max |behavior - transformers| {worst:.3g}")
        assert worst < TOL
    finally:
        live.engine.leave_weight_group()
        sender.close()


def test_a_push_that_fails_mid_round_abandons_the_round_and_the_engine_recovers(random_engine) -> None:
    live = random_engine
    port = free_port()
    join = lambda: live.engine.join_weight_group(  # noqa: E731
        HOST, port, rank_offset=1, world_size=2, group_name="weights/0", timeout_s=60.0)
    sender, _ = with_peers([join], lambda: WeightSender(HOST, port, 2, timeout_s=60.0, bucket_bytes=64 << 10))
    errors: list[str] = []

    def between_steps() -> bool:
        if not errors:
            bad = [("model.no_such_layer.weight", torch.zeros(4))]  # the receiver drains the push, then raises
            try:
                with_peers([live.engine.apply_weights], lambda: sender.push(bad, 9))
            except Exception as e:  # vLLM reports a worker's failure as a plain Exception (as the actor loop sees it)
                errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
                return False
        return True

    try:
        assert live.engine.generate(PROMPTS, n=G, max_tokens=40, seed=11, version=8, between_steps=between_steps) == []
        assert errors and not live.engine.llm.llm_engine.has_unfinished_requests()
        model = _perturbed(live.reference, seed=73)  # the next push (same group) succeeds; the engine generates again
        with_peers([live.engine.apply_weights], lambda: sender.push(model.named_parameters(), 10))
        live.reference = model
        samples = live.engine.generate(PROMPTS, n=G, max_tokens=16, seed=12, version=10, between_steps=lambda: True)
        assert all(s.token_versions.tolist() == [10] * len(s.token_ids) for g in samples for s in g)
        worst = _full_parity(live, PROMPTS, samples)
        print(f"failed mid-round push ({errors[0][:80]}): round abandoned; after the next push {worst:.3g}")
        assert worst < TOL
    finally:
        live.engine.leave_weight_group()
        sender.close()


def test_a_round_without_push_has_one_version_and_equals_between_mode(random_engine) -> None:
    live = random_engine
    between = live.engine.generate(PROMPTS, n=G, max_tokens=24, seed=9)
    steps = []
    stepped = live.engine.generate(PROMPTS, n=G, max_tokens=24, seed=9, version=4,
                                   between_steps=lambda: steps.append(1) or True)
    assert len(steps) > 0
    for a_group, b_group in zip(between, stepped, strict=True):
        for a, b in zip(a_group, b_group, strict=True):
            assert a.token_versions is None and b.token_versions.tolist() == [4] * len(b.token_ids)
            assert a.token_ids.tolist() == b.token_ids.tolist() and a.finish_reason == b.finish_reason
            assert a.text == b.text and np.allclose(a.logprobs, b.logprobs, atol=1e-6)
    assert _full_parity(live, PROMPTS, stepped) < TOL
    with pytest.raises(ValueError, match="needs the version"):
        live.engine.generate(PROMPTS, between_steps=lambda: True)


def _loop(live, tokenizer, cfg: VapoConfig, follower):
    from actors.main import ActorLoop

    loop = ActorLoop(cfg, 0, live.engine, tokenizer, None, None, follower, threading.Event())
    loop.version = 0
    return loop


def test_actor_loop_takes_part_in_a_push_mid_round(random_engine, random_model_dir) -> None:
    """ActorLoop._generate with update_mode=during and a real follower; the learner's push is waiting when it starts."""
    from transformers import AutoTokenizer

    from actors.rollout import score_round
    from actors.weight_sync import WeightFollower

    live = random_engine
    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    rollout = RolloutConfig(samples_per_prompt=G, max_new_tokens=40, max_prompt_tokens=256, temperature=1.0)
    sync = SyncConfig(master_port=free_port())
    cfg = VapoConfig(rollout=rollout, actors=ActorConfig(update_mode="during"), sync=sync)
    text = "(12+7)*3=57, so the answer is"
    leases = [Lease(10 + i, i, prompt, "57", "math", None, 0) for i, prompt in enumerate([text, text * 5])]
    manager = MembershipManager(HOST, cfg.sync.master_port, timeout_s=60.0, bucket_bytes=1 << 20)
    follower = WeightFollower(live.engine, HOST, cfg.sync.master_port, 0, incarnation=4242, timeout_s=60.0)
    old_model, new_model = live.reference, _perturbed(live.reference, seed=72)
    pushed: dict[str, object] = {}
    pusher = threading.Thread(target=lambda: pushed.update(report=manager.push(new_model.named_parameters, 1)))
    try:
        follower.connect(30.0)
        loop = _loop(live, tokenizer, cfg, follower)
        pusher.start()
        deadline = time.monotonic() + 30
        while (spec := follower.read_spec()) is None or spec.slot(0, 4242) is None:
            assert time.monotonic() < deadline, "the learner wrote no spec for this actor"
            time.sleep(0.02)
        rnd = loop._generate(leases)
        pusher.join(60)
        live.reference = new_model
        assert rnd is not None and pushed["report"].ok  # type: ignore[attr-defined]
        assert loop.version == 1 and loop.report.mid_round_updates == loop.report.weight_updates == 1
        assert rnd.version == 0 and rnd.gen_seconds > 0
        switched, worst, gap, _ = _check_round(rnd.prompt_ids, rnd.samples, old_model, new_model, old=0)
        print(f"actor loop: {switched} of {G * len(leases)} responses switched; max |behavior - reference| "
              f"{worst:.3g}; old weights alone {gap:.3g} away; idle {loop.report.idle_seconds:.3f}s")
        assert switched >= 1 and worst < TOL and gap > 100 * TOL

        groups = score_round(rnd, RewardConfig(), actor_id=0)
        for group, samples in zip(groups, rnd.samples, strict=True):
            assert group.policy_version == 0 and set(group.token_versions.tolist()) <= {0, 1}
            assert np.array_equal(group.token_versions, np.concatenate([s.token_versions for s in samples]))

        # between mode: the same loop code without the stepping, every token of the round's version
        cfg_between = VapoConfig(rollout=rollout, sync=cfg.sync)
        loop_between = _loop(live, tokenizer, cfg_between, follower)
        loop_between.version = 1
        rnd = loop_between._generate(leases)
        assert rnd is not None and all(s.token_versions is None for g in rnd.samples for s in g)
        groups = score_round(rnd, RewardConfig(), actor_id=0)
        assert all(g.policy_version == 1 and set(g.token_versions.tolist()) == {1} for g in groups)
        assert _full_parity(live, rnd.prompt_ids, rnd.samples) < TOL
    finally:
        pusher.join(60)
        follower.leave()
        if follower.group is not None:
            live.engine.leave_weight_group()
        manager.close()
