"""What each filter of the filter stage costs on the quickstart corpus (the standard
library's modules and Python's documentation topics), one process.

Baseline, measured in the same run: the filter task's own work per document without a
filter (a datatrove Document built, its metadata serialised). Each filter's line gives
its time, throughput and the ratio to that baseline, and what it dropped; the last line
is the quickstart's own filter configuration.

    python bench/filter_cost.py
"""

from __future__ import annotations

import json
import pathlib
import sysconfig
import time
from collections import Counter

from datatrove.data import Document
from pydoc_data.topics import topics

from illada.config import FilterConfig, load_config
from illada.data.filter import build_filters, first_failure

FILTERS = ["language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"]


def corpora() -> dict[str, list[str]]:
    code = [p.read_text(errors="replace") for p in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]
    return {"stdlib_code": code, "python_docs": list(topics.values())}


def run(filters, texts: list[str]) -> tuple[float, Counter]:
    dropped: Counter = Counter()
    start = time.perf_counter()
    for i, text in enumerate(texts):
        doc = Document(text=text, id=str(i), metadata={})
        failure = first_failure(filters, doc)
        json.dumps(doc.metadata)
        if failure:
            dropped[failure[0]] += 1
    return time.perf_counter() - start, dropped


def main() -> None:
    data = corpora()
    warm = build_filters(FILTERS, FilterConfig(), ["en"])  # load py3langid's model and spaCy once
    for _, step in warm:
        step.filter(Document(text="Warm up the models. " * 60, id="w", metadata={}))
    for name, texts in data.items():
        mb = sum(len(t.encode()) for t in texts) / 1e6
        base, _ = run([], texts)
        print(f"{name}: {len(texts)} documents, {mb:.2f} MB; baseline {base:.3f} s")
        for f in FILTERS:
            seconds, dropped = run(build_filters([f], FilterConfig(), ["en"]), texts)
            print(f"  {f:<18} {seconds:7.2f} s  {mb / seconds:6.2f} MB/s  {seconds / base:8.0f}x baseline  dropped {sum(dropped.values())}/{len(texts)}")
    quickstart = load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml").data
    total = 0.0
    for source in quickstart.sources:
        names = quickstart.filter.for_source(source)
        seconds, dropped = run(build_filters(names, quickstart.filter, quickstart.filter.languages), data[source.name])
        total += seconds
        print(f"quickstart {source.name}: filters {names or 'none'}: {seconds:.2f} s, dropped {dict(dropped)}")
    print(f"quickstart filter stage, one process: {total:.2f} s")


if __name__ == "__main__":
    main()
