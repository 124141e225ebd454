"""The shard formats: zstd-compressed Arrow IPC files.

Pre-training (packed sequences): each row is one training sequence of exactly `seq_len`
token ids, with the document segments it holds (ids and end offsets), its source, and how
many trailing tokens are padding.

SFT (samples): each row is one conversation — its prompt, its response and end-of-text
padding up to a length bucket — with the prompt's and response's lengths, so
`tokens[:prompt_len]` is the prompt and `tokens[prompt_len:prompt_len + response_len]` the
response.

Every record batch of a shard holds ROWS_PER_BATCH rows except the shard's last, so a
reader finds row r in batch r // ROWS_PER_BATCH and decompresses only that batch, never
the whole shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from illada import storage

ROWS_PER_BATCH = 16


def sequence_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("tokens", pa.list_(pa.int32(), seq_len), nullable=False),
            pa.field("doc_ends", pa.list_(pa.int32()), nullable=False),  # exclusive end of each segment
            pa.field("doc_ids", pa.list_(pa.string()), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("pad", pa.int32(), nullable=False),
        ],
        metadata={"illada.format": "packed-sequences/1", "seq_len": str(seq_len), "rows_per_batch": str(ROWS_PER_BATCH)},
    )


def sample_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("tokens", pa.list_(pa.int32()), nullable=False),  # prompt, response, end-of-text padding
            pa.field("prompt_len", pa.int32(), nullable=False),
            pa.field("response_len", pa.int32(), nullable=False),  # with its end-of-turn (if not truncated)
            pa.field("pad", pa.int32(), nullable=False),
            pa.field("id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
        ],
        metadata={"illada.format": "sft-samples/1", "rows_per_batch": str(ROWS_PER_BATCH)},
    )


class ShardWriter:
    """Writes sequences into shards of at most `per_shard` rows: `<prefix>-<k>.arrow`."""

    def __init__(self, prefix: str, seq_len: int, per_shard: int, zstd_level: int, schema: pa.Schema | None = None):
        self.prefix = prefix
        self.seq_len = seq_len
        self.per_shard = per_shard
        self.schema = schema or sequence_schema(seq_len)
        self.options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=zstd_level))
        self.shards: list[dict] = []
        self._rows: list[dict] = []
        self._open: _OpenShard | None = None

    def write(self, tokens: np.ndarray, doc_ends: list[int], doc_ids: list[str], source: str, pad: int = 0) -> None:
        assert len(tokens) == self.seq_len, (len(tokens), self.seq_len)
        self._rows.append({"tokens": tokens, "doc_ends": doc_ends, "doc_ids": doc_ids, "source": source, "pad": pad})
        if len(self._rows) >= ROWS_PER_BATCH:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write full batches (a shorter one only to end a shard, or when `final`)."""
        while self._rows:
            if self._open is None:
                self._start_shard()
            info = self._open.info
            take = min(self.per_shard - info["sequences"], ROWS_PER_BATCH)
            if len(self._rows) < take and not final:
                return
            take = min(take, len(self._rows))
            rows, self._rows = self._rows[:take], self._rows[take:]
            self._open.ipc.write_batch(self._batch(rows))
            info["sequences"] += take
            info["tokens"] += sum(len(r["tokens"]) - r["pad"] for r in rows)
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
        ipc = pa.ipc.new_file(hashing, self.schema, options=self.options)
        self._open = _OpenShard(atomic, hashing, ipc, {"url": url, "sequences": 0, "tokens": 0, "pad": 0})

    def _finish_shard(self) -> None:
        shard = self._open
        shard.ipc.close()
        shard.atomic.__exit__(None, None, None)
        self.shards.append({**shard.info, "sha256": shard.hashing.hexdigest(), "bytes": shard.hashing.bytes_written})
        self._open = None

    def close(self) -> list[dict]:
        self._flush(final=True)
        if self._open is not None:
            self._finish_shard()
        return self.shards


class SampleShardWriter(ShardWriter):
    """Writes SFT samples (of any lengths) into shards of at most `per_shard` rows."""

    def __init__(self, prefix: str, per_shard: int, zstd_level: int):
        super().__init__(prefix, 0, per_shard, zstd_level, schema=sample_schema())

    def write(self, tokens: np.ndarray, prompt_len: int, response_len: int, pad: int, sample_id: str, source: str) -> None:
        assert prompt_len + response_len + pad == len(tokens), (prompt_len, response_len, pad, len(tokens))
        self._rows.append({"tokens": tokens, "prompt_len": prompt_len, "response_len": response_len, "pad": pad, "id": sample_id, "source": source})
        if len(self._rows) >= ROWS_PER_BATCH:
            self._flush(final=False)

    def _batch(self, rows: list[dict]) -> pa.RecordBatch:
        offsets = np.concatenate([[0], np.cumsum([len(r["tokens"]) for r in rows])]).astype(np.int32)
        flat = pa.array(np.concatenate([r["tokens"] for r in rows]).astype(np.int32))
        columns = [pa.ListArray.from_arrays(pa.array(offsets), flat)]
        columns += [pa.array([r[k] for r in rows], pa.int32()) for k in ("prompt_len", "response_len", "pad")]
        columns += [pa.array([r[k] for r in rows], pa.string()) for k in ("id", "source")]
        return pa.record_batch(columns, schema=self.schema)


@dataclass
class _OpenShard:
    atomic: Any  # the storage.open_atomic context: the file appears when it exits
    hashing: storage.HashingWriter
    ipc: pa.ipc.RecordBatchFileWriter
    info: dict


def open_shard(url: str) -> pa.ipc.RecordBatchFileReader:
    """Random access to a shard's record batches (reads only the batches asked for)."""
    return pa.ipc.open_file(storage.open_read(url))


def read_sequences(url: str) -> pa.Table:
    return open_shard(url).read_all()
