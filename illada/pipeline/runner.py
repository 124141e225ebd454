"""Run a chain of stages: skip what is up to date, resume what was interrupted.

A stage is up to date when its manifest exists, was made with the fingerprint it would
have now (same code, config slice and input digests), and every file it lists is there
with its recorded size (and, with `verify`, its sha256). A stage whose files are missing
or changed is redone. `only` re-runs one stage, `start` re-runs a stage and everything
after it, `force` re-runs all of them. One run at a time holds a root, and a root holds
one pipeline (illada.pipeline.lock). Every run is recorded in MLflow
(illada.lineage.pipeline): a run per pipeline, a nested run per stage that runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from illada import layout, storage
from illada.config import Config, ConfigError
from illada.lineage.pipeline import PipelineRecorder
from illada.pipeline.lock import RootLock, check_root_identity
from illada.layout import FINGERPRINT, MANIFEST
from illada.pipeline.stage import (
    PipelineError,
    Stage,
    StageContext,
    write_manifest,
)

log = logging.getLogger(__name__)


@dataclass
class StageStatus:
    name: str
    state: str  # "complete", "stale", "damaged", "partial", "missing"
    tasks_done: int
    digest: str | None
    problems: tuple[str, ...] = ()  # for "damaged": which files are missing or changed


def damaged_outputs(config: Config, manifest: dict, verify: bool = False) -> list[str]:
    """The files a manifest lists that are missing or differ in size (or, with `verify`, in
    sha256) from what it records, each as "path: what is wrong"."""
    sizes: dict[str, int] = {}
    for top in {f["path"].split("/", 1)[0] for f in manifest["files"]}:  # a stage may pass on another's files
        sizes |= storage.file_sizes(storage.join(config.root, top))
    problems = []
    for f in manifest["files"]:
        url = storage.join(config.root, f["path"])
        size = sizes.get(url)
        if size is None:
            problems.append(f"{f['path']}: missing")
        elif size != f["bytes"]:
            problems.append(f"{f['path']}: {size} bytes, the manifest records {f['bytes']}")
        elif verify and storage.sha256_file(url) != f["sha256"]:
            problems.append(f"{f['path']}: sha256 differs from the manifest's")
    return problems


def remove_orphaned_temporaries(url: str) -> int:
    """Delete the `.tmp-*` files an interrupted atomic write left behind (local disks only;
    an object store never shows an unfinished upload). Returns how many."""
    orphans = [f for f in storage.list_files(url) if f.rsplit("/", 1)[-1].startswith(".tmp-")]
    for f in orphans:
        storage.remove(f)
    return len(orphans)


def _stage_names(stages: list[Stage]) -> list[str]:
    return [s.name for s in stages]


def _check_stage_name(stages: list[Stage], name: str | None) -> None:
    if name is not None and name not in _stage_names(stages):
        raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(_stage_names(stages))}")


def read_manifest(config: Config, stage: str) -> dict | None:
    return layout.read_manifest(config.root, stage)


def run_pipeline(
    config: Config,
    stages: list[Stage],
    *,
    only: str | None = None,
    start: str | None = None,
    force: bool = False,
    verify: bool = False,
) -> dict[str, dict]:
    """Run the stages in order and return every stage's manifest. Outputs of stages that
    would be skipped are checked against their manifests first: sizes always, sha256 with
    `verify`."""
    from illada.ray_runtime import ensure_ray

    config.require("data")
    _check_stage_name(stages, only)
    _check_stage_name(stages, start)
    storage.configure(config.storage)
    names = _stage_names(stages)
    forced = set(names) if force else set()
    if start:
        forced |= set(names[names.index(start) :])
    if only:
        forced.add(only)

    manifests: dict[str, dict] = {}
    with RootLock(config.root, "pipeline run") as lock, PipelineRecorder(config) as recorder:  # MLflow: a run, a nested one per stage run
        check_root_identity(config, force)
        for stage in stages:
            lock.check()
            if only and stage.name != only:
                manifest = read_manifest(config, stage.name)
                if manifest is not None:
                    problems = damaged_outputs(config, manifest, verify)
                    if problems:
                        raise PipelineError(
                            f"stage {stage.name!r} lists files that are missing or changed ({'; '.join(problems[:3])}); "
                            f"run `illada pipeline run CONFIG --from {stage.name}` to rebuild it"
                        )
                    manifests[stage.name] = manifest
                    recorder.skipped(stage.name, manifest)
                continue
            missing = [name for name in stage.inputs if name not in manifests]
            if missing:
                raise PipelineError(
                    f"stage {stage.name!r} needs {', '.join(missing)} to be complete first; "
                    f"run `illada pipeline run CONFIG --from {missing[0]}`"
                )
            upstream = {name: manifests[name] for name in stage.inputs}
            fingerprint = stage.fingerprint(config, upstream)
            current = read_manifest(config, stage.name)
            if stage.name not in forced and current is not None and current["fingerprint"] == fingerprint:
                problems = damaged_outputs(config, current, verify)
                if not problems:
                    log.info("stage %s is up to date (digest %s); skipping", stage.name, current["digest"][:12])
                    manifests[stage.name] = current
                    recorder.skipped(stage.name, current)
                    continue
                for problem in problems:
                    log.warning("stage %s: %s", stage.name, problem)
                log.warning("stage %s: %d listed file(s) missing or changed; rebuilding the stage", stage.name, len(problems))
                forced.add(stage.name)
            ensure_ray(config.ray)
            fresh = stage.name in forced
            manifests[stage.name] = recorder.stage(stage.name, upstream, partial(_run_stage, config, stage, upstream, fingerprint, fresh))
    return manifests


def _run_stage(config: Config, stage: Stage, upstream: dict[str, dict], fingerprint: str, fresh: bool) -> dict:
    ctx = StageContext(config=config, stage=stage.name, inputs=upstream)
    fingerprint_url = ctx.path(FINGERPRINT)
    previous = storage.read_json(fingerprint_url)["fingerprint"] if storage.exists(fingerprint_url) else None
    if fresh or previous != fingerprint:
        # Outputs made from other code, config or inputs must not be mixed with new ones.
        storage.remove(ctx.out)
        storage.write_json(fingerprint_url, {"fingerprint": fingerprint})
    else:
        storage.remove(ctx.path(MANIFEST))
        if removed := remove_orphaned_temporaries(ctx.out):
            log.info("removed %d unfinished temporary file(s) of stage %s", removed, stage.name)
        log.info("resuming stage %s from its completed tasks", stage.name)
    log.info("running stage %s -> %s", stage.name, ctx.out)
    body = stage.run(ctx)
    return write_manifest(ctx, fingerprint, body)


def pipeline_status(config: Config, stages: list[Stage], verify: bool = False) -> list[StageStatus]:
    """Each stage's state. A stage whose input is not complete is stale: running it again
    may change what it is made from."""
    config.require("data")
    storage.configure(config.storage)
    out: list[StageStatus] = []
    manifests: dict[str, dict] = {}
    states: dict[str, str] = {}
    for stage in stages:
        stage_dir = storage.join(config.root, stage.name)
        tasks_done = sum(1 for f in storage.list_files(storage.join(stage_dir, "_tasks")) if f.endswith(".json"))
        manifest = read_manifest(config, stage.name)
        problems: list[str] = []
        if manifest is None:
            state = "partial" if storage.exists(storage.join(stage_dir, FINGERPRINT)) else "missing"
        elif any(states.get(name) != "complete" for name in stage.inputs):
            state = "stale"
        elif manifest["fingerprint"] != stage.fingerprint(config, {name: manifests[name] for name in stage.inputs}):
            state = "stale"
        elif problems := damaged_outputs(config, manifest, verify):
            state = "damaged"
            for problem in problems:
                log.warning("stage %s: %s", stage.name, problem)
        else:
            state = "complete"
        if manifest is not None:
            manifests[stage.name] = manifest
        states[stage.name] = state
        out.append(StageStatus(stage.name, state, tasks_done, manifest["digest"] if manifest else None, tuple(problems)))
    return out
