"""The packed-sequence shard format: zstd-compressed Arrow IPC files.

Each row is one training sequence of exactly `seq_len` token ids, with the document
segments it holds (ids and end offsets), its source, and how many trailing tokens are
padding. Record batches are small so a reader can fetch one sequence without
decompressing the whole shard.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from illada import storage

ROWS_PER_BATCH = 64


def sequence_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("tokens", pa.list_(pa.int32(), seq_len), nullable=False),
            pa.field("doc_ends", pa.list_(pa.int32()), nullable=False),  # exclusive end of each segment
            pa.field("doc_ids", pa.list_(pa.string()), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("pad", pa.int32(), nullable=False),
        ],
        metadata={"illada.format": "packed-sequences/1", "seq_len": str(seq_len)},
    )


class ShardWriter:
    """Writes sequences into shards of at most `per_shard` rows: `<prefix>-<k>.arrow`."""

    def __init__(self, prefix: str, seq_len: int, per_shard: int, zstd_level: int):
        self.prefix = prefix
        self.seq_len = seq_len
        self.per_shard = per_shard
        self.schema = sequence_schema(seq_len)
        self.options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=zstd_level))
        self.shards: list[dict] = []
        self._rows: list[dict] = []
        self._open: list = []  # [atomic context, hashing writer, ipc writer, info]

    def write(self, tokens: np.ndarray, doc_ends: list[int], doc_ids: list[str], source: str, pad: int = 0) -> None:
        assert len(tokens) == self.seq_len, (len(tokens), self.seq_len)
        self._rows.append({"tokens": tokens, "doc_ends": doc_ends, "doc_ids": doc_ids, "source": source, "pad": pad})
        if len(self._rows) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        while self._rows:
            if not self._open:
                self._start_shard()
            info = self._open[3]
            take = min(len(self._rows), self.per_shard - info["sequences"], ROWS_PER_BATCH)
            rows, self._rows = self._rows[:take], self._rows[take:]
            self._open[2].write_batch(self._batch(rows))
            info["sequences"] += take
            info["tokens"] += sum(self.seq_len - r["pad"] for r in rows)
            info["pad"] += sum(r["pad"] for r in rows)
            if info["sequences"] >= self.per_shard:
                self._finish_shard()

    def _batch(self, rows: list[dict]) -> pa.RecordBatch:
        flat = pa.array(np.concatenate([r["tokens"] for r in rows]).astype(np.int32))
        return pa.record_batch(
            [
                pa.FixedSizeListArray.from_arrays(flat, self.seq_len),
                pa.array([r["doc_ends"] for r in rows], pa.list_(pa.int32())),
                pa.array([r["doc_ids"] for r in rows], pa.list_(pa.string())),
                pa.array([r["source"] for r in rows], pa.string()),
                pa.array([r["pad"] for r in rows], pa.int32()),
            ],
            schema=self.schema,
        )

    def _start_shard(self) -> None:
        url = f"{self.prefix}-{len(self.shards):04d}.arrow"
        atomic = storage.open_atomic(url)
        hashing = storage.HashingWriter(atomic.__enter__())
        writer = pa.ipc.new_file(hashing, self.schema, options=self.options)
        self._open = [atomic, hashing, writer, {"url": url, "sequences": 0, "tokens": 0, "pad": 0}]

    def _finish_shard(self) -> None:
        atomic, hashing, writer, info = self._open
        writer.close()
        atomic.__exit__(None, None, None)
        self.shards.append({**info, "sha256": hashing.hexdigest(), "bytes": hashing.bytes_written})
        self._open = []

    def close(self) -> list[dict]:
        self._flush()
        if self._open:
            self._finish_shard()
        return self.shards


def open_shard(url: str) -> pa.ipc.RecordBatchFileReader:
    """Random access to a shard's record batches (reads only the batches asked for)."""
    return pa.ipc.open_file(storage.open_read(url))


def read_sequences(url: str) -> pa.Table:
    return open_shard(url).read_all()
