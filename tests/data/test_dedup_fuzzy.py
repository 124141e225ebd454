"""dedup_fuzzy: connected components against union-find, the LSH detection curve through
the real pipeline, deterministic keeping of the earliest document, and an S3 root."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from illada import storage
from illada.data.dedup_fuzzy import EDGE_SCHEMA, both_directions, connected_components, minhash_config, write_partitioned
from illada.data.documents import read_table
from illada.pipeline.runner import run_pipeline
from illada.pipeline.stage import StageContext
from illada.data.stages import PRETRAIN as STAGES
from tests.helpers import make_config, write_jsonl

UPTO_FUZZY = STAGES[: [s.name for s in STAGES].index("dedup_fuzzy") + 1]
assert [s.name for s in UPTO_FUZZY] == ["ingest", "filter", "dedup_exact", "dedup_fuzzy"]


# --- connected components ---------------------------------------------------------------


def union_find_roots(edges: list[tuple[int, int]]) -> dict[int, int]:
    """Every node's smallest component member, by plain union-find."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def known_graph(rng: random.Random) -> list[tuple[int, int]]:
    """Chains, stars, a cycle, two cliques joined by one edge and a 400-node path, on ids
    shaped like documents (file << 32 | row) and shuffled so that id order is no help."""
    ids = [(f << 32) | r for f in range(5) for r in range(300)]
    rng.shuffle(ids)
    take = iter(ids).__next__
    edges = []

    def path(n: int) -> None:
        nodes = [take() for _ in range(n)]
        edges.extend(zip(nodes, nodes[1:]))

    for n in (2, 3, 5, 17):
        path(n)
    for n in (4, 30):
        center = take()
        edges.extend((take(), center) for _ in range(n))
    ring = [take() for _ in range(12)]
    edges.extend(zip(ring, ring[1:] + ring[:1]))
    left, right = [take() for _ in range(6)], [take() for _ in range(6)]
    for clique in (left, right):
        edges.extend((a, b) for i, a in enumerate(clique) for b in clique[i + 1 :])
    edges.append((left[0], right[-1]))
    path(400)
    edges.extend(edges[:10])  # repeated pairs, as several LSH buckets report them
    return edges


def run_cc(tmp_path, edges: list[tuple[int, int]], num_partitions: int) -> tuple[dict[int, int], dict]:
    config = make_config(tmp_path / "run", [{"name": "unused", "paths": [str(tmp_path)], "weight": 1}])
    ctx = StageContext(config=config, stage="cc_test")
    table = pa.table({"node": [a for a, _ in edges], "neighbor": [b for _, b in edges]}, schema=EDGE_SCHEMA)
    write_partitioned(both_directions(table), ctx.path("input"), num_partitions)
    labels, stats = connected_components(ctx, [ctx.path("input")], num_partitions)
    found = pa.concat_tables([read_table(url) for url in labels]).to_pylist()
    return {row["node"]: row["root"] for row in found}, stats


@pytest.mark.parametrize("num_partitions", [1, 3])
def test_connected_components_match_union_find(tmp_path, ray_local, num_partitions):
    edges = known_graph(random.Random(7))
    expected = union_find_roots(edges)
    labels, stats = run_cc(tmp_path, edges, num_partitions)

    assert labels == {node: root for node, root in expected.items() if node != root}  # roots are not listed
    assert stats["clusters"] == len(set(expected.values())) == 4 + 2 + 1 + 1 + 1
    assert stats["rounds"] < 20


def test_connected_components_of_no_edges(tmp_path, ray_local):
    labels, stats = run_cc(tmp_path, [], 2)
    assert labels == {} and stats == {"rounds": 1, "clusters": 0}


# --- corpora ----------------------------------------------------------------------------

_vocab_rng = random.Random(0)
VOCAB = ["".join(_vocab_rng.choices("abcdefghijklmnopqrstuvwxyz", k=7)) for _ in range(40_000)]


def random_words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def near_copy(rng: random.Random, words: list[str], destroyed: int, n_grams: int = 5) -> list[str]:
    """`words` with one run of fresh words in place so that `destroyed` of its n-gram shingles
    are gone (and as many new ones appear): a run of k words costs k shingles at the start of
    the text and k + n - 1 inside it."""
    copy = list(words)
    inside = destroyed - (n_grams - 1)
    if inside >= 1 and rng.random() < 0.7:
        start = rng.randrange(n_grams - 1, len(words) - inside - (n_grams - 1) + 1)
        copy[start : start + inside] = random_words(rng, inside)
    else:
        copy[:destroyed] = random_words(rng, destroyed)
    return copy


def output_ids(root: str, manifest: dict) -> list[str]:
    ids = []
    for f in sorted(manifest["files"], key=lambda f: f["order"]):
        ids += read_table(storage.join(root, f["path"]), columns=["id"]).column("id").to_pylist()
    return ids


# --- the LSH detection curve ------------------------------------------------------------

