"""Ray Jobs: send a pipeline or training run to a cluster and follow it.

One way to submit, for both: the job's runtime environment is either
- a working directory: a small staging folder holding the `illada` and `pipelines`
  packages, the model presets (`configs/model/`, which a resolved config may name) and the
  resolved config, so what runs there is exactly what was resolved here; no other file of
  `configs/` is sent (one may hold credentials); or
- a container image (Ray's `image_uri`; the nodes need podman): the code is the image's,
  and the resolved config travels in $ILLADA_JOB_CONFIG.
Either way the config has its secrets left out: the cluster uses its own credentials.
`--env` values travel in the job's runtime environment, which the Ray dashboard shows: a
name that looks like a credential gets a warning.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from illada.config import Config, ConfigError, dump_config, load_config
from illada.errors import UserError

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)
PACKAGES = ("illada", "pipelines")
SECRET_NAME = re.compile(r"(?i)(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL)")
JOB_CONFIG = "job_config.yaml"  # in the staged working directory
CONFIG_ENV = "ILLADA_JOB_CONFIG"  # the config's YAML, for jobs from an image


def client(address: str) -> JobSubmissionClient:
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray dashboard at {address} ({e}); check --address (or RAY_ADDRESS), e.g. http://HEAD:8265") from e


def job_config(config: Config) -> Config:
    """The config as the job's driver must see it: it joins the cluster it runs in, and
    relative local paths mean what they meant here."""
    update = {"ray": config.ray.model_copy(update={"address": None})}
    if config.data is not None:
        update["data"] = _absolute_paths(config.data)
    if config.train is not None:
        update["train"] = _absolute_train_paths(config.train)
    return config.model_copy(update=update)


def _stage_working_dir(config: Config) -> Path:
    staging = Path(tempfile.mkdtemp(prefix="illada-job-"))
    for package in PACKAGES:
        shutil.copytree(REPO / package, staging / package, ignore=_code_and_presets)
    (staging / JOB_CONFIG).write_text(dump_config(job_config(config)))
    return staging


def _code_and_presets(folder: str, names: list[str]) -> set[str]:
    """What not to stage: caches, and every config but the model presets a config may name
    (a config holding a storage key must never travel)."""
    skip = {n for n in names if n == "__pycache__"}
    if Path(folder).name == "configs" and Path(folder).parent.name == "illada":
        skip |= {n for n in names if n != "model"}
    return skip


def load_job_config(path: str | None, overrides: list[str] = ()) -> Config:
    """In a job's driver: the config file, or without one the YAML in $ILLADA_JOB_CONFIG."""
    if path is not None:
        return load_config(path, list(overrides))
    if CONFIG_ENV not in os.environ:
        raise ConfigError(f"no config: give a config file, or set {CONFIG_ENV} to the config's YAML")
    return load_config(base=yaml.safe_load(os.environ[CONFIG_ENV]), overrides=list(overrides))


def _absolute(path: str) -> str:
    return path if "://" in path or os.path.isabs(path) else os.path.abspath(path)


def _absolute_paths(data):
    """Relative local paths made absolute as they are meant here: the job's driver runs in
    the staged folder, where they would point at nothing (the root is already absolute)."""
    tokenizer = data.tokenizer.path
    return data.model_copy(
        update={
            "sources": [s.model_copy(update={"paths": [_absolute(p) for p in s.paths]}) for s in data.sources],
            "tokenizer": data.tokenizer.model_copy(update={"path": _absolute(tokenizer) if tokenizer else None}),
        }
    )


def _absolute_train_paths(train):
    checkpoint = train.checkpoint.model_copy(update={"dir": _absolute(train.checkpoint.dir) if train.checkpoint.dir else None})
    return train.model_copy(update={"checkpoint": checkpoint, "init_from": _absolute(train.init_from) if train.init_from else None})


@dataclass
class JobSpec:
    entrypoint: str
    runtime_env: dict
    metadata: dict
    staging: Path | None  # the staged working dir, removed once submitted


