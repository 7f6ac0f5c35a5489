"""MLA: the absorbed form (attention over the latent cache) equals the plain per-head form."""

import pytest
import torch

import moeserve
from moeserve.layers.attention.backend import DenseAttention


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-deepseek-v2-lite"])
def test_absorbed_equals_plain(preset):
    model = moeserve.load_model(preset, dtype=torch.float64, progress=False)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    plain = model(input_ids, DenseAttention(2, 17, input_ids.device))
    absorbed = model(input_ids, DenseAttention(2, 17, input_ids.device, mla_absorbed=True))
    assert torch.isfinite(plain).all() and plain.std() > 0.1
    torch.testing.assert_close(absorbed, plain, rtol=1e-10, atol=1e-10)
