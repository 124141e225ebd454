"""Ray Jobs against a real Ray head (dashboard and job server included) started for this module.

The head is this module's own: its own temp dir, free ports for everything it listens on,
its own session. It is stopped by signalling exactly the processes of that session (and
their children) - never `ray stop`, which stops every Ray on the machine, other people's
included. Nothing here uses the test process's own local Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from illada import storage
from illada.cli import main
from tests.conftest import free_port

VENV_BIN = Path(sys.executable).parent
STAGE_NAMES = ["ingest", "dedup_exact", "dedup_fuzzy", "tokenizer", "tokenize", "pack"]


# --- the processes of one session ---------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a live process; None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else (int(fields[1]), int(fields[3]))


def session_processes(sid: int) -> list[int]:
    """Every process of session `sid`, plus every descendant of one (a Ray job's entrypoint
    runs in a session of its own, as a child of a worker of ours)."""
    stats = {pid: st for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()) if (st := _proc_stat(pid))}
    found = {pid for pid, (_, s) in stats.items() if s == sid}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    found.discard(os.getpid())
    return sorted(found)


def kill_session(sid: int, grace_s: float = 3) -> None:
    """SIGTERM, then SIGKILL what is left after `grace_s` (gcs_server and the autoscaler
    monitor can sit on a SIGTERM for longer; this cluster is throwaway)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = session_processes(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_processes(sid):
            return


# --- the head -------------------------------------------------------------------------------


@dataclass
class RayHead:
    address: str  # the dashboard / job server URL
    temp_dir: str
    sid: int


def _dashboard_ready(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _diagnostics(temp_dir: str, start_output: str) -> str:
    logs = sorted(Path(temp_dir).glob("session_*/logs/dashboard*.*")) + sorted(Path(temp_dir).glob("session_*/logs/*.err"))
    tails = [f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:] for p in logs if p.stat().st_size]
    return "\n".join([f"--- ray start\n{start_output[-4000:]}", *tails])


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with the dashboard and job server, run from this venv.

    Started the way an operator starts a venv-based head: with the venv activated, so that
    the job entrypoint's `python` is the venv's. Token auth is off for this private test
    head so the result does not depend on the test process's Ray auth state (which a
    local ray.init() elsewhere in the session switches on); see the runbook for clusters
    with token auth."""
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's unix sockets live here
    dashboard_port = free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        VIRTUAL_ENV=str(VENV_BIN.parent),
        RAY_TMPDIR=temp_dir,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--dashboard-host=127.0.0.1", "--num-cpus=2",
        "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        f"--object-store-memory={200 * 1024 * 1024}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    start = subprocess.Popen(cmd, env=env, cwd=temp_dir, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sid = start.pid  # session leader: every Ray process it starts stays in this session
    try:
        output, _ = start.communicate(timeout=180)
        if start.returncode != 0:
            pytest.fail(f"`ray start --head` exited {start.returncode}\n{_diagnostics(temp_dir, output)}")
        deadline = time.monotonic() + 60
        while not _dashboard_ready(address):
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard at {address} did not answer within 60 s\n{_diagnostics(temp_dir, output)}")
            time.sleep(0.5)
        yield RayHead(address, temp_dir, sid)
    finally:
        start.kill() if start.poll() is None else None
        kill_session(sid)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
