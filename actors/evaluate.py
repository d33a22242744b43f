"""Held-out evaluation: k samples per problem from a vLLM engine, scored by the training verifier.

The measure the VAPO paper reports (and `bench/learning.py` uses) is the *average accuracy
over k samples*: for each held-out problem the share of its k sampled responses the verifier
accepts, averaged over problems (AIME24 avg@32 in the paper). pass@k (at least one of the k
correct) and the mean response length come with it.

Decisions:
- The prompts are rendered and cut exactly as the actor does for training
  (`actors.rollout.prompt_ids`), and responses are scored with the same reward rule
  (`actors.rollout.response_reward`), so an evaluation measures what training optimises.
- Sampling settings are arguments, not the training config's, because one usually evaluates
  at the training temperature (the policy RL improves) but may want greedy too.
- All prompts go to the engine in one `generate` call (vLLM batches them); a fixed seed makes
  a repeated evaluation of the same weights give the same number.

`python -m actors.evaluate CONFIG [key=value ...] --model-path DIR [--k K] [--num N]` evaluates
a policy directory (the tiny model, an exported checkpoint) on the config's held-out prompts
(`data.eval_path`, else the built-in task's test split) and prints the result as one JSON line.

Must not import learner or deploy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.rollout import SampleLike, prompt_ids, response_reward
from shared.config import RewardConfig, VapoConfig, load_config
from shared.data.records import PromptRecord, load_records
from shared.types import Lease

if TYPE_CHECKING:
    from actors.engine import Engine


@dataclass(frozen=True)
class EvalResult:
    """Average accuracy over k samples, pass@k and mean response tokens on `num_problems` problems."""

    accuracy: float
    pass_at_k: float
    mean_response_tokens: float
    num_problems: int
    k: int
    per_problem: tuple[float, ...]
    """Share of the k samples judged correct, per problem, in input order."""

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """The figures as flat metric names."""
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}pass_at_k": self.pass_at_k,
                f"{prefix}response_tokens": self.mean_response_tokens}


def evaluate(
    engine: Engine,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    *,
    k: int,
    reward_cfg: RewardConfig,
    max_tokens: int,
    max_prompt_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> EvalResult:
    """Sample k responses per record with `engine` and score them (see the module note)."""
    if k < 1 or not records:
        raise ValueError(f"need k >= 1 and at least one record; got k={k}, {len(records)} records")
    leases = [Lease(i, r.index, r.prompt, r.ground_truth, r.data_source, r.messages, 0)
              for i, r in enumerate(records)]
    ids = [prompt_ids(lease, tokenizer, max_prompt_tokens)[0] for lease in leases]
    samples = engine.generate(ids, n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    return score_samples(records, samples, reward_cfg)


def score_samples(
    records: Sequence[PromptRecord], samples: Sequence[Sequence[SampleLike]], reward_cfg: RewardConfig
) -> EvalResult:
    """The evaluation figures of k samples per record (the same k for every record)."""
    ks = {len(group) for group in samples}
    if len(samples) != len(records) or len(ks) != 1 or 0 in ks:
        raise ValueError(f"need the same k >= 1 samples for each of {len(records)} records; got sizes {sorted(ks)}")
    per_problem, lengths = [], []
    for record, group in zip(records, samples, strict=True):
        correct = [response_reward(s.text, len(s.token_ids), record.ground_truth, reward_cfg)[1] for s in group]
        per_problem.append(float(np.mean(correct)))
        lengths.extend(len(s.token_ids) for s in group)
    scores = np.array(per_problem)
    return EvalResult(
        accuracy=float(scores.mean()), pass_at_k=float((scores > 0).mean()),
        mean_response_tokens=float(np.mean(lengths)), num_problems=len(records), k=ks.pop(),
        per_problem=tuple(per_problem),
    )

def eval_records(cfg: VapoConfig, num: int | None = None) -> list[PromptRecord]:
    """The held-out prompts: `data.eval_path`, else the built-in task's test split (`data.builtin_eval_size`)."""
    d = cfg.data
    path = d.eval_path or d.train_path
    if not path.startswith("builtin:") and d.eval_path is None:
        raise ValueError("data.eval_path is not set (only a built-in task has a held-out split of its own)")
    builtin = path.startswith("builtin:")
    return load_records(path, prompt_key=d.prompt_key, answer_key=d.answer_key, source_key=d.source_key,
                        split="test", num=(num or d.builtin_eval_size) if builtin else num, seed=cfg.seed)


def main(argv: list[str] | None = None) -> int:
    """`python -m actors.evaluate CONFIG [key=value ...] --model-path DIR [--k K] [--num N] [--seed S]`."""
    from transformers import AutoTokenizer

    from actors.main import build_engine

    parser = argparse.ArgumentParser(prog="python -m actors.evaluate", description="Held-out accuracy of a policy.")
    parser.add_argument("items", nargs="*", metavar="CONFIG|key=value", help="YAML files, then overrides")
    parser.add_argument("--model-path", required=True, help="the policy directory (Hugging Face layout)")
    parser.add_argument("--k", type=int, default=8, help="samples per problem (default 8)")
    parser.add_argument("--num", type=int, default=None, help="problems (default: all held-out ones)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config([x for x in args.items if "=" not in x], [x for x in args.items if "=" in x])
    records = eval_records(cfg, args.num)
    engine = build_engine(cfg, 0, args.model_path)
    try:
        result = evaluate(engine, AutoTokenizer.from_pretrained(args.model_path), records, k=args.k,
                          reward_cfg=cfg.reward, max_tokens=cfg.rollout.max_new_tokens,
                          max_prompt_tokens=cfg.rollout.max_prompt_tokens, temperature=cfg.rollout.temperature,
                          top_p=cfg.rollout.top_p, seed=args.seed)
    finally:
        engine.shutdown()
    summary = {k: v for k, v in asdict(result).items() if k != "per_problem"}
    print(json.dumps({"model_path": args.model_path, **summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
