"""The samplers on the real megatron model (the tiny preset, random weights, TP=1) in a child
process (tests/distributed.py): padding, the LLaDA reference, determinism, and the prefix
cache against the full forward."""

from __future__ import annotations

import torch

from illada.model.config import ModelConfig
from tests.distributed import run_distributed

SEED = 1234
# Wider initial weights than training's make random logits peaked enough that greedy
# choices are far from ties (padding changes the float summation order).
CONFIG = {"preset": "tiny", "vocab_size": 512, "max_seq_len": 64, "init_std": 0.3}


def _models():
    from illada.model.build import build_model, transformer_config
    from illada.parallel import init_parallel
    from illada.sampling.megatron import MegatronDenoiser

    init_parallel(1, 1, seed=SEED)
    out = {}
    for layers in (2, 1):
        cfg = ModelConfig(**CONFIG, num_layers=layers)
        out[layers] = MegatronDenoiser(build_model(cfg, transformer_config(cfg)))
    return out


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(7, 512, (n,), generator=g) for n in (6, 3, 5)]


def _sampling_on_the_real_model(rank: int) -> dict:
    from illada.parallel import destroy_parallel
    from illada.sampling.model import SpecialTokens, left_pad
    from illada.sampling.sampler import Decoding, SamplerConfig, generate
    from tests.sampling.reference import llada_generate

    special = SpecialTokens(mask=5, pad=0, stop=(1, 6))
    models = _models()
    model = models[2]
    prompts = _prompts()
    r: dict = {}

    # Padding: each row of a left-padded batch gets the logits it gets alone.
    tokens, keep = left_pad(prompts, special.pad)
    batched = model(tokens, keep)
    r["padding_logit_diff"] = max((batched[i, tokens.shape[1] - len(p) :] - model(p[None])[0]).abs().max().item() for i, p in enumerate(prompts))

    config = SamplerConfig(gen_length=16, steps=16, block_length=8)
    together = generate(model, prompts, config, special)
    alone = [generate(model, [p], config, special).answers(special)[0] for p in prompts]
    r["batched_equals_alone"] = together.answers(special) == alone
    r["deterministic"] = torch.equal(together.tokens, generate(model, prompts, config, special).tokens)
    r["prompts_kept"] = all(row[together.start - len(p) : together.start] == p.tolist() for row, p in zip(together.tokens.tolist(), prompts))

    same_length = torch.stack([p[:3] for p in prompts])
    for cfg_scale in (0.0, 1.0):
        ours = generate(model, same_length, SamplerConfig(gen_length=16, steps=8, block_length=8, decoding=Decoding(cfg_scale=cfg_scale)), special).tokens
        reference = llada_generate(model, same_length, steps=8, gen_length=16, block_length=8, mask_id=special.mask, cfg_scale=cfg_scale)
        r[f"equals_reference_cfg{cfg_scale}"] = torch.equal(ours, reference)

    # The prefix cache against the full forward, on a canvas whose block [lo, hi) changes.
    canvas = torch.cat([tokens, torch.full((3, 16), special.mask)], 1)
    keep_all = torch.cat([keep, torch.ones(3, 16, dtype=torch.bool)], 1)
    lo = tokens.shape[1]
    changed = canvas.clone()
    changed[:, lo : lo + 4] = torch.tensor([11, 12, 13, 14])
    for layers, m in models.items():
        cache = m.prefix_cache(3, canvas.shape[1])
        full = m(canvas, keep_all)
        r[f"cache_full_diff_{layers}"] = (cache.full(canvas, keep_all) - full).abs().max().item()
        r[f"cache_same_tokens_diff_{layers}"] = (cache.suffix(canvas, lo, keep_all) - full[:, lo:]).abs().max().item()
        r[f"cache_changed_block_diff_{layers}"] = (cache.suffix(changed, lo, keep_all) - m(changed, keep_all)[:, lo:]).abs().max().item()

    # Sampling with the cache: exact for one layer; for two, how much it agrees.
    for layers, m in models.items():
        plain = generate(m, prompts, SamplerConfig(gen_length=16, steps=16, block_length=8), special)
        cached = generate(m, prompts, SamplerConfig(gen_length=16, steps=16, block_length=8, prefix_cache=True), special)
        r[f"cached_equals_plain_{layers}"] = torch.equal(plain.tokens, cached.tokens)
        r[f"cached_agreement_{layers}"] = (plain.tokens == cached.tokens).float().mean().item()
    fast = generate(model, prompts, SamplerConfig(gen_length=16, steps=16, block_length=8, prefix_cache=True, decoding=Decoding(threshold=0.5, cfg_scale=0.5)), special)
    r["fast_filled"] = bool((fast.tokens[:, fast.start :] != special.mask).all())
    r["fast_nfe"] = fast.nfe
    destroy_parallel()
    return r


def test_samplers_on_the_megatron_model():
    [r] = run_distributed(_sampling_on_the_real_model, 1, timeout=240)
    assert r["padding_logit_diff"] < 1e-4, r
    assert r["batched_equals_alone"] and r["deterministic"] and r["prompts_kept"], r
    assert r["equals_reference_cfg0.0"] and r["equals_reference_cfg1.0"], r
    for layers in (1, 2):  # a block's first step (full) and an unchanged canvas are exact
        assert r[f"cache_full_diff_{layers}"] < 1e-5 and r[f"cache_same_tokens_diff_{layers}"] < 1e-5, r
    # Stale keys/values of the prefix: exact with one layer, an approximation with two.
    assert r["cache_changed_block_diff_1"] < 1e-4 < r["cache_changed_block_diff_2"], r
    assert r["cached_equals_plain_1"], r  # (two layers: r["cached_agreement_2"], weight-dependent)
    assert r["fast_filled"] and r["fast_nfe"] <= 16, r
