"""No credential where it could leak: debug logs, what `illada submit` uploads, the arguments
of Ray tasks. Against moto's S3 server and a local Ray."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from illada import jobs, storage
from illada.config import load_config
from tests.conftest import REPO

KEY = "AKIAILLADALOGKEY0002"
SECRET = "illada-log-secret-do-not-print-9876543210"


def _with_secrets(raw: dict, endpoint: str) -> dict:
    return raw | {"storage": {"s3": {"endpoint_url": endpoint, "region": "us-east-1", "key": KEY, "secret": SECRET}}}


def test_verbose_logs_never_show_the_s3_key_id_or_secret(tmp_path, s3_bucket, s3_server, tiny_config_factory):
    raw = _with_secrets(tiny_config_factory.raw(f"{s3_bucket}/run", f"{s3_bucket}/raw"), s3_server)
    config = tiny_config_factory.write_yaml(raw, tmp_path / "s3.yaml")
    done = subprocess.run([sys.executable, "-m", "illada.cli", "-v", "pipeline", "status", config], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = done.stdout + done.stderr
    assert "'Authorization': b'***'" in logged  # botocore's DEBUG request lines, masked
    assert KEY not in logged and SECRET not in logged


def test_the_redacting_filter_masks_headers_key_ids_and_known_secrets(caplog):
    from illada.redaction import RedactingFilter, remember

    remember("a-configured-secret-value")
    logger = logging.getLogger("illada.test.redaction")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        logger.debug("headers=%s", {"Authorization": "Bearer abc.def.ghi", "Host": "s3"})
        logger.debug("key %s and %s", "ASIAABCDEFGHIJKLMNOP", "a-configured-secret-value")
    assert "abc.def.ghi" not in caplog.text and "'Host': 's3'" in caplog.text
    assert "ASIAABCDEFGHIJKLMNOP" not in caplog.text and "a-configured-secret-value" not in caplog.text


def test_ray_tasks_get_s3_credentials_through_their_environment_not_their_arguments(tmp_path, ray_local, tiny_config_factory, s3_server):
    from illada.pipeline.stage import StageContext

    config = load_config(base=_with_secrets(tiny_config_factory.raw(str(tmp_path / "run"), str(tmp_path / "raw")), s3_server))
    ctx = StageContext(config=config, stage="probe")
    [seen] = ctx.run_tasks("credentials", _what_the_task_got, {"only": {}}).values()
    assert seen == {"key in arguments": False, "secret in arguments": False, "env key": KEY, "env secret": SECRET}


def _what_the_task_got(spec: dict) -> dict:
    s3 = storage._storage.s3  # what _run_with_storage configured from the task's arguments
    return {
        "key in arguments": s3.key is not None,
        "secret in arguments": s3.secret is not None,
        "env key": os.environ.get("AWS_ACCESS_KEY_ID"),
        "env secret": os.environ.get("AWS_SECRET_ACCESS_KEY"),
    }


def test_submit_uploads_the_model_presets_and_no_other_config(tmp_path, tiny_config_factory):
    raw = tiny_config_factory.raw(str(tmp_path / "run"), str(tmp_path / "raw"))
    staging = jobs._stage_working_dir(load_config(base=raw))
    try:
        staged = sorted(str(p.relative_to(staging / "illada")) for p in (staging / "illada" / "configs").rglob("*") if p.is_file())
        presets = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "model").glob("*.yaml"))
        assert staged == presets and "configs/quickstart.yaml" not in staged
        assert not (staging / "configs").exists()
    finally:
        import shutil

        shutil.rmtree(staging)


def test_submit_warns_about_secret_looking_env_names(tmp_path, tiny_config_factory, caplog):
    import shutil

    config = load_config(base=tiny_config_factory.raw(str(tmp_path / "run"), str(tmp_path / "raw")))
    with caplog.at_level(logging.WARNING, logger="illada.jobs"):
        spec = jobs.job_spec(config, "pipeline", "pipelines.pretrain_data", env={"NCCL_DEBUG": "INFO", "AWS_SECRET_ACCESS_KEY": "x", "HF_TOKEN": "y"})
    shutil.rmtree(spec.staging)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m.split()[1] for m in warned] == ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN"]
    assert all("looks like a credential" in m for m in warned)


def test_ray_training_workers_get_s3_credentials_through_their_environment(tmp_path, tiny_config_factory, s3_server):
    import pickle

    from illada.train.ray_launch import worker_arguments

    config = load_config(base=_with_secrets(tiny_config_factory.raw(str(tmp_path / "run"), str(tmp_path / "raw")), s3_server))
    loop_config, runtime_env = worker_arguments(config, {"MLFLOW_RUN_ID": "r"})
    assert KEY.encode() not in pickle.dumps(loop_config) and SECRET.encode() not in pickle.dumps(loop_config)
    assert runtime_env == {"env_vars": {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}}
    assert loop_config["config"].storage.s3.endpoint_url == s3_server and loop_config["env"] == {"MLFLOW_RUN_ID": "r"}
