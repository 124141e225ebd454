"""`illada eval`: score a checkpoint on lm-evaluation-harness tasks (the local ones in
illada/eval/tasks/) or on the perplexity of a shard."""

from __future__ import annotations

import argparse
import json
import sys

PERPLEXITY = "perplexity"


def add_parsers(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: harness tasks, or perplexity over a shard",
        description="Evaluate CHECKPOINT on --task names: 'perplexity' (the Monte-Carlo ELBO bound over a packed "
        "shard's sequences) or lm-evaluation-harness tasks; the repository's own (illada/eval/tasks/: "
        "illada_toy_mc, illada_toy_gen, illada_toy_ppl) need no network.",
    )
    e.add_argument("checkpoint", help="a checkpoint directory, or a folder of them (the latest complete one is used)")
    e.add_argument("--task", action="append", required=True, help="task name; repeat for several")
    e.add_argument("--scorer", choices=["confidence", "likelihood"], default="confidence", help="loglikelihood requests: iLLaDA's confidence score or the Monte-Carlo ELBO")
    e.add_argument("--confidence-order", choices=["target", "argmax"], default="target", help="confidence scorer: reveal next the masked position most confident of the candidate's token (target, default) or of its own top token (argmax, the sampler's confidence)")
    e.add_argument("--mc-num", type=int, default=128, help="Monte-Carlo samples per ELBO (default 128; LLaDA uses 1 for MMLU-like tasks)")
    e.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    e.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    e.add_argument("--block-length", type=int, default=32, help="generation tasks: the sampler's block length (default 32)")
    e.add_argument("--threshold", type=float, default=None, help="generation tasks: Fast-dLLM threshold decoding")
    e.add_argument("--prefix-cache", action="store_true", help="generation tasks: Fast-dLLM prefix cache")
    e.add_argument("--repetition-guard", action="store_true", help="generation tasks: re-denoise blocks that fall into a repeating n-gram loop (default off, as LLaDA's evaluation)")
    e.add_argument("--shard", default=None, help="perplexity: an .arrow shard of the pack stage (default: the pack manifest's shards, last first)")
    e.add_argument("--max-sequences", type=int, default=64, help="perplexity: at most this many sequences (default 64)")
    e.add_argument("--include-harness-tasks", action="store_true", help="also offer lm-eval's own tasks (they download hub datasets)")
    e.add_argument("--bootstrap-iters", type=int, default=0, help="harness bootstrap iterations for standard errors (default 0: none)")
    e.add_argument("--json", dest="json_path", default=None, help="also write the results here as JSON")
    e.add_argument("--seed", type=int, default=1234, help="seed of the Monte-Carlo masks and of sampling")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from illada.inference import load_for_inference

    loaded = load_for_inference(args.checkpoint)
    results = {}
    harness_tasks = [t for t in args.task if t != PERPLEXITY]
    if PERPLEXITY in args.task:
        results[PERPLEXITY] = shard_perplexity(loaded, args.shard, args.max_sequences, args.mc_num, args.batch_size, args.seed)
    if harness_tasks:
        from illada.eval.harness import run_tasks

        try:
            results.update(run_tasks(harness_model(loaded, args), harness_tasks, limit=args.limit, bootstrap_iters=args.bootstrap_iters, include_harness_tasks=args.include_harness_tasks))
        except ValueError as e:
            print(f"illada: error: eval: {e}", file=sys.stderr)
            return 2
    print(json.dumps(results, indent=2, default=str))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


def harness_model(loaded, args: argparse.Namespace):
    """The harness model `illada eval` scores with, as its flags configure it."""
    from illada.eval.harness import IlladaLM

    return IlladaLM(
        loaded,
        scorer=args.scorer,
        confidence_order=args.confidence_order,
        mc_num=args.mc_num,
        batch_size=args.batch_size,
        block_length=args.block_length,
        threshold=args.threshold,
        prefix_cache=args.prefix_cache,
        repetition_guard=args.repetition_guard,
        seed=args.seed,
    )


def shard_perplexity(loaded, shard: str | None, max_sequences: int, mc_num: int, batch_size: int, seed: int) -> dict:
    """The ELBO perplexity bound over up to max_sequences sequences (their padding left out)
    of `shard`, or else of the pack manifest's shards, last first."""
    import torch

    from illada.data.shards import read_sequences
    from illada.eval.likelihood import perplexity

    shards = [shard] if shard else _last_shards(loaded.checkpoint)
    sequences: list[torch.Tensor] = []
    for url in shards:
        table = read_sequences(url)
        for tokens, pad in zip(table.column("tokens").to_pylist(), table.column("pad").to_pylist()):
            if len(sequences) < max_sequences and len(tokens) > pad:
                sequences.append(torch.tensor(tokens[: len(tokens) - pad], device=loaded.device))
    generator = torch.Generator().manual_seed(seed)
    return {"shards": shards, **perplexity(loaded.model, sequences, loaded.special, mc_num=mc_num, batch_size=batch_size, generator=generator)}


def _last_shards(checkpoint: str) -> list[str]:
    from illada import storage
    from illada.layout import checkpoint_info

    root = checkpoint_info(checkpoint).data_root
    files = storage.read_json(storage.join(root, "pack", "manifest.json"))["files"]
    print("illada eval: perplexity over the pack manifest's last shards, which training may have read; pass --shard for a held-out one", file=sys.stderr)
    return [storage.join(root, f["path"]) for f in reversed(files) if f["path"].endswith(".arrow")]
