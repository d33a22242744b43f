"""The typed config: defaults, YAML merging, overrides, and one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from shared.config import AlgoConfig, VapoConfig, flatten, load_config, resolve_auto, to_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def test_every_yaml_in_configs_loads() -> None:
    assert len(ALL_YAML) >= 15
    for path in ALL_YAML:
        cfg = load_config([path])
        assert isinstance(cfg, VapoConfig), path


def test_vapo_yaml_equals_the_defaults() -> None:
    # The paper-faithful recipe is the default; vapo.yaml restates it and must not drift.
    assert load_config([CONFIGS / "vapo.yaml"]) == VapoConfig()


def test_paper_values() -> None:
    cfg = VapoConfig()
    a = cfg.algo
    assert (a.clip_low, a.clip_high, a.alpha, a.lambda_critic, a.nll_coef) == (0.2, 0.28, 0.05, 1.0, 0.1)
    assert (a.gamma, a.value_pretrain_steps, a.is_cap, a.kl_coef, a.entropy_coef) == (1.0, 50, 2.0, 0.0, 0.0)
    assert a.dual_clip is None and not a.whiten_advantages and not a.dynamic_sampling
    assert not cfg.reward.overlong_penalty
    assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.learner.mini_batch_size) == (512, 16, 512)
    assert (cfg.learner.actor_lr, cfg.learner.critic_lr, cfg.queue.max_staleness) == (1e-6, 2e-6, 2)


@pytest.mark.parametrize(
    ("name", "changed"),
    [
        ("no_value_pretraining", {"algo.value_pretrain_steps": 0}),
        ("no_decoupled_gae", {"algo.decoupled_gae": False}),
        ("no_length_adaptive_gae", {"algo.length_adaptive": False}),
        ("no_clip_higher", {"algo.clip_high": 0.2}),
        ("no_token_level_loss", {"algo.loss_agg": "sequence"}),
        ("no_positive_lm_loss", {"algo.nll_coef": 0.0}),
        ("no_group_sampling", {"rollout.prompts_per_step": 8192, "rollout.samples_per_prompt": 1}),
    ],
)
def test_each_ablation_changes_exactly_what_it_names(name: str, changed: dict) -> None:
    base = flatten(VapoConfig())
    ablated = flatten(load_config([CONFIGS / "ablations" / f"{name}.yaml"]))
    diff = {k: v for k, v in ablated.items() if base[k] != v}
    assert diff == changed


def test_yaml_files_merge_left_to_right_then_overrides(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("algo:\n  clip_low: 0.1\n  clip_high: 0.3\n")
    b.write_text("algo:\n  clip_high: 0.4\n")
    cfg = load_config([a, b], ["algo.clip_low=0.15", "rollout.stop=[x,y]"])
    assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.rollout.stop) == (0.15, 0.4, ["x", "y"])
    assert type(cfg.algo).__name__ == "AlgoConfig"  # plain dataclasses, never DictConfig


def test_base_chain(tmp_path: Path) -> None:
    (tmp_path / "parent.yaml").write_text("algo:\n  nll_coef: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nalgo:\n  alpha: 0.1\n")
    cfg = load_config([tmp_path / "child.yaml"])
    assert (cfg.algo.nll_coef, cfg.algo.alpha) == (0.5, 0.1)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="circular"):
        load_config([tmp_path / "loop.yaml"])


def _one_line_error(paths: list, overrides: list) -> str:
    with pytest.raises(ValueError) as info:
        load_config(paths, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    assert "did you mean algo.clip_high" in _one_line_error([], ["algo.clip_hihg=0.3"])
    assert "did you mean algo.clip_low" in _one_line_error([], ["clip_low=0.3"])  # right key, wrong section
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  actor_lrr: 1.0e-5\n")
    message = _one_line_error([bad], [])
    assert "bad.yaml" in message and "learner.actor_lrr" in message and "learner.actor_lr" in message
    assert "unknown key 'nothing_like_it'" in _one_line_error([], ["nothing_like_it=1"])
    moved = _one_line_error([], ["learner.activation_checkpointing=true"])  # one key for activation checkpointing
    assert "it is model.gradient_checkpointing now" in moved


def test_wrong_type_names_key_and_source() -> None:
    message = _one_line_error([], ["rollout.samples_per_prompt=many"])
    assert "rollout.samples_per_prompt" in message and "override" in message
    assert "rollout.stop" in _one_line_error([], ["rollout.stop=5"])
    assert "algo" in _one_line_error([], ["algo=3"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("algo.clip_low=1.5", "algo.clip_low"),
        ("algo.alpha=0", "algo.alpha"),
        ("algo.estimator=reinforce", "algo.estimator"),
        ("algo.dual_clip=0.5", "algo.dual_clip"),
        ("algo.is_cap=0.5", "algo.is_cap"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("learner.mini_batch_size=7", "learner.mini_batch_size"),
        ("learner.lr_schedule=linear", "learner.lr_schedule"),
        ("learner.device=tpu", "learner.device"),
        ("sync.backend=mpi", "sync.backend"),
        ("actors.update_mode=sometimes", "actors.update_mode"),
        ("algo.kl_estimator=k4", "algo.kl_estimator"),
        ("learner.min_lr_ratio=1.5", "learner.min_lr_ratio"),
        ("queue.port=70000", "queue.port"),
        ("actors.gpu_memory_utilization=1.5", "actors.gpu_memory_utilization"),
        ("reward.wrong=2", "reward.correct"),
        ("learner.adam_betas=[0.9]", "learner.adam_betas"),
    ],
)
def test_out_of_range_names_the_key(override: str, key: str) -> None:
    assert key in _one_line_error([], [override])


def test_cross_field_rules() -> None:
    assert "samples_per_prompt" in _one_line_error(
        [], ["algo.estimator=grpo", "rollout.samples_per_prompt=1", "rollout.prompts_per_step=512"]
    )
    assert "overlong_max_len" in _one_line_error([], ["reward.overlong_penalty=true", "rollout.max_new_tokens=100"])


def test_bad_override_syntax_and_missing_file(tmp_path: Path) -> None:
    assert "key=value" in _one_line_error([], ["algo.clip_low"])
    assert "not found" in _one_line_error([tmp_path / "nope.yaml"], [])


def test_every_field_has_a_docstring() -> None:
    def check(cls: type) -> None:
        source = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            idx = next(i for i, line in enumerate(source) if line.strip().startswith(f"{f.name}:"))
            assert source[idx + 1].strip().startswith('"""'), f"{cls.__name__}.{f.name} has no docstring"
            if dataclasses.is_dataclass(f.type):
                check(f.type)  # type: ignore[arg-type]

    check(VapoConfig)


