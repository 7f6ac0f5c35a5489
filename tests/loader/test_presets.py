"""Built-in presets: tiny models that are real Hugging Face checkpoints, and real-shape configs."""

import pytest
import torch
import transformers

import moeserve
from moeserve.bench.throughput import hf_config_fields
from moeserve.loader import presets
from moeserve.loader.resolve import resolve_checkpoint


@pytest.mark.parametrize("name", sorted(presets.TINY_PRESETS))
def test_tiny_preset_is_a_checkpoint_transformers_agrees_with(name):
    ours = moeserve.load_model(name, progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(resolve_checkpoint(name), attn_implementation="eager")
    if hasattr(reference, "set_experts_implementation") and "llama4" not in name:
        reference.set_experts_implementation("eager")
    input_ids = torch.randint(0, ours.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids).logits
    actual = ours(input_ids)
    assert torch.isfinite(actual).all() and actual.std() > 0.1
    assert (actual - expected).abs().max() <= 1e-4


def test_tiny_routers_use_many_experts_and_groups():
    model = moeserve.load_model("tiny-deepseek-v3", progress=False)
    moe = model.model.layers[1].mlp
    x = torch.randn(256, model.config.hidden_size)
    topk_ids, _ = moe.gate(x)
    assert topk_ids.unique().numel() == model.config.moe.num_experts
    groups = topk_ids // (model.config.moe.num_experts // model.config.moe.num_groups)
    assert all(row.unique().numel() <= model.config.moe.topk_groups for row in groups)


def test_tiny_weights_are_deterministic(tmp_path, monkeypatch):
    first = moeserve.load_model("tiny-qwen3-moe", progress=False)
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    second = moeserve.load_model("tiny-qwen3-moe", progress=False)
    assert resolve_checkpoint("tiny-qwen3-moe").is_relative_to(tmp_path)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_tiny_tokenizer_round_trips_text():
    tokenizer = moeserve.load_tokenizer("tiny-mixtral")
    text = "Hello, world! The router scores each expert: 123 ünïcödé."
    ids = tokenizer.encode(text)
    assert max(ids) < moeserve.load_config("tiny-mixtral").vocab_size
    assert len(ids) < len(text.encode())
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 1


# Published totals (without DeepSeek-V3's MTP module; Llama 4 Scout's text model only).
PUBLISHED_PARAMETERS = {"deepseek-v3": 671e9, "deepseek-v2-lite": 15.7e9, "qwen3-30b-a3b": 30.5e9,
                        "mixtral-8x7b": 46.7e9, "llama-4-scout": 107.8e9}


@pytest.mark.parametrize("name", sorted(presets.SHAPE_PRESETS))
def test_shape_preset_has_the_published_parameter_count(name):
    model = moeserve.build_model(moeserve.load_config(name), torch.bfloat16, device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert total == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.01)
    config = transformers.AutoConfig.for_model(**hf_config_fields(presets.SHAPE_PRESETS[name]))
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
    reference_total = sum(p.numel() for p in reference.parameters())
    reference_total += sum(b.numel() for n, b in reference.named_buffers() if n.endswith("e_score_correction_bias"))
    assert total == reference_total  # transformers keeps DeepSeek-V3's correction bias as a buffer


def test_shape_presets_have_no_weights():
    with pytest.raises(moeserve.ConfigError, match="config-only preset"):
        moeserve.load_model("deepseek-v3")
