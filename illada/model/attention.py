"""Full (bidirectional) attention through torch's scaled_dot_product_attention.

Megatron-core's own `DotProductAttention` (the local spec's) materialises the [b, h, s, s]
score matrix and repeats the key/value heads for GQA; Transformer Engine's fused attention
is the usual way out, but TE is a CUDA build that CPU machines cannot install. SDPA picks
a flash or memory-efficient kernel on GPUs and the exact math kernel on CPUs, and handles
GQA itself, so one module serves both. It takes megatron's core-attention interface, so it
drops into the layer spec in place of `DotProductAttention`. The only mask it takes is
megatron's key padding mask [b, 1, 1|s, s] (True = may not be attended), which batched
sampling of prompts of different lengths needs; training passes none.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str, softmax_scale: float | None = None, **_):
        super().__init__(config=config)
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        """query [s, b, heads, d], key/value [s, b, groups, d] (this TP rank's) -> [s, b, heads * d]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention is full bidirectional attention: it takes no bias or packed sequences")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        allowed = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])
        s, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
