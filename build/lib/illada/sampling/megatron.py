"""The megatron GPTModel as a sampler's model: padding masks, and Fast-dLLM's prefix cache
through megatron's own key/value cache.

Padding: `keep` [b, s] (False at left padding) becomes megatron's attention mask [b, 1, 1, s]
(True = may not be attended), broadcast over heads and queries, which the model's core
attention (`illada.model.attention.SDPAttention`) hands to SDPA.

Prefix cache: megatron's `StaticInferenceContext` keeps each layer's keys and values (before
RoPE) in a buffer; a forward with `sequence_len_offset = k` writes the keys and values of
its tokens at positions k.. and attends over positions [0, k + its length). With the
bidirectional layer spec (no causal mask), `full` (offset 0, the whole canvas) fills the
buffer, and `suffix` (offset = the block's start, the block and everything after it) is
exactly Fast-dLLM's prefix-cached step: the block and the suffix are recomputed, the prefix
is read from the buffer. Only tensor parallel size 1 and one pipeline stage are supported
(what `illada.inference` builds).
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext


def attention_mask(keep: torch.Tensor | None) -> torch.Tensor | None:
    return None if keep is None else ~keep[:, None, None, :]


class MegatronDenoiser:
    """logits = denoiser(tokens, keep=None) for a one-stage megatron GPTModel (set to eval)."""

    def __init__(self, model):
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=tokens, position_ids=None, attention_mask=attention_mask(keep), runtime_gather_output=True)

    def prefix_cache(self, batch_size: int, max_len: int) -> MegatronPrefixCache:
        return MegatronPrefixCache(self.model, batch_size, max_len)


class MegatronPrefixCache:
    def __init__(self, model, batch_size: int, max_len: int):
        self.model = model
        self.context = StaticInferenceContext(batch_size, max_len)
        self.context.materialize_only_last_token_logits = False  # logits for every position given

    @torch.inference_mode()
    def full(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return self._run(tokens, 0, keep)

    @torch.inference_mode()
    def suffix(self, tokens: torch.Tensor, start: int, keep: torch.Tensor | None) -> torch.Tensor:
        return self._run(tokens[:, start:], start, keep)

    def _run(self, tokens: torch.Tensor, offset: int, keep: torch.Tensor | None) -> torch.Tensor:
        if offset + tokens.shape[1] > self.context.max_sequence_length or tokens.shape[0] > self.context.max_batch_size:
            raise ValueError(f"canvas [{tokens.shape[0]}, {offset + tokens.shape[1]}] exceeds the prefix cache's [{self.context.max_batch_size}, {self.context.max_sequence_length}]")
        self.context.sequence_len_offset = offset
        return self.model(
            input_ids=tokens,
            position_ids=None,
            attention_mask=attention_mask(keep),
            inference_context=self.context,
            runtime_gather_output=True,
        )
