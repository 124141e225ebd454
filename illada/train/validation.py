"""Validation data: a fixed set of held-out sequences with fixed masks.

The sequences are the first `train.eval_sequences` full (unpadded) sequences of the pack
stage's validation shards, taken from the sources in turn. Sequence j is noised with a
generator seeded by (seed, j), so every evaluation of every run sees the same masked
inputs at any parallel layout: val_loss changes only with the weights.
"""

from __future__ import annotations

import numpy as np
import torch

from illada.config import ConfigError, TrainConfig
from illada.layout import VALIDATION_SHARDS
from illada.objective import Noised, add_noise
from illada.train.data import ShardReader, source_shards, stable_seed


def validation_sequences(manifest: dict, root: str, count: int) -> np.ndarray:
    """[n, seq_len] token ids: up to `count` full sequences, one source after another in turn."""
    sources = source_shards(manifest, root, kind=VALIDATION_SHARDS)
    reader = ShardReader()
    rows, position = [], dict.fromkeys(sources, 0)
    while len(rows) < count and any(position[n] < s.size for n, s in sources.items()):
        for name, shards in sources.items():
            if position[name] < shards.size and len(rows) < count:
                tokens, pad = reader.read(*shards.locate(position[name]))
                position[name] += 1
                if pad == 0:
                    rows.append(tokens)
    if not rows:
        raise ConfigError(
            "train.eval_interval is set but the pack stage has no full validation sequences: raise data.pack.validation_fraction "
            "and re-run the pack stage, or set train.eval_interval=0"
        )
    return np.stack(rows).astype(np.int64)


def validation_micro_batches(tokens: np.ndarray, train: TrainConfig, mask_id: int, dp_rank: int, dp_size: int, device) -> list[tuple[torch.Tensor, Noised]]:
    """This rank's (clean, noised) micro-batches of the validation sequences; the sequences
    are cut to a multiple of dp_size x micro_batch_size so every rank has whole micro-batches."""
    unit = dp_size * train.micro_batch_size
    n = len(tokens) // unit * unit
    if n == 0:
        raise ConfigError(
            f"{len(tokens)} validation sequences cannot be shared by {dp_size} data-parallel ranks in micro-batches of "
            f"{train.micro_batch_size}: raise train.eval_sequences (or data.pack.validation_fraction)"
        )
    per_rank = n // dp_size
    first = dp_rank * per_rank
    clean, noised = [], []
    for j in range(first, first + per_rank):
        g = torch.Generator().manual_seed(stable_seed(train.seed, "validation", j))
        row = torch.from_numpy(tokens[j : j + 1])
        clean.append(row)
        noised.append(add_noise(row, mask_id, g))
    out = []
    for m in range(0, per_rank, train.micro_batch_size):
        part = slice(m, m + train.micro_batch_size)
        n_part = noised[part]
        batch = Noised(torch.cat([x.tokens for x in n_part]).to(device), torch.cat([x.masked for x in n_part]).to(device), torch.cat([x.p for x in n_part]).to(device))
        out.append((torch.cat(clean[part]).to(device), batch))
    return out
