"""dedup_fuzzy removes only true near-duplicates: candidates verified by Jaccard, chains
stopped at each cluster's kept document. Judged by word 5-gram Jaccard computed here,
independently of datatrove and of the stage."""

from __future__ import annotations

import random

import numpy as np
import pytest

from illada.data.near_duplicates import size_bin, stop_chains
from illada.pipeline.runner import run_pipeline
from illada.data.stages import PRETRAIN as STAGES
from tests.data.near_duplicate_corpus import build, jaccard, planted_chain, quality, shingles
from tests.data.test_dedup_fuzzy import output_ids
from tests.helpers import make_config, write_jsonl

UPTO_FUZZY = STAGES[:3]


# --- stop_chains against a plain sequential rendering of the rule -------------------------


def reference_resolution(n: int, edges: list[tuple[int, int]], close: set[tuple[int, int]] | None) -> dict[int, int]:
    """Removed node -> kept node, by the rule as stated: repeatedly, in every cluster of the
    unresolved nodes, keep the earliest and remove those close to it."""
    removed: dict[int, int] = {}
    unresolved = set(range(n))
    while True:
        adjacency = {u: set() for u in unresolved}
        for a, b in edges:
            if a in unresolved and b in unresolved:
                adjacency[a].add(b)
                adjacency[b].add(a)
        seen: set[int] = set()
        next_round: set[int] = set()
        for start in sorted(u for u in unresolved if adjacency[u]):
            if start in seen:
                continue
            cluster, stack = {start}, [start]
            while stack:
                for v in adjacency[stack.pop()] - cluster:
                    cluster.add(v)
                    stack.append(v)
            seen |= cluster
            rep = min(cluster)
            for u in cluster - {rep}:
                if close is None or (min(u, rep), max(u, rep)) in close:
                    removed[u] = rep
                else:
                    next_round.add(u)
        if not next_round:
            return removed
        unresolved = next_round


def resolve(n: int, edges: list[tuple[int, int]], close: set[tuple[int, int]] | None) -> dict[int, int]:
    a = np.array([e[0] for e in edges], dtype=np.int64)
    b = np.array([e[1] for e in edges], dtype=np.int64)
    check = None if close is None else (lambda m, r: np.array([(min(x, y), max(x, y)) in close for x, y in zip(m, r)], dtype=bool))
    rep_of, _ = stop_chains(n, a, b, check)
    return {int(u): int(r) for u, r in enumerate(rep_of) if r >= 0}


def test_a_planted_chain_is_stopped():
    # A=0 ~ B=1 ~ C=2; A and C are not close.
    edges = [(0, 1), (1, 2)]
    assert resolve(3, edges, close={(0, 1), (1, 2)}) == {1: 0}
    assert resolve(3, edges, close=None) == {1: 0, 2: 0}  # connected components remove C too
    # A longer chain: C, left alone, is kept and keeps D in its turn.
    assert resolve(5, [(0, 1), (1, 2), (2, 3), (3, 4)], close={(0, 1), (1, 2), (2, 3), (3, 4)}) == {1: 0, 3: 2}


@pytest.mark.parametrize("seed", range(6))
def test_stop_chains_matches_the_rule_on_random_graphs(seed):
    rng = random.Random(seed)
    n = 60
    edges = [(a, b) for a in range(n) for b in range(a + 1, n) if rng.random() < 0.05]
    close = {e for e in edges if rng.random() < 0.6} | {(a, b) for a in range(n) for b in range(a + 1, n) if rng.random() < 0.1}
    assert resolve(n, edges, close) == reference_resolution(n, edges, close)
    assert resolve(n, edges, None) == reference_resolution(n, edges, None)


def test_size_bins():
    assert [size_bin(s) for s in (2, 3, 4, 5, 8, 9, 517)] == ["2", "3-4", "3-4", "5-8", "5-8", "9-16", "513-1024"]


# --- through the pipeline -----------------------------------------------------------------


