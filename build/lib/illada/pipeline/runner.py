"""Run a chain of stages: skip what is up to date, resume what was interrupted.

A stage is up to date when its manifest exists and was made with the fingerprint it would
have now (same code, config slice and input digests). `only` re-runs one stage, `start`
re-runs a stage and everything after it, `force` re-runs all of them. Every run is recorded
in MLflow (illada.lineage.pipeline): a run per pipeline, a nested run per stage that runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from illada import storage
from illada.config import Config, ConfigError
from illada.lineage.pipeline import PipelineRecorder
from illada.pipeline.stage import (
    FINGERPRINT,
    MANIFEST,
    Stage,
    StageContext,
    write_manifest,
)

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A stage cannot run or failed; the message says which and what to do."""


@dataclass
class StageStatus:
    name: str
    state: str  # "complete", "stale", "partial", "missing"
    tasks_done: int
    digest: str | None


def _stage_names(stages: list[Stage]) -> list[str]:
    return [s.name for s in stages]


def _check_stage_name(stages: list[Stage], name: str | None) -> None:
    if name is not None and name not in _stage_names(stages):
        raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(_stage_names(stages))}")


def read_manifest(config: Config, stage: str) -> dict | None:
    url = storage.join(config.root, stage, MANIFEST)
    return storage.read_json(url) if storage.exists(url) else None


def run_pipeline(
    config: Config,
    stages: list[Stage],
    *,
    only: str | None = None,
    start: str | None = None,
    force: bool = False,
) -> dict[str, dict]:
    """Run the stages in order and return every stage's manifest."""
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
    with PipelineRecorder(config) as recorder:  # an MLflow run, a nested one per stage that runs
        for stage in stages:
            if only and stage.name != only:
                manifest = read_manifest(config, stage.name)
                if manifest is not None:
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
                log.info("stage %s is up to date (digest %s); skipping", stage.name, current["digest"][:12])
                manifests[stage.name] = current
                recorder.skipped(stage.name, current)
                continue
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
        log.info("resuming stage %s from its completed tasks", stage.name)
    log.info("running stage %s -> %s", stage.name, ctx.out)
    body = stage.run(ctx)
    return write_manifest(ctx, fingerprint, body)


def pipeline_status(config: Config, stages: list[Stage]) -> list[StageStatus]:
    config.require("data")
    storage.configure(config.storage)
    out: list[StageStatus] = []
    manifests: dict[str, dict] = {}
    for stage in stages:
        stage_dir = storage.join(config.root, stage.name)
        tasks_done = sum(1 for f in storage.list_files(storage.join(stage_dir, "_tasks")) if f.endswith(".json"))
        manifest = read_manifest(config, stage.name)
        if manifest is None:
            state = "partial" if storage.exists(storage.join(stage_dir, FINGERPRINT)) else "missing"
        elif all(name in manifests for name in stage.inputs) and manifest["fingerprint"] == stage.fingerprint(
            config, {name: manifests[name] for name in stage.inputs}
        ):
            state = "complete"
        else:
            state = "stale"
        if manifest is not None:
            manifests[stage.name] = manifest
        out.append(StageStatus(stage.name, state, tasks_done, manifest["digest"] if manifest else None))
    return out
