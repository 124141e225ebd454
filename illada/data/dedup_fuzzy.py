"""Stage 3, dedup-fuzzy: drop near-duplicate documents (MinHash LSH, verified), keeping the earliest.

1. signature: per document file, datatrove's `MinhashDedupSignature` writes one sorted
              signature file per LSH bucket (`_sigs/bucket_<b>/<file>.minhash.sig`).
2. buckets:   per bucket, datatrove's `MinhashDedupBuckets` merges the bucket's signature
              files and writes the pairs that share a band (`_dups/<b>_00.dups`, "<4I":
              file, doc, file, doc); the same task splits the pairs into partitions.
3. pairs:     per partition, the distinct candidate pairs, and the documents they name.
4. shingles:  per document file, the shingle sets (datatrove's own) of its documents that
              some candidate names, sent to the partitions that need them.
5. verify:    per partition, the true Jaccard of each candidate's shingles; pairs below
              `jaccard_threshold` are dropped. Steps 4-5 are skipped at threshold 0.
6. cc-<r>-large, cc-<r>-small: connected components of the verified graph by alternating
              Large-Star and Small-Star (Kiveris et al. 2014, "Connected Components in
              MapReduce and Beyond"), one Ray phase per step, each task holding only its
              partition of the edges, until a round changes nothing. The graph is then a
              set of stars, each centred on its component's smallest node.
7. cc-labels: per partition, the (node, root) pairs of every non-root node.
8. chain-edges, chain-shingles, chains: edges and shingle sets regrouped by component
              (partition of the root); per partition, `near_duplicates.stop_chains` keeps
              each component's earliest document and removes only the members within the
              threshold of it, re-clustering the rest (`chain_stopping`; off, every
              non-root member is removed). Writes `_clusters/`: (removed node, kept node).
9. filter:    per document file, copy every row that is not a removed node.

datatrove's own clustering step (`MinhashDedupCluster`) is not used: it is one in-memory
task over every pair of the corpus. A chain-stopping task holds whole components: its
memory follows the largest component, not the corpus.

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
from illada.data import near_duplicates
from illada.data.dedup_exact import filtered_files, passthrough
from illada.data.documents import DocumentWriter, iter_batches, read_table
from illada.data.near_duplicates import jaccard, merge_histograms, size_histogram, stop_chains, unique_shingles
from illada.pipeline.stage import Stage, StageContext

EDGE_SCHEMA = pa.schema([("node", pa.int64()), ("neighbor", pa.int64())])
CLUSTER_SCHEMA = pa.schema([("node", pa.int64()), ("root", pa.int64())])
NODE_SCHEMA = pa.schema([("node", pa.int64())])
SHINGLE_SCHEMA = pa.schema([("node", pa.int64()), ("shingles", pa.list_(pa.uint64()))])
COMPONENT_EDGE_SCHEMA = pa.schema([("root", pa.int64()), ("node", pa.int64()), ("neighbor", pa.int64())])
COMPONENT_SHINGLE_SCHEMA = pa.schema([("root", pa.int64()), ("node", pa.int64()), ("shingles", pa.list_(pa.uint64()))])
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
    """Find the pairs sharing a band in one bucket, and split them into partitions by their
    smaller node."""
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
    edges = pa.table({"node": pairs.min(axis=1), "neighbor": pairs.max(axis=1)}, schema=EDGE_SCHEMA)
    write_partitioned(edges, spec["out_dir"], spec["num_partitions"])
    return {"pairs": len(pairs)}


def read_dups(url: str) -> np.ndarray:
    """datatrove's duplicate pairs as an (n, 2) array of node ids."""
    raw = np.frombuffer(storage.read_bytes(url), dtype="<u4").reshape(-1, 4).astype(np.int64)
    return np.stack([raw[:, 0] << ROW_BITS | raw[:, 1], raw[:, 2] << ROW_BITS | raw[:, 3]], axis=1)


# --- verifying candidates: the Jaccard of their shingles ---------------------------------
#
# A candidate pair lives in the partition of its smaller node. Each file's task computes
# the shingles of its documents that candidates name, once, and sends a copy to every
# partition naming it; each partition then checks its own pairs.


