"""Stage 1, ingest: raw files -> normalised documents, with every bad record quarantined.

Formats: jsonl (plain, .gz, .zst), parquet, and text files (one document per file); and
chat: jsonl or parquet records holding a conversation (a list of {role, content}), checked
and stored as its canonical JSON text (illada.data.conversations) for the SFT pipeline. A
task reads one jsonl/parquet file, or a group of text files, streaming; it writes
`docs/<source>/<task>.parquet` and, if any record was bad, `quarantine/<source>/<task>.jsonl`
with the reason, the location and the raw record.

Accounting is in rows. A file that cannot be read to its end (a truncated or corrupt
compressed stream, an unreadable Parquet file, a Parquet file without the content column)
is quarantined as a unit: none of its documents is kept, and one quarantine line records
its reason, the rows read from it (all of a Parquet file's rows, from its footer) and its
size in bytes. The bound `max_quarantine_fraction` applies per source to the rows and,
for damage whose rows cannot be counted, to the bytes. A file without any record, or a
source left with no document, is an error naming it.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from illada import storage
from illada.config import Config, ConfigError, IngestConfig, SourceConfig
from illada.errors import UserError
from illada.data import conversations
from illada.data.documents import DocumentWriter
from illada.pipeline.stage import Stage, StageContext, file_entry

log = logging.getLogger(__name__)

TEXT_FILES_PER_TASK = 256
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
CHUNK = 1 << 20


class QuarantineError(UserError):
    """Too many records were malformed; the message names the files holding them."""


class DamagedFile(Exception):
    """A file that cannot be read to its end; it is quarantined whole."""

    def __init__(self, name: str, reason: str, detail: str, rows: int):
        super().__init__(f"{name}: {reason}: {detail}")
        self.name, self.reason, self.detail, self.rows = name, reason, detail, rows


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
            listed = storage.list_files(pattern)  # a file lists as itself
            if not listed:
                raise FileNotFoundError(f"source {source.name!r}: the directory {pattern!r} holds no files; check data.sources paths")
            files += listed
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
    rows = 0
    try:
        for line_no, raw in enumerate(_lines(_decompressed(url)), start=1):
            location = f"{name}:{line_no}"
            if not raw.strip():
                continue  # blank lines between records are not records
            rows += 1
            yield _jsonl_record(source, raw, location)
    except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as e:
        reason = "truncated" if isinstance(e, EOFError) else "undecodable"
        raise DamagedFile(name, reason, str(e) or type(e).__name__, rows) from e


def _jsonl_record(source: SourceConfig, raw: bytes, location: str) -> Record:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(location, raw=raw, problem=f"invalid_utf8: {e.reason} at byte {e.start}")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Record(location, raw=line, problem=f"bad_json: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return Record(location, raw=line, problem=f"not_an_object: a JSON {type(obj).__name__}")
    return _record_from_mapping(source, obj, location, raw=line)


def _decompressed(url: str) -> Iterator[bytes]:
    """The bytes of a file, decompressed by its suffix; EOFError if a compressed stream
    ends before its end marker (gzip raises it itself; zstd's stream reader does not)."""
    suffix = next((s for s in COMPRESSION if url.lower().endswith(s)), None)
    with storage.open_read(url, "rb", compression="gzip" if suffix == ".gz" else None) as f:
        if COMPRESSION.get(suffix) == "zstd":
            yield from _zstd_frames(f)
        else:
            while chunk := f.read(CHUNK):
                yield chunk


def _zstd_frames(f) -> Iterator[bytes]:
    """Decompress every zstd frame of a stream, checking that the last one is complete."""
    frame, in_frame = zstandard.ZstdDecompressor().decompressobj(), False
    while chunk := f.read(CHUNK):
        while chunk:
            in_frame = True
            yield frame.decompress(chunk)
            if not frame.eof:
                break
            chunk, in_frame = frame.unused_data, False
            frame = zstandard.ZstdDecompressor().decompressobj()
    if in_frame:
        raise EOFError("the zstd stream ends inside a frame (the file is cut short)")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines of a stream of byte chunks."""
    tail = b""
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


def _parquet_records(source: SourceConfig, url: str, name: str) -> Iterator[Record]:
    rows = None
    try:
        with storage.open_read(url) as f:
            parquet = pq.ParquetFile(f)
            rows = parquet.metadata.num_rows
            field = _content_field(source)
            if field not in parquet.schema_arrow.names:
                reason = "missing_messages" if source.format == "chat" else "missing_text"
                raise DamagedFile(name, reason, f"no column {field!r} (columns: {parquet.schema_arrow.names})", rows)
            row = 0
            for batch in parquet.iter_batches(batch_size=1024):
                for obj in batch.to_pylist():
                    yield _record_from_mapping(source, obj, f"{name}#{row}", raw=obj)
                    row += 1
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, ConnectionError)):
            raise  # the storage failed, not the file
        raise DamagedFile(name, "unreadable_parquet", str(e), rows or 0) from e


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

    def write_unit(self, source: str, unit: dict) -> None:
        """One line for a whole file quarantined as a unit (its raw bytes stay where they are)."""
        entry = {"reason": unit["reason"], "detail": unit["detail"], "source": source, "location": unit["file"], "unit": "file", "rows": unit["rows"], "bytes": unit["bytes"]}
        self.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    def info(self) -> dict | None:
        if self._out is None:
            return None
        return {"sha256": self._out.hexdigest(), "bytes": self._out.bytes_written, "rows": self.rows}


def ingest_task(spec: dict) -> dict:
    """Ingest a task's files. A file found damaged part-way is quarantined whole: the task
    starts again (its outputs are written atomically, so nothing of the first try remains)."""
    damaged: dict[str, dict] = {}
    while True:
        try:
            return _ingest_files(spec, damaged)
        except DamagedFile as e:
            url = next(f["url"] for f in spec["files"] if f["name"] == e.name)
            damaged[e.name] = {"file": e.name, "reason": e.reason, "detail": e.detail, "rows": e.rows, "bytes": _size(url)}


def _size(url: str) -> int:
    fs, path = storage.filesystem(url)
    return int(fs.size(path))


def _ingest_files(spec: dict, damaged: dict[str, dict]) -> dict:
    source = SourceConfig.model_validate(spec["source"])
    cfg = IngestConfig.model_validate(spec["ingest"])
    reasons: Counter[str] = Counter()
    seen = kept = chars = total_bytes = 0
    empty_files = []
    with (
        DocumentWriter(spec["docs_url"], rows_per_batch=cfg.rows_per_batch) as writer,
        QuarantineWriter(spec["quarantine_url"]) as quarantine,
    ):
        for file in spec["files"]:
            total_bytes += _size(file["url"])
            if file["name"] in damaged:
                unit = damaged[file["name"]]
                quarantine.write_unit(source.name, unit)
                reasons[unit["reason"]] += unit["rows"]
                seen += unit["rows"]
                continue
            rows = 0
            for record in read_records(source, file["url"], file["name"]):
                rows += 1
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
            seen += rows
            if rows == 0:
                empty_files.append(file["name"])
    result = {
        "source": source.name,
        "records": seen,
        "documents": kept,
        "chars": chars,
        "quarantined": dict(reasons),
        "bytes": total_bytes,
        "damaged": list(damaged.values()),
        "empty_files": empty_files,
        "docs": writer.info,
    }
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
        s = stats["sources"].setdefault(r["source"], {"records": 0, "documents": 0, "chars": 0, "bytes": 0, "quarantined": {}, "damaged_files": [], "empty_files": []})
        for key in ("records", "documents", "chars", "bytes"):
            s[key] += r[key]
        s["damaged_files"] += r["damaged"]
        s["empty_files"] += r["empty_files"]
        for reason, n in r["quarantined"].items():
            s["quarantined"][reason] = s["quarantined"].get(reason, 0) + n
    for name, s in stats["sources"].items():
        for d in s["damaged_files"]:
            log.warning("source %s: quarantined the whole file %s (%s: %s; %d rows, %d bytes)", name, d["file"], d["reason"], d["detail"], d["rows"], d["bytes"])
    _check_no_empty_file(stats["sources"])
    _check_quarantine_rate(ctx, stats["sources"], files)
    _check_no_empty_source(stats["sources"])
    stats["documents"] = sum(s["documents"] for s in stats["sources"].values())
    stats["quarantined"] = sum(sum(s["quarantined"].values()) for s in stats["sources"].values())
    return {"files": files, "stats": stats}


def _check_no_empty_file(sources: dict) -> None:
    for name, s in sources.items():
        if s["empty_files"]:
            shown = ", ".join(s["empty_files"][:5]) + (" ..." if len(s["empty_files"]) > 5 else "")
            raise ConfigError(f"source {name!r}: {len(s['empty_files'])} input file(s) hold no record: {shown}; remove them from data.sources paths")


def _check_no_empty_source(sources: dict) -> None:
    for name, s in sources.items():
        if s["documents"] == 0:
            raise ConfigError(
                f"source {name!r} has no valid document ({s['records']} rows read, all quarantined); "
                "fix its input or remove it from data.sources (a source without data cannot get a mix weight)"
            )


def _check_quarantine_rate(ctx: StageContext, sources: dict, files: list[dict]) -> None:
    bound = ctx.config.data.ingest.max_quarantine_fraction
    for name, s in sources.items():
        bad = sum(s["quarantined"].values())
        damaged_bytes = sum(d["bytes"] for d in s["damaged_files"])
        rows_over = s["records"] and bad / s["records"] > bound
        bytes_over = s["bytes"] and damaged_bytes / s["bytes"] > bound
        if not (rows_over or bytes_over):
            continue
        where = [ctx.absolute(f["path"]) for f in files if f["kind"] == "quarantine" and f["source"] == name]
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(s["quarantined"].items(), key=lambda x: -x[1]))
        damage = "".join(
            f" File {d['file']} is quarantined whole ({d['reason']}: {d['detail']}; {d['rows']} rows, {d['bytes']} bytes)." for d in s["damaged_files"][:3]
        )
        share = f"{bad} of {s['records']} rows ({bad / s['records']:.1%})" if s["records"] else "0 rows"
        if bytes_over and not rows_over:
            share = f"{damaged_bytes} of {s['bytes']} bytes ({damaged_bytes / s['bytes']:.1%}) are in damaged files; {share}"
        raise QuarantineError(
            f"source {name!r}: {share} are malformed, "
            f"over data.ingest.max_quarantine_fraction={bound}.{damage} Reasons (rows): {reasons}. "
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
