"""A corpus for judging fuzzy dedup, and the measures of a result, independent of the code.

Documents are lowercase random words joined by single spaces, so their word 5-gram
shingles are exactly datatrove's (tests/data/test_dedup_fuzzy.py checks this). Planted:
- families: a base text and 1-4 near copies of it (some copies of copies), Jaccard 0.75-1;
- templated pages: a shared header and footer around a short body of their own, so pages
  of one template are at Jaccard ~0.55: LSH finds many such pairs and connected
  components chain a template's pages into one cluster although they are not duplicates;
  a few pages also have a true near copy;
- chains A~B~C(~D): each link replaces another stretch of its predecessor (Jaccard ~0.7),
  so that documents two links apart are below Jaccard 0.5;
- unrelated documents.

Used by tests/data/test_dedup_fuzzy_quality.py and bench/fuzzy_dedup_quality.py.
"""

from __future__ import annotations

import random
from collections import defaultdict
from itertools import combinations

N_GRAMS = 5

_vocab_rng = random.Random(0)
VOCAB = ["".join(_vocab_rng.choices("abcdefghijklmnopqrstuvwxyz", k=7)) for _ in range(40_000)]


def random_words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def replace_run(rng: random.Random, words: list[str], start: int, length: int) -> list[str]:
    return words[:start] + random_words(rng, length) + words[start + length :]


def near_copy(rng: random.Random, words: list[str], similarity: float) -> list[str]:
    """`words` with one stretch replaced, so that its shingle Jaccard to `words` is about
    `similarity` (and below 1: dedup_exact would take exact copies)."""
    n = len(words) - N_GRAMS + 1
    destroyed = max(1, round(n * (1 - similarity) / (1 + similarity)))  # J = (n - d) / (n + d)
    if destroyed <= N_GRAMS or rng.random() < 0.3:  # a run of k words at the start costs k shingles
        return replace_run(rng, words, 0, destroyed)
    run = destroyed - (N_GRAMS - 1)  # inside the text, k + n - 1
    return replace_run(rng, words, rng.randrange(N_GRAMS, len(words) - run - N_GRAMS), run)


def shingles(text: str) -> frozenset[str]:
    words = text.split(" ")
    return frozenset(" ".join(words[i : i + N_GRAMS]) for i in range(len(words) - N_GRAMS + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def build(rng: random.Random, families: int, templates: int, pages_per_template: int, chains: int, unrelated: int) -> list[dict]:
    """The documents ({"id", "text"}), shuffled."""
    docs: list[tuple[str, list[str]]] = []
    for f in range(families):
        family = [random_words(rng, rng.randint(80, 120))]
        for _ in range(rng.randint(1, 4)):
            family.append(near_copy(rng, rng.choice(family), rng.uniform(0.75, 0.99)))
        docs += [(f"family{f}-{k}", words) for k, words in enumerate(family)]
    for t in range(templates):
        header, footer = random_words(rng, 40), random_words(rng, 40)
        for p in range(pages_per_template):
            page = header + random_words(rng, rng.randint(20, 30)) + footer
            docs.append((f"template{t}-{p}", page))
            if rng.random() < 0.15:
                docs.append((f"template{t}-{p}-copy", near_copy(rng, page, rng.uniform(0.9, 0.99))))
    for c in range(chains):
        docs += [(f"chain{c}-{k}", words) for k, words in enumerate(planted_chain(rng, rng.randint(3, 4)))]
    docs += [(f"unrelated{u}", random_words(rng, rng.randint(80, 120))) for u in range(unrelated)]
    rng.shuffle(docs)
    return [{"id": doc_id, "text": " ".join(words)} for doc_id, words in docs]


def planted_chain(rng: random.Random, length: int) -> list[list[str]]:
    """Documents each replacing another stretch of its predecessor: consecutive ones at
    Jaccard 0.706 (116 shingles, 20 replaced), any two links apart at 0.487 or less."""
    while True:
        chain = [random_words(rng, 120)]
        # Stretches 4 words apart or more, so that no shingle overlaps two of them.
        starts = rng.sample(range(N_GRAMS, 120 - 16 - N_GRAMS, 20), length - 1)
        for start in starts:
            chain.append(replace_run(rng, chain[-1], start, 16))
        sets = [shingles(" ".join(words)) for words in chain]
        if all(jaccard(sets[i], sets[j]) < 0.5 for i in range(length) for j in range(i + 2, length)):
            return chain


def similar_pairs(texts: dict[str, str], at_least: float = 1e-9) -> dict[tuple[str, str], float]:
    """The Jaccard of every pair of documents sharing a shingle (others are at 0), by
    brute force over an inverted index: {(id, id): J} for J >= at_least."""
    sets = {doc_id: shingles(text) for doc_id, text in texts.items()}
    holders: dict[str, list[str]] = defaultdict(list)
    for doc_id, s in sets.items():
        for shingle in s:
            holders[shingle].append(doc_id)
    pairs = {pair for ids in holders.values() for pair in combinations(sorted(ids), 2)}
    out = {}
    for a, b in pairs:
        j = jaccard(sets[a], sets[b])
        if j >= at_least:
            out[(a, b)] = j
    return out


def quality(inputs: dict[str, str], kept: set[str], pairs: dict[tuple[str, str], float] | None = None) -> dict:
    """How well a dedup result (the ids `kept` of the documents `inputs`) did:
    - precision: the share of removed documents with a kept document at Jaccard >= 0.6;
    - recall: the share of pairs at Jaccard >= 0.9 of which at most one was kept.
    """
    pairs = similar_pairs(inputs) if pairs is None else pairs
    removed = set(inputs) - kept
    best_kept = dict.fromkeys(removed, 0.0)
    for (a, b), j in pairs.items():
        if a in removed and b in kept:
            best_kept[a] = max(best_kept[a], j)
        if b in removed and a in kept:
            best_kept[b] = max(best_kept[b], j)
    close = [(a, b) for (a, b), j in pairs.items() if j >= 0.9]
    caught = sum(1 for a, b in close if not (a in kept and b in kept))
    return {
        "documents": len(inputs),
        "removed": len(removed),
        "removed_with_kept_within_0.6": sum(1 for j in best_kept.values() if j >= 0.6),
        "precision": sum(1 for j in best_kept.values() if j >= 0.6) / len(removed) if removed else 1.0,
        "pairs_at_0.9": len(close),
        "recall_at_0.9": caught / len(close) if close else 1.0,
    }
