"""Stage 5, tokenize: documents -> token ids, on Ray tasks.

A unit of work is a range of rows of a document file: a Ray task reads it, encodes it with
`Tokenizer.encode_batch_fast` and writes `tokens/<source>/<file>.<start>-<stop>.parquet`
atomically. Ray runs one task per CPU, so each task encodes on its own core (tokenizers'
thread pool, which would take every core in every task, is turned off). Tasks run in Ray's
warm worker processes, each of which loads the tokenizer once. Each finished part is
recorded as it comes in (`StageContext.run_tasks`), so an interrupted or failed run
resumes with the parts not yet done.

With at least `PARTS_PER_CPU` files per CPU every file is one part; with fewer, files are
cut into row ranges so that no core idles through a long last round. The cut depends on
the cluster's size, so parts name their rows (a resume on another cluster redoes what no
longer matches), and the pack stage reads a file's parts as one stream: its output does
not depend on the cut.

The stage also counts, per benchmark, the tokens of the documents the decontaminate stage
took out (or flagged): that stage runs before the tokenizer exists and counts words.
"""

from __future__ import annotations

import functools
import os
from collections import Counter

import pyarrow as pa
import ray
from tokenizers import Tokenizer

from illada import storage
from illada.data.documents import DocumentWriter, iter_batches
from illada.data.special_tokens import plain_text
from illada.data.tokenizer import tokenizer_url
from illada.pipeline.stage import Stage, StageContext, file_entry

TOKENS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("tokens", pa.large_list(pa.int32()), nullable=False),
    ]
)


def encode(tokenizer: Tokenizer, texts: list[str]) -> pa.LargeListArray:
    """Token ids of each text, as one Arrow list array (no per-token Python objects).
    `tokenizer` must be `plain_text`: raw text never yields special ids."""
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return pa.array([e.ids for e in encodings], type=pa.large_list(pa.int32()))


@functools.lru_cache(maxsize=4)
def load_tokenizer(url: str, sha256: str) -> Tokenizer:
    """The tokenizer at `url`, once per worker process. Keyed by its checksum too: a
    retrained tokenizer at the same URL is loaded afresh by a long-lived worker."""
    return plain_text(Tokenizer.from_str(storage.read_bytes(url).decode()))


def task_tokenizer(spec: dict) -> Tokenizer:
    """The tokenizer a task's spec names, encoding on the task's one core only."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read at every encode call
    return load_tokenizer(spec["tokenizer_url"], spec["tokenizer_sha256"])


def tokenize_part(spec: dict) -> dict:
    """A Ray task: tokenize rows [start, stop) of one document file on one core."""
    return tokenize_file(task_tokenizer(spec), spec["src"], (spec["start"], spec["stop"]), spec["dst"], spec["batch_size"])


def tokenize_file(tokenizer: Tokenizer, src: str, rows: tuple[int, int], dst: str, batch_size: int) -> dict:
    """Tokenize rows [start, stop) of the document file `src` into the tokens file `dst`."""
    tokens = documents = 0
    with DocumentWriter(dst, schema=TOKENS_SCHEMA) as writer:
        for batch in iter_batches(src, columns=["id", "source", "text"], batch_size=batch_size, rows=rows):
            ids = encode(tokenizer, batch.column("text").to_pylist())
            writer.write_table(pa.table({"id": batch.column("id"), "source": batch.column("source"), "tokens": ids}))
            tokens += len(ids.values)
            documents += batch.num_rows
    return {"documents": documents, "tokens": tokens, "tokens_file": writer.info}


def count_contaminated_tokens(spec: dict) -> dict:
    """A Ray task: the tokens, per benchmark, of the documents in one of the decontaminate
    stage's `contaminated` files (a document matching two benchmarks counts for both)."""
    tokenizer = task_tokenizer(spec)
    counts = Counter()
    for batch in iter_batches(spec["src"], columns=["text", "benchmarks"], batch_size=spec["batch_size"]):
        lengths = encode(tokenizer, batch.column("text").to_pylist()).value_lengths().to_pylist()
        for n, benchmarks in zip(lengths, batch.column("benchmarks").to_pylist()):
            counts.update(dict.fromkeys(benchmarks, n))
    return dict(counts)


PARTS_PER_CPU = 4


def run_tokenize(ctx: StageContext) -> dict:
    cfg = ctx.config.data.tokenize
    docs = ctx.input_files("decontaminate", "documents")
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(cfg.num_workers or cpus, cpus)
    tokenizer = {
        "tokenizer_url": tokenizer_url(ctx.inputs["tokenizer"], ctx.root),
        "tokenizer_sha256": ctx.inputs["tokenizer"]["files"][0]["sha256"],
        "batch_size": cfg.batch_size,
    }
    specs = {}
    for i, f in enumerate(docs):
        for start, stop in row_ranges(f, docs, PARTS_PER_CPU * workers):
            tid = f"{i:06d}.{start}-{stop}"
            dst = ctx.path("tokens", f["source"], f"{tid}.parquet")
            specs[tid] = {"src": ctx.absolute(f["path"]), "start": start, "stop": stop, "dst": dst, "source": f["source"], "document_file": i, **tokenizer}
    largest_first = dict(sorted(specs.items(), key=lambda item: item[1]["start"] - item[1]["stop"]))  # a short last round
    results = ctx.run_tasks("encode", tokenize_part, largest_first, num_cpus=cpus / workers)
    files, per_source = [], {}
    for tid, spec in specs.items():
        r = results[tid]
        info = r["tokens_file"]
        files.append(
            file_entry(
                ctx, spec["dst"], "tokens", info["sha256"], info["bytes"],
                rows=info["rows"], source=spec["source"], document_file=spec["document_file"], order=len(files),
            )
        )
        s = per_source.setdefault(spec["source"], {"documents": 0, "tokens": 0})
        s["documents"] += r["documents"]
        s["tokens"] += r["tokens"]
    stats = {"sources": per_source, "tokens": sum(s["tokens"] for s in per_source.values())}
    return {"files": files, "stats": stats | {"contaminated_tokens": _contaminated_tokens(ctx, tokenizer)}}


def _contaminated_tokens(ctx: StageContext, tokenizer: dict) -> dict[str, int]:
    """Per benchmark, the tokens of what decontamination took out (or flagged): it ran
    before there was a tokenizer, so it could count only words."""
    side = [f for f in ctx.input_files("decontaminate", "contaminated") if f.get("rows")]
    specs = {f"{i:06d}": {"src": ctx.absolute(f["path"]), **tokenizer} for i, f in enumerate(side)}
    totals = sum((Counter(c) for c in ctx.run_tasks("count_contaminated", count_contaminated_tokens, specs).values()), Counter())
    return dict(sorted(totals.items()))


def row_ranges(file: dict, files: list[dict], units: int) -> list[tuple[int, int]]:
    """The (start, stop) row ranges `file` is cut into: one range when there are `units`
    files or more, else a share of `units` by its bytes (at most one per row)."""
    rows = file["rows"]
    if len(files) >= units or rows <= 1:
        return [(0, rows)]
    total = sum(f["bytes"] for f in files) or 1
    parts = min(rows, max(1, round(units * file["bytes"] / total)))
    cuts = [rows * j // parts for j in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


STAGE = Stage(
    name="tokenize",
    inputs=("decontaminate", "tokenizer"),
    run=run_tokenize,
    identity=lambda config: {"batch_size": config.data.tokenize.batch_size},
    description="Encode documents to token ids with batch encoding, one Ray task per CPU and file (or part of a file).",
)
