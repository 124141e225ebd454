"""Stage 3, dedup-fuzzy: drop near-duplicate documents (MinHash LSH), keeping the earliest.

1. signature: per document file, datatrove's `MinhashDedupSignature` writes one sorted
              signature file per LSH bucket (`_sigs/bucket_<b>/<file>.minhash.sig`).
2. buckets:   per bucket, datatrove's `MinhashDedupBuckets` merges the bucket's signature
              files and writes the pairs that share a band (`_dups/<b>_00.dups`, "<4I":
              file, doc, file, doc); the same task splits the pairs into edge partitions.
3. cc-<r>-large, cc-<r>-small: connected components of the pair graph by alternating
              Large-Star and Small-Star (Kiveris et al. 2014, "Connected Components in
              MapReduce and Beyond"), one Ray phase per step, each task holding only its
              partition of the edges, until a round changes nothing. The graph is then a
              set of stars, each centred on its component's smallest node.
4. cc-labels: per partition, the (node, root) pairs of every non-root node (`_clusters/`).
5. filter:    per document file, copy every row that is not a non-root node.

datatrove's own clustering step (`MinhashDedupCluster`) is not used: it is one in-memory
task over every pair of the corpus.

A node is a document as `file << 32 | row`, `file` being its file's place in the input
manifest's order; so the smallest node of a cluster is its earliest document, and it is
the one kept, on every run.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from importlib.metadata import version

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.io import DataFolder
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.logging import logger
from datatrove.utils.typeshelper import StatHints

from illada import storage
from illada.config import Config
from illada.data.dedup_exact import filtered_files, passthrough
from illada.data.documents import DocumentWriter, iter_batches, read_table
from illada.pipeline.stage import Stage, StageContext

EDGE_SCHEMA = pa.schema([("node", pa.int64()), ("neighbor", pa.int64())])
CLUSTER_SCHEMA = pa.schema([("node", pa.int64()), ("root", pa.int64())])
ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1
MAX_CC_ROUNDS = 64  # alternating stars converge in O(log^2 n) rounds; more means a bug
# datatrove's bucket step holds every signature file of its bucket open, reading each
# `lines_to_buffer` records at a time (also its fsspec block size). Its default of 5 records
# makes hundreds of range GETs per file on S3; so read up to 1 MiB at a time, within a
# budget for all the files together.
SIG_READ_BYTES = 1 << 20
SIG_READ_BUDGET = 256 << 20
CLUSTER_ROW_GROUP = 1 << 16  # small row groups let each filter task read only its own file's range

# datatrove logs a few INFO lines per task to stderr, which Ray forwards to the driver; the
# phases' progress bars say the same. Its failures still raise.
logger.disable("datatrove")


# --- MinHash with datatrove ------------------------------------------------------------


def minhash_config(cfg: dict) -> MinhashConfig:
    """datatrove's MinHash config for ours (a FuzzyDedupConfig as a dict).

    Shingles are hashed with datatrove's 64-bit SHA-1 option: its default, xxhash, passes
    `str` to xxhash, which xxhash 4 rejects.
    """
    return MinhashConfig(
        n_grams=cfg["n_grams"],
        num_buckets=cfg["num_buckets"],
        hashes_per_bucket=cfg["hashes_per_bucket"],
        seed=cfg["seed"],
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )


def data_folder(url: str) -> DataFolder:
    """A datatrove folder on the filesystem (and S3 options) that `illada.storage` uses."""
    fs, path = storage.filesystem(url)
    return DataFolder(path, fs=fs)


def datatrove_documents(url: str) -> Iterator[Document]:
    for batch in iter_batches(url, columns=["id", "text"]):
        for doc_id, text in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist()):
            yield Document(text=text, id=doc_id)


def signature_task(spec: dict) -> dict:
    """Write the MinHash signatures of one document file, one file per bucket; a document's
    index in its signature records is its row."""
    step = MinhashDedupSignature(output_folder=data_folder(spec["sigs_url"]), config=minhash_config(spec["minhash"]))
    step.run(data=datatrove_documents(spec["docs_url"]), rank=spec["file"], world_size=spec["num_files"])
    return {"documents": step.stats[StatHints.total].total}


def bucket_task(spec: dict) -> dict:
    """Find the pairs sharing a band in one bucket, and split them into edge partitions."""
    config = minhash_config(spec["minhash"])
    sig_line = struct.calcsize(f"<{config.hashes_per_bucket}{config.hash_config.struct_format}I")
    step = MinhashDedupBuckets(
        input_folder=data_folder(spec["sigs_url"]),
        output_folder=data_folder(spec["dups_url"]),
        config=config,
        lines_to_buffer=max(1, min(SIG_READ_BYTES, SIG_READ_BUDGET // spec["num_files"]) // sig_line),
    )
    step.run(rank=spec["bucket"], world_size=config.num_buckets)
    pairs = read_dups(storage.join(spec["dups_url"], f"{spec['bucket']:05d}_00.dups"))
    edges = pa.table({"node": pairs[:, 0], "neighbor": pairs[:, 1]}, schema=EDGE_SCHEMA)
    write_partitioned(both_directions(edges), spec["out_dir"], spec["num_partitions"])
    return {"pairs": len(pairs)}


def read_dups(url: str) -> np.ndarray:
    """datatrove's duplicate pairs as an (n, 2) array of node ids."""
    raw = np.frombuffer(storage.read_bytes(url), dtype="<u4").reshape(-1, 4).astype(np.int64)
    return np.stack([raw[:, 0] << ROW_BITS | raw[:, 1], raw[:, 2] << ROW_BITS | raw[:, 3]], axis=1)


