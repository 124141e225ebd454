"""The GPU check of issue 14, one script: training throughput (illada, plain eager, plain
compiled, illada with the output layer at every position as before, with megatron's cross
entropy and with its layers torch.compile'd, with peak memory and the profile's top
kernels; then illada with torch's foreach AdamW, to show what the fused one buys), the
output layer + cross entropy alone (bench/cross_entropy.py: fused, megatron's, plain) and
the memory planner's prediction against torch.cuda.max_memory_allocated() for two 1b
layouts on one GPU.

Runs on a plain PyTorch GPU box (Python 3.12, no Ray, Transformer Engine or Apex); start it
with bench/gpu_check.sh, which installs the few wheels such a box lacks. On a CPU machine
`--dry-run` runs every part at the tiny preset (no measured memory) to check the script.

    python bench/gpu_check.py              # GPU: 1b, seq 4096, a few minutes
    python bench/gpu_check.py --dry-run    # CPU: tiny preset, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# Two layouts of one GPU: (name, overrides). The second turns on every GPU-only switch.
LAYOUTS = {
    "plain": ["train.micro_batch_size=1", "train.global_batch_size=2", "train.random_length_fraction=0"],
    "sharded+recompute": [
        "train.micro_batch_size=2",
        "train.random_length_fraction=0",
        "train.global_batch_size=4",
        "train.recompute.granularity=selective",
        "train.recompute.modules=[mlp]",
        "train.parallel.use_distributed_optimizer=true",
        "train.parallel.overlap_grad_reduce=true",
        "train.parallel.overlap_param_gather=true",
    ],
}
CPU_SAFE = ("train.micro_batch_size", "train.global_batch_size", "train.random_length_fraction")  # what --dry-run keeps


def shape(args) -> tuple[str, int]:
    return ("tiny", 64) if args.dry_run else ("1b", args.seq_len)


# --- the planner against the allocator ---------------------------------------------------------


def measure_layout(args) -> dict:
    """In this process: train a few steps of the trainer's own model, optimizer and noise at
    this layout; return the planner's peak and the allocator's."""
    import numpy as np
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from train_throughput import bench_config

    from illada.model.config import ModelConfig
    from illada.parallel import destroy_parallel, init_parallel
    from illada.train import plan as planner
    from illada.train.data import Sequences
    from illada.train.trainer import build, forward_step, micro_batches, weights_gathered

    preset, seq_len = shape(args)
    overrides = [o for o in LAYOUTS[args.layout] if not args.dry_run or o.startswith(CPU_SAFE)]
    config = bench_config(ModelConfig(preset=preset, max_seq_len=seq_len), 1, overrides)
    train = config.train
    on_gpu = torch.cuda.is_available()
    init_parallel(1, 1)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    model, optimizer, scheduler, _ = build(config)
    rng = np.random.default_rng(0)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    losses = []
    for step in range(3):
        tokens = rng.integers(7, config.model.vocab_size, size=(train.global_batch_size, seq_len)).astype(np.int64)
        rows = Sequences(tokens, pad=np.zeros(len(tokens), dtype=np.int64), sources=["random"] * len(tokens))
        batches, _ = micro_batches(rows, train, step, mask_id=5, device=device)
        optimizer.zero_grad()
        model.zero_grad_buffer()
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=seq_len,
            micro_batch_size=train.micro_batch_size,
            forward_only=False,
        )
        optimizer.step()
        scheduler.step(increment=1)
        losses.append(float(torch.stack([o["loss"] for o in out]).mean()))
    with weights_gathered(model):
        pass  # the checkpoint path's gather (overlap_param_gather) runs
    measured = torch.cuda.max_memory_allocated() if on_gpu else None
    layout = planner.config_layout(train, dp=1)
    fused_ce = train.cross_entropy == "fused"
    predicted = planner.plan(config.model, layout, seq_len, train.global_batch_size, bf16=train.bf16 and on_gpu, fused_norm=on_gpu, fused_cross_entropy=fused_ce)
    destroy_parallel()
    return {"layout": args.layout, "describe": layout.describe(), "predicted": predicted.peak, "measured": measured, "losses": losses}


def planner_check(args) -> list[dict]:
    """Each layout in a fresh process, so one's allocations do not count in the other's peak."""
    rows = []
    for name in LAYOUTS:
        cmd = [sys.executable, __file__, "--layout", name, "--seq-len", str(args.seq_len)] + (["--dry-run"] if args.dry_run else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"layout {name} failed")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\nplanner vs torch.cuda.max_memory_allocated(), {shape(args)[0]}, seq {shape(args)[1]}, one GPU:")
    print(f"  {'layout':<72}{'predicted GiB':>14}{'measured GiB':>14}{'error':>8}")
    for r in rows:
        measured = f"{r['measured'] / 2**30:.2f}" if r["measured"] else "n/a"
        error = f"{(r['predicted'] - r['measured']) / r['measured']:+.1%}" if r["measured"] else "-"
        print(f"  {r['describe']:<72}{r['predicted'] / 2**30:>14.2f}{measured:>14}{error:>8}")
    return rows


# --- throughput ------------------------------------------------------------------------------------


def throughput(args) -> dict:
    """The three columns, illada with logits everywhere, with megatron's cross entropy and
    with train.compile, then illada again with torch's foreach AdamW (megatron's default without TE/Apex before
    train.optim.torch_impl) to show what the fused kernel buys."""
    from train_throughput import SIDES, measure, parse_args

    preset, seq_len = shape(args)
    argv = ["--preset", preset, "--seq-len", str(seq_len), "--micro-batch", "2", "--steps", str(2 if args.dry_run else 10), "--warmup", str(1 if args.dry_run else 3)]
    if args.dry_run:
        argv += ["--device", "cpu", "--compile-backend", "eager"]
    results = measure(parse_args(argv + ["--sides", "illada,eager,compiled,illada-all,illada-megatron-ce,illada-compiled"] + (["--profile"] if args.profile else [])))
    print("\nillada with train.optim.torch_impl=foreach:")
    foreach = measure(parse_args(argv + ["--sides", "illada", "train.optim.torch_impl=foreach"]))[SIDES["illada"]]
    fused = results[SIDES["illada"]]
    print(f"fused / foreach AdamW: {fused['tokens_per_s'] / foreach['tokens_per_s']:.2f}x tokens/s")
    results["illada, foreach AdamW"] = foreach
    return results


def cross_entropy_check(args) -> str:
    """bench/cross_entropy.py at the 1b preset, every position of a seq 4096 x 2 micro-batch."""
    size = ["--device", "cpu", "--preset", "tiny", "--tokens", "64"] if args.dry_run else ["--device", "cuda", "--tokens", "8192"]
    done = subprocess.run([sys.executable, str(HERE / "cross_entropy.py"), *size], capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        raise SystemExit("bench/cross_entropy.py failed")
    print("\n" + done.stdout, end="")
    return done.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny preset: check that every part runs")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the top-kernel tables")
    p.add_argument("--layout", choices=list(LAYOUTS), help=argparse.SUPPRESS)  # one planner layout, in a child process
    args = p.parse_args()
    if args.layout:
        print(json.dumps(measure_layout(args)))
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --dry-run on a CPU machine")
    start = time.time()
    print(f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (dry run)'}")
    results = {"throughput": throughput(args), "cross_entropy": cross_entropy_check(args), "planner": planner_check(args)}
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\ndone in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
