"""Our forward pass against the transformers reference implementation, family by family (fp32)."""

import pytest
import torch

import moeserve
from tests.hf_reference import CASES, build_reference

TOLERANCE = 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    reference = build_reference(case)
    reference.save_pretrained(tmp_path)
    ours = moeserve.load_model(tmp_path, progress=False)

    input_ids = torch.randint(0, reference.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids).logits
    actual = ours(input_ids)

    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    diff = (actual - expected).abs().max().item()
    print(f"{case}: max |logit difference| = {diff:.3g} (logit std {expected.std().item():.3g})")
    assert diff <= TOLERANCE