def pairs_task(spec: dict) -> dict:
    """The distinct candidate pairs of one partition: as edges for the components (no
    verification), or as the pairs to verify and the nodes whose shingles that needs."""
    pairs = distinct(read_partition(spec["inputs"]))
    if spec["verify"]:
        _write_parquet(pairs, spec["pairs_url"])
        nodes = np.unique(np.concatenate([pairs.column("node").to_numpy(), pairs.column("neighbor").to_numpy()]))
        _write_parquet(pa.table({"node": nodes}, schema=NODE_SCHEMA), spec["needed_url"], row_group_size=CLUSTER_ROW_GROUP)
    else:
        write_partitioned(both_directions(pairs), spec["edges_dir"], spec["num_partitions"])
    return {"candidates": pairs.num_rows}


def shingler(minhash: dict, sigs_url: str):
    """datatrove's shingling for our MinHash config: the hashed word n-grams it signs."""
    return MinhashDedupSignature(output_folder=data_folder(sigs_url), config=minhash_config(minhash)).get_shingles


def shingles_task(spec: dict) -> dict:
    """Shingle the documents of one file that candidates name; write them per partition."""
    file = spec["file"]
    lo, hi = file << ROW_BITS, (file + 1) << ROW_BITS
    needed = [read_node_range(url, lo, hi, NODE_SCHEMA).column("node").to_numpy() for url in spec["needed"]]
    wanted = set((np.concatenate(needed) & ROW_MASK).tolist()) if needed else set()
    shingles_of = shingler(spec["minhash"], spec["sigs_url"])
    shingles: dict[int, np.ndarray] = {}
    row = 0
    for batch in iter_batches(spec["docs_url"], columns=["text"]):
        for text in batch.column("text").to_pylist():
            if row in wanted:
                shingles[(file << ROW_BITS) | row] = unique_shingles(shingles_of(text))
            row += 1
    for p, nodes in enumerate(needed):
        table = pa.table({"node": nodes, "shingles": [shingles[int(n)] for n in nodes]}, schema=SHINGLE_SCHEMA)
        _write_parquet(table, partition_url(spec["out_dir"], p))
    return {"documents": len(shingles)}


def read_shingles(urls: list[str], schema: pa.Schema = SHINGLE_SCHEMA) -> dict[int, np.ndarray]:
    table = read_partition(urls, schema)
    if table.num_rows == 0:
        return {}
    lists = table.column("shingles").combine_chunks()
    flat, offsets = lists.flatten().to_numpy(), lists.offsets.to_numpy() - lists.offsets[0].as_py()
    return {int(n): flat[offsets[i] : offsets[i + 1]] for i, n in enumerate(table.column("node").to_numpy())}


def verify_task(spec: dict) -> dict:
    """Keep the candidate pairs of one partition whose shingle Jaccard reaches the threshold;
    write them as edges for the components."""
    pairs = read_table(spec["pairs_url"])
    shingles = read_shingles(spec["shingles"])
    node, neighbor = pairs.column("node").to_numpy(), pairs.column("neighbor").to_numpy()
    similarity = np.array([jaccard(shingles[int(a)], shingles[int(b)]) for a, b in zip(node, neighbor)])
    verified = pairs.filter(pa.array(similarity >= spec["threshold"])) if len(similarity) else pairs
    write_partitioned(both_directions(verified), spec["edges_dir"], spec["num_partitions"])
    return {"verified": verified.num_rows}


# --- chain stopping: each component resolved in one task ----------------------------------


def roots_of(nodes: np.ndarray, labels: pa.Table) -> np.ndarray:
    """Each node's component root: its label, or itself where it has none (a root)."""
    if labels.num_rows == 0:
        return nodes.copy()
    order = np.argsort(labels.column("node").to_numpy())
    labelled, roots = labels.column("node").to_numpy()[order], labels.column("root").to_numpy()[order]
    at = np.minimum(np.searchsorted(labelled, nodes), len(labelled) - 1)
    return np.where(labelled[at] == nodes, roots[at], nodes)


def component_edges_task(spec: dict) -> dict:
    """Send one partition's edges (each once) to the partition of their component's root."""
    edges = distinct(read_partition(spec["inputs"]))
    edges = edges.filter(pc.less(edges.column("node"), edges.column("neighbor")))
    node = edges.column("node").to_numpy()
    root = roots_of(node, read_table(spec["labels_url"]))
    table = pa.table({"root": root, "node": node, "neighbor": edges.column("neighbor")}, schema=COMPONENT_EDGE_SCHEMA)
    write_partitioned(table, spec["out_dir"], spec["num_partitions"], key="root")
    return {"edges": table.num_rows}


