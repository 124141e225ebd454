"""Lineage against a real `mlflow server` (PostgreSQL backend store, artifacts in moto's S3),
for a pipeline whose raw data and run root are on S3, with S3 keys both in the environment
and in the config: the chain is recorded and read back through the server, and no
credential appears in the store (any table), its artifacts, or any log."""

from __future__ import annotations

import json
import logging
import os

import boto3

from illada.cli import main
from illada.config import load_config
from illada.lineage.graph import build
from illada.lineage.verify import verify
from illada.pipeline.runner import run_pipeline
from illada.data.stages import PRETRAIN as STAGES
from tests.conftest import S3_ENV, TinyConfigFactory
from tests.lineage.conftest import train

CONFIG_KEY = "illada-config-access-key-5Q7Z"
CONFIG_SECRET = "illada-config-secret-8fJ2kL0p"
SECRETS = (CONFIG_KEY, CONFIG_SECRET, S3_ENV["AWS_ACCESS_KEY_ID"], S3_ENV["AWS_SECRET_ACCESS_KEY"])
CREDENTIALS = {"storage": {"s3": {"key": CONFIG_KEY, "secret": CONFIG_SECRET}}}


def store_text(server) -> str:
    """Every row of every table of the server's database, as text."""
    import psycopg

    with psycopg.connect(server.backend) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(f"{t}: {row}" for t in tables for row in conn.execute(f'SELECT * FROM "{t}"'))


def artifacts_text(server, endpoint: str) -> tuple[list[str], str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=S3_ENV["AWS_DEFAULT_REGION"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=server.artifacts_bucket).get("Contents", [])]
    return keys, "\n".join(s3.get_object(Bucket=server.artifacts_bucket, Key=k)["Body"].read().decode(errors="replace") for k in keys)


def test_lineage_through_an_mlflow_server_with_no_credentials_in_it(mlflow_server, s3_server, s3_bucket, ray_local, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    root = f"{s3_bucket}/run"
    raw = TinyConfigFactory().raw(root, f"{s3_bucket}/raw", extra=CREDENTIALS)
    # Everything at INFO, illada's own loggers at DEBUG. (botocore's DEBUG wire log, which
    # `illada -v` turns on, prints access key ids in request headers.)
    with caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, logger="illada"):
        manifests = run_pipeline(load_config(base=raw), STAGES)
    env = {k: os.environ[k] for k in (*S3_ENV, "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI")}
    output = train(tmp_path / "T", root, env=env, extra=CREDENTIALS)
    assert CONFIG_SECRET in (tmp_path / "T" / "train.yaml").read_text()  # the config did carry it

    checkpoint = str(tmp_path / "T" / "checkpoints" / "step_00000002")
    lineage = build(checkpoint)
    assert all(n.recorded == "mlflow" for n in lineage.nodes.values()), [n.label for n in lineage.nodes.values() if n.recorded != "mlflow"]
    stages = {n.label: n for n in lineage.of_kind("stage")}
    assert set(stages) == set(manifests)
    assert all(stages[name].facts["digest"] == manifests[name]["digest"] for name in manifests)
    assert stages["pack"].detail["manifest"] == f"{root}/pack/manifest.json"
    assert {n.label for n in lineage.of_kind("raw")} == {"raw alpha", "raw beta"}
    assert not verify(lineage).problems  # re-hashes the shards on S3

    capfd.readouterr()
    assert main(["lineage", "show", checkpoint, "--format", "json"]) == 0
    shown = json.loads(capfd.readouterr().out)
    assert {n["kind"] for n in shown["nodes"]} == {"checkpoint", "training_run", "shards", "stage", "raw"}
    assert main(["lineage", "mix", checkpoint, "--format", "json"]) == 0
    mix = json.loads(capfd.readouterr().out)
    info = json.loads((tmp_path / "T" / "checkpoints" / "step_00000002" / "illada.json").read_text())
    assert {r["source"]: r["tokens"] for r in mix["rows"]} == info["tokens_per_source"]

    # The checkpoints are LoggedModels whose metadata went through the server to S3.
    keys, artifacts = artifacts_text(mlflow_server, s3_server)
    assert sum(k.endswith("/MLmodel") for k in keys) == 2
    database = store_text(mlflow_server)
    assert root in database and checkpoint in database  # the scan sees what was recorded
    logs = caplog.text + output + "".join(capfd.readouterr()) + mlflow_server.log.read_text()
    for secret in SECRETS:
        for where, text in (("the MLflow database", database), ("the artifacts", artifacts), ("the logs", logs)):
            assert secret not in text, f"{secret!r} is in {where}"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == S3_ENV["AWS_SECRET_ACCESS_KEY"]  # it was there to leak
