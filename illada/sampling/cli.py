"""`illada generate` and `illada infill`: sample from a checkpoint on this machine (the GPU
if there is one, else the CPU), in one process."""

from __future__ import annotations

import argparse
import re
import sys
import time

INFILL_SPAN = re.compile(r"\[MASK(?:\*(\d+))?\]")


def add_parsers(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="generate text from a checkpoint with the masked-diffusion sampler",
        description="Generate after each --prompt: gen-length positions in blocks of block-length, denoised in "
        "steps steps (SPEC §3). --view prints the canvas after every step.",
    )
    g.add_argument("checkpoint", help="a checkpoint directory, or a folder of them (the latest complete one is used)")
    g.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    g.add_argument("--gen-length", type=int, default=128, help="positions to generate (the cap with --variable-length; default 128)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps in all (default: gen-length, one token per step)")
    g.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block (default 32; gen-length for one block)")
    g.add_argument("--variable-length", action="store_true", help="append blocks until an end-of-text token (iLLaDA)")
    g.add_argument("--prefix-cache", action="store_true", help="Fast-dLLM prefix key/value cache (approximate after each block's first step)")
    add_decoding_args(g)
    g.add_argument("--no-repetition-guard", action="store_true", help="do not re-denoise blocks that fall into a repeating n-gram loop")
    g.set_defaults(func=cmd_generate)

    f = sub.add_parser(
        "infill",
        help="fill masked spans anywhere in a text",
        description="Fill every [MASK] (one token) and [MASK*N] (N tokens) of --text. Example: "
        "illada infill CKPT --text 'def add(a, b):\\n    return [MASK*4]'",
    )
    f.add_argument("checkpoint", help="a checkpoint directory, or a folder of them")
    f.add_argument("--text", required=True, help="text with [MASK] / [MASK*N] spans")
    f.add_argument("--steps", type=int, default=None, help="denoising steps in all (default: one per masked token)")
    f.add_argument("--block-length", type=int, default=None, help="fill the masked tokens in chunks of this many, left to right (default: all at once)")
    add_decoding_args(f)
    f.set_defaults(func=cmd_infill)


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="Gumbel-noise temperature (default 0: greedy)")
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance scale (default 0: off)")
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence", help="which proposals a step commits")
    p.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel decoding: also commit every proposal this confident (e.g. 0.9)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--view", action="store_true", help="print the canvas after every step (masks as ░)")


def decoding_from_args(args: argparse.Namespace):
    from illada.sampling.sampler import Decoding

    return Decoding(temperature=args.temperature, cfg_scale=args.cfg, remasking=args.remasking, threshold=args.threshold)


def _fail(command: str, error: Exception) -> int:
    print(f"illada: error: {command}: {error}", file=sys.stderr)
    return 2


def cmd_generate(args: argparse.Namespace) -> int:
    from illada.sampling.repetition import RepetitionGuard
    from illada.sampling.sampler import SamplerConfig

    try:
        config = SamplerConfig(
            gen_length=args.gen_length,
            steps=args.steps or args.gen_length,
            block_length=args.block_length,
            decoding=decoding_from_args(args),
            prefix_cache=args.prefix_cache,
            variable_length=args.variable_length,
            repetition=None if args.no_repetition_guard else RepetitionGuard(),
        )
    except ValueError as e:
        return _fail("generate", e)
    from illada.inference import load_for_inference

    loaded = load_for_inference(args.checkpoint)
    for prompt, answer in zip(args.prompt, sample(loaded, args.prompt, config, seed=args.seed, view=args.view)):
        print(f"--- {prompt!r}\n{prompt}{answer}")
    return 0


def sample(loaded, prompts: list[str], config, *, seed: int = 0, view: bool = False) -> list[str]:
    """Generate after each prompt (a SamplerConfig); returns the answers' text. Speed goes
    to stderr."""
    from illada.sampling.sampler import generate
    from illada.sampling.view import CanvasView

    ids = [loaded.encode(p) for p in prompts]
    width = max(len(i) for i in ids)
    on_step = CanvasView(loaded.decode, loaded.special.mask, width) if view else None
    start = time.perf_counter()
    result = generate(loaded.model, ids, config, loaded.special, generator=_generator(loaded.device, seed), on_step=on_step)
    seconds = time.perf_counter() - start
    answers = result.answers(loaded.special)
    tokens = sum(len(a) for a in answers)
    loops = f", {result.loops} loop(s) re-denoised" if result.loops else ""
    print(f"[{result.nfe} forward passes, {seconds:.2f} s, {tokens / seconds:.1f} answer tokens/s{loops}]", file=sys.stderr)
    return [loaded.decode(a) for a in answers]


def cmd_infill(args: argparse.Namespace) -> int:
    from illada.inference import load_for_inference
    from illada.sampling.sampler import infill
    from illada.sampling.view import CanvasView

    try:
        decoding = decoding_from_args(args)
    except ValueError as e:
        return _fail("infill", e)
    loaded = load_for_inference(args.checkpoint)
    tokens = infill_tokens(args.text, loaded.encode, loaded.special.mask)
    if not (tokens == loaded.special.mask).any():
        print("illada infill: warning: --text has no [MASK] span; nothing to fill", file=sys.stderr)
    on_step = CanvasView(loaded.decode, loaded.special.mask, 0) if args.view else None
    result = infill(loaded.model, [tokens], loaded.special, steps=args.steps, block_length=args.block_length, decoding=decoding, generator=_generator(loaded.device, args.seed), on_step=on_step)
    print(loaded.decode(result.tokens[0]))
    return 0


def infill_tokens(text: str, encode, mask_id: int):
    """Token ids of `text` with each [MASK*N] span replaced by N mask ids."""
    import torch

    pieces, last = [], 0
    for m in INFILL_SPAN.finditer(text):
        pieces.append(encode(text[last : m.start()]).cpu())
        pieces.append(torch.full((int(m.group(1) or 1),), mask_id, dtype=torch.long))
        last = m.end()
    pieces.append(encode(text[last:]).cpu())
    return torch.cat(pieces)


def _generator(device, seed: int):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


QUICKSTART_PROMPTS = ["def ", "import os\n", "class Stack:\n    def __init__(self):\n"]


def sample_after_training(checkpoint_path: str, prompts: list[str] = QUICKSTART_PROMPTS) -> list[str]:
    """The quickstart's last step: load the checkpoint it trained and print a sample after
    each prompt (48 tokens in blocks of 16, then again with threshold decoding and the
    prefix cache). Runs in this process (tensor/pipeline parallel size 1)."""
    from illada.inference import load_for_inference
    from illada.sampling.repetition import RepetitionGuard
    from illada.sampling.sampler import Decoding, SamplerConfig

    loaded = load_for_inference(checkpoint_path)
    answers = []
    for label, extra in (("plain sampler", {}), ("threshold 0.9 + prefix cache", {"decoding": Decoding(threshold=0.9), "prefix_cache": True})):
        config = SamplerConfig(gen_length=48, steps=48, block_length=16, repetition=RepetitionGuard(), **extra)
        print(f"\n== samples from {loaded.checkpoint} ({label})")
        texts = sample(loaded, prompts, config)
        for prompt, text in zip(prompts, texts):
            print(f"--- {prompt!r}\n{prompt}{text}")
        answers += texts
    return answers
