"""Stage 3, dedup-exact: drop documents whose text is byte-identical to an earlier one.

A map-reduce over hash partitions, so no task holds more than 1/num_partitions of the
corpus's hashes and none holds texts from other files:

1. hash:   per document file, the 128-bit xxh3 hash of each text, split into partition files
           by hash (hash_hi, hash_lo, file, row).
2. reduce: per partition, sort by (hash, file, row); the first of each hash is kept, the
           rest become drops (file, row).
3. filter: per document file, copy every row that no reducer dropped.

"Earliest" is the order of the config's sources, then files, then rows, so the kept copy
is the same on every run.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from illada import storage
from illada.data.documents import DocumentWriter, iter_batches, read_table
from illada.pipeline.stage import Stage, StageContext, file_entry

HASH_SCHEMA = pa.schema([("hash_hi", pa.uint64()), ("hash_lo", pa.uint64()), ("file", pa.int32()), ("row", pa.int64())])
DROPS_PER_ROW_GROUP = 65536
DROP_SCHEMA = pa.schema([("file", pa.int32()), ("row", pa.int64()), ("kept_file", pa.int32()), ("kept_row", pa.int64())])


def text_hashes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The (high, low) 64-bit halves of each text's xxh3-128 hash."""
    digests = [xxhash.xxh3_128_intdigest(t.encode()) for t in texts.to_pylist()]
    hi = np.fromiter((d >> 64 for d in digests), dtype=np.uint64, count=len(digests))
    lo = np.fromiter((d & 0xFFFFFFFFFFFFFFFF for d in digests), dtype=np.uint64, count=len(digests))
    return hi, lo


def hash_task(spec: dict) -> dict:
    """Write one partition file per hash partition for one document file."""
    n = spec["num_partitions"]
    parts: list[list[pa.Table]] = [[] for _ in range(n)]
    row = 0
    for batch in iter_batches(spec["docs_url"], columns=["text"]):
        hi, lo = text_hashes(batch.column("text"))
        rows = np.arange(row, row + len(hi), dtype=np.int64)
        row += len(hi)
        table = pa.table({"hash_hi": hi, "hash_lo": lo, "file": np.full(len(hi), spec["file"], np.int32), "row": rows}, schema=HASH_SCHEMA)
        partition = lo % n
        for p in np.unique(partition):
            parts[p].append(table.filter(pa.array(partition == p)))
    for p in range(n):
        table = pa.concat_tables(parts[p]) if parts[p] else HASH_SCHEMA.empty_table()
        _write_parquet(table, storage.join(spec["hash_dir"], f"part-{p:05d}.parquet"))
    return {"rows": row}


def reduce_task(spec: dict) -> dict:
    """Find the duplicates within one hash partition."""
    tables = [read_table(url) for url in spec["inputs"]]
    table = pa.concat_tables(tables) if tables else HASH_SCHEMA.empty_table()
    table = table.sort_by([("hash_hi", "ascending"), ("hash_lo", "ascending"), ("file", "ascending"), ("row", "ascending")])
    hi, lo = table.column("hash_hi").to_numpy(), table.column("hash_lo").to_numpy()
    first = np.ones(len(hi), dtype=bool)
    first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    kept_index = np.maximum.accumulate(np.where(first, np.arange(len(hi)), 0))
    dup = ~first
    files, rows = table.column("file").to_numpy(), table.column("row").to_numpy()
    drops = pa.table(
        {"file": files[dup], "row": rows[dup], "kept_file": files[kept_index[dup]], "kept_row": rows[kept_index[dup]]},
        schema=DROP_SCHEMA,
    ).sort_by([("file", "ascending"), ("row", "ascending")])
    _write_parquet(drops, spec["drops_url"], row_group_size=DROPS_PER_ROW_GROUP)
    return {"hashes": len(hi), "unique": int(first.sum()), "duplicates": int(dup.sum())}


def filter_task(spec: dict) -> dict:
    """Copy one document file without its dropped rows."""
    # Drops are sorted by file in small row groups: each task reads its own rows' groups only.
    drops = pa.concat_tables([read_table(url, filters=pc.field("file") == spec["file"]) for url in spec["drops"]])
    dropped = drops.column("row").to_numpy()
    kept_files, counts = np.unique(drops.column("kept_file").to_numpy(), return_counts=True)
    kept_from = {int(f): int(c) for f, c in zip(kept_files, counts)}
    row = 0
    with DocumentWriter(spec["out_url"]) as writer:
        for batch in iter_batches(spec["docs_url"]):
            keep = ~np.isin(np.arange(row, row + batch.num_rows), dropped)
            row += batch.num_rows
            writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(keep)))
    return {"source": spec["source"], "documents_in": row, "duplicates": len(dropped), "kept_in_files": {str(k): v for k, v in kept_from.items()}, "docs": writer.info}


