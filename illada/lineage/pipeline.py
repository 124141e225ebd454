"""Recording a pipeline run: one MLflow run per `run_pipeline`, one nested run per stage.

A stage run has the resolved config as params, the numbers of its manifest's stats as
metrics (documents in and out, duplicates, quarantined records by reason, filtered
documents by filter, tokens and sequences per source), its upstream manifests as input
datasets and its own as the output dataset, each with the manifest's content digest. A stage that was up to date and skipped
is logged on the pipeline run as a `reused` dataset: the lineage follows its digest to the
stage run that made it, or to its manifest on storage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from illada import layout
from illada.config import Config
from illada.lineage.record import (
    INPUT,
    KIND,
    OUTPUT,
    STAGE,
    Redactor,
    code_version,
    config_params,
    dataset_input,
    log_batch,
    numeric_metrics,
    ray_job,
)

log = logging.getLogger(__name__)

REUSED = "reused"  # the dataset context of a skipped stage's output on the pipeline run
PIPELINE_SECTIONS = ("name", "root", "ray", "storage", "data")


def manifest_url(config: Config, stage: str) -> str:
    return layout.manifest_url(config.root, stage)


def stage_metrics(manifest: dict) -> dict[str, float]:
    """The stats' numbers, quarantined records summed by reason, and the output's size."""
    stats = manifest.get("stats", {})
    metrics = numeric_metrics(stats)
    for per_source, total in (("quarantined", "quarantined_by_reason"), ("by_filter", "filtered_by_filter")):
        metrics.update(numeric_metrics(_summed_over_sources(stats, per_source), total))
    metrics["files"] = float(len(manifest.get("files", [])))
    metrics["bytes"] = float(sum(f.get("bytes", 0) for f in manifest.get("files", [])))
    return metrics


def _summed_over_sources(stats: dict, key: str) -> dict[str, float]:
    """A per-source count table (e.g. quarantined records by reason) summed over the sources."""
    out: dict[str, float] = {}
    for source in stats.get("sources", {}).values():
        if isinstance(source, dict) and isinstance(source.get(key), dict):
            for name, n in source[key].items():
                out[name] = out.get(name, 0) + n
    return out


class PipelineRecorder:
    """Use as `with PipelineRecorder(config) as recorder:` around the stages."""

    def __init__(self, config: Config):
        self.config = config
        self.redact = Redactor(config)
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.states: dict[str, str] = {}
        self.version = code_version()

    def __enter__(self) -> PipelineRecorder:
        from illada.tracking import open_store

        self.client, self.experiment_id = open_store(self.config)
        tags = {KIND: "pipeline", "illada.root": self.config.root, **self.version, **ray_job()}
        run = self.client.create_run(self.experiment_id, run_name=f"{self.config.name}-pipeline", tags=self.redact.all(tags))
        self.run_id = run.info.run_id
        log_batch(self.client, self.run_id, self.redact, params=config_params(self.config, PIPELINE_SECTIONS))
        log.info("recording the pipeline run in MLflow run %s", self.run_id)
        return self

    def __exit__(self, kind, error, tb) -> None:
        tags = {f"illada.stage.{name}": state for name, state in self.states.items()} | ray_job()
        log_batch(self.client, self.run_id, self.redact, tags=tags)
        self.client.set_terminated(self.run_id, _status(kind))

    def skipped(self, name: str, manifest: dict) -> None:
        """A stage up to date (or not selected): its existing output is what later stages use."""
        self.states[name] = f"reused {manifest['digest'][:16]}"
        url = manifest_url(self.config, name)
        self.client.log_inputs(self.run_id, [dataset_input(name, url, manifest["digest"], REUSED, self.redact)])

    def stage(self, name: str, upstream: dict[str, dict], run: Callable[[], dict]) -> dict:
        """Run one stage (`run` returns its manifest) inside a nested MLflow run."""
        tags = {"mlflow.parentRunId": self.run_id, KIND: "stage", STAGE: name, **self.version, **ray_job()}
        stage_run = self.client.create_run(self.experiment_id, run_name=name, tags=self.redact.all(tags)).info.run_id
        log_batch(self.client, stage_run, self.redact, params=config_params(self.config, PIPELINE_SECTIONS))
        try:
            manifest = run()
        except BaseException as e:
            self.states[name] = "failed"
            self.client.set_terminated(stage_run, _status(type(e)))
            raise
        self.states[name] = f"ran {manifest['digest'][:16]}"
        datasets = [dataset_input(up, manifest_url(self.config, up), m["digest"], INPUT, self.redact) for up, m in upstream.items()]
        datasets.append(dataset_input(name, manifest_url(self.config, name), manifest["digest"], OUTPUT, self.redact))
        self.client.log_inputs(stage_run, datasets)
        log_batch(self.client, stage_run, self.redact, metrics=stage_metrics(manifest), tags={"illada.fingerprint": manifest["fingerprint"]})
        self.client.set_terminated(stage_run, "FINISHED")
        return manifest


def _status(kind) -> str:
    if kind is None:
        return "FINISHED"
    return "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
