"""The output layer + cross entropy at the masked positions, forward and backward: illada's
fused function (illada.model.cross_entropy) against megatron's path (its output layer's
matmul and vocab-parallel cross entropy, what train.cross_entropy=megatron runs) and plain
PyTorch (nn.functional.linear + cross_entropy), same inputs, same process.

    python bench/cross_entropy.py                                    # CPU: 512 tokens, 1b's hidden and vocabulary
    python bench/cross_entropy.py --device cuda --tokens 8192        # GPU: 1b, seq 4096 x micro-batch 2, every position

Prints, for each, milliseconds per forward+backward, the bytes autograd keeps for the backward
pass (inputs and weight aside), peak GPU memory above the inputs (GPU only) and the largest
difference of the loss and of the gradients from plain PyTorch's (relative to the largest
gradient), with the ratios against megatron's.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time

import torch
import torch.nn.functional as F

from illada.model.config import ModelConfig
from illada.model.cross_entropy import linear_cross_entropy


def fused(hidden, weight, labels):
    return linear_cross_entropy(hidden, weight, labels)


def megatron(hidden, weight, labels):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = F.linear(hidden, weight)  # ColumnParallelLinear's matmul at TP=1
    return vocab_parallel_cross_entropy(logits.unsqueeze(1), labels.unsqueeze(1)).squeeze(1)


def plain(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="none")


SIDES = {"fused": fused, "megatron": megatron, "plain": plain}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(side, hidden, weight, labels, scale, reps: int) -> dict:
    device = hidden.device
    inputs = {hidden.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step(record: bool = False):
        hidden.grad = weight.grad = None
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t) if record else contextlib.nullcontext():
            loss = side(hidden, weight, labels)
        (loss * scale).sum().backward()
        return loss.detach()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    loss = step(record=True)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        step()
    sync(device)
    return {"ms": (time.perf_counter() - start) / reps * 1e3, "saved": sum(saved.values()), "peak": peak, "loss": loss, "grads": (hidden.grad.clone(), weight.grad.clone())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="1b", help="hidden size and vocabulary from this model preset (default: 1b)")
    p.add_argument("--tokens", type=int, default=512, help="masked positions (rows) per call (default: 512)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    from illada.parallel import destroy_parallel, init_parallel

    init_parallel(1, 1)  # megatron's cross entropy reads its TP group
    cfg = ModelConfig(preset=args.preset)
    device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, cfg.hidden_size, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) * cfg.init_std).to(device, dtype).requires_grad_()
    labels = torch.randint(0, cfg.vocab_size, (args.tokens,), generator=g).to(device)
    scale = torch.rand(args.tokens, generator=g).to(device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"output layer + cross entropy, {args.tokens} rows x hidden {cfg.hidden_size} x vocab {cfg.vocab_size:,}, {args.dtype}, {device_name}, torch {torch.__version__}")
    print(f"{'':<10}{'ms':>10}{'saved MiB':>12}{'peak MiB':>10}{'max |dloss|':>13}{'grads, rel.':>13}")
    results = {name: run(fn, hidden, weight, labels, scale, args.reps) for name, fn in SIDES.items()}
    ref = results["plain"]
    for name, r in results.items():
        dloss = (r["loss"] - ref["loss"]).abs().max().item()
        dgrad = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(r["grads"], ref["grads"]))
        peak = f"{r['peak'] / 2**20:.0f}" if r["peak"] is not None else "-"
        print(f"{name:<10}{r['ms']:>10.1f}{r['saved'] / 2**20:>12.1f}{peak:>10}{dloss:>13.2e}{dgrad:>13.2e}")
    f, m = results["fused"], results["megatron"]
    line = f"fused / megatron: {m['ms'] / f['ms']:.2f}x speed, {f['saved'] / m['saved']:.2f}x saved bytes"
    if f["peak"] is not None:
        line += f", {f['peak'] / m['peak']:.2f}x peak memory"
    print(line)
    destroy_parallel()


if __name__ == "__main__":
    main()
