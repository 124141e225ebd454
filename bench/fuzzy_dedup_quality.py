"""Fuzzy dedup quality: how many removals are true near-duplicates, and recall at J >= 0.9.

One corpus of near-duplicate families, templated pages and planted chains
(tests/data/near_duplicate_corpus.py), deduplicated in the same run three ways:
- components: the old behaviour, every LSH candidate an edge, every member of a connected
  component but the earliest removed (jaccard_threshold=0, chain_stopping=false);
- verified: candidates checked by shingle Jaccard, components as before (chain_stopping=false);
- chain-stopped: the default, a member removed only if within the threshold of its
  cluster's kept document.
Precision and recall are measured on word 5-gram shingles by the corpus module, not by the
stage.

    PYTHONPATH=. python bench/fuzzy_dedup_quality.py [--scale 4] [--cpus 2]
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from pathlib import Path

import ray

from illada.config import RayConfig, load_config
from illada.data.documents import read_table
from illada import storage
from illada.pipeline.runner import run_pipeline
from illada.ray_runtime import ensure_ray
from illada.data.stages import PRETRAIN as STAGES
from tests.data.near_duplicate_corpus import build, quality, similar_pairs
from tests.helpers import write_jsonl

MODES = {
    "components (old)": ["data.dedup.fuzzy.jaccard_threshold=0", "data.dedup.fuzzy.chain_stopping=false"],
    "verified": ["data.dedup.fuzzy.chain_stopping=false"],
    "chain-stopped (default)": [],
}


def ids(root: str, manifest: dict) -> list[str]:
    out = []
    for f in sorted(manifest["files"], key=lambda f: f["order"]):
        out += read_table(storage.join(root, f["path"]), columns=["id"]).column("id").to_pylist()
    return out


def run_mode(work: Path, raw: Path, name: str, overrides: list[str], cpus: int) -> tuple[dict, list[str], float, list[str]]:
    base = {
        "name": "bench-fuzzy",
        "root": str(work / name.split()[0]),
        "ray": {"num_cpus": cpus},
        "data": {"sources": [{"name": "web", "paths": [str(raw)], "weight": 1, "id_field": "id"}], "dedup": {"exact": {"num_partitions": 4}, "fuzzy": {"num_partitions": 4}}},
    }
    config = load_config(None, overrides, base=base)
    start = time.perf_counter()
    manifests = run_pipeline(config, STAGES[:3])
    seconds = time.perf_counter() - start  # ingest and exact dedup included, the same in every mode
    return manifests["dedup_fuzzy"], ids(config.root, manifests["dedup_fuzzy"]), seconds, ids(config.root, manifests["dedup_exact"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=4, help="Corpus size as multiples of the CI test's (~470 documents).")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    docs = build(random.Random(args.seed), families=60 * args.scale, templates=2 * args.scale, pages_per_template=40, chains=30 * args.scale, unrelated=60 * args.scale)
    ensure_ray(RayConfig(num_cpus=args.cpus))  # started before any mode is timed
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for f in range(4):
            write_jsonl(work / "raw" / f"{f}.jsonl", docs[f::4])
        texts = {d["id"]: d["text"] for d in docs}
        rows = []
        pairs = None
        for name, overrides in MODES.items():
            manifest, kept, seconds, inputs = run_mode(work, work / "raw", name, overrides, args.cpus)
            given = {i: texts[i] for i in inputs}
            pairs = similar_pairs(given) if pairs is None else pairs
            rows.append((name, manifest["stats"], quality(given, set(kept), pairs), seconds))
    ray.shutdown()

    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {args.cpus} Ray CPUs, {len(docs)} documents (scale {args.scale})\n")
    print("| mode | removed | removals with a kept doc at J ≥ 0.6 | recall at J ≥ 0.9 | candidate pairs | verified pairs | largest cluster | kept by chain stopping | seconds |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for name, stats, q, seconds in rows:
        largest = list(stats["cluster_sizes"])[-1] if stats["cluster_sizes"] else "-"
        print(
            f"| {name} | {q['removed']:,} | {q['precision']:.3f} ({q['removed_with_kept_within_0.6']:,}) | "
            f"{q['recall_at_0.9']:.4f} of {q['pairs_at_0.9']:,} | {stats['candidate_pairs']:,} | {stats['verified_pairs']:,} | "
            f"{largest} | {stats['kept_by_chain_stopping']:,} | {seconds:.1f} |"
        )
    old, new = rows[0], rows[-1]
    print(f"\nprecision: {new[2]['precision']:.3f} vs {old[2]['precision']:.3f} (components); recall at 0.9: {new[2]['recall_at_0.9']:.4f} vs {old[2]['recall_at_0.9']:.4f}; time ×{new[3] / old[3]:.2f}")


if __name__ == "__main__":
    main()
