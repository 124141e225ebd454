"""SFT masking modes: how well a pre-trained checkpoint, fine-tuned in iLLaDA mode (the whole
sequence masked) or in LLaDA mode (the prompt kept clean), answers held-out instructions.

Everything runs through the real stack on this machine: a pre-training corpus of words and
numbers goes through the pre-training data pipeline and `illada train`; instruction data
from illada.eval.toy_instruct (copy or reverse a string of digits) goes through the SFT
data pipeline; each mode is fine-tuned from the same pre-trained checkpoint with `illada
train` (train.objective: sft), checkpointed every --eval-every steps; every checkpoint then
answers the held-out prompts through the chat template and variable-length generation
(illada.chat), scored by illada.eval.toy_instruct.score.

    python bench/sft_modes.py --root runs/bench-sft                      # 2-core CPU: about 15 minutes
    python bench/sft_modes.py --root runs/bench-sft --sft-steps 3000 --eval-every 500

Prints a markdown table (baseline: the pre-trained checkpoint, in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODES = ("illada", "llada")
WORDS = ["the", "a", "of", "and", "to", "in", "on", "with", "for", "from", "model", "token", "mask", "sequence", "data", "train", "sample", "number", "value", "list", "item", "order"]


def pretrain_corpus(path: Path, docs: int, seed: int) -> None:
    """Documents of words and single digits: the pre-trained model knows digits, not the task.
    (Digits never touch one another, so the tokenizer learns no multi-digit tokens and the
    tasks' digit strings are one token per digit, as copying and reversing want.)"""
    rng = random.Random(seed)
    lines = []
    for i in range(docs):
        parts = [rng.choice(WORDS) if rng.random() < 0.7 else str(rng.randrange(10)) for _ in range(rng.randint(30, 90))]
        lines.append(json.dumps({"id": f"doc-{i}", "text": " ".join(parts) + "."}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def run(*argv: str) -> float:
    """`illada ARGV` in a subprocess; returns its wall time."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, "-m", "illada.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"illada {' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/bench-sft", help="where everything is written (default runs/bench-sft)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=500, help="checkpoint and score every this many SFT steps")
    p.add_argument("--examples", type=int, default=600, help="instruction examples (train + held out)")
    p.add_argument("--held-out", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args()
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    model = {"preset": "tiny", "vocab_size": 512, "max_seq_len": 64}

    # 1. Pre-training data and a pre-trained checkpoint.
    pretrain_corpus(root / "raw" / "corpus.jsonl", 600, seed=0)
    pre = {
        "name": "bench-sft-pretrain",
        "root": str(root / "pretrain"),
        "ray": {"num_cpus": 2},
        "data": {
            "sources": [{"name": "corpus", "paths": [str(root / "raw" / "corpus.jsonl")], "weight": 1, "id_field": "id"}],
            "dedup": {"exact": {"num_partitions": 2}, "fuzzy": {"enabled": False}},
            "tokenizer": {"vocab_size": 400, "train_sample_docs": 600},
            "pack": {"seq_len": 64, "sequences_per_shard": 256},
        },
        "model": model,
        "train": {
            "steps": args.pretrain_steps,
            "global_batch_size": 32,
            "micro_batch_size": 32,
            "log_interval": 100,
            "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": 20},
            "checkpoint": {"interval": args.pretrain_steps},
        },
    }
    pre_config = write_config(root / "pretrain.yaml", pre)
    run("pipeline", "run", pre_config)
    pretrain_s = run("train", pre_config)
    pretrained = str(root / "pretrain" / "checkpoints")

    # 2. Instruction data: held-out prompts are never trained on.
    from illada.eval import toy_instruct

    examples = toy_instruct.make_examples(args.examples, seed=1, tasks=("copy", "reverse"), lengths=(3, 3))
    train, held_out = toy_instruct.split(examples, args.held_out)
    toy_instruct.write_jsonl(train, root / "raw" / "instructions.jsonl")
    sft_data = {
        "name": "bench-sft-data",
        "root": str(root / "sft-data"),
        "ray": {"num_cpus": 2},
        "data": {
            "kind": "sft",
            "sources": [{"name": "toy", "paths": [str(root / "raw" / "instructions.jsonl")], "format": "chat", "weight": 1, "id_field": "id"}],
            "dedup": {"exact": {"num_partitions": 2}, "fuzzy": {"enabled": False}},
            "tokenizer": {"path": str(root / "pretrain" / "tokenizer" / "tokenizer.json")},
            "sft": {"buckets": [16, 24, 32]},
        },
    }
    run("pipeline", "run", write_config(root / "sft-data.yaml", sft_data))

    # 3. Fine-tune each mode from the same checkpoint.
    seconds = {}
    for mode in args.modes.split(","):
        sft = {
            "name": f"bench-sft-{mode}",
            "root": str(root / f"sft-{mode}"),
            "model": model,
            "train": {
                "data_root": str(root / "sft-data"),
                "objective": "sft",
                "sft": {"mode": mode},
                "init_from": pretrained,
                "steps": args.sft_steps,
                "global_batch_size": 32,
                "micro_batch_size": 32,
                "log_interval": 100,
                "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": 20},
                "checkpoint": {"interval": args.eval_every, "keep_last": 100},
            },
        }
        seconds[mode] = run("train", write_config(root / f"sft-{mode}.yaml", sft))

    # 4. Score every checkpoint on the held-out prompts.
    from illada.inference import load_for_inference
    from illada.sampling.sampler import SamplerConfig
    from illada.layout import complete_checkpoints

    sampler = SamplerConfig(gen_length=16, steps=16, block_length=8, variable_length=True)

    def scores(path: str) -> dict:
        loaded = load_for_inference(path)
        return {**toy_instruct.evaluate(loaded, held_out, sampler), "nll": toy_instruct.answer_nll(loaded, held_out)}

    rows = [("pre-trained", args.pretrain_steps, scores(pretrained))]
    for mode in args.modes.split(","):
        for path in complete_checkpoints(str(root / f"sft-{mode}" / "checkpoints")):
            step = json.loads(Path(path, "illada.json").read_text())["step"]
            rows.append((f"SFT {'iLLaDA' if mode == 'illada' else 'LLaDA'}", step, scores(path)))

    print(f"\n{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; pre-training {pretrain_s:.0f} s; "
          + ", ".join(f"SFT {m} {s:.0f} s" for m, s in seconds.items()))
    print(f"{len(train)} training conversations, {len(held_out)} held out (copy / reverse 3 digits); greedy variable-length replies\n")
    print("| checkpoint | steps | exact match | right form | digits in place | answer NLL (nats/token) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, step, s in rows:
        print(f"| {name} | {step} | {s['exact']:.1%} | {s['form']:.1%} | {s['chars']:.1%} | {s['nll']:.2f} |")


if __name__ == "__main__":
    main()
