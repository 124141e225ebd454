"""The masked-diffusion objective (SPEC §2).

Forward process: per sequence t ~ U(0, 1) and p = (1 - eps) t + eps; every token is
replaced by the mask token independently with probability p. The model sees the noisy
sequence (no causal mask) and is trained with cross-entropy on the masked positions only,
each weighted 1/p, summed and divided by all tokens of the batch:

    L = [ sum over masked i of CE_i / p_b(i) ] / (B * L_seq)

Since E[masked_i / p] = 1 for every position, the weighted sum is an unbiased estimate of
the sum of per-token CE over all tokens, whatever t is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-3


@dataclass
class Noised:
    tokens: torch.Tensor  # [b, s] input with masks applied
    masked: torch.Tensor  # [b, s] bool: which positions were masked
    p: torch.Tensor  # [b] mask probability of each sequence


def add_noise(tokens: torch.Tensor, mask_id: int, generator: torch.Generator | None = None, eps: float = EPS) -> Noised:
    """Mask each token with its sequence's probability p = (1 - eps) t + eps, t ~ U(0, 1)."""
    b, s = tokens.shape
    t = torch.rand(b, generator=generator, device=tokens.device)
    p = (1 - eps) * t + eps
    masked = torch.rand(b, s, generator=generator, device=tokens.device) < p[:, None]
    return Noised(torch.where(masked, torch.full_like(tokens, mask_id), tokens), masked, p)


def diffusion_loss(token_ce: torch.Tensor, noised: Noised) -> torch.Tensor:
    """Pre-training loss from per-token cross-entropy [b, s] (computed against the clean
    tokens at every position)."""
    weights = noised.masked.to(token_ce.dtype) / noised.p[:, None].to(token_ce.dtype)
    return (token_ce * weights).sum() / token_ce.numel()


def random_length(tokens: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability `fraction`, cut the batch to a random length in [1, seq_len]
    (LLaDA's guideline: 1% of pre-training batches, so the model also sees short inputs)."""
    if fraction <= 0 or torch.rand(1, generator=generator).item() >= fraction:
        return tokens
    length = int(torch.randint(1, tokens.shape[1] + 1, (1,), generator=generator).item())
    return tokens[:, :length]
