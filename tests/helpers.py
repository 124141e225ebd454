"""Small builders for test inputs and configs."""

from __future__ import annotations

import json
from pathlib import Path

import zstandard

from illada.config import Config, load_config


def write_jsonl(path: Path, records: list, compress: bool = False) -> Path:
    """Write records (dicts, or raw bytes/str lines written as they are) as jsonl[.zst]."""
    lines = []
    for r in records:
        if isinstance(r, bytes):
            lines.append(r)
        elif isinstance(r, str):
            lines.append(r.encode())
        else:
            lines.append(json.dumps(r).encode())
    data = b"\n".join(lines) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)
    return path


def make_config(root, sources: list[dict], overrides: list[str] = ()) -> Config:
    """A small, fast pipeline config: tiny vocab and sequences, fuzzy dedup off."""
    base = {
        "name": "test",
        "root": str(root),
        "data": {
            "sources": sources,
            "dedup": {"exact": {"num_partitions": 2}, "fuzzy": {"enabled": False, "num_partitions": 2}},
            "tokenizer": {"vocab_size": 300, "train_sample_docs": 500, "min_frequency": 1},
            "pack": {"seq_len": 32, "sequences_per_shard": 16},
        },
    }
    return load_config(None, list(overrides), base=base)
