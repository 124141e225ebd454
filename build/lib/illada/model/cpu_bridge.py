"""Let megatron-core 0.16.1 run on a machine without a GPU (CPU tensors, gloo collectives).

Megatron has no CPU path: it assumes CUDA in a handful of places that the model, the
tensor/pipeline-parallel collectives and the pipeline schedules go through. Each patch below
replaces a call that can only raise on a CPU-only machine, so it cannot change what happens
where a GPU is present; `enable_if_no_gpu` applies nothing at all when CUDA is available.

Not bridged (not needed by the model's forward/backward): activation recomputation (it saves
and restores CUDA RNG states), gradient clipping in megatron's optimizer (asserts CUDA
tensors), the distributed optimizer (refuses CPU tensors), fused kernels and TE.
"""

from __future__ import annotations

import types

import torch

_enabled = False


def enable_if_no_gpu() -> bool:
    """Apply the bridge once if CUDA is unavailable; returns whether it is active."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if not _enabled:
        _patch_torch_cuda()
        _patch_cuda_factories()
        _patch_rng_tracker()
        _patch_grad_clipping()
        _enabled = True
    return True


def _patch_torch_cuda() -> None:
    # Megatron allocates with device=torch.cuda.current_device() all over (RoPE's inv_freq,
    # the attention scores buffer, TP gathers, pipeline p2p buffers): make that the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # Pipeline p2p waits for its sends/receives with torch.cuda.synchronize(); gloo's wait()
    # is already synchronous.
    torch.cuda.synchronize = lambda device=None: None
    # With tied embeddings across pipeline stages, the last stage's copy of the embedding is
    # moved with weight.data.cuda() before the all-reduce that copies the first stage's.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_cuda_factories() -> None:
    # The forward-backward schedules count tokens in torch.zeros([], device="cuda"), and the
    # stock causal mask (used by the causal control in the tests) is torch.ones(..., device=
    # "cuda"). Give these modules (only) a torch whose tensor factories put "cuda" on the CPU.
    # The optimizer wrappers keep their loss scale and overflow flags, and gradient clipping
    # (with megatron's torch fallback of the multi-tensor L2 norm, in core.utils) its norm,
    # in such tensors too.
    from megatron.core import utils as core_utils
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils

    for module in (schedules, utils, optimizer, clip_grads, core_utils):
        module.torch = _torch_with_cpu_factories()


def _torch_with_cpu_factories() -> types.ModuleType:
    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    for name in ("zeros", "ones", "empty", "full", "tensor"):
        setattr(proxy, name, _on_cpu(getattr(torch, name)))
    return proxy


def _on_cpu(factory):
    def wrapped(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return factory(*args, device=device, **kwargs)

    return wrapped


def _patch_rng_tracker() -> None:
    # Megatron's RNG tracker keeps one CUDA generator state per parallel region (data, tensor,
    # expert) and forks into it around dropout; creating those states needs CUDA. Its
    # inference variant has the same interface with no-op add/fork. The model has no dropout
    # and CPU initialisation draws from torch's default generator, so nothing is lost.
    from megatron.core.tensor_parallel import random

    original = random.initialize_rng_tracker

    def initialize_rng_tracker(use_te_rng_tracker=False, inference_rng_tracker=False, use_cudagraphable_rng=False, force_reset=False):
        original(use_te_rng_tracker, True, use_cudagraphable_rng, force_reset)

    random.initialize_rng_tracker = initialize_rng_tracker
    initialize_rng_tracker(force_reset=True)


def _patch_grad_clipping() -> None:
    # Clipping scales the gradients in place after asserting they are torch.cuda.FloatTensor;
    # the norm itself (megatron's torch fallback of the multi-tensor L2 norm) runs on the CPU
    # as it is. Scale with torch's foreach kernel instead, keeping megatron's rule.
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
