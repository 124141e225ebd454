"""Stage 4, decontaminate: keep evaluation data out of the training data.

A document is contaminated by a benchmark when it shares a word n-gram (13 words by
default; words are lowercased `\\w+` runs) with one of the benchmark's texts. A text
shorter than the n-gram but of at least `min_words` words is matched whole; a shorter one
is too common to judge by and is skipped (counted in the manifest).

1. index:  on the driver, the n-gram hashes of every evaluation text (the project's lm-eval
           task data, illada/eval/tasks/*.jsonl, and the configured eval sets), written to
           `_index.parquet`: evaluation sets are small beside a corpus.
2. match:  per document file, the hashes of its documents' n-grams of each indexed length
           against the index. A contaminated document goes to `contaminated/` with its
           benchmarks and the first matching n-gram as the reason (action remove), or stays
           with the benchmarks in its metadata's `contamination` (action flag; also listed in
           `contaminated/`). Nothing is dropped silently.

The manifest counts, per benchmark, the documents and words contaminated; a document
matching two benchmarks counts for both. Words, not tokens: the tokenizer is trained
after this stage, on what it keeps; the tokenize stage counts the same documents' tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from illada import storage
from illada.config import Config, ConfigError, DecontaminateConfig
from illada.data.dedup_exact import passthrough
from illada.data.documents import DOCUMENT_SCHEMA, DocumentWriter, iter_batches, read_table
from illada.pipeline.stage import Stage, StageContext, file_entry

PROJECT_TASKS = Path(__file__).resolve().parents[1] / "eval" / "tasks"
WORD = re.compile(r"\w+")
MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial hash of a word sequence
INDEX_SCHEMA = pa.schema([("length", pa.int32()), ("hash", pa.uint64()), ("benchmark", pa.int32())])
CONTAMINATED_SCHEMA = pa.schema([*DOCUMENT_SCHEMA, pa.field("benchmarks", pa.list_(pa.string())), pa.field("reason", pa.string())])


# --- n-grams ------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def word_hashes(word_list: list[str]) -> np.ndarray:
    return np.fromiter((xxhash.xxh64_intdigest(w.encode()) for w in word_list), dtype=np.uint64, count=len(word_list))


def gram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """The 64-bit hash of every run of n consecutive words (empty if there are fewer)."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.zeros(m, dtype=np.uint64)
    for j in range(n):  # uint64 arithmetic wraps: a polynomial hash modulo 2^64
        acc = acc * MULTIPLIER + word_hashes[j : j + m]
    return acc


# --- the evaluation index -----------------------------------------------------------------


def eval_sets(cfg: DecontaminateConfig) -> list[dict]:
    """The benchmarks to match: {name, url, fields}; project tasks first, by file name."""
    sets = []
    if cfg.project_tasks:
        sets += [{"name": p.stem, "url": str(p), "fields": None} for p in sorted(PROJECT_TASKS.glob("*.jsonl"))]
    sets += [{"name": e.name, "url": e.path, "fields": e.fields} for e in cfg.eval_sets]
    names = [s["name"] for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"data.decontaminate.eval_sets: {', '.join(repeated)} is also a project task's name; name it otherwise")
    return sets


def eval_texts(record: dict, fields: list[str] | None) -> list[str]:
    """The evaluation texts of one record: each string (or string in a list) of its fields."""
    values = [record.get(f) for f in fields] if fields is not None else list(record.values())
    out = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        out += [v for v in items if isinstance(v, str)]
    return out


