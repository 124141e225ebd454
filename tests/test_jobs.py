"""Ray Jobs against a real Ray head (dashboard and job server included) started for this module.

The head is this module's own (tests/ray_cluster.py): its own temp dir, free ports for
everything it listens on, its own session, stopped by signalling exactly that session's
processes. Nothing here uses the test process's own local Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from illada import storage
from illada.cli import main
from tests.ray_cluster import VENV_BIN, RayStartError, start_cluster

STAGE_NAMES = ["ingest", "dedup_exact", "dedup_fuzzy", "decontaminate", "tokenizer", "tokenize", "pack"]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on this machine with the dashboard and job server, run from this venv
    (see tests/ray_cluster.py; the runbook covers clusters with token auth)."""
    try:
        cluster = start_cluster(head_cpus=2)
    except RayStartError as e:
        pytest.fail(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


def _wait_status(address: str, job_id: str, wanted: set[str], timeout_s: float = 120) -> str:
    from illada.jobs import job_info

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = job_info(address, job_id)["status"]
        if status in wanted:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {wanted} in {timeout_s:.0f}s (last: {status})")


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_submit_pipeline_and_follow_it(ray_head, tmp_path, tiny_config_factory, capsys):
    root = tmp_path / "run"
    raw = tiny_config_factory.raw(str(root), str(tmp_path / "raw"))
    config_path = tiny_config_factory.write_yaml(raw, tmp_path / "tiny.yaml")
    job_id = "illada-test-pipeline"

    code = main(["submit", "pipeline", config_path, "--address", ray_head.address, "--job-id", job_id, "--wait"])
    out = capsys.readouterr().out
    if code != 0:
        main(["jobs", "logs", job_id, "--address", ray_head.address])
        pytest.fail(f"the job failed:\n{out}\n{capsys.readouterr().out[-6000:]}")
    assert f"submitted job {job_id}" in out and f"job {job_id}: SUCCEEDED" in out

    # The cluster wrote the run to the local disk it shares with us.
    pack = storage.read_json(str(root / "pack" / "manifest.json"))
    assert pack["stats"]["seq_len"] == 64 and any(f["kind"] == "shard" for f in pack["files"])
    assert all((root / name / "manifest.json").exists() for name in STAGE_NAMES)

    assert main(["jobs", "status", job_id, "--address", ray_head.address]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "SUCCEEDED"
    assert info["entrypoint"] == "python -m pipelines.pretrain_data job_config.yaml"
    assert info["metadata"] == {"illada.kind": "pipeline", "illada.config": "tiny", "illada.root": str(root)}

    assert main(["jobs", "logs", job_id, "--address", ray_head.address]) == 0
    logs = capsys.readouterr().out
    assert "packed" in logs and "sequences of 64 tokens" in logs  # the driver's summary
    assert main(["jobs", "logs", job_id, "--address", ray_head.address, "--follow"]) == 0  # ends with the job
    assert "sequences of 64 tokens" in capsys.readouterr().out

    assert main(["jobs", "list", "--address", ray_head.address]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [job_id, "SUCCEEDED", "python", "-m", "pipelines.pretrain_data", "job_config.yaml"] in listed

    # A job that fails: --wait exits 1, the status says FAILED, the logs say why.
    other = tmp_path / "other-run"
    code = main(["submit", "pipeline", config_path, "--root", str(other), "--stage", "pack", "--address", ray_head.address, "--job-id", "illada-test-fails", "--wait"])
    assert code == 1 and "job illada-test-fails: FAILED" in capsys.readouterr().out
    assert main(["jobs", "status", "illada-test-fails", "--address", ray_head.address]) == 0
    assert json.loads(capsys.readouterr().out)["entrypoint"].endswith("job_config.yaml --stage pack")
    assert main(["jobs", "logs", "illada-test-fails", "--address", ray_head.address]) == 0
    assert "illada: error: stage 'pack' needs" in capsys.readouterr().out

    # Submitting again is a resume: every stage is up to date, so the job only checks.
    manifests_before = {n: (root / n / "manifest.json").read_bytes() for n in STAGE_NAMES}
    assert main(["submit", "pipeline", config_path, "--address", ray_head.address, "--wait"]) == 0
    assert {n: (root / n / "manifest.json").read_bytes() for n in STAGE_NAMES} == manifests_before


def test_staged_working_dir_holds_the_code_and_a_config_without_secrets(tmp_path, tiny_config_factory, monkeypatch):
    from illada import jobs
    from illada.config import load_config
    from illada.data.ingest import expand_paths

    monkeypatch.chdir(tmp_path)
    raw = tiny_config_factory.raw("run", "raw")  # relative paths, as people write them
    raw["ray"]["address"] = "ray://somewhere:10001"
    raw["storage"] = {"s3": {"endpoint_url": "http://minio:9000", "key": "AKIASTAGEDKEY", "secret": "staged-secret-value"}}
    raw["data"]["tokenizer"]["path"] = "tok/tokenizer.json"

    staging = jobs._stage_working_dir(load_config(base=raw))
    try:
        assert sorted(p.name for p in staging.iterdir()) == ["illada", "job_config.yaml", "pipelines"]
        assert (staging / "illada" / "configs" / "model" / "tiny.yaml").is_file()  # presets a config may name, as real files
        assert (staging / "pipelines" / "pretrain_data.py").exists() and (staging / "illada" / "jobs.py").exists()
        assert not list(staging.rglob("__pycache__"))
        text = (staging / "job_config.yaml").read_text()
        assert "staged-secret-value" not in text and "AKIASTAGEDKEY" not in text
        staged = load_config(staging / "job_config.yaml")
        assert staged.ray.address is None  # the driver joins the cluster it runs in
        assert staged.storage.s3.endpoint_url == "http://minio:9000"
        # The driver runs in the staged folder: local paths must still mean what they meant here.
        assert staged.root == str(tmp_path / "run")
        assert staged.data.tokenizer.path == str(tmp_path / "tok" / "tokenizer.json")
        monkeypatch.chdir(staging)
        assert [len(expand_paths(source)) for source in staged.data.sources] == [2, 1]
    finally:
        shutil.rmtree(staging)


@pytest.mark.timeout(180)
def test_job_python_is_the_venv_and_stop_ends_a_long_job(ray_head, capsys):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.address)
    job_id = client.submit_job(
        entrypoint="python -c 'import sys, time; print(\"PYTHON=\" + sys.executable, flush=True); time.sleep(600)'",
        submission_id="illada-test-long",
    )
    _wait_status(ray_head.address, job_id, {"RUNNING"})
    deadline = time.monotonic() + 60
    printed: list[str] = []
    while not printed and time.monotonic() < deadline:  # (the log also echoes the entrypoint)
        printed = [line for line in client.get_job_logs(job_id).splitlines() if line.startswith("PYTHON=")]
        time.sleep(0.5)
    assert printed, client.get_job_logs(job_id)
    executable = printed[0].removeprefix("PYTHON=")
    assert Path(executable).parent == VENV_BIN, f"the job's `python` is {executable}, not the venv's"

    assert main(["jobs", "stop", job_id, "--address", ray_head.address]) == 0
    assert f"job {job_id}: stop requested" in capsys.readouterr().out
    assert _wait_status(ray_head.address, job_id, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout_s=60) == "STOPPED"
    assert main(["jobs", "stop", job_id, "--address", ray_head.address]) == 0
    assert "was not running" in capsys.readouterr().out


def test_a_training_job_runs_from_a_working_dir_or_from_an_image_with_its_config_in_the_environment(tmp_path, monkeypatch):
    from illada import jobs
    from illada.config import load_config

    monkeypatch.chdir(tmp_path)
    raw = {
        "name": "tiny",
        "root": "run",
        "storage": {"s3": {"key": "AKIASTAGEDKEY", "secret": "staged-secret-value"}},
        "model": {"preset": "tiny"},
        "train": {"steps": 2, "global_batch_size": 2, "optim": {"warmup_steps": 1}, "checkpoint": {"dir": "ckpt"}, "init_from": "old/step_00000010"},
    }
    config = load_config(base=raw)

    spec = jobs.job_spec(config, "train", "pipelines.pretrain", env={"NCCL_DEBUG": "INFO"})
    try:
        assert spec.entrypoint == "python -m pipelines.pretrain job_config.yaml"
        from illada.lineage.record import GIT_COMMIT, code_version

        env_vars = spec.runtime_env.pop("env_vars")
        assert spec.runtime_env == {"working_dir": str(spec.staging)}
        assert env_vars["NCCL_DEBUG"] == "INFO"
        assert env_vars["ILLADA_GIT_COMMIT"] == code_version()[GIT_COMMIT]  # the staged copy has no .git
        assert spec.metadata == {"illada.kind": "train", "illada.config": "tiny", "illada.root": str(tmp_path / "run")}
        staged = load_config(spec.staging / "job_config.yaml")
        assert staged.train.checkpoint.dir == str(tmp_path / "ckpt") and staged.train.init_from == str(tmp_path / "old/step_00000010")
    finally:
        shutil.rmtree(spec.staging)

    spec = jobs.job_spec(config, "train", "pipelines.pretrain", image="registry.example/illada-gpu:1", env={"NCCL_DEBUG": "INFO"})
    assert spec.staging is None and spec.entrypoint == "python -m pipelines.pretrain"
    env_vars = spec.runtime_env.pop("env_vars")
    assert spec.runtime_env == {"image_uri": "registry.example/illada-gpu:1"}
    assert env_vars["NCCL_DEBUG"] == "INFO" and "staged-secret-value" not in env_vars[jobs.CONFIG_ENV]
    monkeypatch.setenv(jobs.CONFIG_ENV, env_vars[jobs.CONFIG_ENV])
    from_env = jobs.load_job_config(None, ["train.steps=3"])
    assert from_env.train.steps == 3 and from_env.model == config.model
    assert from_env.train.checkpoint.dir == str(tmp_path / "ckpt")


def test_the_training_entrypoint_has_help_and_says_when_it_has_no_config():
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "ILLADA_JOB_CONFIG"}
    shown = subprocess.run([sys.executable, "-m", "pipelines.pretrain", "--help"], check=False, cwd=REPO, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "ILLADA_JOB_CONFIG" in shown.stdout
    bare = subprocess.run([sys.executable, "-m", "pipelines.pretrain"], check=False, cwd=REPO, env=env, capture_output=True, text=True)
    assert bare.returncode == 2 and "illada: error: no config: give a config file, or set ILLADA_JOB_CONFIG" in bare.stderr


def test_submit_train_refuses_a_config_without_training_or_a_malformed_env(tmp_path, tiny_config_factory, capsys):
    raw = tiny_config_factory.raw(str(tmp_path / "run"), str(tmp_path / "raw"))
    config_path = tiny_config_factory.write_yaml(raw, tmp_path / "tiny.yaml")  # a data config: no model, no train
    assert main(["submit", "train", config_path, "--address", "http://127.0.0.1:1"]) == 2
    assert "illada: error: config 'tiny' has no model, train section; this command needs it" in capsys.readouterr().err
    assert main(["submit", "pipeline", config_path, "--address", "http://127.0.0.1:1", "--env", "NOEQUALS"]) == 2
    assert "illada: error: --env 'NOEQUALS' must look like KEY=VALUE" in capsys.readouterr().err
