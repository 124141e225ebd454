"""Sampling from masked-diffusion LMs (SPEC §3).

    sampler     generate (fixed or variable length, semi-autoregressive blocks), infill
    schedule    the per-step commit counts, top-n and threshold selection
    repetition  n-gram loop detection (the sampler's repetition guard)
    model       what a model must offer (tokens -> logits; padding; prefix cache)
    megatron    the megatron GPTModel as such a model, with megatron's key/value cache
    view        the canvas printed step by step
    cli         `illada generate`, `illada infill`

The modules are imported on demand, so the command line starts without torch.
"""