def test_yaml_round_trip() -> None:
    cfg = load_config([CONFIGS / "tiny_cpu.yaml"])
    text = to_yaml(cfg)
    assert "clip_high: 0.28" in text
    assert flatten(cfg)["rollout.prompts_per_step"] == 16


def test_a_closed_set_built_in_code_is_checked_too() -> None:
    with pytest.raises(ValueError, match="algo.loss_agg must be one of token, sequence"):
        AlgoConfig(loss_agg="tokens")  # type: ignore[arg-type]


def test_auto_device_and_backends_resolve_once_for_both_sides() -> None:
    cpu = resolve_auto(VapoConfig(), cuda_available=False)
    assert (cpu.learner.device, cpu.learner.backend, cpu.sync.backend) == ("cpu", "gloo", "gloo")
    gpu = resolve_auto(VapoConfig(), cuda_available=True)
    assert (gpu.learner.device, gpu.learner.backend, gpu.sync.backend) == ("cuda", "nccl", "nccl")
    cpu_learner = resolve_auto(load_config([], ["learner.device=cpu"]), cuda_available=True)
    assert (cpu_learner.learner.backend, cpu_learner.sync.backend) == ("gloo", "gloo")  # the actors' too
    pinned = resolve_auto(load_config([], ["learner.backend=gloo", "sync.backend=gloo"]), cuda_available=True)
    assert (pinned.learner.device, pinned.learner.backend, pinned.sync.backend) == ("cuda", "gloo", "gloo")
