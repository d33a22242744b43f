"""Actor generation with vLLM against transformers `generate`, and weight-push time against a memory copy.

Generation: the tiny model (`vapo make-tiny-model`) and held-out problems of the built-in
arithmetic task, tokenised as the actor does (`actors.rollout.prompt_ids`), G = 16 samples per
prompt, the tiny run's sampling settings (`configs/tiny_cpu.yaml`: temperature, top-p, max new
tokens). vLLM is the actor's own engine (`actors.main.build_engine`, `actors.engine.Engine`),
called once per lease batch of `actors.prompts_per_lease` prompts, as the actor loop does; its
`actors.max_num_seqs` is scaled with G so that one lease's samples fit in a batch, as
tiny_cpu.yaml sizes it for its G = 8 (16 prompts x 8 = 128; the config's 128 with G = 16 ran vLLM
about 1.4x slower: 5,270 against 7,200-7,370 tokens/s at load 2).
transformers runs `generate(do_sample=True, num_return_sequences=G)` on the same prompts with the
same temperature, top-p (top-k off, as in vLLM) and max_new_tokens, several prompts per call, left
padding, KV cache on; it is timed at each batch size of `--hf-batch-prompts` and its best figure
counts. The two alternate lease batch by lease batch, so the shared machine's load changes fall on
both alike; both are warmed up first on other prompts. transformers runs on one torch thread
(`--threads`), as vLLM's CPU worker does (vLLM's automatic binding keeps the other core for the
engine's scheduler); on this shared 2-core machine two OpenMP threads ran transformers 5-8x
slower at load 7-12 (47 against 371 tokens/s) and only ~10% faster at load 1.6 (3,100-3,230
against 2,840-2,880 tokens/s, 1 prompt per call). Generated tokens are counted up to and including
the first EOS (vLLM returns the EOS among its token ids; transformers' padding after it is not
counted). Mean response length, EOS count and the share of correct answers are printed for both:
the same model with the same sampling, they must agree up to noise, which shows that the counts
compare like with like.

What bounds the ratio on the 2-core machine (measured with the tiny model, G = 16, load 2-4):
vLLM's cost is per engine step, not per FLOP: its front-end, engine-core and worker processes run
in lockstep (vLLM turns async scheduling off on CPU; core and worker spin-wait for each other about
half the time), ~13 ms a step with ~48 sequences, ~20 ms with ~150 and ~42-49 ms with 256, i.e.
~10 ms + ~0.13 ms per sequence, which caps it near 6-7k tokens/s however large the batch. A lease
call also ends in a tail: >10% of responses reach max_new_tokens (median ~65 tokens), so ~160 of
its ~256 steps run with fewer than 64 sequences. transformers is fastest with 1 prompt per call
(~3,000 tokens/s; 8 prompts: ~1,450, as every row is padded to the longest response). Tried
without gain: two OpenMP threads for the worker (no reserved core: ~2,100 against ~3,900-4,800
tokens/s), LD_PRELOAD of libiomp5 and VLLM_CPU_ATTN_SPLIT_KV=0 (within the run-to-run spread of ~20%),
max_num_seqs 128 for a 256-sequence lease (4,200-4,850 against 3,900-4,150 tokens/s: within the
spread), the engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~640 tokens/s). Flat
log-probs and no vLLM detokenizer (`actors.engine`) cut a 256-sequence step from ~62-69 to ~39-49
ms, but a lease call, mostly tail, gains less than the spread. Full runs at load 1.6-3.6: vLLM
4,000-4,600 tokens/s against transformers' best 3,000-3,250, a ratio of 1.2-1.5; at load 1.1-1.2
(session 11) both ran ~3x faster, 12,384 against 8,796 tokens/s (1 prompt per call), a ratio of 1.4.

Weight push: the real path, `learner.weight_sender.WeightSender` (bucketed, header, handshake) over
a gloo group built by `shared.weights.group`, to two receivers:
- the tiny model (its perturbed parameters, as the learner pushes `named_parameters()`) into two
  live vLLM engines through `actors.weight_receiver.WeightReceiver`, timed until both engines
  have applied it (vLLM's in-place reload, the prefix-cache reset and the RPC included), then
  checked by log-prob parity against transformers (`deploy.doctor`);
- a synthetic model with Qwen2.5-0.5B's parameter shapes (494,032,768 parameters, tied
  embeddings, random bfloat16 tensors: no download) into two plain receiver processes that join
  with `actors.weight_receiver.join_weight_group`, receive with its `BucketStream` and copy each
  tensor into a preallocated parameter (what vLLM's reload does); timed until both report done,
  then checked by a digest of every received byte.
The reference is one in-memory copy of the same bytes into preallocated tensors (best of 3).
`weight push GB/s` is the model's bytes over the push time (each receiver gets all of them).

    python3 bench/generation.py            # 64 prompts, 3 pushes of each model
    python3 bench/generation.py --quick    # 16 prompts, 1 push, one transformers batch size

The last line is `vllm/hf_generate tokens-per-second ratio: X` (the target is at least 5).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where bench/queue.py would shadow the
# standard library; the repository root goes there instead, so `learner` imports too.
if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deploy.doctor import (  # noqa: E402
    builtin_model_path,
    fixed_sequences,
    free_port,
    hf_logprobs,
    max_abs_diff,
    perturb_,
    with_peers,
)
from learner.weight_sender import WeightSender  # noqa: E402
from shared.config import VapoConfig, load_config  # noqa: E402
from shared.data.records import load_records  # noqa: E402
from shared.data.tasks.arithmetic import extract_answer  # noqa: E402
from shared.types import Lease  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
G = 16
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
QWEN25_05B_PARAMS = 494_032_768
SPAWN = mp.get_context("spawn")


def load() -> str:
    """The 1-minute load average, for the figures' context."""
    return f"load {os.getloadavg()[0]:.2f}"


