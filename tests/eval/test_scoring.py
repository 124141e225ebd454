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


def test_elbo_with_guidance_masks_only_the_prompt_in_the_unconditional_pass():
    """Against LLaDA's get_log_likelihood: its get_logits builds the unconditional batch by
    masking the prompt positions only (un_batch[prompt_index] = mask_id)."""

    class Seen:
        def __init__(self):
            self.batches = []

        def __call__(self, tokens, keep=None):
            self.batches.append(tokens.clone())
            scores = (tokens * torch.arange(1, tokens.shape[1] + 1)).sum(1, keepdim=True) + torch.arange(tokens.shape[1])
            return torch.nn.functional.one_hot(scores % VOCAB, VOCAB).float() * 3 + (tokens == SPECIAL.mask).float()[..., None]

    prompt, answer = torch.tensor([7, 8, 9]), torch.tensor([10, 11, 12, 13, 14])
    model, w, mc = Seen(), 0.7, 8
    [ll] = elbo(model, [(prompt, answer)], SPECIAL, mc_num=mc, batch_size=4, cfg_scale=w, generator=torch.Generator().manual_seed(1))

    clean = torch.cat([prompt, answer])
    expected = 0.0
    for batch in model.batches:
        cond, uncond = batch.chunk(2)
        reference_uncond = cond.clone()
        reference_uncond[:, : len(prompt)] = SPECIAL.mask  # LLaDA: the prompt, nothing else
        assert torch.equal(uncond, reference_uncond)
        plain = Seen()
        logits = plain(reference_uncond) + (w + 1) * (plain(cond) - plain(reference_uncond))
        for row, logit in zip(cond, logits):
            masked = row == SPECIAL.mask
            ce = torch.nn.functional.cross_entropy(logit[masked].double(), clean[masked], reduction="sum")
            expected -= float(ce) * len(answer) / int(masked.sum()) / mc
    assert sum(len(b) // 2 for b in model.batches) == mc
    assert math.isclose(ll, expected, rel_tol=1e-9)


def test_eval_flags_choose_the_reveal_order_and_leave_the_repetition_guard_off():
    from types import SimpleNamespace

    from illada.cli import build_parser
    from illada.eval.cli import harness_model

    # The model is sure of other tokens than the candidate's: `target` reveals the position
    # least sure of its own token first, `argmax` the most sure one.
    boost = {3: 1.0, 2: 4.0, 1: 2.5}
    model = Oracle({3: 13, 2: 14, 1: 15}, boost)
    loaded = SimpleNamespace(model=model, special=SPECIAL, config=SimpleNamespace(max_seq_len=64), encode=lambda text: torch.tensor([7 + ord(c) % 6 for c in text]))
    request = SimpleNamespace(args=("ab", "cde"))
    pair = (loaded.encode("ab"), loaded.encode("cde"))

    args = build_parser().parse_args(["eval", "ckpt", "--task", "illada_toy_gen"])
    lm = harness_model(loaded, args)
    assert lm.repetition is None and lm.confidence_order == "target"
    reveals = {}
    for order in ("target", "argmax"):
        args = build_parser().parse_args(["eval", "ckpt", "--task", "illada_toy_mc", "--confidence-order", order])
        model.seen.clear()
        [(logprob, _)] = harness_model(loaded, args).loglikelihood([request])
        reveals[order] = [c[0].tolist() for c in model.seen]
        [expected] = confidence_scores(model, [pair], SPECIAL, order=order)
        assert logprob == expected.logprob
    first_revealed = {order: [i for i, t in enumerate(seen[1][2:]) if t != SPECIAL.mask] for order, seen in reveals.items()}
    assert first_revealed == {"target": [0], "argmax": [1]}  # boosts: 1.0 at answer position 0, 4.0 at 1, 2.5 at 2
    guarded = harness_model(loaded, build_parser().parse_args(["eval", "ckpt", "--task", "illada_toy_gen", "--repetition-guard"]))
    assert guarded.repetition is not None
