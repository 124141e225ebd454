"""Which masked positions a denoising step commits (SPEC §3).

The step schedule: M masked positions denoised in s steps commit, at step j,

    n_j = floor(M / s) + [j < M mod s]

so the counts sum to M and differ by at most one. Each step commits the n_j most
confident candidates. Threshold decoding (Fast-dLLM) replaces the count: commit the most
confident candidate plus every other one whose confidence is at least the threshold.
"""

from __future__ import annotations

import torch


def commit_schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per step [b, steps] for `masked` [b] masked positions per row."""
    if steps <= 0:
        raise ValueError(f"steps must be positive (got {steps})")
    masked = masked.long()
    counts = (masked // steps)[:, None].repeat(1, steps)
    counts += torch.arange(steps, device=masked.device)[None, :] < (masked % steps)[:, None]
    return counts


def top_n(confidence: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[b, s] bool: the n[b] highest-confidence positions of each row (candidates are the
    positions whose confidence is above -inf; n never exceeds their count)."""
    commit = torch.zeros_like(confidence, dtype=torch.bool)
    k = int(n.max()) if n.numel() else 0
    if k == 0:
        return commit
    index = confidence.topk(k, dim=1).indices
    chosen = torch.arange(k, device=confidence.device)[None, :] < n[:, None].to(confidence.device)
    return commit.scatter_(1, index, chosen)


def above_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """[b, s] bool: every candidate with confidence >= threshold, and at least the most
    confident candidate of each row that has one."""
    candidates = confidence > float("-inf")
    commit = (confidence >= threshold) & candidates
    best = confidence.topk(1, dim=1).indices  # ties broken as top_n breaks them
    commit.scatter_(1, best, candidates.gather(1, best) | commit.gather(1, best))
    return commit