def run_fuzzy(tmp_path, docs: list[dict], name: str, overrides: list[str] = ()) -> tuple[dict, dict[str, str], set[str]]:
    """Run ingest..dedup_fuzzy on `docs` (three files); return the fuzzy manifest (with the
    config as "config"), the documents it was given and the ids it kept."""
    raw = tmp_path / name / "raw"
    for f in range(3):
        write_jsonl(raw / f"{f}.jsonl", docs[f::3])
    sources = [{"name": "web", "paths": [str(raw)], "weight": 1, "id_field": "id"}]
    config = make_config(tmp_path / name / "run", sources, ["data.dedup.fuzzy.enabled=true", "data.dedup.fuzzy.num_partitions=3", *overrides])
    manifests = run_pipeline(config, UPTO_FUZZY)
    texts = {d["id"]: d["text"] for d in docs}
    inputs = {i: texts[i] for i in output_ids(config.root, manifests["dedup_exact"])}
    return manifests["dedup_fuzzy"] | {"config": config}, inputs, set(output_ids(config.root, manifests["dedup_fuzzy"]))


def stage_metrics(config, stage: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from illada.tracking import experiment_name, tracking_uri

    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(experiment_name(config)).experiment_id
    # The store may be shared by the session's tests: the latest run of the stage is this one.
    [run] = client.search_runs([experiment], f"tags.`illada.stage` = '{stage}'", order_by=["attributes.start_time DESC"], max_results=1)
    return run.data.metrics


def test_planted_chains_keep_their_far_end(tmp_path, ray_local):
    """With bands fine enough that every link (J 0.706) is a candidate, components remove
    whole chains; chain stopping keeps every document two links from the kept one."""
    rng = random.Random(3)
    chains = [planted_chain(rng, 3) for _ in range(5)]
    docs = [{"id": f"chain{c}-{k}", "text": " ".join(words)} for c, chain in enumerate(chains) for k, words in enumerate(chain)]
    for c in range(5):
        a, b, c_ = (shingles(docs[3 * c + k]["text"]) for k in range(3))
        assert jaccard(a, b) >= 0.7 and jaccard(b, c_) >= 0.7 and jaccard(a, c_) < 0.5
    bands = ["data.dedup.fuzzy.num_buckets=40", "data.dedup.fuzzy.hashes_per_bucket=4"]

    stopped, _, kept = run_fuzzy(tmp_path, docs, "stopped", bands)
    assert kept == {f"chain{c}-{k}" for c in range(5) for k in (0, 2)}
    assert stopped["stats"]["kept_by_chain_stopping"] == 5
    assert stopped["stats"]["cluster_sizes"] == {"2": 5} and stopped["stats"]["component_sizes"] == {"3-4": 5}
    metrics = stage_metrics(stopped["config"], "dedup_fuzzy")
    assert metrics["near_duplicates"] == 5 and metrics["cluster_sizes.2"] == 5
    assert metrics["candidate_pairs"] == stopped["stats"]["candidate_pairs"] >= metrics["verified_pairs"] == stopped["stats"]["verified_pairs"] >= 10

    chained, _, kept = run_fuzzy(tmp_path, docs, "components", [*bands, "data.dedup.fuzzy.chain_stopping=false"])
    assert kept == {f"chain{c}-0" for c in range(5)}
    assert chained["stats"]["cluster_sizes"] == {"3-4": 5}


def test_removals_are_near_duplicates_of_kept_documents(tmp_path, ray_local):
    """On families, templated pages and chains, with the default bands and threshold:
    >= 97% of the removed documents have a kept one within Jaccard 0.6, and pairs at
    Jaccard >= 0.9 are still caught (>= 0.99)."""
    docs = build(random.Random(1), families=60, templates=2, pages_per_template=40, chains=30, unrelated=60)
    manifest, inputs, kept = run_fuzzy(tmp_path, docs, "default")
    measured = quality(inputs, kept)

    assert measured["pairs_at_0.9"] >= 80 and measured["removed"] >= 100, measured
    assert measured["precision"] >= 0.97, measured
    assert measured["recall_at_0.9"] >= 0.99, measured
    stats = manifest["stats"]
    assert stats["near_duplicates"] == measured["removed"] == stats["documents_in"] - stats["documents_out"]
    assert stats["candidate_pairs"] > stats["verified_pairs"] > 0  # the templates' pairs were dropped
    assert sum(stats["cluster_sizes"].values()) == stats["clusters"]
