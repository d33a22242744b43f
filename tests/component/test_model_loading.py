"""Sharded loading: models built on the meta device and filled from the checkpoint's tensors, a rank's rows each.

Against `transformers`' own `from_pretrained` of the same directory: the same parameters and buffers and
the same logits, unsharded and on two FSDP2 ranks over gloo (each rank's shard equal to its rows of the
full tensor). The value model keeps a reward model's one-label score head and zero-initialises the head
otherwise. A rank's memory while loading is its shard plus a slice (the high-water mark of its resident
memory, reset before loading: a whole model per rank would exceed the bound). A checkpoint stored in
bf16 loads into float32 masters, and a missing tensor is a one-line error naming it.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from learner.hf_checkpoint import CheckpointReader, model_directory
from learner.model import ValueModel, load_policy, load_value_model
from tests.component.test_learner import _free_port


def _reference(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _assert_same_model(got: torch.nn.Module, want: torch.nn.Module) -> None:
    got_params, want_params = dict(got.named_parameters()), dict(want.named_parameters())
    assert got_params.keys() == want_params.keys()
    for name, param in want_params.items():
        full = got_params[name]
        full = full.full_tensor() if hasattr(full, "full_tensor") else full
        assert full.dtype == torch.float32, name
        torch.testing.assert_close(full, param, rtol=0, atol=0, msg=name)
    for (name, buf), (_, ref_buf) in zip(got.named_buffers(), want.named_buffers(), strict=True):
        torch.testing.assert_close(buf, ref_buf, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_an_unsharded_load_equals_from_pretrained(tied: bool, random_model_dir: Path,
                                                  random_untied_model_dir: Path) -> None:
    model_dir = random_model_dir if tied else random_untied_model_dir
    policy, want = load_policy(model_dir), _reference(model_dir)
    _assert_same_model(policy, want)
    assert (policy.lm_head.weight is policy.model.embed_tokens.weight) == tied
    ids = torch.randint(3, 51, (2, 11))
    torch.testing.assert_close(policy(input_ids=ids).logits, want(input_ids=ids).logits, rtol=0, atol=0)


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _sharded_rank(rank: int, world: int, port: int, model_dir: str, small_dir: str, out: dict) -> None:
    import torch.distributed as dist

    from learner.model import shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        load_policy(small_dir, wrap=shard)  # what loading imports is not counted: a small model first
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again at the current RSS
        before = _hwm_kib()
        policy = load_policy(model_dir, wrap=shard)
        grown = (_hwm_kib() - before) * 1024
        want = _reference(Path(model_dir))
        full_bytes = sum(p.numel() * 4 for p in want.parameters())
        largest = max(p.numel() * 4 for p in want.parameters())
        for name, param in policy.named_parameters():
            full, local = param.full_tensor(), param.to_local()
            rows = -(-full.shape[0] // world)
            torch.testing.assert_close(local, full[rank * rows : (rank + 1) * rows], rtol=0, atol=0, msg=name)
        _assert_same_model(policy, want)
        ids = torch.randint(3, 51, (2, 11))
        torch.testing.assert_close(policy(input_ids=ids).logits, want(input_ids=ids).logits, rtol=0, atol=0)
        out[rank] = (grown, full_bytes, largest)
    finally:
        dist.destroy_process_group()


def _wide_model_dir(out: Path) -> Path:
    """Many mid-sized tensors (no dominant embedding), so a shard is clearly less than the model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.component.conftest import build_random_model

    build_random_model(out, tie_word_embeddings=True)  # the tokenizer; the model is replaced
    config = Qwen2Config(vocab_size=51, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=512, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def test_two_ranks_each_load_their_own_rows_and_hold_no_whole_model(tmp_path: Path, random_model_dir: Path) -> None:
    model_dir = _wide_model_dir(tmp_path / "wide")
    port, world = _free_port(), 2
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        args = (world, port, str(model_dir), str(random_model_dir), out)
        procs = [ctx.Process(target=_sharded_rank, args=(r, *args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        results = dict(out)
    for rank, (grown, full_bytes, largest) in results.items():
        # its shard (half the model), a slice of one tensor, and 16 MiB of slack; a whole model is twice the shard
        bound = full_bytes / world + largest + 16 * 2**20
        assert grown < bound, (rank, grown / 2**20, bound / 2**20, full_bytes / 2**20)


def test_a_bf16_checkpoint_loads_into_float32_masters(tmp_path: Path, random_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_pretrained(random_model_dir, dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    policy = load_policy(tmp_path)
    for (name, got), (_, want) in zip(policy.named_parameters(), bf16.named_parameters(), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=0, atol=0, msg=name)


def test_the_value_model_has_the_policys_backbone_and_a_zero_head(random_model_dir: Path) -> None:
    value, want = load_value_model(random_model_dir), _reference(random_model_dir)
    assert isinstance(value, ValueModel)
    for name, param in want.model.named_parameters():
        torch.testing.assert_close(value.backbone.get_parameter(name), param, rtol=0, atol=0, msg=name)
    assert not value.value_head.weight.any() and not value.value_head.bias.any()


@pytest.mark.parametrize("num_labels", [1, 2])
def test_a_reward_model_gives_its_score_head_when_it_has_the_heads_shape(
    num_labels: int, tmp_path: Path, random_model_dir: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(5)
    rm = AutoModelForSequenceClassification.from_pretrained(random_model_dir, num_labels=num_labels,
                                                            dtype=torch.float32)
    with torch.no_grad():
        rm.score.weight.normal_()
        for p in rm.model.parameters():
            p.add_(0.01)  # a backbone unlike the policy's
    rm.save_pretrained(tmp_path)
    value = load_value_model(random_model_dir, tmp_path)
    for name, param in rm.model.named_parameters():
        torch.testing.assert_close(value.backbone.get_parameter(name), param, rtol=0, atol=0, msg=name)
    if num_labels == 1:
        torch.testing.assert_close(value.value_head.weight, rm.score.weight, rtol=0, atol=0)
    else:
        assert not value.value_head.weight.any()
    assert not value.value_head.bias.any()  # Qwen2's score head has no bias


def test_a_missing_tensor_is_a_one_line_error_naming_it(tmp_path: Path, random_untied_model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    for f in random_untied_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(random_untied_model_dir / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no tensor lm_head\.weight$"):
        load_policy(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reader_returns_safetensors_own_rows(dtype: torch.dtype, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    tensors = {"a": torch.randn(7, 3, 2).to(dtype), "b": torch.randn(5).to(dtype), "c": torch.tensor(2.5).to(dtype),
               "d": torch.randint(0, 9, (4, 4))}
    save_file(tensors, tmp_path / "model.safetensors")
    reader, want = CheckpointReader(tmp_path), load_file(tmp_path / "model.safetensors")
    for key, tensor in want.items():
        assert reader.shape(key) == tuple(tensor.shape)
        if tensor.dim() == 0:
            torch.testing.assert_close(reader.rows(key, 0, 0), tensor, rtol=0, atol=0)
            continue
        for start, end in ((0, tensor.shape[0]), (1, 3), (3, 3), (4, 99)):
            got = reader.rows(key, start, end)
            assert got.dtype == tensor.dtype
            torch.testing.assert_close(got, tensor[start:end], rtol=0, atol=0)


def test_a_bin_checkpoint_reads_like_safetensors(tmp_path: Path, random_model_dir: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(random_model_dir / "model.safetensors")
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    bin_reader, st_reader = CheckpointReader(tmp_path), CheckpointReader(random_model_dir)
    for key, tensor in tensors.items():
        assert bin_reader.shape(key) == st_reader.shape(key) == tuple(tensor.shape)
        torch.testing.assert_close(bin_reader.rows(key, 1, 3), st_reader.rows(key, 1, 3), rtol=0, atol=0)


def test_a_path_that_is_neither_a_directory_nor_a_hub_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a directory nor a hub id"):
        model_directory(tmp_path / "nope" / "deeper")
    with pytest.raises(ValueError, match="no weights"):
        CheckpointReader(tmp_path)