def job_spec(config: Config, kind: str, module: str, flags=(), *, image=None, env=None) -> JobSpec:
    """What `submit` sends: `python -m MODULE CONFIG FLAGS` with its runtime environment.

    With `image`, the job runs in that container image (Ray's image_uri) and gets the
    config in $ILLADA_JOB_CONFIG instead of a file (MODULE must accept that); otherwise it
    runs from a staged working directory. `env` adds environment variables to every
    process of the job (the driver, Ray Train's controller, the workers)."""
    _warn_on_secret_names(env or {})
    env_vars = {**_code_version_env(), **(env or {})}
    metadata = {"illada.kind": kind, "illada.config": config.name, "illada.root": config.root}
    staging = None
    if image:
        env_vars[CONFIG_ENV] = dump_config(job_config(config))
        runtime_env, config_arg = {"image_uri": image}, []
    else:
        staging = _stage_working_dir(config)
        runtime_env, config_arg = {"working_dir": str(staging)}, [JOB_CONFIG]
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return JobSpec(shlex.join(["python", "-m", module, *config_arg, *flags]), runtime_env, metadata, staging)


def _warn_on_secret_names(env: dict[str, str]) -> None:
    for name in sorted(n for n in env if SECRET_NAME.search(n)):
        log.warning(
            "--env %s looks like a credential: it is stored in the job's runtime environment, which the Ray dashboard and "
            "job API show; give the cluster its own credentials (instance roles, a secret store) instead",
            name,
        )


def submit(config: Config, address: str, kind: str, module: str, flags=(), *, submission_id=None, image=None, env=None) -> str:
    """Submit a job (see job_spec); returns its submission id. The one way illada submits."""
    spec = job_spec(config, kind, module, flags, image=image, env=env)
    try:
        return client(address).submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env, submission_id=submission_id, metadata=spec.metadata)
    finally:
        if spec.staging is not None:
            shutil.rmtree(spec.staging, ignore_errors=True)


def _code_version_env() -> dict[str, str]:
    """The submitter's git commit for the job's lineage records (the staged copy has no .git)."""
    from illada.lineage.record import GIT_COMMIT, GIT_DIRTY, code_version

    version = code_version()
    return {"ILLADA_GIT_COMMIT": version[GIT_COMMIT], "ILLADA_GIT_DIRTY": version[GIT_DIRTY]}


def submit_pipeline(config: Config, address: str, *, stage=None, start=None, force=False, verify=False, submission_id=None, env=None) -> str:
    flags = (["--stage", stage] if stage else []) + (["--from", start] if start else []) + (["--force"] if force else []) + (["--verify"] if verify else [])
    return submit(config, address, "pipeline", "pipelines.pretrain_data", flags, submission_id=submission_id, env=env)


def submit_train(config: Config, address: str, *, submission_id=None, image=None, env=None) -> str:
    config.require("model", "train")
    return submit(config, address, "train", "pipelines.pretrain", submission_id=submission_id, image=image, env=env)


def job_info(address: str, job_id: str) -> dict:
    info = client(address).get_job_info(job_id)
    return {"submission_id": info.submission_id, "status": str(info.status.value), "entrypoint": info.entrypoint, "message": info.message, "start_time": info.start_time, "end_time": info.end_time, "metadata": info.metadata}


def list_jobs(address: str) -> list[dict]:
    return [{"submission_id": j.submission_id or j.job_id, "status": str(j.status.value), "entrypoint": j.entrypoint} for j in client(address).list_jobs()]


def print_logs(address: str, job_id: str, follow: bool = False) -> None:
    c = client(address)
    if not follow:
        print(c.get_job_logs(job_id), end="")
        return
    import asyncio

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def stop_job(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)


def wait_for_job(address: str, job_id: str, timeout_s: float = 3600, poll_s: float = 2) -> str:
    c = client(address)
    deadline = time.monotonic() + timeout_s
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while time.monotonic() < deadline:
        status = c.get_job_status(job_id)
        if status in terminal:
            return str(status.value)
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f}s; it is still running on the cluster")
