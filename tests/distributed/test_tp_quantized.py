"""Tensor parallelism over quantized linears: each rank reads its rows or columns of the quantized data
and the matching block scales, and two ranks compute what one rank computes on the same checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import moeserve
from moeserve.config import ConfigError
from moeserve.distributed.layout import ParallelGroups, ParallelLayout
from moeserve.distributed.parallelize import ParallelOptions
from moeserve.distributed.tensor_parallel import QuantRowParallelLinear, RowParallelLinear
from moeserve.loader.resolve import resolve_checkpoint
from moeserve.loader.weights import export_state_dict
from moeserve.quant.fp8 import quantize_fp8_block
from moeserve.quant.nvfp4 import quantize_nvfp4_weight
from tests.distributed.harness import run_ranks
from tests.quant.test_checkpoints import is_quantized

PRESET = "tiny-deepseek-v3"


def write_quantized(folder, scheme: str, block: int = 32):
    """tiny-deepseek-v3 in DeepSeek FP8 (block x block scales) or ModelOpt NVFP4, every layer linear quantized."""
    original = resolve_checkpoint(PRESET)
    tensors = {}
    for name, w in export_state_dict(moeserve.load_model(PRESET, progress=False)):
        base = name.removesuffix("weight")
        if not is_quantized(name):
            tensors[name] = w
        elif scheme == "fp8":
            values, scale = quantize_fp8_block(w, (block, block))
            tensors |= {name: values, base + "weight_scale_inv": scale}
        else:
            packed, block_scale, global_scale = quantize_nvfp4_weight(w)
            tensors |= {name: packed, base + "weight_scale": block_scale, base + "weight_scale_2": global_scale,
                        base + "input_scale": torch.tensor(0.01)}
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    shutil.copy(original / "tokenizer.json", folder)
    config = json.loads((original / "config.json").read_text())
    if scheme == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [block, block]}
    else:
        (folder / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                                "exclude_modules": ["lm_head"]}}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def batch() -> torch.Tensor:
    return torch.randint(3, 512, (2, 19), generator=torch.Generator().manual_seed(5))


def tp_logits(rank, world, folder, layout):
    """This rank's logits, and how many of its linears are quantized row-parallel shards."""
    options = ParallelOptions(ParallelGroups(ParallelLayout(*layout), "cpu"))
    model = moeserve.load_model(folder, parallel=options, progress=False)
    return model(batch()), sum(isinstance(m, QuantRowParallelLinear) for m in model.modules())


@pytest.mark.parametrize("scheme", ["fp8", "nvfp4"])
def test_two_tp_ranks_over_quantized_linears_match_one_rank(scheme, tmp_path):
    folder = write_quantized(tmp_path / scheme, scheme)
    expected = moeserve.load_model(folder, progress=False)(batch())
    for actual, row_shards in run_ranks(2, tp_logits, folder, (2, 1, 2)):  # TP2 attention and dense MLP, EP2 experts
        assert row_shards == 3 + 1 + 2  # o_proj of 3 layers, the dense MLP's down_proj, 2 shared experts' down_proj
        assert torch.isfinite(actual).all()
        if scheme == "nvfp4":  # W4A16: the ranks' sums differ from one rank's by fp32 rounding only
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
        else:  # W8A8: an fp32 rounding difference (the all-reduce's order) can flip an activation's FP8 code
            assert relative_error(actual, expected) < 0.01  # measured 0.0032; a lost all-reduce gives ~0.9


def build_error(rank, world, folder, layout) -> str:
    try:
        tp_logits(rank, world, folder, layout)
    except ConfigError as error:
        return str(error)
    return "no error"


def test_a_split_through_a_scale_block_is_a_clear_error(tmp_path):
    folder = write_quantized(tmp_path / "fp8-128", "fp8", block=128)  # 96 q_b rows per rank: not whole blocks
    for message in run_ranks(2, build_error, folder, (2, 1, 2)):
        assert "q_b_proj: 96 output features per rank (tp=2) are not whole fp8 scale blocks of 128" in message


def quantized_on_load_logits(rank, world, layout, fmt):
    """This rank's logits with the preset quantized as it loads, and its plain / quantized row-parallel linears."""
    options = ParallelOptions(ParallelGroups(ParallelLayout(*layout), "cpu"))
    model = moeserve.load_model(PRESET, parallel=options, quantization=fmt, progress=False)
    modules = list(model.modules())
    plain_rows = sum(isinstance(m, RowParallelLinear) for m in modules)
    return model(batch()), plain_rows, sum(isinstance(m, QuantRowParallelLinear) for m in modules)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("layout", [(2, 1, 2), (2, 1, 1)], ids=["tp2-ep2", "tp2"])
def test_quantizing_on_load_over_tp_ranks_keeps_the_row_parallel_sums(fmt, layout):
    """Each rank quantizes its own shard (scales of its own), so the logits are not bit-equal to one
    rank's; a row-parallel linear that lost its all-reduce would be off by the size of the logits."""
    reference = moeserve.load_model(PRESET, progress=False)(batch())
    one_rank_error = relative_error(moeserve.load_model(PRESET, quantization=fmt, progress=False)(batch()), reference)
    for actual, plain_rows, quantized_rows in run_ranks(2, quantized_on_load_logits, layout, fmt):
        assert plain_rows == 0 and quantized_rows == 3 + 1 + 2
        assert torch.isfinite(actual).all()
        assert relative_error(actual, reference) < 1.25 * one_rank_error + 0.02