@dataclass
class GenResult:
    """What one generator produced over the run: tokens, seconds, per-response lengths and correctness."""

    name: str
    num_tokens: int = 0
    seconds: float = 0.0
    lengths: list[int] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    num_eos: int = 0
    """Responses that ended with EOS (the EOS is among the counted tokens); the rest hit max_new_tokens."""

    def add(self, lengths: list[int], correct: list[bool], num_eos: int, seconds: float) -> None:
        """Count one timed call."""
        self.lengths += lengths
        self.correct += correct
        self.num_tokens += sum(lengths)
        self.num_eos += num_eos
        self.seconds += seconds

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds

    def summary(self) -> str:
        return (f"{self.name}: {self.num_tokens} tokens in {self.seconds:.1f} s = {self.tokens_per_s:.0f} tokens/s; "
                f"{len(self.lengths)} responses, mean length {statistics.fmean(self.lengths):.1f}, "
                f"{self.num_eos} ended with EOS, accuracy {statistics.fmean(self.correct):.3f}")


# --- generation -----------------------------------------------------------------------------------------------


def arithmetic_prompts(tokenizer, num: int, seed: int, max_prompt_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Token ids (as the actor builds them) and ground truths of `num` held-out arithmetic problems."""
    from actors.rollout import prompt_ids

    records = load_records("builtin:arithmetic", split="test", num=num, seed=seed)
    prompts = []
    for r in records:
        ids, _ = prompt_ids(Lease(r.index, r.index, r.prompt, r.ground_truth, r.data_source, r.messages, 0),
                            tokenizer, max_prompt_tokens)
        prompts.append(ids)
    return prompts, [r.ground_truth for r in records]


def run_vllm(engine, prompts: list[list[int]], truths: list[str], cfg: VapoConfig, eos_id: int,
             result: GenResult) -> None:
    """One `Engine.generate` call for a lease batch of prompts, G samples each, as the actor loop makes it."""
    r = cfg.rollout
    t0 = time.perf_counter()
    groups = engine.generate(prompts, n=G, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens,
                             stop=r.stop or None)
    seconds = time.perf_counter() - t0
    samples = [(s, truth) for group, truth in zip(groups, truths, strict=True) for s in group]
    result.add([len(s.token_ids) for s, _ in samples], [extract_answer(s.text) == truth for s, truth in samples],
               sum(len(s.token_ids) > 0 and int(s.token_ids[-1]) == eos_id for s, _ in samples), seconds)


def generated_lengths(sequences: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Tokens of each generated row [N, T] up to and including its first EOS (all T when it has none): [N]."""
    is_eos = sequences == eos_id
    first = is_eos.int().argmax(dim=1) + 1
    return torch.where(is_eos.any(dim=1), first, torch.full_like(first, sequences.shape[1]))


@torch.no_grad()
def run_hf(model, tokenizer, prompts: list[list[int]], truths: list[str], cfg: VapoConfig, batch_prompts: int,
           result: GenResult) -> None:
    """transformers `generate` with G samples per prompt, `batch_prompts` prompts per call, left padding."""
    r = cfg.rollout
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start : start + batch_prompts]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        t0 = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                             temperature=r.temperature, top_p=r.top_p, top_k=0, max_new_tokens=r.max_new_tokens,
                             num_return_sequences=G, pad_token_id=pad, eos_token_id=eos, use_cache=True)
        seconds = time.perf_counter() - t0
        generated = out[:, width:]
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        result.add(generated_lengths(generated, eos).tolist(),
                   [extract_answer(t) == truths[start + i // G] for i, t in enumerate(texts)],
                   int((generated == eos).any(dim=1).sum()), seconds)


def compare_generation(engine, model, tokenizer, prompts: list[list[int]], truths: list[str], cfg: VapoConfig,
                       hf_batches: list[int]) -> tuple[GenResult, list[GenResult]]:
    """vLLM and transformers (at each batch size) on the same prompts, interleaved lease batch by lease batch.

    Interleaving spreads the load of the shared machine over both sides alike.
    """
    vllm = GenResult("vllm")
    hf = [GenResult(f"hf_generate ({b} prompts x {G} per call)") for b in hf_batches]
    per_lease = cfg.actors.prompts_per_lease
    for start in range(0, len(prompts), per_lease):
        lease = prompts[start : start + per_lease], truths[start : start + per_lease]
        run_vllm(engine, *lease, cfg, tokenizer.eos_token_id, vllm)
        for b, result in zip(hf_batches, hf, strict=True):
            run_hf(model, tokenizer, *lease, cfg, b, result)
        rates = ", ".join(f"{x.tokens_per_s:.0f}" for x in [vllm, *hf])
        print(f"  prompts {start + len(lease[0])}/{len(prompts)}: tokens/s so far (vllm, hf...) {rates}; {load()}")
    return vllm, hf


# --- weight push ----------------------------------------------------------------------------------------------


def qwen25_05b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of Qwen2.5-0.5B's parameters as transformers names them (tied: no lm_head.weight)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B))
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert sum(torch.Size(s).numel() for _, s in shapes) == QWEN25_05B_PARAMS
    return shapes


def synthetic_state(
    shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, seed: int
) -> list[tuple[str, torch.Tensor]]:
    """Seeded random tensors of these shapes."""
    gen = torch.Generator().manual_seed(seed)
    return [(name, torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=gen)) for name, shape in shapes]


def digest(tensors: list[torch.Tensor]) -> str:
    """BLAKE2 of the tensors' bytes, in order."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def copy_seconds(tensors: list[torch.Tensor], repeats: int = 3) -> float:
    """Best time of one in-memory copy of every tensor into preallocated (already touched) tensors."""
    dst = [torch.empty_like(t) for t in tensors]
    times = []
    for _ in range(repeats + 1):  # the first pass touches the destination pages and is not counted
        t0 = time.perf_counter()
        for d, s in zip(dst, tensors, strict=True):
            d.copy_(s)
        times.append(time.perf_counter() - t0)
    assert all(torch.equal(d, s) for d, s in zip(dst[:3], tensors[:3], strict=True))
    return min(times[1:])


def receiver_main(port: int, rank: int, world_size: int, group_name: str, shapes: list, dtype_name: str,
                  num_pushes: int, timeout_s: float) -> None:
    """A plain receiving process: joins and receives exactly as the vLLM worker extension, copying into parameters."""
    torch.set_num_threads(1)
    from actors.weight_receiver import BucketStream, join_weight_group

    params = {name: torch.zeros(shape, dtype=getattr(torch, dtype_name)) for name, shape in shapes}
    for p in params.values():
        p.fill_(0)  # touched, as a loaded model's parameters are
    group, store = join_weight_group(HOST, port, rank, world_size, "gloo", timeout_s, group_name)
    for push in range(num_pushes):
        cpu0 = time.process_time()
        stream = BucketStream(group, torch.device("cpu"))
        stream.fetch_first()
        for name, tensor in stream:
            params[name].copy_(tensor)
        assert stream.done and stream.num_tensors == len(params)
        store.set(f"bench/done/{push}/{rank}", str(time.process_time() - cpu0))  # CPU seconds, all threads
    store.set(f"bench/digest/{rank}", digest(list(params.values())))  # after the timing


def push_to_processes(state: list[tuple[str, torch.Tensor]], num_pushes: int, bucket_bytes: int,
                      timeout_s: float = 300.0) -> list[float]:
    """Push `state` `num_pushes` times to two receiver processes; seconds of each push until both are done."""
    port, world_size, group_name = free_port(), 3, "weights/0"
    shapes = [(name, tuple(t.shape)) for name, t in state]
    dtype_name = str(state[0][1].dtype).removeprefix("torch.")
    procs = [SPAWN.Process(target=receiver_main, daemon=True,
                           args=(port, rank, world_size, group_name, shapes, dtype_name, num_pushes, timeout_s))
             for rank in (1, 2)]
    for p in procs:
        p.start()
    sender = WeightSender(HOST, port, world_size, timeout_s=timeout_s, bucket_bytes=bucket_bytes)
    store = dist.PrefixStore(group_name, sender.store)
    seconds = []
    try:
        for push in range(num_pushes):
            t0, cpu0 = time.perf_counter(), time.process_time()
            stats = sender.push(state, version=push + 1)
            cpu = time.process_time() - cpu0
            store.wait([f"bench/done/{push}/{rank}" for rank in (1, 2)])
            seconds.append(time.perf_counter() - t0)
            cpu += sum(float(store.get(f"bench/done/{push}/{rank}")) for rank in (1, 2))
            print(f"  push {push + 1}: {seconds[-1]:.3f} s until both received ({stats.seconds:.3f} s at the sender, "
                  f"{stats.num_buckets} buckets; {cpu:.2f} CPU seconds in the sender and receivers); {load()}")
        expected = digest([t for _, t in state])
        got = [store.get(f"bench/digest/{rank}").decode() for rank in (1, 2)]
        if got != [expected, expected]:
            raise SystemExit(f"a receiver holds different bytes: digests {got}, expected {expected}")
    finally:
        sender.close()
        for p in procs:
            p.join(timeout=60)
    return seconds


def push_to_engines(engines: list, model, num_pushes: int, bucket_bytes: int, seed: int) -> tuple[list[float], float]:
    """Push perturbed copies of `model` into the live engines; seconds of each (until both applied), worst parity."""
    port, world_size = free_port(), 1 + sum(e.num_workers for e in engines)
    joins, offset = [], 1
    for e in engines:
        joins.append(lambda e=e, o=offset: e.join_weight_group(HOST, port, rank_offset=o, world_size=world_size,
                                                                group_name="weights/0", timeout_s=120))
        offset += e.num_workers
    sender, _ = with_peers(joins, lambda: WeightSender(HOST, port, world_size, timeout_s=120,
                                                       bucket_bytes=bucket_bytes))
    sequences = fixed_sequences(model.config.vocab_size, seed)
    seconds, worst = [], 0.0
    try:
        for push in range(num_pushes):
            model = copy.deepcopy(model)
            perturb_(model, seed + push, scale=0.1)
            t0 = time.perf_counter()
            stats, versions = with_peers([e.apply_weights for e in engines],
                                         lambda m=model, v=push + 1: sender.push(m.named_parameters(), v))
            seconds.append(time.perf_counter() - t0)
            assert versions == [push + 1] * len(engines)
            applied = ", ".join(f"{e.last_push['seconds']:.3f}" for e in engines)
            print(f"  push {push + 1}: {seconds[-1]:.3f} s until both engines applied it ({stats.seconds:.3f} s at "
                  f"the sender; receivers {applied} s); {load()}")
            expected = hf_logprobs(model, sequences)
            worst = max([worst] + [max_abs_diff(e.score(sequences), expected) for e in engines])
    finally:
        for e in engines:
            e.leave_weight_group()
        sender.close()
    return seconds, worst


def report_push(label: str, tensors: list[torch.Tensor], seconds: list[float]) -> None:
    """Print the push's GB/s and its time against one in-memory copy of the same bytes."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    copy_s = copy_seconds(tensors)
    push_s = min(seconds)
    print(f"{label}: {nbytes / 1e9:.4f} GB, push {push_s:.4f} s (best of {len(seconds)}), in-memory copy "
          f"{copy_s:.4f} s ({nbytes / copy_s / 1e9:.2f} GB/s); {load()}")
    print(f"{label}: weight push GB/s: {nbytes / push_s / 1e9:.3f}; push/in-memory-copy time ratio: "
          f"{push_s / copy_s:.1f}")


# --- main -----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts, 1 push per model, one HF batch size")
    parser.add_argument("--prompts", type=int, default=64, help="held-out arithmetic problems (G = 16 samples each)")
    parser.add_argument("--hf-batch-prompts", default="1,2,4,8", help="prompts per generate call to try (best counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here (transformers, the memory copy)")
    parser.add_argument("--pushes", type=int, default=3, help="pushes of each model (the best counts)")
    parser.add_argument("--bucket-mb", type=int, default=0, help="bucket size (default: the tiny run's sync.bucket_mb)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-path", default="", help="tiny model directory (default: builtin:tiny)")
    args = parser.parse_args()
    num_prompts, pushes = (16, 1) if args.quick else (args.prompts, args.pushes)
    hf_batches = [2] if args.quick else [int(b) for b in args.hf_batch_prompts.split(",")]
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.main import build_engine

    tiny = load_config([ROOT / "configs" / "tiny_cpu.yaml"])
    # G = 16 instead of the tiny run's 8; the engine keeps room for one lease's samples, as tiny_cpu.yaml sizes it
    seqs = max(tiny.actors.prompts_per_lease * G, tiny.actors.max_num_seqs)
    cfg = load_config([ROOT / "configs" / "tiny_cpu.yaml"],
                      [f"rollout.samples_per_prompt={G}", f"actors.max_num_seqs={seqs}"])
    model_path = args.model_path or builtin_model_path(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompts, truths = arithmetic_prompts(tokenizer, num_prompts, args.seed, cfg.rollout.max_prompt_tokens)
    r = cfg.rollout
    bucket_bytes = (args.bucket_mb or cfg.sync.bucket_mb) << 20
    print(f"tiny model {model_path}; {num_prompts} prompts x G={G}, temperature {r.temperature}, top_p {r.top_p}, "
          f"max_new_tokens {r.max_new_tokens}; vLLM max_num_seqs {seqs} (tiny_cpu.yaml: {tiny.actors.max_num_seqs} "
          f"for G={tiny.rollout.samples_per_prompt}); torch threads {torch.get_num_threads()}; buckets of "
          f"{bucket_bytes >> 20} MiB; {load()}")

    engines = [build_engine(cfg, 0, model_path)]
    try:
        warm_prompts, warm_truths = arithmetic_prompts(tokenizer, cfg.actors.prompts_per_lease, args.seed + 1,
                                                       cfg.rollout.max_prompt_tokens)
        run_vllm(engines[0], warm_prompts, warm_truths, cfg, tokenizer.eos_token_id, GenResult("warm-up"))
        torch.manual_seed(args.seed)
        run_hf(model, tokenizer, warm_prompts[:1], warm_truths[:1], cfg, 1, GenResult("warm-up"))
        vllm, hf_runs = compare_generation(engines[0], model, tokenizer, prompts, truths, cfg, hf_batches)
        for result in [vllm, *hf_runs]:
            print(result.summary())
        hf = max(hf_runs, key=lambda x: x.tokens_per_s)

        print("weight push, tiny model -> 2 live vLLM engines (actors.weight_receiver.WeightReceiver):")
        engines.append(build_engine(cfg, 1, model_path))
        seconds, worst = push_to_engines(engines, model, pushes, bucket_bytes, args.seed)
        print(f"  max_abs_logprob_diff after the pushes (vLLM vs transformers): {worst:.3g}")
        report_push("tiny model", [p.detach() for p in model.parameters()], seconds)
    finally:
        for e in engines:
            e.shutdown()

    print("weight push, Qwen2.5-0.5B-shaped synthetic model (bfloat16) -> 2 plain receiver processes "
          "(actors.weight_receiver.BucketStream):")
    state = synthetic_state(qwen25_05b_shapes(), torch.bfloat16, args.seed)
    seconds = push_to_processes(state, pushes, bucket_bytes)
    report_push("0.5B synthetic", [t for _, t in state], seconds)
    del state

    print(f"vllm/hf_generate tokens-per-second ratio: {vllm.tokens_per_s / hf.tokens_per_s:.1f}")


if __name__ == "__main__":
    main()
