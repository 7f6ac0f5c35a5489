"""Deterministic random weights, for the built-in tiny models and for benchmarks with real shapes."""

import zlib

import torch

from moeserve.models.base import CausalLM


def random_init(model: CausalLM, seed: int) -> None:
    """Weights with unit-scale activations (std 1/sqrt(fan_in)), norms near 1, small biases, and
    routers spread wide enough that top-k choices are far from ties. Each parameter draws from its own
    stream (seed and name) on the parameters' device, so replicated parameters agree across ranks."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(param.shape, generator=generator, device=device)
            if name.endswith("embed_tokens.weight"):
                value = noise
            elif name.endswith("mlp.gate.weight"):  # router
                value = noise * 2.0 / hidden**0.5
            elif name.endswith("e_score_correction_bias"):
                value = noise * 0.1
            elif name.endswith("norm.weight"):
                value = 1.0 + 0.1 * noise
            elif param.dim() == 1:  # biases
                value = 0.1 * noise
            else:
                value = noise / param.shape[-1] ** 0.5
            param.copy_(value)
