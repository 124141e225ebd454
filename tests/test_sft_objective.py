"""The SFT objective in both modes against a direct computation with fixed seeds (SPEC §2)."""

import numpy as np
import pytest
import torch

from illada.objective import (
    EPS,
    add_noise,
    answer_length_loss,
    diffusion_loss,
    sft_noise,
)
from illada.train.sft import Sample, micro_batch

MASK, EOT = 5, 1
SPECIAL = {"mask": MASK, "eot": EOT}


def _draws(seed: int, b: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p per row and the uniform draw per token, in the order add_noise makes them."""
    g = torch.Generator().manual_seed(seed)
    p = (1 - EPS) * torch.rand(b, generator=g) + EPS
    return p, torch.rand(b, s, generator=g)


def test_illada_mode_masks_the_whole_sequence_and_is_the_pretraining_loss():
    tokens = torch.randint(10, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    prompt_len = torch.tensor([4, 7, 2])
    noised = sft_noise(tokens, prompt_len, MASK, "illada", torch.Generator().manual_seed(1))
    p, u = _draws(1, 3, 12)
    for b in range(3):
        for i in range(12):  # prompt positions too
            masked = bool(u[b, i] < p[b])
            assert bool(noised.masked[b, i]) == masked
            assert noised.tokens[b, i].item() == (MASK if masked else tokens[b, i].item())
    assert noised.masked[:, :2].any()  # some prompt position was masked
    ce = torch.rand(3, 12, generator=torch.Generator().manual_seed(2))
    expected = sum(ce[b, i].item() / p[b].item() for b in range(3) for i in range(12) if u[b, i] < p[b]) / (3 * 12)
    assert diffusion_loss(ce, noised).item() == pytest.approx(expected, rel=1e-6)


def test_llada_mode_keeps_the_prompt_clean_and_divides_by_the_answer_length():
    tokens = torch.randint(10, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    prompt_len = torch.tensor([4, 7, 2])
    noised = sft_noise(tokens, prompt_len, MASK, "llada", torch.Generator().manual_seed(1))
    p, u = _draws(1, 3, 12)
    for b in range(3):
        for i in range(12):
            masked = i >= prompt_len[b] and bool(u[b, i] < p[b])
            assert bool(noised.masked[b, i]) == masked, (b, i)
            assert noised.tokens[b, i].item() == (MASK if masked else tokens[b, i].item())
    assert torch.equal(noised.p, p)
    ce = torch.rand(3, 12, generator=torch.Generator().manual_seed(2))
    answer_len = 12 - prompt_len
    # (1/B) sum_b sum_{masked i} CE_i / (p_b * answer_len_b)
    expected = sum(ce[b, i].item() / (p[b].item() * answer_len[b].item()) for b in range(3) for i in range(12) if noised.masked[b, i]) / 3
    assert answer_length_loss(ce, noised, answer_len).item() == pytest.approx(expected, rel=1e-6)


def test_llada_loss_is_an_unbiased_estimate_of_the_mean_answer_ce():
    # With CE = 1 on every answer token, E[loss] = 1 whatever the noise levels drawn.
    b, s = 20000, 16
    prompt_len = torch.randint(1, 12, (b,), generator=torch.Generator().manual_seed(3))
    noised = sft_noise(torch.zeros(b, s, dtype=torch.long), prompt_len, MASK, "llada", torch.Generator().manual_seed(4))
    per_row = noised.masked.sum(1) / noised.p / (s - prompt_len)
    assert abs(per_row.mean().item() - 1) < 4 * (per_row.std() / b**0.5).item()


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="illada, llada"):
        sft_noise(torch.zeros(1, 4, dtype=torch.long), torch.tensor([1]), MASK, "LLaDA")


@pytest.mark.parametrize("mode", ["illada", "llada"])
def test_a_micro_batch_pads_with_end_of_text_to_its_longest_bucket_and_trains_on_it(mode):
    samples = [
        Sample(np.array([3, 40, 41, 6, 4, 50, 6, EOT], dtype=np.int64), prompt_len=5),  # bucket 8
        Sample(np.array([3, 42, 6, 4, 51, 52, 53, 6, EOT, EOT, EOT, EOT], dtype=np.int64), prompt_len=4),  # bucket 12
    ]
    clean, noised, answer_len = micro_batch(samples, mode, SPECIAL, torch.Generator().manual_seed(5))
    assert clean.shape == (2, 12)
    assert clean[0].tolist() == [3, 40, 41, 6, 4, 50, 6, EOT, EOT, EOT, EOT, EOT]
    assert clean[1].tolist() == samples[1].tokens.tolist()
    expected = sft_noise(clean, torch.tensor([5, 4]), MASK, mode, torch.Generator().manual_seed(5))
    assert torch.equal(noised.tokens, expected.tokens) and torch.equal(noised.masked, expected.masked)
    if mode == "llada":
        assert answer_len.tolist() == [7, 8]  # response + every end-of-text after it
        assert not noised.masked[0, :5].any() and not noised.masked[1, :4].any()
    else:
        assert answer_len is None
    # Padding positions are maskable, so they carry loss: the model learns to stop.
    g = torch.Generator().manual_seed(0)
    many = [micro_batch(samples, mode, SPECIAL, g)[1] for _ in range(50)]
    assert any(n.masked[0, 8:].any() for n in many)


def test_llada_and_illada_draw_the_same_noise_levels():
    tokens = torch.randint(10, 100, (4, 10))
    a = sft_noise(tokens, torch.full((4,), 3), MASK, "illada", torch.Generator().manual_seed(6))
    b = sft_noise(tokens, torch.full((4,), 3), MASK, "llada", torch.Generator().manual_seed(6))
    plain = add_noise(tokens, MASK, torch.Generator().manual_seed(6))
    assert torch.equal(a.p, b.p) and torch.equal(a.masked, plain.masked)
    assert torch.equal(b.masked, a.masked & (torch.arange(10) >= 3))