# --- connected components: alternating Large-Star / Small-Star --------------------------
#
# A phase's input is an edge list split by the partition of its `node` column, so a task
# sees every edge of the nodes it owns. Large-Star needs each undirected edge in both
# directions; Small-Star only from the larger end to the smaller.


def large_star(edges: pa.Table) -> tuple[pa.Table, dict]:
    """For every node u with m = min(u, neighbours of u): link each neighbour larger than u
    to m. Takes both directions of every edge; returns (larger end, smaller end) edges."""
    edges = distinct(edges)
    mins = edges.group_by("node").aggregate([("neighbor", "min")])
    joined = edges.join(mins, "node")
    node, neighbor = joined.column("node").to_numpy(), joined.column("neighbor").to_numpy()
    star_center = np.minimum(node, joined.column("neighbor_min").to_numpy())
    larger = neighbor > node
    out = pa.table({"node": neighbor[larger], "neighbor": star_center[larger]}, schema=EDGE_SCHEMA)
    roots = pc.sum(pc.greater(mins.column("neighbor_min"), mins.column("node"))).as_py() or 0
    # An edge changed when u had a smaller neighbour, so m is not u.
    return out, {"edges": edges.num_rows, "changes": int(np.count_nonzero(larger & (star_center != node))), "roots": roots}


def small_star(edges: pa.Table) -> tuple[pa.Table, dict]:
    """For every node u with m = its smallest neighbour: link u and each of its smaller
    neighbours to m. Takes (larger end, smaller end) edges; returns both directions."""
    edges = distinct(edges)
    mins = edges.group_by("node").aggregate([("neighbor", "min")])
    joined = edges.join(mins, "node")
    neighbor, star_center = joined.column("neighbor").to_numpy(), joined.column("neighbor_min").to_numpy()
    moved = neighbor != star_center
    out = pa.table(
        {
            "node": np.concatenate([neighbor[moved], mins.column("node").to_numpy()]),
            "neighbor": np.concatenate([star_center[moved], mins.column("neighbor_min").to_numpy()]),
        },
        schema=EDGE_SCHEMA,
    )
    return both_directions(out), {"edges": edges.num_rows, "changes": int(np.count_nonzero(moved))}


def distinct(edges: pa.Table) -> pa.Table:
    return edges.group_by(["node", "neighbor"]).aggregate([]).select(EDGE_SCHEMA.names)


def both_directions(edges: pa.Table) -> pa.Table:
    reverse = pa.table({"node": edges.column("neighbor"), "neighbor": edges.column("node")}, schema=EDGE_SCHEMA)
    return pa.concat_tables([edges, reverse])


def partition_of(nodes: np.ndarray, num_partitions: int) -> np.ndarray:
    """A node's partition: a mix of its bits (splitmix64), so the rows of one file spread."""
    x = nodes.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(num_partitions)).astype(np.int64)


def write_partitioned(edges: pa.Table, out_dir: str, num_partitions: int) -> None:
    """Write `part-<p>.parquet` under out_dir for every partition p (empty ones too, so a
    reader never has to ask which exist)."""
    node, neighbor = edges.column("node").to_numpy(), edges.column("neighbor").to_numpy()
    partition = partition_of(node, num_partitions)
    order = np.lexsort((neighbor, node, partition))
    bounds = np.searchsorted(partition[order], np.arange(num_partitions + 1))
    edges = edges.take(order)
    for p in range(num_partitions):
        _write_parquet(edges.slice(bounds[p], bounds[p + 1] - bounds[p]), partition_url(out_dir, p))


