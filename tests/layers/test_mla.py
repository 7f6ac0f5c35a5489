"""MLA: the absorbed form (attention over the latent cache) equals the plain per-head form."""

import pytest
import torch

import moeserve
from moeserve.layers.attention.mla import MLAttention


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-deepseek-v2-lite"])
def test_absorbed_equals_plain(preset):
    model = moeserve.load_model(preset, dtype=torch.float64, progress=False)
    attention = next(m for m in model.modules() if isinstance(m, MLAttention))
    x = torch.randn(2, 17, model.config.hidden_size, dtype=torch.float64)
    positions = torch.arange(17)
    plain = attention(x, positions)
    absorbed = attention.forward_absorbed(x, positions)
    assert torch.isfinite(plain).all()
    assert plain.abs().mean() > 0.1
    torch.testing.assert_close(absorbed, plain, rtol=1e-10, atol=1e-10)
