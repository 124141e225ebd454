"""Training data: packed shards read through a seeded permutation, blended by mix weights.

- Each source's sequences are visited in the order of a seeded pseudo-random permutation
  (a Feistel network: O(1) memory, however many sequences), re-drawn every epoch.
- Sources are blended as Megatron's BlendedDataset does: each next sample comes from the
  source furthest behind its target share.
- The sample order is a function of (seed, sample index) alone, so every data-parallel
  rank computes the same global batch and reads only its own slice of it.
- The position (samples drawn per source) is small state, saved in every checkpoint;
  loading it continues the exact sequence of samples.
- Shards are read a record batch at a time (see illada.data.shards); a few open readers
  are cached, never a whole shard set.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from illada import storage
from illada.config import ConfigError
from illada.data.shards import open_shard

MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stable_seed(*parts: object) -> int:
    """A seed from values, the same in every process (unlike hash() of a str)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


class Permutation:
    """A seeded permutation of range(n) evaluated one index at a time: a 4-round Feistel
    network over the smallest power-of-four domain >= n, cycle-walking back into range."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("cannot permute an empty range")
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.half_mask = (1 << self.half_bits) - 1
        self.keys = [_mix64(seed * 1_000_003 + r) for r in range(self.ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half_bits, x & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.half_mask)
        return (left << self.half_bits) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._encrypt(i)
        while x >= self.n:
            x = self._encrypt(x)
        return x


@dataclass
class Sequences:
    """Rows of packed sequences with, for each row, its source and its trailing padding."""

    tokens: np.ndarray  # [n, seq_len] int64
    pad: np.ndarray  # [n] padding tokens at the end of each row
    sources: list[str]

    def valid(self) -> np.ndarray:
        """[n, seq_len] bool: True on real tokens, False on padding."""
        return np.arange(self.tokens.shape[1])[None, :] < (self.tokens.shape[1] - self.pad)[:, None]

    def real_tokens(self, rows: slice, length: int) -> dict[str, int]:
        """Real tokens per source of `rows` cut to their first `length` positions."""
        counts: dict[str, int] = {}
        for source, pad in zip(self.sources[rows], self.pad[rows]):
            counts[source] = counts.get(source, 0) + min(length, self.tokens.shape[1] - int(pad))
        return counts


@dataclass
class SourceShards:
    name: str
    urls: list[str]
    starts: np.ndarray  # first global row of each shard, plus the total at the end

    @property
    def size(self) -> int:
        return int(self.starts[-1])

    def locate(self, row: int) -> tuple[str, int]:
        shard = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.urls[shard], row - int(self.starts[shard])


def source_shards(pack_manifest: dict, root: str) -> dict[str, SourceShards]:
    by_source: dict[str, list[dict]] = {}
    for f in pack_manifest["files"]:
        if f["kind"] == "shard":
            by_source.setdefault(f["source"], []).append(f)
    out = {}
    for name, files in sorted(by_source.items()):
        files.sort(key=lambda f: f["path"])
        counts = np.array([f["sequences"] for f in files], dtype=np.int64)
        out[name] = SourceShards(name, [storage.join(root, f["path"]) for f in files], np.concatenate([[0], np.cumsum(counts)]))
    return out


class BlendedSchedule:
    """Which (source, n-th sample of that source) each global sample index is.

    State is the count drawn from each source; drawing continues the same sequence.
    """

    def __init__(self, weights: dict[str, float], seed: int):
        total = sum(weights.values())
        self.names = sorted(weights)
        self.weights = np.array([weights[n] / total for n in self.names])
        self.seed = seed
        self.drawn = np.zeros(len(self.names), dtype=np.int64)

    @property
    def position(self) -> int:
        return int(self.drawn.sum())

    def draw(self, count: int) -> list[tuple[str, int]]:
        out = []
        for _ in range(count):
            deficit = self.weights * (self.position + 1) - self.drawn
            s = int(np.argmax(deficit))
            out.append((self.names[s], int(self.drawn[s])))
            self.drawn[s] += 1
        return out

    def state_dict(self) -> dict:
        return {"drawn": dict(zip(self.names, self.drawn.tolist())), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ConfigError(
                f"train.seed is {self.seed} but the checkpoint being resumed was trained with seed {state['seed']}: "
                f"resume with train.seed={state['seed']}, or start a new run with another train.checkpoint.dir"
            )
        self.drawn = np.array([state["drawn"].get(n, 0) for n in self.names], dtype=np.int64)


class ShardReader:
    """Reads single sequences, keeping a few shard readers and the last batch open."""

    def __init__(self, cache_size: int = 8):
        self.cache_size = cache_size
        self._readers: OrderedDict[str, pa.ipc.RecordBatchFileReader] = OrderedDict()
        self._batch_key: tuple[str, int] | None = None
        self._batch: pa.RecordBatch | None = None

    def _reader(self, url: str) -> pa.ipc.RecordBatchFileReader:
        if url not in self._readers:
            self._readers[url] = open_shard(url)
            if len(self._readers) > self.cache_size:
                self._readers.popitem(last=False)
        self._readers.move_to_end(url)
        return self._readers[url]

    def locate(self, url: str, row: int) -> tuple[pa.RecordBatch, int]:
        """The record batch holding a shard's row, and the row's index in it."""
        reader = self._reader(url)
        rows_per_batch = int(reader.schema.metadata[b"rows_per_batch"])
        key = (url, row // rows_per_batch)
        if key != self._batch_key:
            self._batch, self._batch_key = reader.get_batch(key[1]), key
        return self._batch, row % rows_per_batch

    def read(self, url: str, row: int) -> tuple[np.ndarray, int]:
        batch, i = self.locate(url, row)
        seq_len = batch.schema.field("tokens").type.list_size
        tokens = batch.column("tokens").values.to_numpy()[i * seq_len : (i + 1) * seq_len]
        return tokens, int(batch.column("pad")[i].as_py())


class PackedData:
    """Global batches of token sequences for one data-parallel rank."""

    def __init__(self, pack_manifest: dict, root: str, weights: dict[str, float], seed: int, dp_rank: int = 0, dp_size: int = 1):
        self.sources = source_shards(pack_manifest, root)
        missing = sorted(set(weights) - set(self.sources))
        if missing:
            raise ValueError(f"mix names sources with no shards: {missing}; the manifest has {sorted(self.sources)}")
        self.schedule = BlendedSchedule({n: w for n, w in weights.items() if w > 0}, seed)
        self.seed = seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.reader = ShardReader()
        self.tokens_seen = dict.fromkeys(self.schedule.names, 0)  # this rank's non-pad tokens read (before any cut)
        self._permutations: dict[str, tuple[int, Permutation]] = {}

    def _row(self, source: str, nth: int) -> int:
        """The shard row of a source's nth sample: a fresh permutation every epoch."""
        size = self.sources[source].size
        epoch, index = divmod(nth, size)
        if self._permutations.get(source, (None,))[0] != epoch:
            self._permutations[source] = (epoch, Permutation(size, stable_seed(self.seed, source, epoch)))
        return self._permutations[source][1](index)

    def next_batch(self, global_batch: int) -> np.ndarray:
        """This rank's slice [global_batch // dp_size, seq_len] of the next global batch."""
        return self.next_sequences(global_batch).tokens

    def next_sequences(self, global_batch: int) -> Sequences:
        """`next_batch` with each row's source and padding."""
        rows, pads, sources = [], [], []
        for source, url, row in self._draw(global_batch):
            tokens, pad = self.reader.read(url, row)
            self.tokens_seen[source] += len(tokens) - pad
            rows.append(tokens)
            pads.append(pad)
            sources.append(source)
        return Sequences(np.stack(rows).astype(np.int64), np.array(pads, dtype=np.int64), sources)

    def _draw(self, global_batch: int) -> list[tuple[str, str, int]]:
        """(source, shard url, row) of each of this rank's samples of the next global batch."""
        if global_batch % self.dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by data-parallel size {self.dp_size}")
        draws = self.schedule.draw(global_batch)
        per_rank = global_batch // self.dp_size
        return [(source, *self.sources[source].locate(self._row(source, nth))) for source, nth in draws[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]]

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
