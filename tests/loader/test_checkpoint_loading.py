"""Checkpoint layouts that must load to the same model, and damaged checkpoints that must fail clearly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeserve
from moeserve import CheckpointError, ConfigError
from tests.hf_reference import build_reference


@pytest.fixture(scope="module")
def deepseek_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepseek")
    build_reference("deepseek-v3-yarn").save_pretrained(folder)
    return folder


def copy_of(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def assert_same_weights(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_fused_and_per_expert_layouts_load_to_the_same_model(deepseek_folder, tmp_path):
    reference = build_reference("deepseek-v3-yarn")
    fused_state = reference.state_dict()  # transformers v5 keeps experts fused in memory
    assert any(name.endswith("experts.gate_up_proj") for name in fused_state)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in fused_state.items()}, str(fused / "model.safetensors"))
    shutil.copy(deepseek_folder / "config.json", fused / "config.json")
    per_expert_keys = load_file(str(deepseek_folder / "model.safetensors")).keys()
    assert any(".experts.0.gate_proj.weight" in k for k in per_expert_keys)

    assert_same_weights(moeserve.load_model(fused, progress=False), moeserve.load_model(deepseek_folder, progress=False))


def test_sharded_checkpoint_loads_through_its_index(deepseek_folder, tmp_path):
    build_reference("deepseek-v3-yarn").save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert_same_weights(moeserve.load_model(tmp_path, progress=False), moeserve.load_model(deepseek_folder, progress=False))


def test_llama4_multimodal_checkpoint_loads_its_text_model(tmp_path):
    reference = build_reference("llama4")
    text = tmp_path / "text"
    reference.save_pretrained(text)
    multimodal = tmp_path / "multimodal"
    multimodal.mkdir()
    tensors = {f"language_model.{k}": v for k, v in load_file(str(text / "model.safetensors")).items()}
    tensors["vision_model.patch_embedding.weight"] = torch.randn(4, 4)
    save_file(tensors, str(multimodal / "model.safetensors"))
    text_config = json.loads((text / "config.json").read_text())
    (multimodal / "config.json").write_text(json.dumps(
        {"architectures": ["Llama4ForConditionalGeneration"], "text_config": text_config}))
    assert_same_weights(moeserve.load_model(multimodal, progress=False), moeserve.load_model(text, progress=False))


def test_deepseek_mtp_layer_is_skipped(deepseek_folder, tmp_path):
    folder = copy_of(deepseek_folder, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    num_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    tensors[f"model.layers.{num_layers}.eh_proj.weight"] = torch.randn(64, 128)
    save_file(tensors, str(folder / "model.safetensors"))
    moeserve.load_model(folder, progress=False)


def rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(deepseek_folder, tmp_path):
    folder = copy_of(deepseek_folder, tmp_path)
    rewrite(folder, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        moeserve.load_model(folder, progress=False)


def test_wrong_shape_names_tensor_file_and_shapes(deepseek_folder, tmp_path):
    folder = copy_of(deepseek_folder, tmp_path)
    rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.randn(64, 60)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' "
                                              r"has shape \[64, 60\], the model expects \[64, 64\]"):
        moeserve.load_model(folder, progress=False)


def test_unexpected_tensor_is_named(deepseek_folder, tmp_path):
    folder = copy_of(deepseek_folder, tmp_path)
    rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.randn(96, 64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        moeserve.load_model(folder, progress=False)


def test_truncated_file_is_reported_with_its_path(deepseek_folder, tmp_path):
    folder = copy_of(deepseek_folder, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read .*damaged or truncated"):
        moeserve.load_model(folder, progress=False)


def test_missing_shard_is_named(tmp_path):
    build_reference("mixtral").save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shard.name}, which is missing"):
        moeserve.load_model(tmp_path, progress=False)


def test_pickled_weights_are_refused(deepseek_folder, tmp_path):
    folder = copy_of(deepseek_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled weights are not loaded"):
        moeserve.load_model(folder, progress=False)


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_architecture_lists_the_supported_ones(deepseek_folder, tmp_path):
    folder = copy_of(deepseek_folder, tmp_path)
    edit_config(folder, lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConfigError, match=r"architecture 'GPT2LMHeadModel' is not supported \(supported: .*DeepseekV3ForCausalLM"):
        moeserve.load_model(folder, progress=False)


def test_missing_config_field_is_named(deepseek_folder, tmp_path):
    folder = copy_of(deepseek_folder, tmp_path)
    edit_config(folder, lambda c: c.pop("kv_lora_rank"))
    with pytest.raises(ConfigError, match=r"config\.json: field 'kv_lora_rank' is missing; DeepseekV3ForCausalLM needs it"):
        moeserve.load_model(folder, progress=False)


def test_impossible_group_routing_is_refused(deepseek_folder, tmp_path):
    folder = copy_of(deepseek_folder, tmp_path)
    edit_config(folder, lambda c: c.update(topk_group=1, num_experts_per_tok=6))
    with pytest.raises(ConfigError, match="num_experts_per_tok=6 exceeds the 4 experts of topk_group=1 groups"):
        moeserve.load_model(folder, progress=False)


def test_unknown_name_lists_presets():
    with pytest.raises(ConfigError, match="neither a checkpoint folder nor a preset.*tiny-deepseek-v3"):
        moeserve.load_model("no-such-model")


def test_a_rank_holding_some_experts_still_checks_the_checkpoints_expert_count():
    from types import SimpleNamespace

    from moeserve.distributed.parallelize import ExpertShard
    from moeserve.loader.weights import Target, check_shape

    target = Target(torch.empty(2, 6, 8), [], expert_shard=ExpertShard((2, 3), num_experts=4), fused_gate_up=True)
    for experts, ok in ((4, True), (10, False), (2, False)):
        reader = SimpleNamespace(shape=lambda name, e=experts: [e, 6, 8], path_of=lambda name: "model.safetensors")
        if ok:
            check_shape(reader, "experts.gate_up_proj", target)
        else:
            with pytest.raises(CheckpointError, match=rf"has shape \[{experts}, 6, 8\], the model expects \[4, 6, 8\]"):
                check_shape(reader, "experts.gate_up_proj", target)
