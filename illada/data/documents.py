"""The document schema shared by ingest and dedup, and streaming Parquet I/O for it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from illada import storage

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),  # JSON object of the record's other fields
    ]
)


class DocumentWriter:
    """Writes rows to one Parquet file in bounded record batches. Use as a context manager:
    the file appears (atomically) when the block ends without error; `info` then holds its
    checksum, size and row count."""

    def __init__(self, url: str, schema: pa.Schema = DOCUMENT_SCHEMA, rows_per_batch: int = 2048):
        self.url = url
        self.schema = schema
        self.rows_per_batch = rows_per_batch
        self.rows = 0
        self.info: dict = {}
        self._buffer: dict[str, list] = {name: [] for name in schema.names}

    def __enter__(self) -> DocumentWriter:
        self._atomic = storage.open_atomic(self.url)
        self._hashing = storage.HashingWriter(self._atomic.__enter__())
        self._writer = pq.ParquetWriter(self._hashing, self.schema, compression="zstd")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self._flush()
            self._writer.close()
        else:  # close it here, not in its __del__ after the file is gone; the file is discarded
            with contextlib.suppress(Exception):
                self._writer.close()
        self._atomic.__exit__(exc_type, exc, tb)
        if exc is None:
            self.info = {"sha256": self._hashing.hexdigest(), "bytes": self._hashing.bytes_written, "rows": self.rows}

    def write(self, **row) -> None:
        for name in self.schema.names:
            self._buffer[name].append(row[name])
        if len(self._buffer[self.schema.names[0]]) >= self.rows_per_batch:
            self._flush()

    def write_table(self, table: pa.Table) -> None:
        self._flush()
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows += table.num_rows

    def _flush(self) -> None:
        n = len(self._buffer[self.schema.names[0]])
        if n:
            self._writer.write_table(pa.table(self._buffer, schema=self.schema))
            self.rows += n
            self._buffer = {name: [] for name in self.schema.names}


def iter_batches(
    url: str, columns: list[str] | None = None, batch_size: int = 2048, rows: tuple[int, int] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a Parquet file batch by batch; never the whole file in memory. With `rows`
    (start, stop), only those rows, reading only the row groups that hold them."""
    with storage.open_read(url) as f:
        parquet = pq.ParquetFile(f)
        if rows is None:
            yield from parquet.iter_batches(batch_size=batch_size, columns=columns)
            return
        start, stop = rows
        groups, position, offset = [], None, 0
        for g in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                position = offset if position is None else position
            offset += n
        if not groups:
            return
        for batch in parquet.iter_batches(batch_size=batch_size, columns=columns, row_groups=groups):
            lo, hi = max(start - position, 0), min(stop - position, batch.num_rows)
            if lo < hi:
                yield batch.slice(lo, hi - lo)
            position += batch.num_rows


def read_table(url: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    """A Parquet file; with `filters`, row groups whose statistics rule them out are not read."""
    with storage.open_read(url) as f:
        return pq.read_table(f, columns=columns, filters=filters)
