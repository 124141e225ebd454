"""SFT stage, chat: conversations -> token ids through the chat template.

Each deduplicated document file (a conversation's canonical text per row, from ingest's
chat format) is one Ray task: it loads the tokenizer, applies the chat template
(illada.data.chat_template) in batches and writes `tokens/<source>/<n>.parquet` with each
sample's tokens and the length of its prompt. Tasks leave completion markers, so an
interrupted run resumes with the files not yet done.
"""

from __future__ import annotations

import pyarrow as pa
from tokenizers import Tokenizer

from illada import storage
from illada.data import chat_template, conversations
from illada.data.documents import DocumentWriter, iter_batches
from illada.data.tokenizer import tokenizer_url
from illada.pipeline.stage import Stage, StageContext, file_entry

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("tokens", pa.large_list(pa.int32()), nullable=False),  # prompt, then response
        pa.field("prompt_len", pa.int32(), nullable=False),
    ]
)


def chat_task(spec: dict) -> dict:
    template = chat_template.ChatTemplate(Tokenizer.from_str(storage.read_bytes(spec["tokenizer_url"]).decode()))
    samples = prompt_tokens = tokens = 0
    with DocumentWriter(spec["dst"], schema=SAMPLES_SCHEMA) as writer:
        for batch in iter_batches(spec["src"], columns=["id", "source", "text"], batch_size=spec["batch_size"]):
            encoded = template.samples([conversations.parse(t) for t in batch.column("text").to_pylist()])
            ids = pa.array([e[0] for e in encoded], type=pa.large_list(pa.int32()))
            prompt_len = pa.array([e[1] for e in encoded], type=pa.int32())
            writer.write_table(pa.table({"id": batch.column("id"), "source": batch.column("source"), "tokens": ids, "prompt_len": prompt_len}))
            samples += batch.num_rows
            tokens += len(ids.values)
            prompt_tokens += sum(e[1] for e in encoded)
    return {"samples": samples, "tokens": tokens, "prompt_tokens": prompt_tokens, "file": writer.info}


def run_chat(ctx: StageContext) -> dict:
    docs = ctx.input_files("decontaminate", "documents")
    tokenizer = tokenizer_url(ctx.inputs["tokenizer"], ctx.root)
    specs = {
        f"{i:06d}": {
            "src": ctx.absolute(f["path"]),
            "dst": ctx.path("tokens", f["source"], f"{i:06d}.parquet"),
            "source": f["source"],
            "tokenizer_url": tokenizer,
            "batch_size": ctx.config.data.tokenize.batch_size,
        }
        for i, f in enumerate(docs)
    }
    results = ctx.run_tasks("encode", chat_task, specs)
    files, per_source = [], {}
    for tid, spec in specs.items():
        r = results[tid]
        files.append(file_entry(ctx, spec["dst"], "tokens", r["file"]["sha256"], r["file"]["bytes"], rows=r["file"]["rows"], source=spec["source"], order=len(files)))
        s = per_source.setdefault(spec["source"], {"samples": 0, "tokens": 0, "prompt_tokens": 0})
        for key in s:
            s[key] += r[key]
    return {"files": files, "stats": {"sources": per_source, "samples": sum(s["samples"] for s in per_source.values())}}


STAGE = Stage(
    name="chat",
    inputs=("decontaminate", "tokenizer"),
    run=run_chat,
    identity=lambda config: {"batch_size": config.data.tokenize.batch_size},
    code=(conversations, chat_template),
    description="Apply the chat template to conversations and tokenize them (prompt length kept per sample).",
)
