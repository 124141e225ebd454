"""Stage 1, ingest: raw files -> normalised documents, with every bad record quarantined.

Formats: jsonl (plain, .gz, .zst), parquet, and text files (one document per file); and
chat: jsonl or parquet records holding a conversation (a list of {role, content}), checked
and stored as its canonical JSON text (illada.data.conversations) for the SFT pipeline. A
task reads one jsonl/parquet file, or a group of text files, streaming; it writes
`docs/<source>/<task>.parquet` and, if any record was bad, `quarantine/<source>/<task>.jsonl`
with the reason, the location and the raw record.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from illada import storage
from illada.config import Config, IngestConfig, SourceConfig
from illada.data import conversations
from illada.data.documents import DocumentWriter
from illada.pipeline.stage import Stage, StageContext, file_entry

TEXT_FILES_PER_TASK = 256
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


class QuarantineError(RuntimeError):
    """Too many records were malformed; the message names the files holding them."""


@dataclass
class Record:
    """One raw record before validation; `problem` is set when it is already known to be bad."""

    location: str  # "file:line" or "file#row"
    text: object = None
    doc_id: object = None
    metadata: dict | None = None
    raw: object = None
    problem: str | None = None


# --- finding the input files ----------------------------------------------------------


def detect_format(url: str) -> str:
    name = url.lower()
    for suffix in COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def expand_paths(source: SourceConfig) -> list[str]:
    """Every file of a source, sorted: globs are expanded, directories walked."""
    files: list[str] = []
    for pattern in source.paths:
        if any(ch in pattern for ch in "*?["):
            files += storage.glob(pattern)
        elif storage.exists(pattern):
            listed = storage.list_files(pattern)
            files += listed if listed else [pattern]
        else:
            raise FileNotFoundError(f"source {source.name!r}: nothing at {pattern!r}; check data.sources paths")
    files = sorted(set(files))
    if not files:
        raise FileNotFoundError(f"source {source.name!r}: the paths {source.paths} match no files")
    return files


def _base_of(pattern: str) -> str:
    """The part of a path pattern before its first wildcard, up to a '/'."""
    match = re.search(r"[*?\[]", pattern)
    prefix = pattern[: match.start()] if match else pattern
    return prefix.rsplit("/", 1)[0] if match or not storage.is_local(prefix) else prefix


def plan_tasks(source: SourceConfig, files: list[str]) -> list[dict]:
    fmt = source.format
    bases = [_base_of(p) for p in source.paths]

    def rel(url: str) -> str:
        base = max((b for b in bases if url.startswith(b)), key=len, default="")
        return url[len(base) :].lstrip("/") or url.rsplit("/", 1)[-1]

    singles = [f for f in files if (fmt if fmt != "auto" else detect_format(f)) != "text"]
    texts = [f for f in files if f not in set(singles)]
    groups = [[f] for f in singles] + [texts[i : i + TEXT_FILES_PER_TASK] for i in range(0, len(texts), TEXT_FILES_PER_TASK)]
    return [{"files": [{"url": f, "name": rel(f)} for f in group]} for group in groups]


# --- reading records --------------------------------------------------------------------


def read_records(source: SourceConfig, url: str, name: str) -> Iterator[Record]:
    fmt = source.format if source.format not in ("auto", "chat") else detect_format(url)
    if source.format == "chat":
        records = _parquet_records(source, url, name) if fmt == "parquet" else _jsonl_records(source, url, name)
        yield from (_conversation(r, source.messages_field) for r in records)
    elif fmt == "jsonl":
        yield from _jsonl_records(source, url, name)
    elif fmt == "parquet":
        yield from _parquet_records(source, url, name)
    else:
        yield _text_record(url, name)


def _jsonl_records(source: SourceConfig, url: str, name: str) -> Iterator[Record]:
    suffix = next((s for s in COMPRESSION if url.lower().endswith(s)), None)
    with storage.open_read(url, "rb", compression=COMPRESSION.get(suffix)) as f:
        for line_no, raw in enumerate(_lines(f), start=1):
            location = f"{name}:{line_no}"
            if not raw.strip():
                continue  # blank lines between records are not records
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(location, raw=raw, problem=f"invalid_utf8: {e.reason} at byte {e.start}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(location, raw=line, problem=f"bad_json: {e.msg} at column {e.colno}")
                continue
            if not isinstance(obj, dict):
                yield Record(location, raw=line, problem=f"not_an_object: a JSON {type(obj).__name__}")
                continue
            yield _record_from_mapping(source, obj, location, raw=line)


def _lines(f, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream; works on decompressors that cannot readline."""
    tail = b""
    while chunk := f.read(chunk_size):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


