import torch

from illada.objective import EPS, add_noise, diffusion_loss, random_length

MASK = 5


def test_noise_and_loss_match_a_direct_computation():
    tokens = torch.randint(10, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    noised = add_noise(tokens, MASK, torch.Generator().manual_seed(1))

    # The same draws, written out step by step.
    g = torch.Generator().manual_seed(1)
    t = torch.rand(4, generator=g)
    p = (1 - EPS) * t + EPS
    u = torch.rand(4, 16, generator=g)
    assert torch.equal(noised.p, p)
    for b in range(4):
        for i in range(16):
            masked = bool(u[b, i] < p[b])
            assert bool(noised.masked[b, i]) == masked
            assert noised.tokens[b, i].item() == (MASK if masked else tokens[b, i].item())

    ce = torch.rand(4, 16, generator=torch.Generator().manual_seed(2))
    expected = sum(ce[b, i].item() / p[b].item() for b in range(4) for i in range(16) if noised.masked[b, i]) / (4 * 16)
    assert abs(diffusion_loss(ce, noised).item() - expected) < 1e-6


def test_unmasked_positions_do_not_contribute():
    tokens = torch.randint(10, 100, (2, 8))
    noised = add_noise(tokens, MASK, torch.Generator().manual_seed(3))
    ce = torch.ones(2, 8)
    ce_changed = ce.clone()
    ce_changed[~noised.masked] = 1000.0
    assert torch.equal(diffusion_loss(ce, noised), diffusion_loss(ce_changed, noised))


def test_weighted_masked_count_is_unbiased():
    # With CE = 1 everywhere the loss estimates the mean per-token CE, 1, for any t.
    g = torch.Generator().manual_seed(4)
    tokens = torch.zeros(20000, 64, dtype=torch.long)
    noised = add_noise(tokens, MASK, g)
    per_sequence = noised.masked.sum(1) / noised.p / 64
    mean, stderr = per_sequence.mean().item(), (per_sequence.std() / per_sequence.numel() ** 0.5).item()
    assert abs(mean - 1.0) < 4 * stderr, (mean, stderr)
    # and the mask rate follows p: E[masked fraction] = E[p] = (1 + eps) / 2
    assert abs(noised.masked.float().mean().item() - (1 + EPS) / 2) < 0.01


def test_random_length_cuts_a_fraction_of_batches():
    g = torch.Generator().manual_seed(5)
    tokens = torch.arange(32).repeat(2, 1)
    lengths = [random_length(tokens, 0.25, g).shape[1] for _ in range(2000)]
    cut = [n for n in lengths if n < 32]
    assert 0.2 < len([n for n in lengths if n != 32]) / 2000 < 0.3
    assert min(cut) >= 1 and max(lengths) == 32
    assert random_length(tokens, 0.0, g) is tokens


def test_padding_is_never_masked_nor_scored():
    tokens = torch.randint(10, 100, (3, 16), generator=torch.Generator().manual_seed(6))
    valid = torch.arange(16)[None, :] < torch.tensor([16, 11, 4])[:, None]  # rows with 0, 5 and 12 pad tokens
    noised = add_noise(tokens, MASK, torch.Generator().manual_seed(7), valid=valid)

    # The same draws as without padding, step by step; only real tokens may be masked.
    g = torch.Generator().manual_seed(7)
    p = (1 - EPS) * torch.rand(3, generator=g) + EPS
    u = torch.rand(3, 16, generator=g)
    reference = (u < p[:, None]) & valid
    assert torch.equal(noised.masked, reference) and not noised.masked[~valid].any()
    assert torch.equal(noised.tokens[~valid], tokens[~valid])

    ce = torch.rand(3, 16, generator=torch.Generator().manual_seed(8))
    expected = sum(ce[b, i].item() / p[b].item() for b in range(3) for i in range(16) if reference[b, i]) / int(valid.sum())
    assert abs(diffusion_loss(ce, noised).item() - expected) < 1e-6
    ce[~valid] = 1000.0  # whatever the model predicts on padding does not matter
    assert abs(diffusion_loss(ce, noised).item() - expected) < 1e-6
