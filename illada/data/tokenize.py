"""Stage 5, tokenize: documents -> token ids, on a Ray Data actor pool.

Each document file is one unit of work. Ray Data schedules the files over a pool of
actors that each load the tokenizer once and encode with `Tokenizer.encode_batch` (Rust,
multi-threaded). An actor writes `tokens/<source>/<n>.parquet` atomically and yields the
file's result; the driver records each as a completion marker as it streams in, so an
interrupted run resumes with the files not yet done.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
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


class TokenizeFiles:
    """A Ray Data actor: loads the tokenizer once, then tokenizes whole files."""

    def __init__(self, tokenizer_url: str, storage_config: StorageConfig, batch_size: int):
        storage.configure(storage_config)
        self.tokenizer = plain_text(Tokenizer.from_str(storage.read_bytes(tokenizer_url).decode()))
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        results = [self.tokenize_file(str(tid), str(src), str(dst)) for tid, src, dst in zip(batch["task"], batch["src"], batch["dst"])]
        return {"task": list(batch["task"]), "result": results}

    def tokenize_file(self, task: str, src: str, dst: str) -> dict:
        tokens = documents = 0
        source = None
        with DocumentWriter(dst, schema=TOKENS_SCHEMA) as writer:
            for batch in iter_batches(src, columns=["id", "source", "text"], batch_size=self.batch_size):
                ids = encode(self.tokenizer, batch.column("text").to_pylist())
                writer.write_table(pa.table({"id": batch.column("id"), "source": batch.column("source"), "tokens": ids}))
                tokens += len(ids.values)
                documents += batch.num_rows
                source = source or (batch.column("source")[0].as_py() if batch.num_rows else None)
        return {"documents": documents, "tokens": tokens, "tokens_file": writer.info}


def run_tokenize(ctx: StageContext) -> dict:
    cfg = ctx.config.data.tokenize
    docs = ctx.input_files("decontaminate", "documents")
    specs = {
        f"{i:06d}": {"src": ctx.absolute(f["path"]), "dst": ctx.path("tokens", f["source"], f"{i:06d}.parquet"), "source": f["source"]}
        for i, f in enumerate(docs)
    }
    done = ctx.completed("encode")
    pending = [{"task": tid, "src": s["src"], "dst": s["dst"]} for tid, s in specs.items() if tid not in done]
    if pending:
        workers = cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        dataset = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
            TokenizeFiles,
            fn_constructor_args=(tokenizer_url(ctx.inputs["tokenizer"], ctx.root), storage.without_credentials(ctx.config.storage), cfg.batch_size),
            batch_size=1,
            compute=ActorPoolStrategy(min_size=1, max_size=min(workers, len(pending))),
            num_cpus=1,
            **storage.worker_env(ctx.config.storage),
        )
        with tqdm(total=len(specs), initial=len(specs) - len(pending), desc="tokenize/encode", unit="file") as bar:
            for row in dataset.iter_rows():
                ctx.mark_done("encode", row["task"], row["result"])
                bar.update(1)
        done = ctx.completed("encode")

    files, per_source = [], {}
    for tid, spec in specs.items():
        r = done[tid]
        info = r["tokens_file"]
        files.append(file_entry(ctx, spec["dst"], "tokens", info["sha256"], info["bytes"], rows=info["rows"], source=spec["source"], order=len(files)))
        s = per_source.setdefault(spec["source"], {"documents": 0, "tokens": 0})
        s["documents"] += r["documents"]
        s["tokens"] += r["tokens"]
    return {"files": files, "stats": {"sources": per_source, "tokens": sum(s["tokens"] for s in per_source.values())}}


STAGE = Stage(
    name="tokenize",
    inputs=("decontaminate", "tokenizer"),
    run=run_tokenize,
    identity=lambda config: {"batch_size": config.data.tokenize.batch_size},
    description="Encode documents to token ids with batch encoding on a Ray Data actor pool.",
)
