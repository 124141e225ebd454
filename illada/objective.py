"""The masked-diffusion objective (SPEC §2).

Forward process: per sequence t ~ U(0, 1) and p = (1 - eps) t + eps; every token is
replaced by the mask token independently with probability p. The model sees the noisy
sequence (no causal mask) and is trained with cross-entropy on the masked positions only,
each weighted 1/p, summed and divided by all tokens of the batch:

    L = [ sum over masked i of CE_i / p_b(i) ] / (B * L_seq)

Since E[masked_i / p] = 1 for every position, the weighted sum is an unbiased estimate of
the sum of per-token CE over all tokens, whatever t is drawn.

Padding (the tail of each source's last packed sequence) is not data: given `valid`, pad
positions are never masked, so never scored, and the loss divides by the real tokens
only. Without padding this is exactly the formula above.
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
    valid: torch.Tensor | None = None  # [b, s] bool: real tokens (False on padding); None: all real

    def to(self, device) -> Noised:
        return Noised(self.tokens.to(device), self.masked.to(device), self.p.to(device), None if self.valid is None else self.valid.to(device))


def add_noise(tokens: torch.Tensor, mask_id: int, generator: torch.Generator | None = None, eps: float = EPS, valid: torch.Tensor | None = None) -> Noised:
    """Mask each token with its sequence's probability p = (1 - eps) t + eps, t ~ U(0, 1);
    positions where `valid` is False (padding) are left as they are. The random draws do
    not depend on `valid`."""
    b, s = tokens.shape
    t = torch.rand(b, generator=generator, device=tokens.device)
    p = (1 - eps) * t + eps
    masked = torch.rand(b, s, generator=generator, device=tokens.device) < p[:, None]
    if valid is not None:
        masked &= valid
    return Noised(torch.where(masked, torch.full_like(tokens, mask_id), tokens), masked, p, valid)


def diffusion_loss(token_ce: torch.Tensor, noised: Noised) -> torch.Tensor:
    """Pre-training loss from per-token cross-entropy [b, s] against the clean tokens (read
    only at masked positions), divided by the real (non-pad) tokens."""
    weights = noised.masked.to(token_ce.dtype) / noised.p[:, None].to(token_ce.dtype)
    tokens = token_ce.numel() if noised.valid is None else noised.valid.sum().clamp(min=1)
    return (token_ce * weights).sum() / tokens


def random_length(tokens: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability `fraction`, cut the batch to a random length in [1, seq_len]
    (LLaDA's guideline: 1% of pre-training batches, so the model also sees short inputs)."""
    if fraction <= 0 or torch.rand(1, generator=generator).item() >= fraction:
        return tokens
    length = int(torch.randint(1, tokens.shape[1] + 1, (1,), generator=generator).item())
    return tokens[:, :length]


# --- supervised fine-tuning (SPEC §2) ---------------------------------------------------------
#
# A sample is a prompt, a response and end-of-text padding (trained on: it teaches the model
# where to stop). iLLaDA noises and scores the whole sequence exactly as pre-training does:
# `add_noise` + `diffusion_loss`. LLaDA keeps the prompt clean and normalises each
# sequence's loss by its answer length (response + padding):
#
#     L = (1/B) sum_b [ sum over masked i of CE_i / p_b ] / answer_len_b

SFT_MODES = ("illada", "llada")


def sft_noise(tokens: torch.Tensor, prompt_len: torch.Tensor, mask_id: int, mode: str, generator: torch.Generator | None = None, eps: float = EPS) -> Noised:
    """`add_noise` over the whole sequence (iLLaDA), or the same draws with the prompt
    positions, the first prompt_len[b] of row b, left clean (LLaDA)."""
    if mode not in SFT_MODES:
        raise ValueError(f"SFT mode must be one of {', '.join(SFT_MODES)} (got {mode!r})")
    noised = add_noise(tokens, mask_id, generator, eps)
    if mode == "illada":
        return noised
    answer = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= prompt_len[:, None]
    masked = noised.masked & answer
    return Noised(torch.where(masked, torch.full_like(tokens, mask_id), tokens), masked, noised.p)


def answer_length_loss(token_ce: torch.Tensor, noised: Noised, answer_len: torch.Tensor) -> torch.Tensor:
    """LLaDA's SFT loss from per-token cross-entropy [b, s]: each sequence's weighted masked
    CE divided by its answer length answer_len[b], averaged over the sequences."""
    weights = noised.masked.to(token_ce.dtype) / noised.p[:, None].to(token_ce.dtype)
    return ((token_ce * weights).sum(1) / answer_len.to(token_ce.dtype)).mean()
