"""Tokenize+pack throughput of the pipeline against raw `tokenizers` batch encoding.

Both sides encode the same documents with the same tokenizer on the same cores: the
baseline is `Tokenizer.encode_batch_fast` over in-memory texts in one process (Rust
threads on every core); the pipeline is the `tokenize` and `pack` stages (Ray tasks,
one per CPU, Parquet in and out, packing, zstd Arrow shards), each re-run with --stage.

    python bench/tokenize_pack.py [--copies N] [--root DIR]

The corpus is the Python standard library's sources, repeated N times with a per-copy
prefix so that dedup keeps every copy.
"""

from __future__ import annotations

import argparse
import os
import platform
import sysconfig
import tempfile
import time
from pathlib import Path

import ray
from tokenizers import Tokenizer

from illada import storage
from illada.config import load_config
from illada.data.documents import iter_batches
from illada.pipeline.runner import run_pipeline
from illada.data.stages import PRETRAIN as STAGES


def make_corpus(raw: Path, copies: int) -> int:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    raw.mkdir(parents=True, exist_ok=True)
    total = 0
    for c in range(copies):
        for f in files:
            text = f.read_text(errors="replace")
            (raw / f"{c:03d}-{f.stem}.txt").write_text(f"# copy {c}\n{text}")
            total += len(text)
    return total


def baseline_seconds(root: str, manifests: dict, batch_size: int) -> tuple[float, int]:
    tokenizer = Tokenizer.from_file(f"{root}/tokenizer/tokenizer.json")
    texts = []
    for f in manifests["dedup_fuzzy"]["files"]:
        for batch in iter_batches(storage.join(root, f["path"]), columns=["text"]):
            texts += batch.column("text").to_pylist()
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch_size):
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts[i : i + batch_size], add_special_tokens=False))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8, help="copies of the stdlib corpus (default 8, ~40 MB)")
    parser.add_argument("--root", default=None, help="work folder (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.root or tempfile.mkdtemp(prefix="illada-bench-"))
    chars = make_corpus(work / "raw", args.copies)
    config = load_config(
        None,
        base={
            "name": "bench",
            "root": str(work / "run"),
            "data": {
                "sources": [{"name": "code", "paths": [str(work / "raw")], "format": "text", "weight": 1}],
                "ingest": {"max_chars": 10_000_000},
                "dedup": {"fuzzy": {"enabled": False}},
                "tokenizer": {"vocab_size": 8192, "train_sample_docs": 2000},
                "pack": {"seq_len": 2048},
            },
        },
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    manifests = run_pipeline(config, STAGES)

    start = time.perf_counter()
    manifests.update(run_pipeline(config, STAGES, only="tokenize"))
    tokenize_s = time.perf_counter() - start
    start = time.perf_counter()
    manifests.update(run_pipeline(config, STAGES, only="pack"))
    pack_s = time.perf_counter() - start
    base_s, base_tokens = baseline_seconds(config.root, manifests, config.data.tokenize.batch_size)

    tokens = manifests["tokenize"]["stats"]["tokens"]
    assert tokens == base_tokens, (tokens, base_tokens)
    pipeline_s = tokenize_s + pack_s
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; corpus {chars / 1e6:.1f} M chars, {tokens / 1e6:.2f} M tokens")
    print(f"baseline  encode_batch_fast    {base_s:7.2f} s  {tokens / base_s / 1e6:6.2f} M tok/s")
    print(f"pipeline  tokenize {tokenize_s:6.2f} s + pack {pack_s:6.2f} s = {pipeline_s:7.2f} s  {tokens / pipeline_s / 1e6:6.2f} M tok/s")
    print(f"ratio (pipeline throughput / baseline): {base_s / pipeline_s:.2f}  (goal >= 0.8)")


if __name__ == "__main__":
    main()
