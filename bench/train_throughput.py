"""Training throughput: illada's megatron-core step against plain PyTorch, eager and under
`torch.compile`, same model, same process, same batches.

The megatron side is the trainer's own code: `build` (GPTModel, megatron DDP, megatron's
AdamW with fp32 main weights, WSD schedule; the config's switches, e.g. train.optim.
torch_impl, apply), `micro_batches` (the masked-diffusion noise) and megatron's
forward-backward schedule; it computes the output layer and cross entropy only at masked
positions, through the fused output layer + cross entropy (train.cross_entropy). The side
`illada-all` is the same with them at every position, as before; `illada-megatron-ce` at
the masked positions through megatron's output layer and cross entropy;
`illada-compiled` is illada with `train.compile` (its layers under torch.compile). The
baselines are the same architecture written in plain PyTorch (nn.Linear, torch SDPA,
RMSNorm, SwiGLU, RoPE, tied embeddings) under bf16 autocast with fused AdamW, trained on the
same objective: once eager, once `torch.compile`d.

    python bench/train_throughput.py --device cuda --preset 1b --seq-len 4096 --micro-batch 2
    python bench/train_throughput.py --device cpu --preset tiny --seq-len 256 --compile-backend eager  # a smoke run
    python bench/train_throughput.py ... train.optim.torch_impl=foreach   # illada config overrides
    python bench/train_throughput.py --device cpu --preset 1b --model num_layers=2 --sides illada,illada-all

Prints tokens/s, MFU (bidirectional attention FLOPs counted), peak GPU memory and final
loss of each, and the ratios between them (illada / eager, illada / compiled, ...).
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import platform
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from illada.config import Config
from illada.model.config import ModelConfig, num_parameters
from illada.objective import add_noise, diffusion_loss
from illada.train.metrics import flops_per_token, peak_flops


# --- the plain-PyTorch reference ---------------------------------------------------------------


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, rotate-half convention, x [b, h, s, d]."""
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, device=x.device, dtype=torch.float32), inv)
    cos, sin = torch.cat([angles, angles], -1).cos().to(x.dtype), torch.cat([angles, angles], -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, kv = cfg.hidden_size, cfg.num_query_groups * cfg.head_dim
        self.cfg = cfg
        self.norm1, self.norm2 = nn.RMSNorm(h, eps=cfg.norm_eps), nn.RMSNorm(h, eps=cfg.norm_eps)
        self.qkv = nn.Linear(h, h + 2 * kv, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.fc1 = nn.Linear(h, 2 * cfg.ffn_hidden_size, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        cfg, d = self.cfg, self.cfg.head_dim
        q, k, v = self.qkv(self.norm1(x)).split([h, cfg.num_query_groups * d, cfg.num_query_groups * d], -1)
        q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # no mask: bidirectional
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        gate, up = self.fc1(self.norm2(x)).chunk(2, -1)
        return x + self.fc2(F.silu(gate) * up)


class Reference(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        for p in self.parameters():
            nn.init.normal_(p, std=cfg.init_std) if p.dim() > 1 else nn.init.ones_(p)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.norm(x), self.embed.weight)  # tied
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)


# --- timing ------------------------------------------------------------------------------------


def batches(cfg: ModelConfig, n: int, micro_batch: int, seq_len: int, mask_id: int = 5) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        clean = torch.randint(7, cfg.vocab_size, (micro_batch, seq_len), generator=g)
        out.append((clean, add_noise(clean, mask_id, g)))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, inputs: list, args) -> tuple[float, list[float], float | None]:
    """Seconds of the timed steps, their losses, and the peak GPU memory allocated (None on CPU)."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for x in inputs[: args.warmup]:
        step(x)
    sync(args.device)
    start = time.perf_counter()
    losses = [step(x) for x in inputs[args.warmup :]]
    sync(args.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    if args.profile:
        profile(step, inputs[-1], args.device)
    return seconds, losses, peak


def profile(step, batch, device: str) -> None:
    """Where one step's time goes: the top operators by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step(batch)
        sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))