def _parquet_records(source: SourceConfig, url: str, name: str) -> Iterator[Record]:
    with storage.open_read(url) as f:
        parquet = pq.ParquetFile(f)
        field = _content_field(source)
        if field not in parquet.schema_arrow.names:
            reason = "missing_messages" if source.format == "chat" else "missing_text"
            yield Record(f"{name}", raw={"columns": parquet.schema_arrow.names}, problem=f"{reason}: no column {field!r}")
            return
        row = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                yield _record_from_mapping(source, obj, f"{name}#{row}", raw=obj)
                row += 1


def _content_field(source: SourceConfig) -> str:
    return source.messages_field if source.format == "chat" else source.text_field


def _record_from_mapping(source: SourceConfig, obj: dict, location: str, raw: object) -> Record:
    field = _content_field(source)
    metadata = {k: v for k, v in obj.items() if k not in (field, source.id_field)}
    return Record(location, text=obj.get(field), doc_id=obj.get(source.id_field) if source.id_field else None, metadata=metadata, raw=raw)


def _conversation(record: Record, field: str) -> Record:
    """A chat record with its messages checked and replaced by their canonical text."""
    if record.problem:
        return record
    try:
        record.text = conversations.canonical(record.text, field)
    except conversations.InvalidConversation as e:
        record.problem = str(e)
    return record


def _text_record(url: str, name: str) -> Record:
    with storage.open_read(url) as f:
        raw = f.read()
    try:
        return Record(name, text=raw.decode("utf-8"), doc_id=name, metadata={"path": name})
    except UnicodeDecodeError as e:
        return Record(name, raw=raw, problem=f"invalid_utf8: {e.reason} at byte {e.start}")


# --- validating ---------------------------------------------------------------------------


def problem_of(record: Record, cfg: IngestConfig, text_field: str) -> str | None:
    if record.problem:
        return record.problem
    if record.text is None:
        return f"missing_text: no {text_field!r} field"
    if not isinstance(record.text, str):
        return f"missing_text: {text_field!r} is a {type(record.text).__name__}, not a string"
    if not record.text.strip():
        return "empty: the text is blank"
    if len(record.text) < cfg.min_chars:
        return f"too_short: {len(record.text)} < min_chars {cfg.min_chars}"
    if len(record.text) > cfg.max_chars:
        return f"too_long: {len(record.text)} > max_chars {cfg.max_chars}"
    if record.doc_id is not None and not isinstance(record.doc_id, (str, int)):
        return f"bad_id: the id is a {type(record.doc_id).__name__}"
    return None


def _quarantine_line(source: str, record: Record, problem: str) -> str:
    entry = {"reason": problem.split(":", 1)[0], "detail": problem, "source": source, "location": record.location}
    raw = record.raw
    if isinstance(raw, bytes):
        entry["raw_base64"] = base64.b64encode(raw).decode()
    else:
        entry["raw"] = raw
    return json.dumps(entry, default=str, ensure_ascii=False) + "\n"


# --- the task and the stage ------------------------------------------------------------


class QuarantineWriter:
    """Streams quarantine lines to one file, opened (atomically) only if a record is bad."""

    def __init__(self, url: str):
        self.url = url
        self.rows = 0
        self._stack = contextlib.ExitStack()
        self._out: storage.HashingWriter | None = None

    def __enter__(self) -> QuarantineWriter:
        return self

    def write(self, line: str) -> None:
        if self._out is None:
            self._out = storage.HashingWriter(self._stack.enter_context(storage.open_atomic(self.url)))
        self._out.write(line.encode())
        self.rows += 1

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    def info(self) -> dict | None:
        if self._out is None:
            return None
        return {"sha256": self._out.hexdigest(), "bytes": self._out.bytes_written, "rows": self.rows}