def component_shingles_task(spec: dict) -> dict:
    """Send the shingle sets of one file's documents to the partition of their component's
    root (each document once, whichever candidate partitions it went to)."""
    table = read_partition(spec["inputs"], SHINGLE_SCHEMA)
    nodes = table.column("node").to_numpy()
    _, first = np.unique(nodes, return_index=True)
    table = table.take(first)
    file = spec["file"]
    lo, hi = file << ROW_BITS, (file + 1) << ROW_BITS
    labels = pa.concat_tables([read_node_range(url, lo, hi) for url in spec["labels"]]) if spec["labels"] else CLUSTER_SCHEMA.empty_table()
    nodes = table.column("node").to_numpy()
    routed = pa.table({"root": roots_of(nodes, labels), "node": nodes, "shingles": table.column("shingles")}, schema=COMPONENT_SHINGLE_SCHEMA)
    write_partitioned(routed, spec["out_dir"], spec["num_partitions"], key="root")
    return {"documents": routed.num_rows}


def chains_task(spec: dict) -> dict:
    """Resolve the components of one partition: which members are removed, in whose favour.
    Writes (removed node, kept node) sorted by node."""
    edges = read_partition(spec["edges"], COMPONENT_EDGE_SCHEMA)
    a_nodes, b_nodes = edges.column("node").to_numpy(), edges.column("neighbor").to_numpy()
    nodes = np.unique(np.concatenate([a_nodes, b_nodes]))  # ascending: index order is document order
    a, b = np.searchsorted(nodes, a_nodes), np.searchsorted(nodes, b_nodes)
    close_to_rep = None
    if spec["chain_stopping"]:
        shingles = read_shingles(spec["shingles"], COMPONENT_SHINGLE_SCHEMA)
        threshold = spec["threshold"]

        def close_to_rep(members: np.ndarray, reps: np.ndarray) -> np.ndarray:
            return np.array([jaccard(shingles[int(nodes[m])], shingles[int(nodes[r])]) >= threshold for m, r in zip(members, reps)], dtype=bool)

    rep_of, rounds = stop_chains(len(nodes), a, b, close_to_rep)
    removed = rep_of >= 0
    clusters = pa.table({"node": nodes[removed], "root": nodes[rep_of[removed]]}, schema=CLUSTER_SCHEMA)
    _write_parquet(clusters, spec["out_url"], row_group_size=CLUSTER_ROW_GROUP)
    root = edges.column("root").to_numpy()
    roots = roots_of(nodes, pa.table({"node": np.concatenate([a_nodes, b_nodes]), "root": np.concatenate([root, root])}, schema=CLUSTER_SCHEMA))
    _, component_sizes = np.unique(roots, return_counts=True)
    _, kept_counts = np.unique(rep_of[removed], return_counts=True)
    return {
        "removed": int(removed.sum()),
        "rounds": rounds,
        "component_sizes": size_histogram(component_sizes),
        "cluster_sizes": size_histogram(kept_counts + 1),
        "kept_in_components": int(len(nodes) - removed.sum() - len(component_sizes)),
    }


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


def write_partitioned(table: pa.Table, out_dir: str, num_partitions: int, key: str = "node") -> None:
    """Write `part-<p>.parquet` under out_dir for every partition p of the `key` column
    (empty ones too, so a reader never has to ask which exist), rows sorted by the integer
    columns."""
    partition = partition_of(table.column(key).to_numpy(), num_partitions)
    sort_keys = [table.column(c).to_numpy() for c in reversed(table.column_names) if pa.types.is_integer(table.schema.field(c).type)]
    order = np.lexsort((*sort_keys, partition))
    bounds = np.searchsorted(partition[order], np.arange(num_partitions + 1))
    table = table.take(order)
    for p in range(num_partitions):
        _write_parquet(table.slice(bounds[p], bounds[p + 1] - bounds[p]), partition_url(out_dir, p))


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


def connected_components(ctx: StageContext, edge_dirs: list[str], num_partitions: int, labels_dir: str = "_clusters") -> tuple[list[str], dict]:
    """Label every node of the graph in `edge_dirs` (each holding both directions of its
    edges, split into `num_partitions` parts) with the smallest node of its component.

    Returns the files under `labels_dir`, one per partition, of (node, root) for every node
    that is not a root, and the stats: rounds and clusters.
    """
    current = edge_dirs
    for r in range(MAX_CC_ROUNDS):
        large_dirs, large = _star_phase(ctx, f"cc-{r:02d}-large", large_star_task, current, num_partitions)
        small_dirs, small = _star_phase(ctx, f"cc-{r:02d}-small", small_star_task, large_dirs, num_partitions)
        if _changes(large) == 0 and _changes(small) == 0:
            labels = _labels(ctx, large_dirs, num_partitions, labels_dir)
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


