"""Stage 2, filter: drop documents that fail quality or language filters, per source.

The filters are datatrove's own steps, each called as `filter(doc)` on a datatrove
Document inside a Ray task (one task per ingested file):

    language           py3langid's model, bundled in the package (nothing is downloaded)
    gopher_repetition  datatrove GopherRepetitionFilter
    gopher_quality     datatrove GopherQualityFilter
    c4_quality         datatrove C4QualityFilter (it also drops lines from documents it keeps)
    fineweb_quality    datatrove FineWebQualityFilter

A source runs its own list in order (data.filter.filters unless the source sets
`filters`); a document is dropped by the first filter that fails and written, with the
filter's name and reason, to `filtered/<source>/<task>.parquet`. A source without filters
hands its ingested files on unchanged.
"""

from __future__ import annotations

import functools
import json
from collections import Counter

import pyarrow as pa
from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result

from illada.config import Config, ConfigError, FilterConfig, SourceConfig
from illada.data.documents import DocumentWriter, iter_batches
from illada.pipeline.stage import Stage, StageContext, file_entry

FILTERED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("filter", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),
    ]
)


@functools.cache
def _language_identifier():
    """py3langid's model (in the package's data/), loaded once per worker process."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageFilter(BaseFilter):
    """Keeps documents whose most likely language is one of `languages` with probability at
    least `min_score`; records both in the document's metadata."""

    name = "language"

    def __init__(self, languages: list[str], min_score: float):
        super().__init__()
        self.languages = set(languages)
        self.min_score = min_score

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        language, score = _language_identifier().classify(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = language, round(float(score), 4)
        if language not in self.languages:
            return False, f"language_{language}"
        if score < self.min_score:
            return False, "low_language_score"
        return True


DATATROVE_FILTERS = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4_quality": C4QualityFilter,
    "fineweb_quality": FineWebQualityFilter,
}


def build_filters(names: list[str], cfg: FilterConfig, languages: list[str]) -> list[tuple[str, BaseFilter]]:
    """The named filters, configured; a wrong keyword in data.filter.params is a config error."""
    out = []
    for name in names:
        params = cfg.params.get(name, {})
        try:
            if name == "language":
                step = LanguageFilter(**{"languages": languages, "min_score": cfg.min_language_score, **params})
            else:
                step = DATATROVE_FILTERS[name](**params)
        except TypeError as e:
            raise ConfigError(f"data.filter.params.{name}: {e}; see the arguments of datatrove's {DATATROVE_FILTERS.get(name, LanguageFilter).__name__}") from None
        out.append((name, step))
    return out


def first_failure(filters: list[tuple[str, BaseFilter]], doc: Document) -> tuple[str, str] | None:
    """(filter, reason) of the first filter that drops `doc`, or None if all keep it."""
    for name, step in filters:
        kept, reason = get_filter_result(step.filter(doc))
        if not kept:
            return name, reason or "failed"
    return None


class LazyWriter:
    """A DocumentWriter whose file is created only when the first row arrives. Use as a
    context manager; `info` is None when no row came."""

    def __init__(self, url: str, schema: pa.Schema):
        self.url, self.schema = url, schema
        self.info: dict | None = None
        self._writer: DocumentWriter | None = None

    def __enter__(self) -> LazyWriter:
        return self

    def write(self, **row) -> None:
        if self._writer is None:
            self._writer = DocumentWriter(self.url, schema=self.schema).__enter__()
        self._writer.write(**row)

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.__exit__(*exc)
            self.info = self._writer.info


