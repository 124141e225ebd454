"""Ray Jobs: send a pipeline run to a cluster and follow it.

The job's working directory is a small staging folder holding the `illada` and
`pipelines` packages and the resolved config (secrets left out: the cluster uses its own
credentials), so what runs there is exactly what was resolved here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from illada.config import Config, dump_config

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("illada", "pipelines")


def client(address: str) -> JobSubmissionClient:
    return JobSubmissionClient(address)


def _stage_working_dir(config: Config) -> Path:
    staging = Path(tempfile.mkdtemp(prefix="illada-job-"))
    for package in PACKAGES:
        shutil.copytree(REPO / package, staging / package, ignore=shutil.ignore_patterns("__pycache__"))
    update = {"ray": config.ray.model_copy(update={"address": None})}
    if config.data is not None:
        update["data"] = _absolute_paths(config.data)
    job_config = config.model_copy(update=update)
    (staging / "job_config.yaml").write_text(dump_config(job_config))
    return staging


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


def submit_pipeline(config: Config, address: str, *, stage=None, start=None, force=False, submission_id=None) -> str:
    flags = (["--stage", stage] if stage else []) + (["--from", start] if start else []) + (["--force"] if force else [])
    entrypoint = " ".join(["python", "-m", "pipelines.pretrain_data", "job_config.yaml", *flags])
    staging = _stage_working_dir(config)
    try:
        return client(address).submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": str(staging)},
            submission_id=submission_id,
            metadata={"illada.kind": "pipeline", "illada.config": config.name, "illada.root": config.root},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
