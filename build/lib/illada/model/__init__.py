"""The bidirectional masked-diffusion Transformer on megatron-core.

The config (illada.model.config) is importable without megatron; building and running the
model is in illada.model.build, the CPU bridge in illada.model.cpu_bridge.
"""