def filter_task(spec: dict) -> dict:
    cfg = FilterConfig.model_validate(spec["filter"])
    filters = build_filters(spec["filters"], cfg, spec["languages"])
    by_filter: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    documents_in = 0
    with DocumentWriter(spec["out_url"]) as kept, LazyWriter(spec["filtered_url"], FILTERED_SCHEMA) as removed:
        for batch in iter_batches(spec["docs_url"]):
            for row in batch.to_pylist():
                documents_in += 1
                doc = Document(text=row["text"], id=row["id"], metadata=json.loads(row["metadata"]))
                failure = first_failure(filters, doc)
                metadata = json.dumps(doc.metadata, sort_keys=True, default=str, ensure_ascii=False)
                if failure is None:
                    kept.write(id=row["id"], text=doc.text, source=row["source"], metadata=metadata)
                    continue
                name, reason = failure
                by_filter[name] += 1
                by_reason[f"{name}/{reason}"] += 1
                removed.write(id=row["id"], source=row["source"], filter=name, reason=reason, text=row["text"], metadata=metadata)
    result = {"source": spec["source"], "documents_in": documents_in, "by_filter": dict(by_filter), "by_reason": dict(by_reason), "docs": kept.info}
    if removed.info:
        result["filtered"] = removed.info
    return result


def run_filter(ctx: StageContext) -> dict:
    data = ctx.config.data
    sources = {s.name: s for s in data.sources}
    plans = {name: data.filter.for_source(source) for name, source in sources.items()}
    docs = ctx.input_files("ingest", "documents")
    specs = {
        f"{i:06d}": {
            "docs_url": ctx.absolute(f["path"]),
            "source": f["source"],
            "filters": plans[f["source"]],
            "languages": _languages(sources[f["source"]], data.filter),
            "filter": data.filter.model_dump(mode="json"),
            "out_url": ctx.path("docs", f["path"].split("/", 2)[-1]),
            "filtered_url": ctx.path("filtered", f["path"].split("/", 2)[-1]),
        }
        for i, f in enumerate(docs)
        if plans[f["source"]]
    }
    results = ctx.run_tasks("filter", filter_task, specs)
    return _manifest_body(ctx, docs, specs, results, plans)


def _languages(source: SourceConfig, cfg: FilterConfig) -> list[str]:
    return list(source.languages or cfg.languages)


def _manifest_body(ctx: StageContext, docs: list[dict], specs: dict, results: dict, plans: dict) -> dict:
    files, per_source = [], {}
    for i, f in enumerate(docs):
        tid = f"{i:06d}"
        s = per_source.setdefault(f["source"], {"filters": plans[f["source"]], "documents_in": 0, "documents_out": 0, "filtered": 0, "by_filter": {}, "by_reason": {}})
        if tid not in specs:  # an unfiltered source: its ingested file, as it is
            files.append({k: v for k, v in f.items() if k != "order"} | {"order": len(files)})
            s["documents_in"] += f["rows"]
            s["documents_out"] += f["rows"]
            continue
        r = results[tid]
        files.append(file_entry(ctx, specs[tid]["out_url"], "documents", r["docs"]["sha256"], r["docs"]["bytes"], rows=r["docs"]["rows"], source=r["source"], order=len(files)))
        if "filtered" in r:
            q = r["filtered"]
            files.append(file_entry(ctx, specs[tid]["filtered_url"], "filtered", q["sha256"], q["bytes"], rows=q["rows"], source=r["source"]))
        s["documents_in"] += r["documents_in"]
        s["documents_out"] += r["docs"]["rows"]
        for key in ("by_filter", "by_reason"):
            for name, n in r[key].items():
                s[key][name] = s[key].get(name, 0) + n
        s["filtered"] = sum(s["by_filter"].values())
    stats = {
        "sources": per_source,
        "documents_in": sum(s["documents_in"] for s in per_source.values()),
        "filtered": sum(s["filtered"] for s in per_source.values()),
        "documents_out": sum(s["documents_out"] for s in per_source.values()),
    }
    return {"files": files, "stats": stats}


def _identity(config: Config) -> dict:
    """The filter config per source. Building the filters here makes a wrong argument fail
    before the runner clears the stage's previous output."""
    data = config.data
    for source in data.sources:
        build_filters(data.filter.for_source(source), data.filter, _languages(source, data.filter))
    return {
        "filter": data.filter.model_dump(mode="json"),
        "sources": {s.name: {"filters": data.filter.for_source(s), "languages": _languages(s, data.filter)} for s in data.sources},
    }


STAGE = Stage(
    name="filter",
    inputs=("ingest",),
    run=run_filter,
    identity=_identity,
    description="Drop documents failing datatrove's quality filters or the language filter, per source; keep them aside with the reason.",
)
