"""Fixtures for the lineage tests: training runs through `illada train`, and a real MLflow
server with a PostgreSQL backend store and an S3 artifact store (moto's server).

PostgreSQL refuses to run as root; as root (CI is) it is started as the `postgres` system
user (or `nobody`) through runuser, in a data directory that user owns."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import S3_ENV, free_port
from tests.distributed import run_distributed

MODEL = {"preset": "tiny", "vocab_size": 512, "max_seq_len": 64}
TRAIN = {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "log_interval": 1, "optim": {"warmup_steps": 1}, "checkpoint": {"interval": 1}}


def train(root: Path, data_root: str, *overrides: str, env: dict[str, str | None] | None = None, extra: dict | None = None) -> str:
    """`illada train CONFIG --nproc-per-node 1` in a child process (from the test harness's
    forkserver, which has imported torch and megatron once); returns what it logged.
    `env` sets (or, with None, removes) environment variables in the child first."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"name": "tiny", "root": str(root), "model": MODEL, "train": {**TRAIN, "data_root": data_root}, **(extra or {})}
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    log = root / f"train-{len(list(root.glob('train-*.log')))}.log"
    [code] = run_distributed(_train_child, 1, str(path), list(overrides), env or {}, str(log), timeout=300)
    assert code == 0, log.read_text()[-6000:]
    return log.read_text()


def _train_child(rank: int, config: str, overrides: list[str], env: dict, log: str) -> int:
    import logging

    from illada.cli import main

    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    logging.basicConfig(filename=log, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    return main(["train", config, *overrides, "--nproc-per-node", "1"])


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
    return Path(found).resolve().parent if found else None


def _as_postgres_user() -> tuple[list[str], str | None]:
    """The command prefix that runs the server binaries as a user PostgreSQL accepts."""
    if os.geteuid() != 0:
        return [], None
    user = "postgres"
    try:
        pwd.getpwnam(user)
    except KeyError:
        user = "nobody"
    return ["runuser", "-u", user, "--"], user


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1 with an empty `mlflow` database; yields its URI."""
    bindir = postgres_bin()
    if bindir is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found; install them (apt-get install postgresql), as .ci/run does"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    prefix, user = _as_postgres_user()
    home = tempfile.mkdtemp(prefix="illada-pg-")
    if user:
        shutil.chown(home, user)
    data, port = os.path.join(home, "data"), free_port()
    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True, timeout=120)

    run(str(bindir / "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    run(str(bindir / "pg_ctl"), "-D", data, "-l", os.path.join(home, "server.log"), "-o", options, "-w", "-t", "60", "start")
    try:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", data, "-m", "immediate", "stop"], check=False, capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


# --- an MLflow server -------------------------------------------------------------------------


@dataclass
class MlflowServer:
    url: str
    backend: str  # the PostgreSQL URI
    artifacts_bucket: str
    log: Path


@pytest.fixture(scope="session")
def mlflow_server(postgres, s3_server, tmp_path_factory):
    """`mlflow server` on PostgreSQL, its artifacts in a bucket of moto's S3 server."""
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name=S3_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"MLFLOW_S3_ENDPOINT_URL": s3_server}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres, "--artifacts-destination", f"s3://{bucket}/artifacts"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(url, server, log)
        yield MlflowServer(url, postgres, bucket, log)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_until_healthy(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer within {timeout_s} s:\n{log.read_text()[-4000:]}")
