"""Stage 5, tokenize: documents -> token ids, on Ray Data tasks.

A unit of work is a range of rows of a document file: a Ray Data task reads it, encodes it
with `Tokenizer.encode_batch_fast` and writes `tokens/<source>/<file>.<start>-<stop>.parquet`
atomically. Ray runs one task per CPU, so each task encodes on its own core (tokenizers'
thread pool, which would take every core in every task, is turned off). Tasks run in Ray's
warm worker processes, each of which loads the tokenizer once. The driver records each
part's result as a completion marker as it streams in, so an interrupted run resumes with
the parts not yet done.

With at least `PARTS_PER_CPU` files per CPU every file is one part; with fewer, files are
cut into row ranges so that no core idles through a long last round. The cut depends on
the cluster's size, so parts name their rows (a resume on another cluster redoes what no
longer matches), and the pack stage reads a file's parts as one stream: its output does
not depend on the cut.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow as pa
import ray
from tokenizers import Tokenizer
from tqdm import tqdm

from illada import storage
from illada.config import StorageConfig
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


def tokenize_files(batch: dict[str, np.ndarray], tokenizer_url: str, tokenizer_sha256: str, storage_config: StorageConfig, batch_size: int) -> dict[str, list]:
    """A Ray Data task: tokenizes the parts of document files named in `batch`."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read at every encode call
    storage.configure(storage_config)
    tokenizer = load_tokenizer(tokenizer_url, tokenizer_sha256)
    parts = zip(batch["src"], batch["start"], batch["stop"], batch["dst"])
    results = [tokenize_file(tokenizer, str(src), (int(start), int(stop)), str(dst), batch_size) for src, start, stop, dst in parts]
    return {"task": list(batch["task"]), "result": results}


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


PARTS_PER_CPU = 4


def run_tokenize(ctx: StageContext) -> dict:
    cfg = ctx.config.data.tokenize
    docs = ctx.input_files("decontaminate", "documents")
    workers = cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    specs = {}
    for i, f in enumerate(docs):
        for start, stop in row_ranges(f, docs, PARTS_PER_CPU * workers):
            tid = f"{i:06d}.{start}-{stop}"
            src = ctx.absolute(f["path"])
            specs[tid] = {"src": src, "start": start, "stop": stop, "dst": ctx.path("tokens", f["source"], f"{tid}.parquet"), "source": f["source"], "document_file": i}
    done = ctx.completed("encode")
    pending = [{"task": tid, **{k: s[k] for k in ("src", "start", "stop", "dst")}} for tid, s in specs.items() if tid not in done]
    pending.sort(key=lambda p: p["start"] - p["stop"])  # largest first: the last round is short
    if pending:
        tokenizer_file = ctx.inputs["tokenizer"]["files"][0]
        dataset = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
            tokenize_files,
            fn_kwargs={
                "tokenizer_url": tokenizer_url(ctx.inputs["tokenizer"], ctx.root),
                "tokenizer_sha256": tokenizer_file["sha256"],
                "storage_config": storage.without_credentials(ctx.config.storage),
                "batch_size": cfg.batch_size,
            },
            batch_size=1,
            num_cpus=1,
            **_concurrency(cfg.num_workers),
            **storage.worker_env(ctx.config.storage),
        )
        with tqdm(total=len(specs), initial=len(specs) - len(pending), desc="tokenize/encode", unit="part") as bar:
            for row in dataset.iter_rows():
                ctx.mark_done("encode", row["task"], row["result"])
                bar.update(1)
        done = ctx.completed("encode")

    files, per_source = [], {}
    for tid, spec in specs.items():
        r = done[tid]
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
    return {"files": files, "stats": {"sources": per_source, "tokens": sum(s["tokens"] for s in per_source.values())}}


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


def _concurrency(num_workers: int | None) -> dict:
    return {"concurrency": num_workers} if num_workers else {}


STAGE = Stage(
    name="tokenize",
    inputs=("decontaminate", "tokenizer"),
    run=run_tokenize,
    identity=lambda config: {"batch_size": config.data.tokenize.batch_size},
    description="Encode documents to token ids with batch encoding, one Ray Data task per file and CPU.",
)
