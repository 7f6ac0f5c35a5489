"""A greedy loop over the plain forward (no cache): the reference the engine's output is checked against."""

import torch

from moeserve.models.base import CausalLM


@torch.no_grad()
def greedy_generate(model: CausalLM, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Up to `max_tokens` new token ids, stopping after an end-of-sequence token."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)  # [1, S]
    output: list[int] = []
    for _ in range(max_tokens):
        next_id = int(model(ids)[0, -1].argmax())
        output.append(next_id)
        if next_id in model.config.eos_token_ids:
            break
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    return output
