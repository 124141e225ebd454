"""Which MinHash candidates are near-duplicates: the Jaccard of their shingles, and chain stopping.

LSH buckets propose pairs whose signatures share a band; some are below the threshold
(the S-curve's tail). `jaccard` checks a pair on the very shingles the signatures were
made from (datatrove's hashed word n-grams).

Connected components chain: A~B and B~C put A, B and C in one cluster although A and C
may share little. `stop_chains` removes a member only if it is within the threshold of
its cluster's kept representative (the earliest document); the members that are not are
clustered again among themselves, by the same edges, until no cluster is left.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def unique_shingles(shingles: np.ndarray) -> np.ndarray:
    """A document's shingle set as a sorted uint64 array (datatrove gives one per n-gram)."""
    return np.unique(np.asarray(shingles, dtype=np.uint64).ravel())


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two sorted, duplicate-free arrays; 0 when both are empty."""
    common = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - common
    return common / union if union else 0.0


def stop_chains(
    num_nodes: int,
    a: np.ndarray,
    b: np.ndarray,
    close_to_rep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, int]:
    """Resolve clusters of nodes 0..num_nodes-1 (lower index = earlier document) joined by
    the edges (a[i], b[i]).

    Each round takes the connected components of the edges between unresolved nodes; a
    component's smallest node is kept as its representative, and every other member that
    `close_to_rep(members, reps)` accepts is removed in its favour. The rest stay
    unresolved for the next round. `close_to_rep=None` accepts everyone: plain connected
    components, in one round.

    Returns each node's representative (-1 where the node is kept) and the rounds taken.
    """
    rep_of = np.full(num_nodes, -1, dtype=np.int64)
    unresolved = np.ones(num_nodes, dtype=bool)
    index = np.arange(num_nodes)
    rounds = 0
    while True:
        live = unresolved[a] & unresolved[b]
        if not live.any():
            return rep_of, rounds
        rounds += 1
        graph = coo_matrix((np.ones(int(live.sum()), dtype=np.int8), (a[live], b[live])), shape=(num_nodes, num_nodes))
        _, component = connected_components(graph, directed=False)
        in_cluster = np.zeros(num_nodes, dtype=bool)
        in_cluster[a[live]] = in_cluster[b[live]] = True
        members = index[in_cluster]
        smallest = np.full(component.max() + 1, num_nodes, dtype=np.int64)
        np.minimum.at(smallest, component[members], members)
        reps = smallest[component[members]]
        others, their_reps = members[members != reps], reps[members != reps]
        close = np.ones(others.size, dtype=bool) if close_to_rep is None else close_to_rep(others, their_reps)
        rep_of[others[close]] = their_reps[close]
        unresolved[:] = False
        unresolved[others[~close]] = True


def size_bin(size: int) -> str:
    """A cluster size's histogram bin: 2, 3-4, 5-8, 9-16, ..."""
    hi = 1 << max(1, (size - 1).bit_length())
    lo = hi // 2 + 1
    return str(hi) if lo >= hi else f"{lo}-{hi}"


def size_histogram(sizes: np.ndarray) -> dict[str, int]:
    hist: dict[str, int] = {}
    for size, count in zip(*np.unique(sizes, return_counts=True)):
        key = size_bin(int(size))
        hist[key] = hist.get(key, 0) + int(count)
    return hist


def merge_histograms(hists: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for hist in hists:
        for key, count in hist.items():
            out[key] = out.get(key, 0) + count
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split("-")[0])))
