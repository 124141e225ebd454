"""Process groups for training: torch.distributed from the torchrun environment, then
megatron's tensor/pipeline/data-parallel groups and its per-region RNG seeds."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from illada.model import cpu_bridge


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: float = 600) -> None:
    """Call once per process. Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK set) it joins the job; without those it is a one-process job needing no port.
    A process group set up already (Ray Train sets one up) is used as it is. NCCL on GPUs,
    gloo with the CPU bridge otherwise. The data-parallel size is world_size / (tp * pp).

    timeout_s bounds every collective, megatron's tensor/pipeline/data-parallel groups'
    included: a rank waiting longer on a peer raises (NCCL: the watchdog ends the process),
    so a hung peer becomes a failure instead of a stall."""
    on_gpu = not cpu_bridge.enable_if_no_gpu()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if on_gpu else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp x pp = {tp} x {pp}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, distributed_timeout_minutes=timeout_s / 60
    )  # (megatron turns the minutes into a timedelta: a fraction is fine)
    # Weights drawn on the CPU (use_cpu_initialization) come from torch's default generator:
    # the same seed on every rank, so TP shards cut from the same full weight.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
