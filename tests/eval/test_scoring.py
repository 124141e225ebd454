"""The scorers' own rules on fake models whose answers are exact: the ELBO estimator
(low-discrepancy counts, prompt never masked, independent of the batch size), perplexity,
and confidence-based scoring's reveal order."""

from __future__ import annotations

import math

import torch

from illada.eval.confidence import confidence_scores
from illada.eval.likelihood import elbo, mask_counts, perplexity
from illada.sampling.model import SpecialTokens

VOCAB = 16
SPECIAL = SpecialTokens(mask=5, pad=0, stop=(1, 6))


class Oracle:
    """Context-free logits: at the k-th position from the right end, `boost[k]` (default 2)
    on token `answer_tokens[k]` and 0 elsewhere, so each position's log-probability of its
    true token is known in closed form. Records the canvases it sees."""

    def __init__(self, answer_tokens: dict[int, int], boost: dict[int, float] | None = None):
        self.answer_tokens = answer_tokens  # absolute position -> clean token
        self.boost = boost or {}
        self.seen: list[torch.Tensor] = []

    def __call__(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(tokens.clone())
        logits = torch.zeros(*tokens.shape, VOCAB)
        width = tokens.shape[1]
        for pos, token in self.answer_tokens.items():
            logits[:, width - pos, token] = self.boost.get(pos, 2.0)
        return logits


def true_logprob(boost: float) -> float:
    return boost - math.log(math.exp(boost) + VOCAB - 1)


def test_mask_counts_are_spread_evenly_over_1_to_L():
    g = torch.Generator().manual_seed(0)
    assert sorted(mask_counts(10, 10, g).tolist()) == list(range(1, 11))
    counts = mask_counts(100, 4, g)
    assert ((counts >= 1) & (counts <= 100)).all() and sorted((counts.diff() % 100).tolist()) == [25, 25, 25]


def test_elbo_is_exact_for_a_context_free_model_and_never_masks_the_prompt():
    prompt, answer = torch.tensor([7, 8, 9]), torch.tensor([10, 11, 12, 13])
    model = Oracle({4: 10, 3: 11, 2: 12, 1: 13})  # the answer: the last four positions
    [ll] = elbo(model, [(prompt, answer)], SPECIAL, mc_num=8, batch_size=3, generator=torch.Generator().manual_seed(0))
    # Each sample: m masked positions x CE x L/m = L x CE, whatever m is.
    assert math.isclose(ll, 4 * true_logprob(2.0), rel_tol=1e-9)
    canvases = torch.cat(model.seen)
    assert (canvases[:, :3] == prompt).all() and (canvases[:, 3:] == SPECIAL.mask).any(1).all()


def test_elbo_does_not_depend_on_the_batch_size():
    class Context:
        def __call__(self, tokens, keep=None):
            return torch.nn.functional.one_hot((tokens.sum(1, keepdim=True) + torch.arange(tokens.shape[1])) % VOCAB, VOCAB).float() * 3

    pairs = [(torch.tensor([7, 8]), torch.tensor([9, 10, 11])), (torch.tensor([12]), torch.tensor([13, 14, 9, 10, 11]))]
    a = elbo(Context(), pairs, SPECIAL, mc_num=16, batch_size=16, generator=torch.Generator().manual_seed(3))
    b = elbo(Context(), pairs, SPECIAL, mc_num=16, batch_size=5, generator=torch.Generator().manual_seed(3))
    assert all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(a, b))


def test_perplexity_of_a_context_free_model():
    model = Oracle({3: 10, 2: 11, 1: 12})
    result = perplexity(model, [torch.tensor([10, 11, 12])], SPECIAL, mc_num=4, generator=torch.Generator().manual_seed(0))
    assert math.isclose(result["perplexity"], math.exp(-true_logprob(2.0)), rel_tol=1e-9) and result["tokens"] == 3


def test_confidence_score_reveals_the_most_confident_position_first():
    prompt, answer = torch.tensor([7, 8]), torch.tensor([10, 11, 12])
    boost = {3: 1.0, 2: 4.0, 1: 2.5}  # answer positions 0, 1, 2: reveal order 1, 2, 0
    model = Oracle({3: 10, 2: 11, 1: 12}, boost)
    [score] = confidence_scores(model, [(prompt, answer)], SPECIAL)
    assert math.isclose(score.logprob, sum(true_logprob(b) for b in boost.values()), rel_tol=1e-9) and score.greedy
    revealed = [(c[0, 2:] != SPECIAL.mask).tolist() for c in model.seen[1:]] + [[True] * 3]
    assert revealed == [[False, True, False], [False, True, True], [True, True, True]] and len(model.seen) == 3


def test_confidence_scores_a_batch_of_different_lengths_as_each_alone():
    model = Oracle({1: 9, 2: 10})
    pairs = [(torch.tensor([7, 8, 9]), torch.tensor([10, 9])), (torch.tensor([7]), torch.tensor([9]))]
    together = confidence_scores(model, pairs, SPECIAL)
    alone = [confidence_scores(model, [p], SPECIAL)[0] for p in pairs]
    assert [s.logprob for s in together] == [s.logprob for s in alone]
