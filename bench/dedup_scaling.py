"""Dedup throughput (documents/s/core) and peak worker memory at three corpus sizes.

The corpus grows by adding files of a fixed size, on a fixed number of Ray workers. If a
task's memory depends only on its own file or partition, the peak resident memory of any
one worker stays flat while the corpus grows 4x; the ratios against the smallest size,
measured in the same run, show it.

    python bench/dedup_scaling.py [--docs 20000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

from illada.config import load_config
from illada.pipeline.runner import run_pipeline
from illada.data.stages import PRETRAIN as STAGES

DOCS_PER_FILE = 5000
WORDS = [f"w{i}" for i in range(5000)]


def write_corpus(raw: Path, docs: int, seed: int = 0) -> None:
    """Random-word documents of ~150 words; 10% exact copies and 10% near copies planted."""
    import json

    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    for f in range(0, docs, DOCS_PER_FILE):
        with open(raw / f"{f // DOCS_PER_FILE:05d}.jsonl", "w") as out:
            for _ in range(min(DOCS_PER_FILE, docs - f)):
                roll = rng.random()
                if made and roll < 0.1:
                    text = rng.choice(made)
                elif made and roll < 0.2:
                    words = rng.choice(made).split()
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
                    text = " ".join(words)
                else:
                    text = " ".join(rng.choices(WORDS, k=150))
                made.append(text)
                if len(made) > 2000:
                    made.pop(0)
                out.write(json.dumps({"text": text}) + "\n")


class PeakWorkerMemory:
    """Samples the resident memory of every Ray worker process; keeps the largest seen."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["name", "cmdline"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                    if "default_worker.py" in cmd or (proc.info["name"] or "").startswith("ray::"):
                        self.peak = max(self.peak, proc.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakWorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(work: Path, docs: int, cpus: int) -> dict:
    raw = work / f"raw-{docs}"
    write_corpus(raw, docs)
    config = load_config(
        None,
        base={
            "name": "bench",
            "root": str(work / f"run-{docs}"),
            "data": {
                "sources": [{"name": "synthetic", "paths": [str(raw)], "weight": 1}],
                "dedup": {"exact": {"num_partitions": 8}, "fuzzy": {"num_partitions": 8}},
            },
        },
    )
    run_pipeline(config, STAGES[:1])
    result = {"docs": docs}
    for stage in ("dedup_exact", "dedup_fuzzy"):
        with PeakWorkerMemory() as memory:
            start = time.perf_counter()
            manifests = run_pipeline(config, STAGES[: STAGES.index(next(s for s in STAGES if s.name == stage)) + 1], only=stage)
            seconds = time.perf_counter() - start
        result[stage] = {
            "docs_per_s_per_core": docs / seconds / cpus,
            "peak_worker_mib": memory.peak / 2**20,
            "removed": manifests[stage]["stats"].get("duplicates", manifests[stage]["stats"].get("near_duplicates")),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20000, help="smallest corpus; the others are 2x and 4x")
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs (fixed across sizes)")
    args = parser.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="illada-bench-dedup-"))
    results = [measure(work, args.docs * k, args.cpus) for k in (1, 2, 4)]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; Ray CPUs {args.cpus}; {DOCS_PER_FILE} docs/file")
    for stage in ("dedup_exact", "dedup_fuzzy"):
        base = results[0][stage]
        print(f"\n{stage}")
        print(f"{'docs':>8} {'docs/s/core':>12} {'x base':>7} {'peak worker MiB':>16} {'x base':>7} {'removed':>8}")
        for r in results:
            s = r[stage]
            print(
                f"{r['docs']:>8} {s['docs_per_s_per_core']:>12.0f} {s['docs_per_s_per_core'] / base['docs_per_s_per_core']:>7.2f}"
                f" {s['peak_worker_mib']:>16.0f} {s['peak_worker_mib'] / base['peak_worker_mib']:>7.2f} {s['removed']!s:>8}"
            )


if __name__ == "__main__":
    main()