def partition_url(out_dir: str, p: int) -> str:
    return storage.join(out_dir, f"part-{p:05d}.parquet")


def read_partition(urls: list[str], schema: pa.Schema = EDGE_SCHEMA) -> pa.Table:
    tables = [read_table(url) for url in urls]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def large_star_task(spec: dict) -> dict:
    out, stats = large_star(read_partition(spec["inputs"]))
    write_partitioned(out, spec["out_dir"], spec["num_partitions"])
    return stats


def small_star_task(spec: dict) -> dict:
    out, stats = small_star(read_partition(spec["inputs"]))
    write_partitioned(out, spec["out_dir"], spec["num_partitions"])
    return stats


def labels_task(spec: dict) -> dict:
    """After convergence the Large-Star output is each non-root node's edge to its root."""
    edges = distinct(read_partition(spec["inputs"])).sort_by([("node", "ascending")])
    clusters = pa.table({"node": edges.column("node"), "root": edges.column("neighbor")}, schema=CLUSTER_SCHEMA)
    _write_parquet(clusters, spec["out_url"], row_group_size=CLUSTER_ROW_GROUP)
    return {"nodes": edges.num_rows}


def connected_components(ctx: StageContext, edge_dirs: list[str], num_partitions: int) -> tuple[list[str], dict]:
    """Label every node of the graph in `edge_dirs` (each holding both directions of its
    edges, split into `num_partitions` parts) with the smallest node of its component.

    Returns the `_clusters/` files, one per partition, of (node, root) for every node that
    is not a root, and the stats: rounds and clusters.
    """
    current = edge_dirs
    for r in range(MAX_CC_ROUNDS):
        large_dirs, large = _star_phase(ctx, f"cc-{r:02d}-large", large_star_task, current, num_partitions)
        small_dirs, small = _star_phase(ctx, f"cc-{r:02d}-small", small_star_task, large_dirs, num_partitions)
        if _changes(large) == 0 and _changes(small) == 0:
            labels = _labels(ctx, large_dirs, num_partitions)
            return labels, {"rounds": r + 1, "clusters": sum(s["roots"] for s in large.values())}
        current = small_dirs
    raise RuntimeError(f"connected components did not converge in {MAX_CC_ROUNDS} rounds; see {ctx.path('_tasks')}")


def _star_phase(ctx: StageContext, phase: str, fn, input_dirs: list[str], num_partitions: int) -> tuple[list[str], dict]:
    specs = {
        f"{p:05d}": {
            "inputs": [partition_url(d, p) for d in input_dirs],
            "out_dir": ctx.path("_cc", phase, f"{p:05d}"),
            "num_partitions": num_partitions,
        }
        for p in range(num_partitions)
    }
    results = ctx.run_tasks(phase, fn, specs)
    return [s["out_dir"] for s in specs.values()], results


def _changes(results: dict) -> int:
    return sum(r["changes"] for r in results.values())


def _labels(ctx: StageContext, star_dirs: list[str], num_partitions: int) -> list[str]:
    specs = {
        f"{p:05d}": {"inputs": [partition_url(d, p) for d in star_dirs], "out_url": ctx.path("_clusters", f"part-{p:05d}.parquet")}
        for p in range(num_partitions)
    }
    ctx.run_tasks("cc-labels", labels_task, specs)
    return [s["out_url"] for s in specs.values()]


# --- filtering -------------------------------------------------------------------------


