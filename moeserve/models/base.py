"""What every family shares: the pre-norm decoder layer and the causal LM around it."""

import re

import torch
from torch import nn

from moeserve.config import ConfigFields, ModelConfig
from moeserve.layers.attention.backend import AttentionBackend, DenseAttention
from moeserve.layers.moe.moe import MoE
from moeserve.layers.norm import RMSNorm
from moeserve.layers.stages import Stages, run, take_turns


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp  # dense MLP or MoE
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (this layer's MLP output, the residual stream before it): the residual add
        of each block is fused into the norm that follows it (the next layer's, or the final norm)."""
        return run(self.stages(x, residual, positions, attn))

    def stages(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, attn: AttentionBackend,
               micro_batch: int = 0) -> Stages:
        """forward, yielding while a MoE's tokens travel (moeserve.layers.stages)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, attn)
        x, residual = self.post_attention_layernorm(x, residual)
        if isinstance(self.mlp, MoE):
            return (yield from self.mlp.stages(x, micro_batch)), residual
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """`micro_batches` 2: two-batch overlap. The batch splits into two micro-batches where its tokens halve (the
    attention backend's `split_batch`; one may be empty), which take turns at every MoE exchange, so that one's tokens
    travel while the other computes; the first runs each layer's attention first (a prefill chunk cut in two reads its
    first part from the cache). Every expert-parallel rank must run the same number (their exchanges pair up)."""

    micro_batches = 1

    def __init__(self, config: ModelConfig, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden states [T, H]
        if self.micro_batches == 1:
            return run(self.stages(input_ids, positions, attn))
        (first, attn_first), (second, attn_second) = attn.split_batch()
        outs = take_turns(self.stages(input_ids[first], positions[first], attn_first, 0),
                          self.stages(input_ids[second], positions[second], attn_second, 1))
        return torch.cat(outs)

    def stages(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
               micro_batch: int = 0) -> Stages:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = yield from layer.stages(x, residual, positions, attn, micro_batch)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """embed -> [norm -> attention -> norm -> MLP or MoE] x L -> norm -> lm_head.

    A family subclasses this with `parse_config`, `build_layer` and how its checkpoint names differ
    from ours: `checkpoint_renames` (checkpoint -> ours) and `export_renames` (ours -> checkpoint),
    regex substitutions applied in order. Our names are the Hugging Face in-memory names, with the
    experts fused as `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I].
    """

    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    export_renames: tuple[tuple[str, str], ...] = ()
    fused_experts_transposed = False  # Llama 4 stores experts as [E, H, 2I] and [E, I, H]

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, [self.build_layer(i) for i in range(config.num_layers)])
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def parse_config(cls, fields: ConfigFields) -> ModelConfig:
        raise NotImplementedError

    def build_layer(self, layer: int) -> DecoderLayer:
        raise NotImplementedError

    def is_ignored_checkpoint_key(self, name: str) -> bool:
        """Checkpoint tensors that are not part of this model (e.g. DeepSeek's MTP layer)."""
        return name.endswith("rotary_emb.inv_freq")

    @classmethod
    def to_our_name(cls, name: str) -> str:
        return _rename(name, cls.checkpoint_renames)

    @classmethod
    def to_checkpoint_name(cls, name: str) -> str:
        return _rename(name, cls.export_renames)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [N, H] -> [N, V]

    def forward(self, input_ids: torch.Tensor, attn: AttentionBackend | None = None) -> torch.Tensor:
        # input_ids: [B, S] -> logits [B, S, V], every sequence from position 0, no cache
        batch_size, seq_len = input_ids.shape
        attn = attn or DenseAttention(batch_size, seq_len, input_ids.device)
        positions = torch.arange(seq_len, device=input_ids.device).repeat(batch_size)  # [B*S]
        hidden = self.model(input_ids.flatten(), positions, attn)  # [B*S, H]
        return self.compute_logits(hidden).view(batch_size, seq_len, -1)


def fuse_projections(model: nn.Module) -> None:
    """After loading: every module with a `fuse_projections` method (MLP's gate and up, MLA's input
    projections) merges the linears that read the same input into one GEMM."""
    for module in model.modules():
        fuse = getattr(module, "fuse_projections", None)
        if fuse is not None:
            fuse()


def replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent), leaf, module)


def _rename(name: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name