def run_reference(cfg: ModelConfig, inputs: list, args, compiled: bool = False) -> tuple[float, list[float], float | None]:
    device = torch.device(args.device)
    model = Reference(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=args.device == "cuda")
    forward = torch.compile(model, backend=args.compile_backend) if compiled else model
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    def step(batch):
        clean, noised = batch
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=dtype, enabled=args.device == "cuda"):
            ce = forward(noised.tokens.to(device), clean.to(device))
        loss = diffusion_loss(ce.float(), _to(noised, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    seconds, losses, peak = time_steps(step, inputs, args)
    del model, opt, forward
    return seconds, [float(x) for x in losses], peak


def _to(noised, device):
    from illada.objective import Noised

    return Noised(noised.tokens.to(device), noised.masked.to(device), noised.p.to(device))


def bench_config(cfg: ModelConfig, micro_batch: int, overrides: list[str] = ()) -> Config:
    """The trainer's config for one micro-batch per step, with `key.sub=value` overrides."""
    from illada.config import load_config

    base = {
        "name": "bench",
        "root": "/tmp/illada-bench",
        "model": cfg.model_dump(),
        "train": {"steps": 1000, "global_batch_size": micro_batch, "micro_batch_size": micro_batch, "optim": {"lr": 1e-4, "warmup_steps": 0}},
    }
    return load_config(None, list(overrides), base=base)


def run_megatron(cfg: ModelConfig, inputs: list, args, logits_everywhere: bool = False, switches: tuple[str, ...] = ()) -> tuple[float, list[float], float | None]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from illada.parallel import destroy_parallel, init_parallel
    from illada.train.trainer import Batch, build, forward_step

    config = bench_config(cfg, args.micro_batch, args.overrides + list(switches))
    init_parallel(1, 1)
    model, optimizer, scheduler, _ = build(config)
    forward_backward = get_forward_backward_func()
    device = torch.device(args.device)

    def step(batch):
        clean, noised = batch
        optimizer.zero_grad()
        model.zero_grad_buffer()
        losses = forward_backward(
            forward_step_func=functools.partial(forward_step, logits_everywhere=logits_everywhere),
            data_iterator=iter([Batch(clean.to(device), _to(noised, device))]),
            model=[model],
            num_microbatches=1,
            seq_length=args.seq_len,
            micro_batch_size=args.micro_batch,
            forward_only=False,
        )
        optimizer.step()
        scheduler.step(increment=1)
        return losses[0]["loss"]

    seconds, losses, peak = time_steps(step, inputs, args)
    del model, optimizer
    destroy_parallel()
    return seconds, [float(x) for x in losses], peak


SIDES = {
    "illada": "illada (megatron-core)",
    "eager": "plain PyTorch, eager",
    "compiled": "plain PyTorch, compiled",
    "illada-all": "illada, logits everywhere",
    "illada-compiled": "illada, train.compile",
    "illada-megatron-ce": "illada, megatron's CE",
}
RUNS = {
    "illada": run_megatron,
    "eager": run_reference,
    "compiled": functools.partial(run_reference, compiled=True),
    "illada-all": functools.partial(run_megatron, logits_everywhere=True),
    "illada-compiled": functools.partial(run_megatron, switches=("train.compile=true",)),
    "illada-megatron-ce": functools.partial(run_megatron, switches=("train.cross_entropy=megatron",)),
}
RATIOS = (
    ("illada", "eager"),
    ("illada", "compiled"),
    ("illada", "illada-all"),
    ("illada", "illada-megatron-ce"),
    ("illada-compiled", "compiled"),
    ("illada-compiled", "illada"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--preset", default="1b")
    p.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE", help="a model field over the preset's (both sides), e.g. --model num_layers=2; repeatable")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled baseline (eager: a CPU smoke run)")
    p.add_argument("--profile", action="store_true", help="also print each side's top operators for one step")
    p.add_argument("--sides", default="illada,eager,compiled", help=f"which sides to run, comma-separated, of {','.join(SIDES)} (default: the first three)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="illada config overrides for the megatron side, e.g. train.optim.torch_impl=foreach")
    args = p.parse_args(argv)
    unknown = set(args.sides.split(",")) - set(SIDES)
    if unknown:
        p.error(f"unknown side(s) {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    fields = dict(item.split("=", 1) for item in args.model)
    return ModelConfig.model_validate({"preset": args.preset, "max_seq_len": max(args.seq_len, 1), **fields})


def measure(args: argparse.Namespace) -> dict[str, dict]:
    """Each side's tokens/s, MFU, peak memory and final loss; prints a table as it goes."""
    cfg = model_config(args)
    inputs = batches(cfg, args.warmup + args.steps, args.micro_batch, args.seq_len)
    tokens = args.steps * args.micro_batch * args.seq_len
    flops = flops_per_token(cfg, args.seq_len)
    peak = peak_flops() if args.device == "cuda" else None
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    shape = args.preset + "".join(f", {item}" for item in args.model)
    print(f"{shape}: {num_parameters(cfg) / 1e9:.2f}B parameters, seq {args.seq_len}, micro-batch {args.micro_batch}, {args.steps} timed steps on {device_name}, torch {torch.__version__}")
    print(f"{'':<26}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'final loss':>12}")
    results = {}
    for key in args.sides.split(","):
        name = SIDES[key]
        seconds, losses, peak_bytes = RUNS[key](cfg, inputs, args)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        rate = tokens / seconds
        assert all(math.isfinite(x) for x in losses), f"{name}: non-finite loss {losses}"
        results[name] = {"tokens_per_s": rate, "mfu": rate * flops / peak if peak else None, "peak_bytes": peak_bytes, "final_loss": float(np.mean(losses[-3:]))}
        r = results[name]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        mem = f"{peak_bytes / 2**30:.1f}" if peak_bytes else "-"
        print(f"{name:<26}{rate:>12,.0f}{mfu:>8}{mem:>10}{r['final_loss']:>12.3f}")
    rate = {key: results[SIDES[key]]["tokens_per_s"] for key in SIDES if SIDES[key] in results}
    ratios = [f"{a} / {b}: {rate[a] / rate[b]:.2f}x" for a, b in RATIOS if a in rate and b in rate]
    if ratios:
        print("   ".join(ratios))
    return results


def main() -> None:
    measure(parse_args())


if __name__ == "__main__":
    main()