def _write_parquet(table: pa.Table, url: str, row_group_size: int | None = None) -> None:
    with storage.open_atomic(url) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=row_group_size)


def run_dedup_exact(ctx: StageContext) -> dict:
    docs = ctx.input_files("filter", "documents")
    cfg = ctx.config.data.dedup.exact
    if not cfg.enabled:
        return passthrough(docs, ctx.stage)
    n = cfg.num_partitions
    hash_specs = {
        f"{i:06d}": {"docs_url": ctx.absolute(f["path"]), "file": i, "num_partitions": n, "hash_dir": ctx.path("_hash", f"{i:06d}")}
        for i, f in enumerate(docs)
    }
    ctx.run_tasks("hash", hash_task, hash_specs)
    reduce_specs = {
        f"{p:05d}": {
            "inputs": [storage.join(s["hash_dir"], f"part-{p:05d}.parquet") for s in hash_specs.values()],
            "drops_url": ctx.path("_drops", f"part-{p:05d}.parquet"),
        }
        for p in range(n)
    }
    reduced = ctx.run_tasks("reduce", reduce_task, reduce_specs)
    drops = [s["drops_url"] for s in reduce_specs.values()]
    filter_specs = {
        f"{i:06d}": {
            "docs_url": ctx.absolute(f["path"]),
            "file": i,
            "source": f["source"],
            "drops": drops,
            "out_url": ctx.path("docs", f["path"].split("/", 2)[-1]),
        }
        for i, f in enumerate(docs)
    }
    filtered = ctx.run_tasks("filter", filter_task, filter_specs)
    storage.remove(ctx.path("_hash"))  # intermediate; the markers and drops keep the record
    return _manifest_body(ctx, docs, filter_specs, filtered, reduced)


def _manifest_body(ctx: StageContext, docs: list[dict], specs: dict, results: dict, reduced: dict) -> dict:
    files, per_source = filtered_files(ctx, docs, specs, results, "duplicates")
    stats = {
        "sources": per_source,
        "documents_in": sum(s["documents_in"] for s in per_source.values()),
        "duplicates": sum(r["duplicates"] for r in reduced.values()),
        "documents_out": sum(s["documents_out"] for s in per_source.values()),
    }
    return {"files": files, "stats": stats}


def filtered_files(ctx: StageContext, docs: list[dict], specs: dict, results: dict, dropped: str) -> tuple[list[dict], dict]:
    """A dedup stage's output files (in input order) and per-source counts: documents in and
    out, `dropped` (the name of the filter tasks' count) and which source kept each copy."""
    files, per_source = [], {}
    source_of_file = {i: f["source"] for i, f in enumerate(docs)}
    for tid in sorted(results):
        r = results[tid]
        files.append(file_entry(ctx, specs[tid]["out_url"], "documents", r["docs"]["sha256"], r["docs"]["bytes"], rows=r["docs"]["rows"], source=r["source"], order=len(files)))
        s = per_source.setdefault(r["source"], {"documents_in": 0, dropped: 0, "documents_out": 0, "duplicate_of_source": {}})
        s["documents_in"] += r["documents_in"]
        s[dropped] += r[dropped]
        s["documents_out"] += r["docs"]["rows"]
        for kept_file, count in r["kept_in_files"].items():
            kept_source = source_of_file[int(kept_file)]
            s["duplicate_of_source"][kept_source] = s["duplicate_of_source"].get(kept_source, 0) + count
    return files, per_source


def passthrough(files: list[dict], stage: str) -> dict:
    """A disabled stage hands its input files on unchanged."""
    return {"files": [dict(f) for f in files], "stats": {"disabled": True, "stage": stage}}


STAGE = Stage(
    name="dedup_exact",
    inputs=("filter",),
    run=run_dedup_exact,
    identity=lambda config: config.data.dedup.exact.model_dump(mode="json"),
    description="Drop byte-identical documents across all sources (hash-partitioned on Ray).",
)