def ingest_task(spec: dict) -> dict:
    source = SourceConfig.model_validate(spec["source"])
    cfg = IngestConfig.model_validate(spec["ingest"])
    reasons: Counter[str] = Counter()
    seen = kept = chars = 0
    with (
        DocumentWriter(spec["docs_url"], rows_per_batch=cfg.rows_per_batch) as writer,
        QuarantineWriter(spec["quarantine_url"]) as quarantine,
    ):
        for file in spec["files"]:
            for record in read_records(source, file["url"], file["name"]):
                seen += 1
                problem = problem_of(record, cfg, _content_field(source))
                if problem:
                    reasons[problem.split(":", 1)[0]] += 1
                    quarantine.write(_quarantine_line(source.name, record, problem))
                    continue
                doc_id = str(record.doc_id) if record.doc_id is not None else record.location
                metadata = json.dumps(record.metadata or {}, sort_keys=True, default=str, ensure_ascii=False)
                writer.write(id=doc_id, text=record.text, source=source.name, metadata=metadata)
                kept += 1
                chars += len(record.text)
    result = {"source": source.name, "records": seen, "documents": kept, "chars": chars, "quarantined": dict(reasons), "docs": writer.info}
    if quarantine.info():
        result["quarantine"] = quarantine.info()
    return result


def run_ingest(ctx: StageContext) -> dict:
    cfg = ctx.config.data
    specs: dict[str, dict] = {}
    for source in cfg.sources:
        for i, task in enumerate(plan_tasks(source, expand_paths(source))):
            tid = f"{source.name}-{i:05d}"
            specs[tid] = {
                **task,
                "source": source.model_dump(mode="json"),
                "ingest": cfg.ingest.model_dump(mode="json"),
                "docs_url": ctx.path("docs", source.name, f"{i:05d}.parquet"),
                "quarantine_url": ctx.path("quarantine", source.name, f"{i:05d}.jsonl"),
            }
    results = ctx.run_tasks("read", ingest_task, specs)

    files, stats = [], {"sources": {}}
    for tid, spec in specs.items():  # config order: "earliest" downstream means this order
        r = results[tid]
        files.append(file_entry(ctx, spec["docs_url"], "documents", r["docs"]["sha256"], r["docs"]["bytes"], rows=r["docs"]["rows"], source=r["source"], order=len(files)))
        if "quarantine" in r:
            q = r["quarantine"]
            files.append(file_entry(ctx, spec["quarantine_url"], "quarantine", q["sha256"], q["bytes"], rows=q["rows"], source=r["source"]))
        s = stats["sources"].setdefault(r["source"], {"records": 0, "documents": 0, "chars": 0, "quarantined": {}})
        for key in ("records", "documents", "chars"):
            s[key] += r[key]
        for reason, n in r["quarantined"].items():
            s["quarantined"][reason] = s["quarantined"].get(reason, 0) + n
    _check_quarantine_rate(ctx, stats["sources"], files)
    stats["documents"] = sum(s["documents"] for s in stats["sources"].values())
    stats["quarantined"] = sum(sum(s["quarantined"].values()) for s in stats["sources"].values())
    return {"files": files, "stats": stats}


def _check_quarantine_rate(ctx: StageContext, sources: dict, files: list[dict]) -> None:
    bound = ctx.config.data.ingest.max_quarantine_fraction
    for name, s in sources.items():
        bad = sum(s["quarantined"].values())
        if s["records"] and bad / s["records"] > bound:
            where = [ctx.absolute(f["path"]) for f in files if f["kind"] == "quarantine" and f["source"] == name]
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(s["quarantined"].items(), key=lambda x: -x[1]))
            raise QuarantineError(
                f"source {name!r}: {bad} of {s['records']} records ({bad / s['records']:.1%}) are malformed, "
                f"over data.ingest.max_quarantine_fraction={bound}. Reasons: {reasons}. "
                f"See {', '.join(where[:3])}{' ...' if len(where) > 3 else ''}. "
                f"Fix the input, or raise the bound if these records are expected."
            )


def _identity(config: Config) -> dict:
    """The config and the raw files as they are now (size and modification time or ETag)."""
    files = {}
    for source in config.data.sources:
        for url in expand_paths(source):
            fs, path = storage.filesystem(url)
            info = fs.info(path)
            files[url] = [info.get("size"), str(info.get("mtime") or info.get("ETag") or info.get("LastModified"))]
    return {
        "sources": [s.model_dump(mode="json") for s in config.data.sources],
        "ingest": config.data.ingest.model_dump(mode="json"),
        "files": files,
    }


STAGE = Stage(
    name="ingest",
    inputs=(),
    run=run_ingest,
    identity=_identity,
    description="Read raw jsonl/parquet/text into documents; quarantine malformed records.",
)