def removed_rows(cluster_urls: list[str], file: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of one document file that are not their cluster's root, and the file index
    of each one's root."""
    tables = [read_node_range(url, file << ROW_BITS, (file + 1) << ROW_BITS) for url in cluster_urls]
    clusters = pa.concat_tables(tables) if tables else CLUSTER_SCHEMA.empty_table()
    node, root = clusters.column("node").to_numpy(), clusters.column("root").to_numpy()
    return node & ROW_MASK, root >> ROW_BITS


def read_node_range(url: str, lo: int, hi: int) -> pa.Table:
    """The rows of a node-sorted clusters file with lo <= node < hi, reading only the row
    groups that can hold them (so a filter task reads about its own file's share)."""
    with storage.open_read(url) as f:
        parquet = pq.ParquetFile(f)
        groups = [i for i in range(parquet.num_row_groups) if _may_hold(parquet.metadata.row_group(i).column(0).statistics, lo, hi)]
        table = parquet.read_row_groups(groups) if groups else CLUSTER_SCHEMA.empty_table()
    node = table.column("node")
    return table.filter(pc.and_(pc.greater_equal(node, lo), pc.less(node, hi)))


def _may_hold(stats, lo: int, hi: int) -> bool:
    return stats is None or not stats.has_min_max or (stats.max >= lo and stats.min < hi)


def filter_task(spec: dict) -> dict:
    """Copy one document file without its near-duplicates."""
    dropped, root_files = removed_rows(spec["clusters"], spec["file"])
    kept_files, counts = np.unique(root_files, return_counts=True)
    row = 0
    with DocumentWriter(spec["out_url"]) as writer:
        for batch in iter_batches(spec["docs_url"]):
            keep = ~np.isin(np.arange(row, row + batch.num_rows), dropped)
            row += batch.num_rows
            writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(keep)))
    return {
        "source": spec["source"],
        "documents_in": row,
        "near_duplicates": len(dropped),
        "kept_in_files": {str(int(f)): int(c) for f, c in zip(kept_files, counts)},
        "docs": writer.info,
    }


def _write_parquet(table: pa.Table, url: str, **options) -> None:
    with storage.open_atomic(url) as f:
        pq.write_table(table, f, compression="zstd", **options)


# --- the stage -------------------------------------------------------------------------


def run_dedup_fuzzy(ctx: StageContext) -> dict:
    docs = ctx.input_files("dedup_exact", "documents")
    cfg = ctx.config.data.dedup.fuzzy
    if not cfg.enabled:
        return passthrough(docs, ctx.stage)
    minhash = cfg.model_dump(mode="json")
    n = cfg.num_partitions
    signature_specs = {
        f"{i:06d}": {"docs_url": ctx.absolute(f["path"]), "file": i, "num_files": len(docs), "sigs_url": ctx.path("_sigs"), "minhash": minhash}
        for i, f in enumerate(docs)
    }
    ctx.run_tasks("signature", signature_task, signature_specs)
    bucket_specs = {
        f"{b:03d}": {
            "bucket": b,
            "sigs_url": ctx.path("_sigs"),
            "dups_url": ctx.path("_dups"),
            "out_dir": ctx.path("_cc", "edges", f"{b:03d}"),
            "num_files": len(docs),
            "num_partitions": n,
            "minhash": minhash,
        }
        for b in range(cfg.num_buckets)
    }
    buckets = ctx.run_tasks("buckets", bucket_task, bucket_specs)
    clusters, cc = connected_components(ctx, [s["out_dir"] for s in bucket_specs.values()], n)
    filter_specs = {
        f"{i:06d}": {
            "docs_url": ctx.absolute(f["path"]),
            "file": i,
            "source": f["source"],
            "clusters": clusters,
            "out_url": ctx.path("docs", f["path"].split("/", 2)[-1]),
        }
        for i, f in enumerate(docs)
    }
    filtered = ctx.run_tasks("filter", filter_task, filter_specs)
    for intermediate in ("_sigs", "_dups", "_cc"):  # the markers and _clusters keep the record
        storage.remove(ctx.path(intermediate))
    return _manifest_body(ctx, docs, filter_specs, filtered, {"duplicate_pairs": sum(r["pairs"] for r in buckets.values()), **cc})


def _manifest_body(ctx: StageContext, docs: list[dict], specs: dict, results: dict, graph: dict) -> dict:
    files, per_source = filtered_files(ctx, docs, specs, results, "near_duplicates")
    stats = {
        "sources": per_source,
        "documents_in": sum(s["documents_in"] for s in per_source.values()),
        "near_duplicates": sum(s["near_duplicates"] for s in per_source.values()),
        "documents_out": sum(s["documents_out"] for s in per_source.values()),
        "duplicate_pairs": graph["duplicate_pairs"],
        "clusters": graph["clusters"],
        "cc_rounds": graph["rounds"],
    }
    return {"files": files, "stats": stats}


def _identity(config: Config) -> dict:
    # datatrove's shingling and hashing decide the signatures, so its version is part of them.
    return {**config.data.dedup.fuzzy.model_dump(mode="json"), "datatrove": version("datatrove")}


STAGE = Stage(
    name="dedup_fuzzy",
    inputs=("dedup_exact",),
    run=run_dedup_fuzzy,
    identity=_identity,
    description="Drop near-duplicate documents: datatrove MinHash signatures and LSH buckets, connected components on Ray.",
)
