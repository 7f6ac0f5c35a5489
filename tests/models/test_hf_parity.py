"""Our forward pass against the transformers reference implementation, family by family (fp32)."""

import pytest
import torch

import moeserve
from moeserve.models.base import fuse_projections
from tests.hf_reference import CASES, build_reference

TOLERANCE = 1e-4


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-projections"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, fused, tmp_path):
    reference = build_reference(case)
    reference.save_pretrained(tmp_path)
    ours = moeserve.load_model(tmp_path, progress=False)
    if fused:
        fuse_projections(ours)
        fused_weights = [w for m in ours.modules() for w in (getattr(m, "gate_up_weight", None),
                                                             getattr(m, "fused_input_proj", None),
                                                             getattr(m, "fused_qkv", None)) if w is not None]
        fusable = [m for m in ours.modules() if hasattr(m, "fuse_projections") and m is not ours]
        assert len(fused_weights) == len(fusable), "a projection was left unfused"  # Mixtral: none to fuse

    input_ids = torch.randint(0, reference.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids).logits
    actual = ours(input_ids)

    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    diff = (actual - expected).abs().max().item()
    print(f"{case}: max |logit difference| = {diff:.3g} (logit std {expected.std().item():.3g})")
    assert diff <= TOLERANCE
