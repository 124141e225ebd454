"""Sampling speed: the plain sampler against Fast-dLLM's speed-ups, in one run.

The baseline is LLaDA's sampler at one token per step (steps = gen_length, one full forward
per step). Against it, on the same model and prompts: threshold parallel decoding (commit
every proposal with confidence >= --threshold, at least one per step), the prefix cache
(a block's later steps recompute only the block and what follows it), and both. Each
prompt is sampled alone unless --batch says otherwise (Fast-dLLM reports batch 1). Printed per variant: generated
positions per second, forward passes, the speed-up over the plain sampler, and the
agreement of the outputs with the plain sampler's (fraction of generated positions equal,
and answers equal up to the first end token).

    python bench/sampling.py --checkpoint runs/quickstart/checkpoints          # a trained model
    python bench/sampling.py --preset tiny                                      # random weights, CPU
    python bench/sampling.py --device cuda --preset 8b --gen-length 256        # LLaDA-8B's shape, bf16

Random weights measure speed only: their confidences are low, so threshold decoding
commits about one token per step on them, and their agreement figures mean little. Needs
torch, megatron-core, tokenizers, numpy and this repository (no Ray, no MLflow).

Fast-dLLM's anchor (LLaDA-8B, one A100, batch 1, GSM8K): 6.73 -> 54.4 tok/s (8.1x) at
length 256, 3.23 -> 35.3 tok/s (11x) at 512, with threshold decoding and the cache.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import torch

from illada.sampling.model import SpecialTokens
from illada.sampling.sampler import Decoding, SamplerConfig, generate

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "The for statement is used to iterate over",
    "alpha document 3: diffusion model token",
    "beta document 5: the sequence",
]


@dataclass
class Run:
    name: str
    seconds: float
    nfe: int
    positions: int
    outputs: list[torch.Tensor]
    answers: list[list[int]]


def load(args):
    """(model, special ids, prompts as token tensors, description)."""
    if args.checkpoint:
        from illada.inference import load_for_inference

        loaded = load_for_inference(args.checkpoint, bf16=args.dtype == "bf16")
        prompts = [loaded.encode(p) for p in PROMPTS[: args.prompts]]
        return loaded.model, loaded.special, prompts, f"checkpoint {loaded.checkpoint} ({loaded.config.num_layers} layers, hidden {loaded.config.hidden_size})"
    return random_model(args)


def random_model(args):
    from illada.model.build import build_model, transformer_config
    from illada.model.config import ModelConfig, num_parameters
    from illada.parallel import init_parallel
    from illada.sampling.megatron import MegatronDenoiser

    init_parallel(1, 1, seed=args.seed)
    cfg = ModelConfig(preset=args.preset)
    bf16 = args.dtype == "bf16"
    tconfig = transformer_config(cfg, params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16)
    model = MegatronDenoiser(build_model(cfg, tconfig))
    # No tokenizer with random weights: the ids the tokenizer stage gives its special tokens.
    special = SpecialTokens(mask=5, pad=0, stop=(1, 6))
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(7, cfg.vocab_size, (args.prompt_length,), generator=g).to(args.device) for _ in range(args.prompts)]
    return model, special, prompts, f"random weights, preset {args.preset} ({num_parameters(cfg) / 1e6:,.1f}M parameters)"


def variants(args) -> dict[str, SamplerConfig]:
    base = {"gen_length": args.gen_length, "steps": args.gen_length, "block_length": args.block_length}
    fast = Decoding(threshold=args.threshold)
    return {
        "plain": SamplerConfig(**base),
        f"threshold {args.threshold}": SamplerConfig(**base, decoding=fast),
        "prefix cache": SamplerConfig(**base, prefix_cache=True),
        f"threshold {args.threshold} + cache": SamplerConfig(**base, decoding=fast, prefix_cache=True),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, model, prompts, config: SamplerConfig, special: SpecialTokens, device: str, batch: int) -> Run:
    outputs, answers, nfe = [], [], 0
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        result = generate(model, prompts[i : i + batch], config, special)
        outputs += list(result.tokens[:, result.start :].cpu())
        answers += result.answers(special)
        nfe += result.nfe
    sync(device)
    return Run(name, time.perf_counter() - start, nfe, config.gen_length * len(prompts), outputs, answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a trained checkpoint (default: random weights of --preset)")
    parser.add_argument("--preset", default="tiny", help="model preset for random weights: tiny, 1b, 8b (default tiny)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda needs a GPU (the model goes where torch finds one)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--prompts", type=int, default=4, help="prompts in all")
    parser.add_argument("--batch", type=int, default=1, help="prompts sampled together (default 1, as Fast-dLLM reports)")
    parser.add_argument("--prompt-length", type=int, default=64, help="random weights: prompt tokens")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu on a GPU machine: hide the GPU with CUDA_VISIBLE_DEVICES=")

    model, special, prompts, described = load(args)
    configs = variants(args)
    for config in configs.values():  # warm-up: kernels, allocator, the cache's buffers
        generate(model, [prompts[0][:8]], SamplerConfig(gen_length=config.block_length, steps=config.block_length, block_length=config.block_length, decoding=config.decoding, prefix_cache=config.prefix_cache), special)
    runs = [measure(name, model, prompts, config, special, args.device, args.batch) for name, config in configs.items()]

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# sampling: {described}; {device}; {args.dtype}")
    print(f"# {len(prompts)} prompts in batches of {args.batch}, gen_length {args.gen_length}, block_length {args.block_length}, steps = gen_length")
    plain = runs[0]
    print("| variant | positions/s | forward passes | speed-up | positions equal to plain | answers equal to plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for run in runs:
        equal = sum(int((a == b).sum()) for a, b in zip(run.outputs, plain.outputs)) / plain.positions
        same = sum(a == b for a, b in zip(run.answers, plain.answers))
        print(f"| {run.name} | {run.positions / run.seconds:.1f} | {run.nfe} | {plain.seconds / run.seconds:.2f}x | {equal:.3f} | {same}/{len(prompts)} |")


if __name__ == "__main__":
    main()
