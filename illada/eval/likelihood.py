"""Monte-Carlo likelihood of a masked-diffusion LM: the ELBO estimator of LLaDA (SPEC §3).

For an answer of L tokens after a prompt (never masked), each of `mc_num` samples masks
m_i of the answer's positions, uniformly at random, and scores

    loss_i = sum over masked positions of CE * L / m_i

The estimate of log p(answer | prompt) is -mean_i loss_i, a lower bound in expectation.
The counts m_i are low-discrepancy: one random start k in 1..L, then evenly spaced by
L / mc_num and wrapped into 1..L (LLaDA spreads them the same way within each batch of
16; spreading them over all samples makes the estimate independent of the batch size).
mc_num = 1 is what LLaDA uses for MMLU-like tasks, 128 elsewhere. With classifier-free
guidance (cfg_scale > 0) the unconditional pass masks the prompt only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from illada.sampling.model import LogitsFn, SpecialTokens, forward, guided, left_pad

Pair = tuple[torch.Tensor, torch.Tensor]  # (prompt, answer): 1-D token tensors


def mask_counts(length: int, mc_num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """mc_num mask counts in 1..length, evenly spread from a random start."""
    k = int(torch.randint(1, length + 1, (), generator=generator))
    counts = torch.round(torch.linspace(float(k), k + (mc_num - 1) * (length / mc_num), mc_num)).long()
    return (counts - 1) % length + 1


def elbo(
    model: LogitsFn,
    pairs: list[Pair],
    special: SpecialTokens,
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[float]:
    """The Monte-Carlo ELBO estimate of log p(answer | prompt) for each pair."""
    if mc_num < 1 or batch_size < 1:
        raise ValueError("mc_num and batch_size must be >= 1")
    samples = [_sample(i, prompt, answer, int(m), special.mask, generator) for i, (prompt, answer) in enumerate(pairs) if len(answer) for m in mask_counts(len(answer), mc_num, generator)]
    total = [0.0] * len(pairs)
    for chunk in _chunks(samples, batch_size):
        for (i, _, _, weight, _), ce in zip(chunk, _masked_ce(model, chunk, special, cfg_scale)):
            total[i] -= ce * weight / mc_num
    return total


def _sample(i: int, prompt: torch.Tensor, answer: torch.Tensor, m: int, mask_id: int, generator) -> tuple:
    """(pair index, noisy sequence, clean sequence, L / m, prompt length) with m answer
    positions masked."""
    clean = torch.cat([prompt, answer]).long()
    chosen = torch.randperm(len(answer), generator=generator)[:m] + len(prompt)
    noisy = clean.clone()
    noisy[chosen] = mask_id
    return i, noisy, clean, len(answer) / m, len(prompt)


def _masked_ce(model: LogitsFn, chunk: list[tuple], special: SpecialTokens, cfg_scale: float) -> list[float]:
    """Summed cross entropy over the masked positions of each sample of the chunk. With
    guidance, the unconditional pass masks the prompt only, as LLaDA's get_log_likelihood
    does: the answer's unmasked tokens stay visible in both passes."""
    noisy, keep = left_pad([s[1] for s in chunk], special.pad)
    clean, _ = left_pad([s[2] for s in chunk], special.pad)
    given = _prompt_positions(noisy.shape[1], [(len(s[1]), s[4]) for s in chunk], noisy.device)
    logits = guided(lambda t, k: forward(model, t, k), noisy, keep, given, cfg_scale, special.mask)
    masked = noisy == special.mask
    if keep is not None:
        masked &= keep
    ce = torch.zeros(masked.shape, dtype=torch.float64, device=logits.device)
    ce[masked] = F.cross_entropy(logits[masked].double(), clean[masked].to(logits.device), reduction="none")
    return ce.sum(1).tolist()


def _prompt_positions(width: int, lengths: list[tuple[int, int]], device) -> torch.Tensor:
    """[b, width] bool: where each left-padded row's prompt is, from (sequence, prompt) lengths."""
    given = torch.zeros(len(lengths), width, dtype=torch.bool, device=device)
    for row, (total, prompt) in enumerate(lengths):
        given[row, width - total : width - total + prompt] = True
    return given


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def greedy_matches(model: LogitsFn, pairs: list[Pair], special: SpecialTokens, batch_size: int = 16) -> list[bool]:
    """Whether one pass over the fully masked answer predicts every answer token (argmax)."""
    out = []
    for chunk in _chunks(pairs, batch_size):
        noisy, keep = left_pad([torch.cat([p, torch.full_like(a, special.mask)]).long() for p, a in chunk], special.pad)
        pred = forward(model, noisy, keep).argmax(-1)
        for row, (_, answer) in enumerate(chunk):
            out.append(bool((pred[row, pred.shape[1] - len(answer) :].cpu() == answer.cpu()).all()))
    return out


def perplexity(
    model: LogitsFn,
    sequences: list[torch.Tensor],
    special: SpecialTokens,
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
) -> dict:
    """Perplexity bound exp(-sum ELBO / tokens) over unconditioned sequences."""
    empty = torch.zeros(0, dtype=torch.long)
    ll = elbo(model, [(empty.to(s.device), s) for s in sequences], special, mc_num=mc_num, batch_size=batch_size, generator=generator)
    tokens = sum(len(s) for s in sequences)
    nll = -sum(ll) / tokens
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": tokens, "sequences": len(sequences), "mc_num": mc_num}
