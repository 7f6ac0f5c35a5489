"""Quantized checkpoints, written here tensor by tensor in each scheme's layout, load and compute
exactly what the same model with the dequantized weights computes, and stay close to the original."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import moeserve
from moeserve import CheckpointError, ConfigError
from moeserve.cli import main
from moeserve.loader.resolve import resolve_checkpoint
from moeserve.loader.weights import export_state_dict
from moeserve.quant.formats import QuantizedWeight
from moeserve.quant.fp8 import dequantize_fp8_block, quantize_fp8_block
from moeserve.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4_weight

PRESET = "tiny-deepseek-v3"
HIGH_PRECISION = ("norm.weight", "mlp.gate.weight", "e_score_correction_bias", "embed_tokens.weight", "lm_head.weight")


def is_quantized(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(".weight") and not name.endswith(HIGH_PRECISION)


def quantize_tensor(scheme: str, name: str, w: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The scheme's tensors for one weight, and the weight they dequantize to."""
    base = name.removesuffix("weight")
    if scheme in ("deepseek-fp8", "ct-fp8"):
        values, scale = quantize_fp8_block(w)
        scale_name = "weight_scale_inv" if scheme == "deepseek-fp8" else "weight_scale"
        return {name: values, base + scale_name: scale}, dequantize_fp8_block(values, scale)
    packed, block_scale, global_scale = quantize_nvfp4_weight(w)
    restored = dequantize_nvfp4(packed, block_scale, global_scale.view(1, 1))
    if scheme == "modelopt-nvfp4":
        return {name: packed, base + "weight_scale": block_scale, base + "weight_scale_2": global_scale,
                base + "input_scale": torch.tensor(0.01)}, restored
    return {base + "weight_packed": packed, base + "weight_scale": block_scale,
            base + "weight_global_scale": 1.0 / global_scale, base + "input_global_scale": torch.tensor(100.0)}, restored


QUANT_CONFIGS = {
    "deepseek-fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "ct-fp8": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128, "dynamic": True}}},
        "ignore": ["lm_head"]},
    "modelopt-nvfp4": None,  # in hf_quant_config.json, as ModelOpt writes it
    "ct-nvfp4": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}}},
        "ignore": ["lm_head"]},
}


def write_checkpoints(scheme: str, folder) -> tuple:
    """(quantized folder, folder of the same model with the dequantized weights)."""
    original = resolve_checkpoint(PRESET)
    model = moeserve.load_model(PRESET, progress=False)
    quantized, dequantized = {}, {}
    for name, tensor in export_state_dict(model):
        if is_quantized(name):
            tensors, restored = quantize_tensor(scheme, name, tensor)
            quantized.update(tensors)
            dequantized[name] = restored
        else:
            quantized[name] = dequantized[name] = tensor
    config = json.loads((original / "config.json").read_text())
    folders = (folder / scheme, folder / f"{scheme}-dequantized")
    for target, tensors in zip(folders, (quantized, dequantized)):
        target.mkdir()
        save_file(tensors, str(target / "model.safetensors"))
        shutil.copy(original / "tokenizer.json", target)
        (target / "config.json").write_text(json.dumps(config))
    if QUANT_CONFIGS[scheme] is None:
        (folders[0] / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                                "exclude_modules": ["lm_head"]}}))
    else:
        (folders[0] / "config.json").write_text(json.dumps({**config, "quantization_config": QUANT_CONFIGS[scheme]}))
    return folders


def logits_of(folder, input_ids):
    return moeserve.load_model(folder, progress=False)(input_ids)


def assert_weights_equal_dequantized(quantized_folder, dequantized_folder) -> None:
    """Every quantized weight of the first model, dequantized, equals the second model's weight."""
    plain = dict(moeserve.load_model(dequantized_folder, progress=False).named_parameters())
    quantized = [(name, m) for name, m in moeserve.load_model(quantized_folder, progress=False).named_modules()
                 if isinstance(m, QuantizedWeight)]
    assert quantized
    for name, weight in quantized:
        expected = plain[name]
        torch.testing.assert_close(weight.dequantize(torch.float32).reshape(expected.shape), expected.float(),
                                   rtol=0, atol=1e-6)


