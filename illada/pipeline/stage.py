"""A pipeline stage: a named step with its own folder, resumable tasks and a manifest.

Layout of one stage under the run root:

    <root>/<stage>/_fingerprint.json   what the outputs were made from (code, config, inputs)
    <root>/<stage>/_tasks/<phase>/<id>.json   a finished task's result: its completion marker
    <root>/<stage>/config.yaml         the resolved config
    <root>/<stage>/manifest.json       written last: the stage is complete iff it exists and
                                       its fingerprint matches
    <root>/<stage>/...                 the stage's own outputs

A task writes its output files atomically and returns a JSON-able result; the driver
writes the marker after. A crash before the marker only means that task runs again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from tqdm import tqdm

from illada import storage
from illada.config import Config, StorageConfig, dump_config
from illada.layout import MANIFEST



class PipelineError(RuntimeError):
    """A stage cannot run or failed; the message says which and what to do."""


def digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def code_digest(*modules: Any) -> str:
    """A hash of the source of the modules a stage's output depends on."""
    return digest_json([inspect.getsource(m) for m in modules])


@dataclass
class Stage:
    """How a stage is wired: its name, upstream stages, code and config slice, and body."""

    name: str
    inputs: tuple[str, ...]
    run: Callable[[StageContext], dict]  # returns the manifest body: {"files": [...], "stats": {...}}
    identity: Callable[[Config], Any]  # what besides upstream digests decides the output: config, raw files
    description: str = ""
    code: tuple[Any, ...] = ()  # modules beyond the one defining `run` that the output depends on

    def fingerprint(self, config: Config, upstream: dict[str, dict]) -> str:
        return digest_json(
            {
                "stage": self.name,
                "code": code_digest(inspect.getmodule(self.run), *self.code),
                "identity": self.identity(config),
                "inputs": {name: upstream[name]["digest"] for name in self.inputs},
            }
        )


@dataclass
class StageContext:
    config: Config
    stage: str
    inputs: dict[str, dict] = field(default_factory=dict)  # upstream manifests by stage name

    @property
    def root(self) -> str:
        return self.config.root

    @property
    def out(self) -> str:
        return storage.join(self.root, self.stage)

    def path(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    def relative(self, url: str) -> str:
        """A path relative to the run root, as manifests record it (so roots can move)."""
        return url[len(self.root.rstrip("/")) + 1 :]

    def absolute(self, rel: str) -> str:
        return storage.join(self.root, rel)

    def input_files(self, stage: str, kind: str | None = None) -> list[dict]:
        """An input stage's files in the order it gave them ("order"; manifests list by path)."""
        files = sorted(self.inputs[stage]["files"], key=lambda f: f.get("order", 0))
        return [f for f in files if kind is None or f.get("kind") == kind]

    def run_tasks(
        self,
        phase: str,
        fn: Callable[[dict], dict],
        specs: dict[str, dict],
        *,
        num_cpus: float = 1,
        memory: int | None = None,
    ) -> dict[str, dict]:
        """Run `fn(spec)` for every spec not yet done, on Ray; return all results by task id.

        Tasks finished by an earlier, interrupted run are not run again.
        """
        results = {k: v for k, v in self.completed(phase).items() if k in specs}
        pending = {tid: spec for tid, spec in specs.items() if tid not in results}
        if not pending:
            return results
        remote = ray.remote(_run_with_storage).options(
            num_cpus=num_cpus, memory=memory, name=f"{self.stage}.{phase}", max_retries=2, **storage.worker_env(self.config.storage)
        )
        task_storage = storage.without_credentials(self.config.storage)  # the credentials: in the worker's environment
        futures = {remote.remote(task_storage, fn, spec): tid for tid, spec in pending.items()}
        desc = f"{self.stage}/{phase}"
        failures: list[tuple[str, Exception]] = []
        with tqdm(total=len(specs), initial=len(results), desc=desc, unit="task", dynamic_ncols=True) as bar:
            waiting = list(futures)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                tid = futures[done[0]]
                try:
                    results[tid] = ray.get(done[0])
                except Exception as e:  # let the other tasks finish and record them first
                    failures.append((tid, e))
                    continue
                self.mark_done(phase, tid, results[tid])
                bar.update(1)
        if failures:
            tid, error = failures[0]
            raise RuntimeError(
                f"{len(failures)} of {len(specs)} tasks of {desc} failed (first: {tid}): {error}. "
                "Finished tasks are recorded; running the pipeline again resumes with the failed ones."
            ) from error
        return results

    def completed(self, phase: str) -> dict[str, dict]:
        """Results of the tasks of `phase` that have a completion marker, by task id."""
        markers = storage.list_files(self.path("_tasks", phase))
        return {url.rsplit("/", 1)[-1][: -len(".json")]: storage.read_json(url) for url in markers if url.endswith(".json")}

    def mark_done(self, phase: str, task_id: str, result: dict) -> None:
        storage.write_json(self.path("_tasks", phase, f"{task_id}.json"), result)


def _run_with_storage(storage_config: StorageConfig, fn: Callable[[dict], dict], spec: dict) -> dict:
    storage.configure(storage_config)
    return fn(spec)


def file_entry(ctx: StageContext, url: str, kind: str, sha256: str, nbytes: int, **extra: Any) -> dict:
    """One output file as a manifest records it."""
    return {"path": ctx.relative(url), "kind": kind, "sha256": sha256, "bytes": nbytes, **extra}


def write_manifest(ctx: StageContext, fingerprint: str, body: dict) -> dict:
    files = sorted(body.get("files", []), key=lambda f: f["path"])
    stats = body.get("stats", {})
    manifest = {
        "stage": ctx.stage,
        "fingerprint": fingerprint,
        # The digest covers content only (no time, no root), so a re-run on the same inputs
        # and config reproduces it.
        "digest": digest_json({"stage": ctx.stage, "files": files, "stats": stats}),
        "inputs": {name: m["digest"] for name, m in ctx.inputs.items()},
        "files": files,
        "stats": stats,
        "created_unix": time.time(),
    }
    storage.write_bytes(ctx.path("config.yaml"), dump_config(ctx.config).encode())
    storage.write_json(ctx.path(MANIFEST), manifest)
    return manifest
