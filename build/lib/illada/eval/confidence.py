"""Confidence-based scoring of a candidate answer (iLLaDA; SPEC §3).

The answer starts fully masked after its context. Each step unmasks one position: the
remaining masked position the model is most confident about, revealing the candidate's
true token there; the score is the sum of the log-probabilities of the revealed tokens, each
read at the step that revealed it. An answer of n tokens takes n forward passes.

"Most confident" reads the model's log-probability of the candidate's token at each masked
position (`order="target"`, the default): the reveal order a candidate would be committed in
if the sampler proposed it. `order="argmax"` ranks by the model's own top log-probability
instead (the sampler's confidence). The score is not a likelihood; iLLaDA reports it ahead
of likelihood scoring on PIQA, ARC-C and HellaSwag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from illada.sampling.model import LogitsFn, SpecialTokens, forward, left_pad

ORDERS = ("target", "argmax")


@dataclass(frozen=True)
class Score:
    logprob: float  # summed log-probabilities of the revealed tokens
    greedy: bool  # every revealed token was the model's argmax at its step


def confidence_scores(model: LogitsFn, pairs: list[tuple[torch.Tensor, torch.Tensor]], special: SpecialTokens, *, order: str = "target", batch_size: int = 16) -> list[Score]:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)} (got {order!r})")
    # Candidates of similar length share a batch: a batch takes as many passes as its longest.
    by_length = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))
    scores: dict[int, Score] = {}
    for start in range(0, len(by_length), batch_size):
        index = by_length[start : start + batch_size]
        for i, score in zip(index, _score_batch(model, [pairs[i] for i in index], special, order)):
            scores[i] = score
    return [scores[i] for i in range(len(pairs))]


def _score_batch(model: LogitsFn, pairs: list[tuple[torch.Tensor, torch.Tensor]], special: SpecialTokens, order: str) -> list[Score]:
    canvas, keep = left_pad([torch.cat([p, torch.full_like(a, special.mask)]).long() for p, a in pairs], special.pad)
    target, _ = left_pad([torch.cat([p, a]).long() for p, a in pairs], special.pad)
    width = canvas.shape[1]
    masked = torch.zeros_like(canvas, dtype=torch.bool)
    for row, (_, answer) in enumerate(pairs):
        masked[row, width - len(answer) :] = True
    target = target.to(canvas.device)
    total = torch.zeros(len(pairs), dtype=torch.float64)
    greedy = torch.ones(len(pairs), dtype=torch.bool)
    while masked.any():
        logits = forward(model, canvas, keep)
        rows, cols = masked.nonzero(as_tuple=True)
        logprobs = logits[rows, cols].double().log_softmax(-1)  # [n, vocab], masked positions only
        true = logprobs.gather(-1, target[rows, cols, None]).squeeze(-1)
        rank = torch.full(masked.shape, float("-inf"), dtype=torch.float64, device=canvas.device)
        rank[rows, cols] = true if order == "target" else logprobs.max(-1).values
        pick = rank.argmax(1)
        chosen = (cols == pick[rows]).nonzero().flatten()  # one entry per row with masks left
        r, c = rows[chosen], cols[chosen]
        total[r.cpu()] += true[chosen].cpu()
        greedy[r.cpu()] &= (logprobs[chosen].argmax(-1) == target[r, c]).cpu()
        canvas[r, c] = target[r, c]
        masked[r, c] = False
    return [Score(float(t), bool(g)) for t, g in zip(total, greedy)]