def read_eval_records(url: str) -> list[dict]:
    if not storage.exists(url):
        raise ConfigError(f"data.decontaminate: eval set {url} does not exist")
    records = []
    for i, line in enumerate(storage.read_bytes(url).decode().splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.decontaminate: {url} line {i + 1} is not JSON ({e.msg}); fix the eval set") from None
    return records


def build_index(cfg: DecontaminateConfig, benchmarks: list[dict]) -> tuple[pa.Table, dict]:
    """The n-gram hashes of every benchmark's texts, and per benchmark how many texts were
    indexed and how many were too short."""
    lengths, hashes, owners = [], [], []
    counts = {}
    for b, bench in enumerate(benchmarks):
        indexed = short = 0
        for record in read_eval_records(bench["url"]):
            for text in eval_texts(record, bench["fields"]):
                w = words(text)
                if len(w) < cfg.min_words:
                    short += 1
                    continue
                n = min(cfg.ngram, len(w))
                g = gram_hashes(word_hashes(w), n)
                lengths.append(np.full(g.size, n, dtype=np.int32))
                hashes.append(g)
                owners.append(np.full(g.size, b, dtype=np.int32))
                indexed += 1
        counts[bench["name"]] = {"texts": indexed, "too_short": short}
    if not hashes:
        return INDEX_SCHEMA.empty_table(), counts
    index = pa.table({"length": np.concatenate(lengths), "hash": np.concatenate(hashes), "benchmark": np.concatenate(owners)}, schema=INDEX_SCHEMA)
    return index.group_by(["length", "hash", "benchmark"]).aggregate([]).sort_by([("length", "ascending"), ("hash", "ascending")]), counts


# --- matching -----------------------------------------------------------------------------


class Matcher:
    """Finds the benchmarks a text shares an indexed n-gram with."""

    def __init__(self, index: pa.Table, names: list[str]):
        self.names = names
        length = index.column("length").to_numpy()
        self.by_length = {}
        for n in np.unique(length):
            rows = index.filter(pa.array(length == n))
            self.by_length[int(n)] = (rows.column("hash").to_numpy(), rows.column("benchmark").to_numpy())

    def match(self, text: str) -> tuple[list[str], list[str], int]:
        """The benchmarks matched (in index order), the first matching n-gram and the text's
        number of words."""
        w = words(text)
        hashed = word_hashes(w)
        found: set[int] = set()
        first: tuple[int, int] | None = None  # (position, length)
        for n, (hashes, owners) in self.by_length.items():  # hashes sorted: a binary search per n-gram
            grams = gram_hashes(hashed, n)
            lo = np.searchsorted(hashes, grams, "left")
            hit = np.flatnonzero(hashes[np.minimum(lo, len(hashes) - 1)] == grams)
            if hit.size == 0:
                continue
            hi = np.searchsorted(hashes, grams[hit], "right")
            for a, b in zip(lo[hit], hi):
                found.update(owners[a:b].tolist())
            if first is None or hit[0] < first[0]:
                first = (int(hit[0]), n)
        if not found:
            return [], [], len(w)
        pos, n = first
        return [self.names[b] for b in sorted(found)], w[pos : pos + n], len(w)


def match_task(spec: dict) -> dict:
    """Split one document file into clean and contaminated documents."""
    matcher = Matcher(read_table(spec["index_url"]), spec["benchmarks"])
    flag = spec["action"] == "flag"
    counts = {name: {"documents": 0, "words": 0} for name in spec["benchmarks"]}
    documents_in = 0
    with DocumentWriter(spec["out_url"]) as out, DocumentWriter(spec["contaminated_url"], schema=CONTAMINATED_SCHEMA) as side:
        for batch in iter_batches(spec["docs_url"]):
            for row in batch.to_pylist():
                documents_in += 1
                benchmarks, ngram, n_words = matcher.match(row["text"])
                if not benchmarks:
                    out.write(**row)
                    continue
                for name in benchmarks:
                    counts[name]["documents"] += 1
                    counts[name]["words"] += n_words
                reason = f"shares a {len(ngram)}-word n-gram with {', '.join(benchmarks)}: \"{' '.join(ngram)}\""
                side.write(**row, benchmarks=benchmarks, reason=reason)
                if flag:
                    metadata = json.loads(row["metadata"] or "{}") | {"contamination": benchmarks}
                    out.write(**{**row, "metadata": json.dumps(metadata, sort_keys=True)})
    return {"source": spec["source"], "documents_in": documents_in, "contaminated": side.info["rows"], "benchmarks": counts, "docs": out.info, "side": side.info}


# --- the stage ----------------------------------------------------------------------------


def run_decontaminate(ctx: StageContext) -> dict:
    docs = ctx.input_files("dedup_fuzzy", "documents")
    cfg = ctx.config.data.decontaminate
    if not cfg.enabled:
        return passthrough(docs, ctx.stage)
    benchmarks = eval_sets(cfg)
    index, indexed = build_index(cfg, benchmarks)
    index_url = ctx.path("_index.parquet")
    with storage.open_atomic(index_url) as f:
        pq.write_table(index, f, compression="zstd")
    names = [b["name"] for b in benchmarks]
    specs = {
        f"{i:06d}": {
            "docs_url": ctx.absolute(f["path"]),
            "source": f["source"],
            "index_url": index_url,
            "benchmarks": names,
            "action": cfg.action,
            "out_url": ctx.path("docs", f["path"].split("/", 2)[-1]),
            "contaminated_url": ctx.path("contaminated", f["path"].split("/", 2)[-1]),
        }
        for i, f in enumerate(docs)
    }
    results = ctx.run_tasks("match", match_task, specs)
    return _manifest_body(ctx, specs, results, cfg, indexed)


def _manifest_body(ctx: StageContext, specs: dict, results: dict, cfg: DecontaminateConfig, indexed: dict) -> dict:
    files, sources = [], {}
    benchmarks = {name: {"documents": 0, "words": 0, **counts} for name, counts in indexed.items()}
    for tid in sorted(results):
        r, spec = results[tid], specs[tid]
        files.append(file_entry(ctx, spec["out_url"], "documents", r["docs"]["sha256"], r["docs"]["bytes"], rows=r["docs"]["rows"], source=r["source"], order=len(files)))
        files.append(file_entry(ctx, spec["contaminated_url"], "contaminated", r["side"]["sha256"], r["side"]["bytes"], rows=r["side"]["rows"], source=r["source"]))
        s = sources.setdefault(r["source"], {"documents_in": 0, "contaminated": 0, "documents_out": 0})
        s["documents_in"] += r["documents_in"]
        s["contaminated"] += r["contaminated"]
        s["documents_out"] += r["docs"]["rows"]
        for name, counts in r["benchmarks"].items():
            benchmarks[name]["documents"] += counts["documents"]
            benchmarks[name]["words"] += counts["words"]
    stats = {
        "action": cfg.action,
        "ngram": cfg.ngram,
        "sources": sources,
        "documents_in": sum(s["documents_in"] for s in sources.values()),
        "contaminated": sum(s["contaminated"] for s in sources.values()),
        "documents_out": sum(s["documents_out"] for s in sources.values()),
        "benchmarks": benchmarks,
    }
    return {"files": files, "stats": stats}


def _identity(config: Config) -> dict:
    # The evaluation sets' contents decide what is removed, so their digests are part of it.
    cfg = config.data.decontaminate
    sets = eval_sets(cfg) if cfg.enabled else []
    return {**cfg.model_dump(mode="json"), "sets": {s["name"]: hashlib.sha256(_read_or_empty(s["url"])).hexdigest() for s in sets}}


def _read_or_empty(url: str) -> bytes:
    return storage.read_bytes(url) if storage.exists(url) else b""


STAGE = Stage(
    name="decontaminate",
    inputs=("dedup_fuzzy",),
    run=run_decontaminate,
    identity=_identity,
    description="Remove (or flag) documents sharing a long word n-gram with an evaluation set; each with its reason in contaminated/.",
)
