"""Small deterministic token -> logits functions for tests of the samplers' own rules
(schedule, determinism, what gets committed). The real model's tests are in
test_megatron_sampling.py."""

from __future__ import annotations

import torch

from illada.sampling.model import ExactPrefixCache, SpecialTokens

VOCAB = 48
SPECIAL = SpecialTokens(mask=5, pad=0, stop=(1, 6))


class ContextModel:
    """Logits from each position's neighbours and the mean of the whole (unpadded) canvas:
    bidirectional, so what is committed changes every other position's logits."""

    def __init__(self, seed: int = 0, scale: float = 3.0):
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(VOCAB, 16, generator=g)
        self.out = torch.randn(16, VOCAB, generator=g) * scale
        self.calls = 0
        self.positions = 0  # canvas positions passed through, summed over calls

    def __call__(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.positions += tokens.numel()
        h = self.embed[tokens]
        weight = torch.ones(tokens.shape, dtype=h.dtype) if keep is None else keep.to(h.dtype)
        context = (h * weight[..., None]).sum(1, keepdim=True) / weight.sum(1, keepdim=True)[..., None]
        neighbours = torch.roll(h, 1, dims=1) + 0.5 * torch.roll(h, -1, dims=1)
        return torch.tanh(neighbours + context) @ self.out


class CachedContextModel(ContextModel):
    """The same model offering an exact 'prefix cache' (it recomputes everything)."""

    def prefix_cache(self, batch_size: int, max_len: int) -> ExactPrefixCache:
        return ExactPrefixCache(self)


class StopAt:
    """Prefers token 9 everywhere and a stop token from absolute position `at[first]` on,
    where `first` is the row's first token (so rows stop apart, whichever rows are left)."""

    def __init__(self, at: dict[int, int]):
        self.at = at
        self.calls = 0
        self.widths: list[int] = []

    def __call__(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.widths.append(tokens.shape[1])
        logits = torch.zeros(*tokens.shape, VOCAB)
        logits[..., 9] = 1.0
        for row, first in enumerate(tokens[:, 0].tolist()):
            logits[row, self.at[first] :, SPECIAL.stop[0]] = 2.0
        return logits


class Looper:
    """Favours the 2-gram (20, 21) at every position, whatever the context, with a distinct
    runner-up per position: left alone, greedy sampling loops '20 21 20 21 ...'."""

    def __call__(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        b, s = tokens.shape
        logits = torch.zeros(b, s, VOCAB)
        pos = torch.arange(s)
        logits[:, pos, 20 + pos % 2] = 4.0
        logits[:, pos, 22 + pos % (VOCAB - 22)] = 2.0
        return logits
