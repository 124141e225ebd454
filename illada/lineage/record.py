"""What every lineage record shares: names, code version, secret-free params, datasets.

A dataset is recorded by metadata only (MLflow's MetaDataset): its source is where the
data's manifest lives and its digest is the manifest's own content hash, cut to MLflow's
36-character limit (`short`); the full hash goes along as the input's `illada.digest` tag.
Everything that reaches MLflow as text passes through `Redactor`, so a credential that slipped
into a value is masked before it is stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from illada.config import Config
from illada.redaction import MIN_SECRET_CHARS, SECRET_ENV

# Tags and dataset contexts: the vocabulary the graph builder reads back.
KIND = "illada.kind"  # pipeline | stage | train | checkpoint
STAGE = "illada.stage"
FULL_DIGEST = "illada.digest"
SOURCE = "illada.source"  # where this run read or wrote the dataset (MLflow keeps one source per name and digest)
CHECKPOINT_URI = "illada.checkpoint.uri"
CHECKPOINT_DIGEST = "illada.checkpoint.digest"
PARENT = "illada.parent"
GIT_COMMIT = "illada.git.commit"
GIT_DIRTY = "illada.git.dirty"
RAY_JOB = "illada.ray.job_id"
RAY_SUBMISSION = "illada.ray.submission_id"
INPUT, OUTPUT, TRAINING = "input", "output", "training"  # dataset contexts
PACK_DATASET = "pack"
SHARDS_PREFIX = "shards/"
MODEL_TYPE = "illada-checkpoint"

DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a dataset digest

REPO = Path(__file__).resolve().parents[2]


def short(digest: str) -> str:
    return digest[:DIGEST_CHARS]


def code_version() -> dict[str, str]:
    """The git commit of the code that runs and whether it had uncommitted changes. A Ray
    Job's staged copy has no .git: the submitter passes both as ILLADA_GIT_COMMIT/_DIRTY."""
    if os.environ.get("ILLADA_GIT_COMMIT"):
        return {GIT_COMMIT: os.environ["ILLADA_GIT_COMMIT"], GIT_DIRTY: os.environ.get("ILLADA_GIT_DIRTY", "unknown")}
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {GIT_COMMIT: "unknown", GIT_DIRTY: "unknown"}
    return {GIT_COMMIT: commit, GIT_DIRTY: str(dirty).lower()}


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()


def ray_job() -> dict[str, str]:
    """This driver's Ray job id, and the Ray Jobs submission id when it runs as one."""
    out = {}
    try:
        import ray

        if ray.is_initialized():
            out[RAY_JOB] = ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001  (no Ray here: nothing to record)
        pass
    # Only the submission id is read from the job config: its runtime env may hold secrets.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}
    if job.get("job_submission_id"):
        out[RAY_SUBMISSION] = job["job_submission_id"]
    return out


class Redactor:
    """Masks the credentials this process knows of (the config's S3 keys, the AWS and
    MLflow secret environment variables) in any text bound for MLflow."""

    def __init__(self, config: Config | None = None):
        secrets = [os.environ.get(name) for name in SECRET_ENV]
        if config is not None:
            s3 = config.storage.s3
            secrets += [s.get_secret_value() for s in (s3.key, s3.secret) if s is not None]
        self.secrets = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)

    def __call__(self, text: Any) -> str:
        text = str(text)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def all(self, mapping: dict[str, Any]) -> dict[str, str]:
        return {self(k): self(v) for k, v in mapping.items()}


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Leaves of nested dicts and lists as (dotted key, value); list items by index."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from flatten(value, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix, obj


def config_params(config: Config, sections: Iterable[str] | None = None) -> dict[str, str]:
    """The resolved config as MLflow params (secrets are excluded from the dump itself)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    dumped = config.model_dump(mode="json")
    if sections is not None:
        dumped = {k: v for k, v in dumped.items() if k in sections}
    return {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in flatten(dumped)}


def numeric_metrics(stats: dict, prefix: str = "") -> dict[str, float]:
    """Every number in a manifest's stats as a metric named by its dotted path."""
    out = {}
    for key, value in flatten(stats, prefix):
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[_metric_key(key)] = float(value)
    return out


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def dataset(name: str, source_uri: str, digest: str):
    """A metadata-only MLflow dataset: `source_uri` says where it lives, `digest` is ours."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all mean a path
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(source_uri)
    return MetaDataset(source, name=name, digest=short(digest))


def dataset_input(name: str, source_uri: str, digest: str, context: str, redact: Redactor):
    """The dataset as a run input, tagged with its context, full digest and location.

    MLflow stores a dataset once per experiment, name and digest, with the source of the
    first run that logged it: a copy of the data (same digest, another place) read by a
    later run would show the original's location. The `illada.source` tag keeps the place
    this run used."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
    from mlflow.utils.validation import MAX_INPUT_TAG_VALUE_SIZE

    source_uri = redact(source_uri)
    entity = dataset(redact(name), source_uri, digest)._to_mlflow_entity()
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag(FULL_DIGEST, digest)]
    if len(source_uri) <= MAX_INPUT_TAG_VALUE_SIZE:
        tags.append(InputTag(SOURCE, source_uri))
    return DatasetInput(entity, tags=tags)


def shard_set_digest(shards: list[dict]) -> str:
    """One content hash of a source's shards: over their paths and sha256s."""
    h = hashlib.sha256()
    for f in sorted(shards, key=lambda f: f["path"]):
        h.update(f"{f['path']}\0{f['sha256']}\n".encode())
    return h.hexdigest()


def shard_sets(manifest: dict) -> dict[str, list[dict]]:
    """A pack manifest's shard files by source."""
    out: dict[str, list[dict]] = {}
    for f in manifest["files"]:
        if f.get("kind") == "shard":
            out.setdefault(f["source"], []).append(f)
    return out


def log_batch(client, run_id: str, redact: Redactor, *, params: dict | None = None, metrics: dict | None = None, tags: dict | None = None, step: int = 0) -> None:
    """Params, metrics and tags (secrets masked) in batches within MLflow's per-call limits."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    params_ = [Param(k, v) for k, v in redact.all(params or {}).items()]
    tags_ = [RunTag(k, v) for k, v in redact.all(tags or {}).items()]
    metrics_ = [Metric(redact(k), v, now, step) for k, v in (metrics or {}).items()]
    while params_ or tags_ or metrics_:  # MLflow takes at most 100 params, 100 tags, 1000 items a call
        p, t = params_[:100], tags_[:100]
        m = metrics_[: 1000 - len(p) - len(t)]
        client.log_batch(run_id, metrics=m, params=p, tags=t)
        params_, tags_, metrics_ = params_[len(p) :], tags_[len(t) :], metrics_[len(m) :]