def _labels(ctx: StageContext, star_dirs: list[str], num_partitions: int, labels_dir: str) -> list[str]:
    specs = {
        f"{p:05d}": {"inputs": [partition_url(d, p) for d in star_dirs], "out_url": ctx.path(labels_dir, f"part-{p:05d}.parquet")}
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


def read_node_range(url: str, lo: int, hi: int, schema: pa.Schema = CLUSTER_SCHEMA) -> pa.Table:
    """The rows of a node-sorted file with lo <= node < hi, reading only the row groups
    that can hold them (so a per-file task reads about its own file's share)."""
    with storage.open_read(url) as f:
        parquet = pq.ParquetFile(f)
        groups = [i for i in range(parquet.num_row_groups) if _may_hold(parquet.metadata.row_group(i).column(0).statistics, lo, hi)]
        table = parquet.read_row_groups(groups) if groups else schema.empty_table()
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
    verify = cfg.jaccard_threshold > 0
    signature_specs = {
        f"{i:06d}": {"docs_url": ctx.absolute(f["path"]), "file": i, "num_files": len(docs), "sigs_url": ctx.path("_sigs"), "minhash": minhash}
        for i, f in enumerate(docs)
    }
    ctx.run_tasks("signature", signature_task, signature_specs)
    candidate_dirs = _find_candidates(ctx, len(docs), minhash)
    edge_dirs, graph = _candidate_edges(ctx, docs, candidate_dirs, minhash, verify)
    labels, cc = connected_components(ctx, edge_dirs, n, labels_dir="_cc/labels")
    clusters, chains = _resolve_components(ctx, len(docs), edge_dirs, labels, chain_stopping=verify and cfg.chain_stopping)
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
    for intermediate in ("_sigs", "_dups", "_cc", "_verify", "_chains"):  # the markers and _clusters keep the record
        storage.remove(ctx.path(intermediate))
    return _manifest_body(ctx, docs, filter_specs, filtered, {**graph, "components": cc["clusters"], "cc_rounds": cc["rounds"], **chains})


def _find_candidates(ctx: StageContext, num_files: int, minhash: dict) -> list[str]:
    """The LSH bucket step: candidate pairs, partitioned by their smaller node, per bucket."""
    n = minhash["num_partitions"]
    specs = {
        f"{b:03d}": {
            "bucket": b,
            "sigs_url": ctx.path("_sigs"),
            "dups_url": ctx.path("_dups"),
            "out_dir": ctx.path("_cc", "candidates", f"{b:03d}"),
            "num_files": num_files,
            "num_partitions": n,
            "minhash": minhash,
        }
        for b in range(minhash["num_buckets"])
    }
    ctx.run_tasks("buckets", bucket_task, specs)
    return [s["out_dir"] for s in specs.values()]


def _candidate_edges(ctx: StageContext, docs: list[dict], candidate_dirs: list[str], minhash: dict, verify: bool) -> tuple[list[str], dict]:
    """The graph's edges: the distinct candidates, each verified by its shingles' Jaccard
    unless `verify` is off. Returns the edge folders and the pair counts."""
    n = minhash["num_partitions"]
    pair_specs = {
        f"{p:05d}": {
            "inputs": [partition_url(d, p) for d in candidate_dirs],
            "verify": verify,
            "pairs_url": ctx.path("_verify", "pairs", f"part-{p:05d}.parquet"),
            "needed_url": ctx.path("_verify", "needed", f"part-{p:05d}.parquet"),
            "edges_dir": ctx.path("_cc", "edges", f"{p:05d}"),
            "num_partitions": n,
        }
        for p in range(n)
    }
    pairs = ctx.run_tasks("pairs", pairs_task, pair_specs)
    candidates = sum(r["candidates"] for r in pairs.values())
    edge_dirs = [s["edges_dir"] for s in pair_specs.values()]
    if not verify:
        return edge_dirs, {"candidate_pairs": candidates, "verified_pairs": candidates}
    shingle_specs = {
        f"{i:06d}": {
            "docs_url": ctx.absolute(f["path"]),
            "file": i,
            "needed": [s["needed_url"] for s in pair_specs.values()],
            "sigs_url": ctx.path("_sigs"),
            "minhash": minhash,
            "out_dir": ctx.path("_verify", "shingles", f"{i:06d}"),
        }
        for i, f in enumerate(docs)
    }
    ctx.run_tasks("shingles", shingles_task, shingle_specs)
    verify_specs = {
        tid: {
            "pairs_url": spec["pairs_url"],
            "shingles": [partition_url(s["out_dir"], p) for s in shingle_specs.values()],
            "threshold": minhash["jaccard_threshold"],
            "edges_dir": spec["edges_dir"],
            "num_partitions": n,
        }
        for p, (tid, spec) in enumerate(pair_specs.items())
    }
    verified = ctx.run_tasks("verify", verify_task, verify_specs)
    return edge_dirs, {"candidate_pairs": candidates, "verified_pairs": sum(r["verified"] for r in verified.values())}


def _resolve_components(ctx: StageContext, num_files: int, edge_dirs: list[str], labels: list[str], chain_stopping: bool) -> tuple[list[str], dict]:
    """Regroup edges (and shingles) by component, then decide per component what is removed.
    Returns the `_clusters/` files and the stats: removed, cluster sizes, rounds."""
    n = len(labels)
    edge_specs = {
        f"{q:05d}": {
            "inputs": [partition_url(d, q) for d in edge_dirs],
            "labels_url": labels[q],
            "out_dir": ctx.path("_chains", "edges", f"{q:05d}"),
            "num_partitions": n,
        }
        for q in range(n)
    }
    ctx.run_tasks("chain-edges", component_edges_task, edge_specs)
    shingle_specs = {}
    if chain_stopping:
        shingle_specs = {
            f"{i:06d}": {
                "inputs": [partition_url(ctx.path("_verify", "shingles", f"{i:06d}"), p) for p in range(n)],
                "file": i,
                "labels": labels,
                "out_dir": ctx.path("_chains", "shingles", f"{i:06d}"),
                "num_partitions": n,
            }
            for i in range(num_files)
        }
        ctx.run_tasks("chain-shingles", component_shingles_task, shingle_specs)
    chain_specs = {
        f"{r:05d}": {
            "edges": [partition_url(s["out_dir"], r) for s in edge_specs.values()],
            "shingles": [partition_url(s["out_dir"], r) for s in shingle_specs.values()],
            "chain_stopping": chain_stopping,
            "threshold": ctx.config.data.dedup.fuzzy.jaccard_threshold,
            "out_url": ctx.path("_clusters", f"part-{r:05d}.parquet"),
        }
        for r in range(n)
    }
    results = list(ctx.run_tasks("chains", chains_task, chain_specs).values())
    stats = {
        "removed": sum(r["removed"] for r in results),
        "clusters": sum(sum(r["cluster_sizes"].values()) for r in results),
        "cluster_sizes": merge_histograms([r["cluster_sizes"] for r in results]),
        "component_sizes": merge_histograms([r["component_sizes"] for r in results]),
        "kept_by_chain_stopping": sum(r["kept_in_components"] for r in results),
        "chain_rounds": max((r["rounds"] for r in results), default=0),
    }
    return [s["out_url"] for s in chain_specs.values()], stats


def _manifest_body(ctx: StageContext, docs: list[dict], specs: dict, results: dict, graph: dict) -> dict:
    files, per_source = filtered_files(ctx, docs, specs, results, "near_duplicates")
    removed = sum(s["near_duplicates"] for s in per_source.values())
    if removed != graph["removed"]:
        raise RuntimeError(f"dedup_fuzzy: the filter removed {removed} documents but the clusters name {graph['removed']}")
    stats = {
        "sources": per_source,
        "documents_in": sum(s["documents_in"] for s in per_source.values()),
        "near_duplicates": removed,
        "documents_out": sum(s["documents_out"] for s in per_source.values()),
        "candidate_pairs": graph["candidate_pairs"],
        "verified_pairs": graph["verified_pairs"],
        "components": graph["components"],
        "clusters": graph["clusters"],
        "cluster_sizes": graph["cluster_sizes"],
        "component_sizes": graph["component_sizes"],
        "kept_by_chain_stopping": graph["kept_by_chain_stopping"],
        "cc_rounds": graph["cc_rounds"],
        "chain_rounds": graph["chain_rounds"],
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
    description="Drop near-duplicate documents: datatrove MinHash LSH candidates verified by shingle Jaccard, "
    "connected components on Ray, chains stopped at each cluster's kept document.",
    code=(near_duplicates,),
)