R, B = 8, 14  # the default bands: 14 buckets of 8 hashes
BANDS = [(0.40, 0.50), (0.50, 0.60), (0.60, 0.70), (0.70, 0.80), (0.80, 0.90), (0.90, 1.00)]


def lsh_curve(j: np.ndarray) -> np.ndarray:
    """P(a pair of Jaccard similarity j shares at least one of B bands of R MinHashes)."""
    return 1 - (1 - j**R) ** B


def pairs_per_band(lo: float, hi: float, sigma: float = 0.015) -> int:
    """Enough pairs that the sampling error of the band's rate is about `sigma`."""
    p = float(lsh_curve(np.array((lo + hi) / 2)))
    return max(150, int(np.ceil(p * (1 - p) / sigma**2)))


def word_shingles(text: str, n: int = 5) -> set[str]:
    """The 5-word shingles of a text of lowercase words joined by single spaces: what
    datatrove's normalisation and spaCy tokenizer leave of such a text (checked below)."""
    words = text.split(" ")
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def check_shingles_as_datatrove_makes_them(texts: list[str]) -> None:
    """datatrove's own shingles (spaCy, slow: so on a sample) are the hashes of ours."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.hashing import create_hash_func

    config = minhash_config({"n_grams": 5, "num_buckets": B, "hashes_per_bucket": R, "seed": 1})
    step = MinhashDedupSignature(output_folder="unused", config=config)
    hash_shingle = create_hash_func(config.hash_config)
    for text in texts:
        assert set(step.get_shingles(text).ravel().tolist()) == {hash_shingle(s) for s in word_shingles(text)}


def test_detection_rate_follows_the_lsh_curve(tmp_path, ray_local):
    """Planted pairs at known shingle Jaccard J are found at the rate 1 - (1 - J^8)^14."""
    rng = random.Random(2026)
    bases, copies, pair_j = [], [], []
    for lo, hi in BANDS:
        for _ in range(pairs_per_band(lo, hi)):
            words = random_words(rng, rng.randint(50, 70))
            n = len(words) - 4
            target = rng.uniform(lo, hi)
            destroyed = max(1, round(n * (1 - target) / (1 + target)))
            base, copy = " ".join(words), " ".join(near_copy(rng, words, destroyed))
            i = len(bases)
            bases.append({"id": f"base-{i}", "text": base})
            copies.append({"id": f"copy-{i}", "text": copy})
            pair_j.append(jaccard(word_shingles(base), word_shingles(copy)))
    check_shingles_as_datatrove_makes_them([d["text"] for d in bases[::50] + copies[::50]])
    rng.shuffle(copies)  # copies sit in other files, in another order than their bases
    half = len(bases) // 2
    write_jsonl(tmp_path / "raw" / "base" / "0.jsonl", bases[:half])
    write_jsonl(tmp_path / "raw" / "base" / "1.jsonl", bases[half:])
    write_jsonl(tmp_path / "raw" / "copy" / "0.jsonl", copies[:half])
    write_jsonl(tmp_path / "raw" / "copy" / "1.jsonl", copies[half:])
    config = make_config(
        tmp_path / "run",
        [
            {"name": "base", "paths": [str(tmp_path / "raw" / "base")], "weight": 1, "id_field": "id"},
            {"name": "copy", "paths": [str(tmp_path / "raw" / "copy")], "weight": 1, "id_field": "id"},
        ],
        # No Jaccard check: the LSH candidates themselves are what follows the curve.
        ["data.dedup.fuzzy.enabled=true", "data.dedup.fuzzy.jaccard_threshold=0"]
        + [f"data.dedup.fuzzy.num_buckets={B}", f"data.dedup.fuzzy.hashes_per_bucket={R}", "data.dedup.fuzzy.num_partitions=4"],
    )
    manifest = run_pipeline(config, UPTO_FUZZY)["dedup_fuzzy"]

    kept = set(output_ids(config.root, manifest))
    assert all(f"base-{i}" in kept for i in range(len(bases)))  # the earlier one of a pair stays
    found = np.array([f"copy-{i}" not in kept for i in range(len(bases))])
    pair_j = np.array(pair_j)
    report = []
    for lo, hi in BANDS:
        band = (pair_j >= lo) & (pair_j < hi)
        assert band.sum() >= 100, (lo, hi, band.sum())
        observed, expected = found[band].mean(), lsh_curve(pair_j[band]).mean()
        report.append(f"J in [{lo:.1f}, {hi:.1f}): {band.sum()} pairs, found {observed:.3f}, expected {expected:.3f}")
        assert abs(observed - expected) < 0.05, "\n".join(report)

    stats = manifest["stats"]
    assert stats["near_duplicates"] == found.sum() == stats["sources"]["copy"]["near_duplicates"]
    assert stats["clusters"] == found.sum()  # every cluster is one planted pair
    assert stats["sources"]["copy"]["duplicate_of_source"] == {"base": int(found.sum())}
    assert stats["documents_out"] == 2 * len(bases) - found.sum()


# --- determinism: the earliest document of a cluster is kept ------------------------------


def write_clustered_corpus(raw, rng: random.Random, clusters: int = 30) -> dict[str, int]:
    """Clusters of 2-5 near copies (J > 0.9) of a base text, scattered over two sources and
    three files, with unrelated documents between them. Returns each near copy's cluster."""
    files: dict[str, list[dict]] = {"a/0.jsonl": [], "a/1.jsonl": [], "b/0.jsonl": []}
    cluster_of = {}
    for c in range(clusters):
        words = random_words(rng, 80)
        for k in range(rng.randint(2, 5)):
            doc_id = f"c{c}-{k}"
            files[rng.choice(list(files))].append({"id": doc_id, "text": " ".join(near_copy(rng, words, rng.randint(1, 3)))})
            cluster_of[doc_id] = c
    for i in range(60):
        files[rng.choice(list(files))].append({"id": f"u{i}", "text": " ".join(random_words(rng, 80))})
    for name, docs in files.items():
        rng.shuffle(docs)
        write_jsonl(raw / name, docs)
    return cluster_of


