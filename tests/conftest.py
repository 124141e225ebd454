"""Shared fixtures: a real S3 (moto's HTTP server), a local Ray, and a tiny pipeline config.

Everything is kept small: the machine these run on has two cores and is shared.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from pathlib import Path

import pytest
import yaml
import zstandard

from illada import storage
from illada.config import Config, StorageConfig, load_config

REPO = Path(__file__).resolve().parents[1]

# Ray starts its workers at nice 15 (to keep its own daemons responsive). On a busy machine
# those workers then get almost no CPU and every Ray test crawls: give them a fair share.
# (Set before any Ray starts; `ray start` in tests/ray_cluster.py inherits it.)
os.environ.setdefault("RAY_worker_niceness", "0")

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- S3: moto's real server over HTTP -------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, with the AWS environment pointing at it for the whole
    session (processes started later, Ray workers included, inherit it). Yields the endpoint."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        patch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        patch.delenv(key, raising=False)
    try:
        yield endpoint
    finally:
        patch.undo()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; yields "s3://<name>"."""
    import boto3

    name = f"illada-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name=S3_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
    storage.configure(StorageConfig())
    yield f"s3://{name}"
    storage.configure(StorageConfig())


# --- Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray of 2 CPUs for this test process, started after the S3 environment is set;
    the AWS variables are also passed as the job's runtime env so workers see them even if
    Ray was started earlier. address="local": never join another cluster on this machine
    (a bare ray.init() joins the last `ray start` cluster it finds)."""
    import ray

    env_vars = {key: os.environ[key] for key in (*S3_ENV, "AWS_ENDPOINT_URL")}
    owned = not ray.is_initialized()
    if owned:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 * 1024 * 1024,
            runtime_env={"env_vars": env_vars},
            log_to_driver=False,
        )
    yield ray
    if owned:
        ray.shutdown()


# --- a tiny pipeline config -----------------------------------------------------------------

WORDS = (
    "diffusion model token mask denoise sequence bidirectional language data pipeline shard "
    "train sample corpus vocabulary the a of and to in on with for from"
).split()


def tiny_docs(source: str, n: int) -> list[dict]:
    """`n` distinct, deterministic documents of a few dozen words, plus one exact duplicate."""
    docs = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * (i + 3)) % len(WORDS)] for j in range(40 + 5 * i)]
        docs.append({"id": f"{source}-{i}", "text": f"{source} document {i}: " + " ".join(words) + "."})
    docs.append({"id": f"{source}-dup", "text": docs[0]["text"]})
    return docs


def _jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in docs).encode()


class TinyConfigFactory:
    """`factory(root, data_dir) -> Config`: writes two small sources under `data_dir` (a local
    path or s3:// URL) - `alpha/*.jsonl` (two files, read through a glob) and
    `beta.jsonl.zst` - and returns the resolved config of a fast pipeline over them.

    `factory.raw(...)` returns the config as a dict instead, and `factory.write_yaml(raw, path)`
    writes one for the CLI. `overrides` are `key.sub=value` strings; `extra` is merged into
    the dict first (e.g. {"storage": {"s3": {...}}})."""

    def raw(self, root: str, data_dir: str, docs_per_source: int = 6, extra: dict | None = None) -> dict:
        data_dir = str(data_dir).rstrip("/")
        alpha = tiny_docs("alpha", docs_per_source)
        half = len(alpha) // 2
        storage.write_bytes(storage.join(data_dir, "alpha", "part-0.jsonl"), _jsonl(alpha[:half]))
        storage.write_bytes(storage.join(data_dir, "alpha", "part-1.jsonl"), _jsonl(alpha[half:]))
        beta = zstandard.ZstdCompressor(level=3).compress(_jsonl(tiny_docs("beta", docs_per_source)))
        storage.write_bytes(storage.join(data_dir, "beta.jsonl.zst"), beta)
        raw = {
            "name": "tiny",
            "root": str(root),
            "ray": {"num_cpus": 2},
            "data": {
                "sources": [
                    {"name": "alpha", "paths": [f"{data_dir}/alpha/*.jsonl"], "weight": 0.5, "id_field": "id"},
                    {"name": "beta", "paths": [f"{data_dir}/beta.jsonl.zst"], "weight": 0.5, "id_field": "id"},
                ],
                "dedup": {"exact": {"num_partitions": 2}, "fuzzy": {"enabled": False, "num_partitions": 2}},
                "tokenizer": {"vocab_size": 300, "train_sample_docs": 50},
                "tokenize": {"batch_size": 16, "num_workers": 1},
                "pack": {"seq_len": 64, "sequences_per_shard": 8},
            },
        }
        for key, value in (extra or {}).items():
            raw[key] = value
        return raw

    def __call__(self, root: str, data_dir: str, overrides: list[str] = (), **kwargs) -> Config:
        return load_config(base=self.raw(root, data_dir, **kwargs), overrides=list(overrides))

    @staticmethod
    def write_yaml(raw: dict, path: str | Path) -> str:
        Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
        return str(path)


@pytest.fixture
def tiny_config_factory():
    return TinyConfigFactory()


# --- a packed tiny corpus for training -------------------------------------------------------


@pytest.fixture(scope="session")
def train_data_root(tmp_path_factory, ray_local) -> str:
    """A data-pipeline run over the tiny sources (64-token sequences, 30 documents each, a
    quarter held out for validation), made once per session: its `pack/` is what training
    tests read (train.data_root)."""
    from illada.pipeline.runner import run_pipeline
    from illada.data.stages import PRETRAIN as STAGES

    tmp = tmp_path_factory.mktemp("train-data")
    config = TinyConfigFactory()(str(tmp / "run"), str(tmp / "raw"), ["data.pack.validation_fraction=0.25"], docs_per_source=30)
    run_pipeline(config, STAGES)
    return str(tmp / "run")


# --- MLflow ---------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """One MLflow database for every run this session records (pipelines record themselves):
    each new database costs seconds of schema migrations, and a run root on S3 would
    otherwise put ./mlflow.db in the working directory. Tests of the default store (under
    the run root) unset MLFLOW_TRACKING_URI themselves."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    patch.undo()


# --- torch --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests run small tensors: one thread is fastest, and far faster than two on a busy
    2-core machine. (Training and megatron tests run in child processes with their own.)"""
    try:
        import torch
    except ImportError:  # the data-stack-only install that CI checks on a second Python
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def no_parallel_state_left_behind():
    """Inference keeps this process's megatron groups for the next model it loads; a test
    module that loaded one must not hand them to another module's init_parallel."""
    yield
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        from illada.parallel import destroy_parallel

        destroy_parallel()