def kl_and_top1(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(other, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return kl, (reference.argmax(-1) == other.argmax(-1)).float().mean().item()


# (max KL, min top-1 agreement) against the fp32 original. Measured on this random-weight model (flat
# next-token distributions, routing that flips under small errors): FP8 0.0146 / 0.786, NVFP4
# 0.066 / 0.510. NVFP4 with the classic bugs measured KL 0.73 / top-1 0.02 (nibbles swapped), 0.98 / 0.005
# (global scale dropped) and 0.50 / 0.0 (reciprocal global, conventions mixed). The bounds sit at
# about twice the measured KL, far below any broken variant.
BOUNDS = {"fp8": (0.04, 0.65), "nvfp4": (0.15, 0.35)}


@pytest.mark.parametrize("scheme", sorted(QUANT_CONFIGS))
def test_quantized_checkpoint_equals_its_dequantized_model_and_stays_close(scheme, tmp_path):
    quantized, dequantized = write_checkpoints(scheme, tmp_path)
    input_ids = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(0))
    actual = logits_of(quantized, input_ids)
    assert torch.isfinite(actual).all()
    assert_weights_equal_dequantized(quantized, dequantized)
    if "nvfp4" in scheme:  # W4A16: the model is the dequantized one (FP8 experts also quantize activations)
        torch.testing.assert_close(actual, logits_of(dequantized, input_ids), rtol=0, atol=1e-5)
    kl, top1 = kl_and_top1(logits_of(resolve_checkpoint(PRESET), input_ids), actual)
    max_kl, min_top1 = BOUNDS["fp8" if "fp8" in scheme else "nvfp4"]
    print(f"{scheme}: KL {kl:.4f}, top-1 agreement {top1:.3f}")
    assert kl < max_kl and top1 > min_top1


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_quantize_command_output_loads_back_to_identical_weights(fmt, tmp_path, capsys):
    assert main(["quantize", PRESET, str(tmp_path / "out"), "--format", fmt]) == 0
    on_load = moeserve.load_model(PRESET, quantization=fmt, progress=False)
    reloaded = moeserve.load_model(tmp_path / "out", progress=False)
    a, b = dict(on_load.named_parameters()), dict(reloaded.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        bits_a, bits_b = (t.reshape(-1).view(torch.uint8) for t in (a[name], b[name]))
        assert a[name].dtype == b[name].dtype and torch.equal(bits_a, bits_b), name
    assert any(p.dtype == (torch.float8_e4m3fn if fmt == "fp8" else torch.uint8) for p in b.values())
    assert main(["quantize", PRESET, str(tmp_path / "out"), "--format", fmt]) == 2
    assert "already exists" in capsys.readouterr().err


def test_quantize_on_load_memory_is_smaller():
    from moeserve.quant.apply import weight_bytes_by_format

    sizes = {fmt: weight_bytes_by_format(moeserve.load_model(PRESET, quantization=fmt, progress=False))
             for fmt in ("fp8", "nvfp4")}
    full = sum(weight_bytes_by_format(moeserve.load_model(PRESET, progress=False)).values())
    assert sum(sizes["fp8"].values()) < 0.45 * full and sum(sizes["nvfp4"].values()) < sum(sizes["fp8"].values())


def test_unsupported_scheme_is_named(tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(resolve_checkpoint(PRESET), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ConfigError, match="quant_method='gptq' is not supported; supported: fp8 with weight_block_size"):
        moeserve.load_model(folder)


def test_inconsistent_quantized_tensors_are_named(tmp_path):
    quantized, _ = write_checkpoints("deepseek-fp8", tmp_path)
    path = quantized / "model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors.pop("model.layers.0.self_attn.o_proj.weight_scale_inv")
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' is quantized "
                                              r"\(torch\.float8_e4m3fn\) but the model expects it in high precision"):
        moeserve.load_model(quantized, progress=False)
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 2)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv' has shape \[1, 2\], the model expects \[1, 1\]"):
        moeserve.load_model(quantized, progress=False)
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    tensors["model.layers.1.mlp.experts.2.up_proj.weight"] = tensors["model.layers.1.mlp.experts.2.up_proj.weight"].float()
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"experts\.2\.up_proj\.weight' is torch\.float32, the checkpoint's "
                                              r"quantization scheme needs torch\.float8_e4m3fn"):
        moeserve.load_model(quantized, progress=False)
    tensors["model.layers.1.mlp.experts.2.up_proj.weight"] = tensors["model.layers.1.mlp.experts.2.up_proj.weight"].to(torch.float8_e4m3fn)
    tensors.pop("model.layers.1.mlp.experts.5.down_proj.weight_scale_inv")
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight_scale_inv"):
        moeserve.load_model(quantized, progress=False)


def test_already_quantized_checkpoint_refuses_quantize_on_load(tmp_path):
    quantized, _ = write_checkpoints("ct-fp8", tmp_path)
    with pytest.raises(ConfigError, match=r"already quantized \(compressed-tensors FP8_BLOCK\); drop the quantization option"):
        moeserve.load_model(quantized, quantization="nvfp4")


def test_deepseek_v3_weight_memory_per_format(capsys):
    from moeserve.loader.build import planned_weight_bytes

    config = moeserve.load_config("deepseek-v3")
    total = {fmt: sum(planned_weight_bytes(config, fmt).values()) for fmt in (None, "fp8", "nvfp4")}
    router_params = 58 * (256 * 7168 + 256)  # kept in fp32: 2 more bytes each
    assert total[None] == 2 * 671026419200 + 2 * router_params
    assert 0.50 < total["fp8"] / total[None] < 0.51  # 1 byte + 1/4096 of a float per weight
    assert 0.28 < total["nvfp4"] / total[None] < 0.29  # 4.5 bits per weight
    assert main(["info", "--model", "deepseek-v3"]) == 0
    assert "nvfp4:   380.5 GB" in capsys.readouterr().out


def test_transformers_reads_the_fp8_export_as_its_fine_grained_fp8_scheme(tmp_path):
    import transformers

    assert main(["quantize", PRESET, str(tmp_path / "fp8"), "--format", "fp8"]) == 0
    from transformers.quantizers import AutoQuantizationConfig

    raw = transformers.AutoConfig.from_pretrained(tmp_path / "fp8").quantization_config
    parsed = AutoQuantizationConfig.from_dict(raw)
    assert type(parsed).__name__ == "FineGrainedFP8Config"
    assert list(parsed.weight_block_size) == [128, 128]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        scale = f.get_slice("model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv")
        assert scale.get_dtype() == "F32" and scale.get_shape() == [1, 1]  # ceil(64/128) x ceil(128/128)
        assert f.get_slice("model.layers.1.mlp.experts.3.gate_proj.weight").get_dtype() == "F8_E4M3"