def test_keeps_the_earliest_of_each_cluster_and_is_deterministic(tmp_path, ray_local):
    cluster_of = write_clustered_corpus(tmp_path / "raw", random.Random(11))
    sources = [
        {"name": "a", "paths": [str(tmp_path / "raw" / "a")], "weight": 1, "id_field": "id"},
        {"name": "b", "paths": [str(tmp_path / "raw" / "b")], "weight": 1, "id_field": "id"},
    ]
    config = make_config(tmp_path / "run", sources, ["data.dedup.fuzzy.enabled=true", "data.dedup.fuzzy.num_partitions=3"])
    manifests = run_pipeline(config, UPTO_FUZZY)
    first = manifests["dedup_fuzzy"]

    # In input order (files by their manifest order, then rows), the first member of every
    # cluster is kept and every later one dropped.
    inputs = output_ids(config.root, manifests["dedup_exact"])
    seen: set[int] = set()
    expected = []
    for doc_id in inputs:
        c = cluster_of.get(doc_id)
        if c is None or c not in seen:
            expected.append(doc_id)
        if c is not None:
            seen.add(c)
    assert output_ids(config.root, first) == expected
    assert first["stats"]["clusters"] == len(set(cluster_of.values()))
    assert first["stats"]["near_duplicates"] == len(inputs) - len(expected)

    again = run_pipeline(config, UPTO_FUZZY, only="dedup_fuzzy")["dedup_fuzzy"]
    assert again["created_unix"] != first["created_unix"] and again["digest"] == first["digest"]

    # Another partitioning of the graph gives the same documents.
    other = config.model_copy(deep=True)
    other.root = str(tmp_path / "run-5")
    other.data.dedup.fuzzy.num_partitions = 5
    moved = run_pipeline(other, UPTO_FUZZY)["dedup_fuzzy"]
    assert [f["sha256"] for f in moved["files"]] == [f["sha256"] for f in first["files"]]


def test_disabled_passes_documents_through(tmp_path, ray_local):
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": "one two three four five six"}, {"text": "one two three four five seven"}])
    config = make_config(tmp_path / "run", [{"name": "a", "paths": [str(tmp_path / "raw")], "weight": 1}])
    manifests = run_pipeline(config, UPTO_FUZZY)
    assert manifests["dedup_fuzzy"]["files"] == manifests["dedup_exact"]["files"]
    assert manifests["dedup_fuzzy"]["stats"]["disabled"] is True


# --- S3 ---------------------------------------------------------------------------------


def test_same_result_with_the_run_root_on_s3(tmp_path, s3_bucket, ray_local):
    """datatrove's folders follow the run root onto S3 (through illada.storage's
    filesystem), and the result is the same as on a local disk, digest for digest."""
    cluster_of = write_clustered_corpus(tmp_path / "raw", random.Random(5), clusters=8)
    sources = [
        {"name": "a", "paths": [str(tmp_path / "raw" / "a")], "weight": 1, "id_field": "id"},
        {"name": "b", "paths": [str(tmp_path / "raw" / "b")], "weight": 1, "id_field": "id"},
    ]
    overrides = ["data.dedup.fuzzy.enabled=true", "data.dedup.fuzzy.num_partitions=2"]
    local = run_pipeline(make_config(tmp_path / "run", sources, overrides), UPTO_FUZZY)["dedup_fuzzy"]
    config = make_config(f"{s3_bucket}/run", sources, overrides)
    on_s3 = run_pipeline(config, UPTO_FUZZY)["dedup_fuzzy"]

    assert on_s3["digest"] == local["digest"]
    assert on_s3["stats"]["clusters"] == len(set(cluster_of.values()))
    assert not storage.exists(storage.join(config.root, "dedup_fuzzy", "_sigs"))  # intermediates cleaned up
    assert storage.list_files(storage.join(config.root, "dedup_fuzzy", "_clusters"))
