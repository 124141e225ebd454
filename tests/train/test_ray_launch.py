"""Training as a Ray job on a real two-node Ray cluster on this machine (a head and a worker
node, one CPU slot each, so the two training workers run on different nodes).

The recovery test submits with `illada submit train`, kills one worker process after the
first checkpoint (step 2), while the group saves step 4, then stops (SIGSTOP) a worker of
the restarted group so its peer waits in a collective: the job must finish anyway, having
restarted twice (from step 2, then step 4), with the loss of every step, re-run ones
included, equal to an uninterrupted run's (`illada train` under torchrun, the same
training code without Ray). The test freezes the workers (SIGSTOP) the moment the state it
waits for appears, so each fault lands where it is meant to however fast the steps are.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from illada.config import load_config
from illada.layout import CHECKPOINT_MARKER as MARKER
from illada.train.preflight import LaunchError, check_data, make_plan
from illada.train.ray_launch import describe_failure
from tests.conftest import REPO
from tests.ray_cluster import cmdline, session_processes, start_cluster

STEPS = 8
MODEL = {"preset": "tiny", "vocab_size": 512, "max_seq_len": 64}
TRAIN = {
    "steps": STEPS,
    "global_batch_size": 8,
    "micro_batch_size": 2,
    "log_interval": 1,
    "random_length_fraction": 0.25,
    "optim": {"lr": 3e-3, "warmup_steps": 1, "decay_steps": 2},
    "checkpoint": {"interval": 2},
    # How long a collective may wait before the hung worker counts as failed: long enough that
    # a slow step on a loaded machine never trips it, which would be a restart the test did not plan.
    "collective_timeout_s": 60,
    "cluster": {"workers": 2, "max_failures": 2},
}


def config_dict(root: Path, data_root: str, **train) -> dict:
    return {"name": "tiny", "root": str(root), "model": MODEL, "train": {**TRAIN, "data_root": data_root, **train}}


def write_config(root: Path, data_root: str, **train) -> str:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "train.yaml"
    path.write_text(json.dumps(config_dict(root, data_root, **train)))
    return str(path)


# --- checks that need no cluster ---------------------------------------------------------------


def _train(global_batch_size=240, micro_batch_size=1, **cluster):
    train = {**TRAIN, "global_batch_size": global_batch_size, "micro_batch_size": micro_batch_size, "cluster": cluster}
    return load_config(base={"name": "t", "root": "/tmp/x", "model": MODEL, "train": train}).train


GPU_NODE = {"CPU": 16, "GPU": 8}


def test_plan_takes_one_worker_per_gpu_and_says_what_does_not_fit():
    plan = make_plan(_train(), [{"CPU": 4}, GPU_NODE, GPU_NODE])  # (the head has no GPU)
    assert (plan.workers, plan.use_gpu, plan.resources_per_worker) == (16, True, {"CPU": 1, "GPU": 1})
    assert make_plan(_train(workers=8), [GPU_NODE]).workers == 8
    assert make_plan(_train(use_gpu=False), [{"CPU": 3}, {"CPU": 2}]).workers == 5  # one per CPU slot
    assert make_plan(_train(use_gpu=False, cpus_per_worker=2), [{"CPU": 3}, {"CPU": 4}]).workers == 3

    with pytest.raises(LaunchError, match=r"9 worker\(s\) of 1 GPU \+ 1 CPUs do not fit.*hold 8"):
        make_plan(_train(workers=9), [GPU_NODE])
    with pytest.raises(LaunchError, match="hold 4; add nodes"):  # 4 CPUs per worker: only 4 fit on 16 CPUs
        make_plan(_train(cpus_per_worker=4), [GPU_NODE])
    with pytest.raises(LaunchError, match="do not fit"):
        make_plan(_train(use_gpu=True), [{"CPU": 8}])


def test_plan_refuses_a_world_size_the_parallel_layout_does_not_divide():
    train = _train(workers=6)
    train.parallel.tensor = 4
    with pytest.raises(LaunchError, match=r"world size 6 is not divisible by tensor x pipeline parallel = 4 x 1"):
        make_plan(train, [GPU_NODE])
    with pytest.raises(LaunchError, match=r"global_batch_size \(8\) is not divisible by data-parallel size \(3\) x train.micro_batch_size \(2\)"):
        make_plan(_train(8, 2, workers=3), [GPU_NODE])


def test_check_data_finds_missing_shards_and_mismatches(train_data_root, tmp_path):
    config = load_config(base=config_dict(tmp_path, train_data_root))
    assert check_data(config)["stats"]["seq_len"] == 64

    with pytest.raises(LaunchError, match="no pack manifest at .*; run the data pipeline first"):
        check_data(load_config(base=config_dict(tmp_path, str(tmp_path / "nothing"))))
    with pytest.raises(LaunchError, match=r"train.mix names sources with no shards: \['gamma'\]"):
        check_data(load_config(base=config_dict(tmp_path, train_data_root, mix={"alpha": 1, "gamma": 1})))
    small = config_dict(tmp_path, train_data_root)
    small["model"] = {**MODEL, "max_seq_len": 32}
    with pytest.raises(LaunchError, match="64-token sequences but model.max_seq_len is 32"):
        check_data(load_config(base=small))

    copy = tmp_path / "copy"  # a data root whose pack lost a shard
    shutil.copytree(Path(train_data_root, "pack"), copy / "pack")
    shards = sorted((copy / "pack" / "shards").rglob("*.arrow"))
    shards[1].unlink()
    with pytest.raises(LaunchError, match=rf"1 of the {len(shards)} shards in .*/copy/pack/manifest.json are missing, e.g. {shards[1]}; re-run the pack stage"):
        check_data(load_config(base=config_dict(tmp_path, str(copy))))


def test_a_node_that_does_not_share_the_checkpoint_directory_says_so(ray_local, train_data_root, tmp_path):
    from illada.config import StorageConfig
    from illada.train.preflight import _probe

    manifest = f"{train_data_root}/pack/manifest.json"
    probe = tmp_path / ".probe-1"
    probe.write_text("illada")
    assert ray_local.get(_probe.remote(str(probe), manifest, StorageConfig())) is None
    elsewhere = ray_local.get(_probe.remote(str(tmp_path / "not-mounted" / ".probe-1"), manifest, StorageConfig()))
    assert elsewhere.endswith("not-mounted is not a filesystem shared by all nodes")
    unreadable = ray_local.get(_probe.remote(str(probe), str(tmp_path / "none.json"), StorageConfig()))
    assert unreadable.startswith(f"{tmp_path}/none.json is not readable here")


def test_a_restart_is_recorded_with_the_checkpoint_it_resumes_from(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from illada.train.ray_launch import RecoveryLog

    checkpoints = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):  # step 6: a save cut short
        (checkpoints / f"step_{step:08d}").mkdir(parents=True)
        if complete:
            (checkpoints / f"step_{step:08d}" / MARKER).write_text("{}")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("x")).info.run_id
    recovery = RecoveryLog(uri, run_id, str(checkpoints), max_failures=3)
    assert recovery.latest_complete() == "step_00000004"

    recovery._record(1, "a failure of rank 1: ActorDiedError", recovery.latest_complete())
    line = "illada: restart 1 (at most 3) after a failure of rank 1: ActorDiedError; the whole worker group restarts from checkpoint step_00000004 (step 4)"
    assert capsys.readouterr().out.strip() == line
    run = MlflowClient(uri).get_run(run_id)
    assert [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "restarts")] == [(4, 1.0)]
    assert run.data.tags["illada.restart.1"].endswith(line.removeprefix("illada: "))


def test_describe_failure_names_each_failed_rank():
    from ray.exceptions import ActorDiedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    error = WorkerGroupError("two ranks", {1: ActorDiedError(), 0: RuntimeError("Timed out waiting 10000ms\nfor recv")})
    text = describe_failure(error)
    assert text.startswith("a failure of rank 0: RuntimeError: Timed out waiting 10000ms; rank 1: ActorDiedError")
    assert describe_failure(AssertionError()) == "a failure of the controller: AssertionError"


# --- on a cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(mlflow_store):
    """A head and one worker node, one CPU each: two training workers land on two nodes.
    Jobs record into the session's MLflow store."""
    c = start_cluster(head_cpus=1, worker_cpus=[1], env={"MLFLOW_TRACKING_URI": mlflow_store})
    try:
        yield c
    finally:
        c.stop()


def ray_workers(sid: int) -> list[int]:
    """The training worker processes of a node (not their forked children: megatron's
    checkpoint writers, which carry the same process title)."""
    workers = {pid for pid in session_processes(sid) if cmdline(pid).startswith("ray::RayTrainWorker")}
    return sorted(pid for pid in workers if parent(pid) not in workers)


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def job_status(address: str, job_id: str) -> str:
    from illada.jobs import job_info

    return job_info(address, job_id)["status"]


def wait_until(condition, what: str, address: str, job_id: str) -> None:
    """Poll `condition` every 10 ms (the workers are frozen the moment it holds, so a fault
    lands where it is meant to however fast the steps are); fail if the job ends first. No
    deadline of its own: however slow the machine, the job either gets there or ends (and
    the test's timeout guards a hang)."""
    polls = 0
    while not condition():
        polls += 1
        if polls % 100 == 0 and (status := job_status(address, job_id)) not in ("PENDING", "RUNNING"):
            from illada.jobs import client

            pytest.fail(f"job {job_id} ended ({status}) before {what}; its log ends:\n{client(address).get_job_logs(job_id)[-6000:]}")
        time.sleep(0.01)


def complete_since(checkpoints: Path, step: int, since: float) -> bool:
    """A checkpoint of `step` or later was completed after `since`."""
    for marker in checkpoints.glob(f"step_*/{MARKER}"):
        if int(marker.parent.name.split("_")[1]) >= step and marker.stat().st_mtime > since:
            return True
    return False


def freeze(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)


def thaw(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


def losses(uri: str, run_id: str) -> dict[int, list[float]]:
    """Every loss a run logged, by step (a step re-run after a restart appears twice)."""
    from mlflow.tracking import MlflowClient

    curve: dict[int, list[float]] = {}
    for m in MlflowClient(uri).get_metric_history(run_id, "loss"):
        curve.setdefault(m.step, []).append(m.value)
    return dict(sorted(curve.items()))


def final_checkpoint(root: Path) -> dict:
    return json.loads((root / "checkpoints" / f"step_{STEPS:08d}" / MARKER).read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_data_root):
    """The same training through `illada train` under torchrun (two processes, no Ray),
    started at once so it overlaps the cluster's start; call the result to collect it:
    (loss by step, the final checkpoint's info)."""
    root = tmp_path_factory.mktemp("torchrun")
    config = write_config(root, train_data_root)
    uri = f"sqlite:///{root}/mlflow.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "illada.cli", "train", config, "--nproc-per-node", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def collect() -> tuple[dict[int, float], dict]:
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, output[-6000:]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("illada/tiny").experiment_id])
        return {step: values[0] for step, values in losses(uri, run.info.run_id).items()}, final_checkpoint(root)

    yield collect
    if proc.poll() is None:
        proc.kill()


@pytest.mark.timeout(1200)
def test_a_dead_worker_and_a_hung_one_restart_the_group_and_the_loss_curve_is_unchanged(uninterrupted, cluster, mlflow_store, train_data_root, tmp_path, capsys):
    from illada.cli import main

    root = tmp_path / "run"
    config = write_config(root, train_data_root)
    job = "illada-test-recovery"
    # (a hung worker's process group is torn down after this long, instead of Ray's 30 s)
    submit = ["submit", "train", config, "--address", cluster.address, "--job-id", job, "--env", "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S=5"]
    assert main(submit) == 0
    head, node = cluster.sids

    checkpoints = root / "checkpoints"

    # 1. After the first checkpoint (step 2), while the group saves step 4, a worker process
    # on the second node dies: the group restarts from step 2 and runs steps 3 and 4 again.
    # The workers are found before the save begins, so they freeze the moment it does.
    wait_until(lambda: (checkpoints / "step_00000002" / MARKER).exists(), "the step-2 checkpoint", cluster.address, job)
    first = ray_workers(head) + ray_workers(node)
    assert len(first) == 2, first
    wait_until(lambda: (checkpoints / "step_00000004").is_dir(), "the step-4 save", cluster.address, job)
    freeze(first)
    assert (checkpoints / "step_00000002" / MARKER).exists()
    assert not (checkpoints / "step_00000004" / MARKER).exists(), "the step-4 save completed before the workers could be stopped"
    [victim] = ray_workers(node)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    thaw([p for p in first if p != victim])

    # 2. The restarted group checkpoints step 4; then one of its workers stops (hangs) and its
    # peer waits in a collective until train.collective_timeout_s. Again the workers are
    # found first (once both are up), so they freeze the moment the checkpoint completes.
    second: list[int] = []

    def restarted_group_is_up() -> bool:
        second[:] = [p for p in ray_workers(head) + ray_workers(node) if p not in first]
        return len(second) == 2

    wait_until(restarted_group_is_up, "the 2 workers of a restarted group", cluster.address, job)
    wait_until(lambda: complete_since(checkpoints, 4, killed_at), "a checkpoint of the restarted group", cluster.address, job)
    freeze(second)
    hung = second[0]
    thaw(second[1:])
    assert not (checkpoints / f"step_{STEPS:08d}" / MARKER).exists(), "the run finished before the hang"

    from illada.jobs import wait_for_job

    status = wait_for_job(cluster.address, job, timeout_s=900, poll_s=1)
    main(["jobs", "logs", job, "--address", cluster.address])
    logs = capsys.readouterr().out
    (root / "job.log").write_text(logs)
    assert status == "SUCCEEDED", logs[-10000:]
    assert not os.path.exists(f"/proc/{hung}") or cmdline(hung) == "", "Ray left the hung worker behind"

    # Each restart is in the job log, with why and from where.
    restarts = [line for line in logs.splitlines() if "illada: restart" in line]
    assert len(restarts) == 2, restarts
    assert "restart 1 (at most 2) after a failure of" in restarts[0] and "WorkerHealthCheckFailedError" in restarts[0]  # (a dead actor)
    assert restarts[0].endswith("restarts from checkpoint step_00000002 (step 2)")  # not the half-saved step 4
    assert "restart 2 (at most 2)" in restarts[1] and "timed out" in restarts[1].lower(), restarts[1]
    assert restarts[1].endswith("restarts from checkpoint step_00000004 (step 4)")
    assert f"trained {STEPS} steps" in logs

    # ... and on the job's MLflow run; the loss of every step, re-run ones included, is the
    # uninterrupted run's, and so are the tokens read per source: no sample skipped or repeated.
    from mlflow.tracking import MlflowClient

    run_id = logs.split("MLflow run ")[-1].split()[0]
    curve = losses(mlflow_store, run_id)
    expected, expected_checkpoint = uninterrupted()
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert {step: set(values) for step, values in curve.items()} == {step: {loss} for step, loss in expected.items()}
    assert [step for step, values in curve.items() if len(values) > 1] == [3, 4]  # run again after the kill
    assert final_checkpoint(root)["tokens_per_source"] == expected_checkpoint["tokens_per_source"]
    client = MlflowClient(mlflow_store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["illada.launcher"] == "ray"
    assert [m.value for m in client.get_metric_history(run_id, "restarts")] == [1, 2]
    assert "WorkerHealthCheckFailedError" in run.data.tags["illada.restart.1"] and "timed out" in run.data.tags["illada.restart.2"].lower()


@pytest.mark.timeout(600)
def test_a_run_that_cannot_start_fails_in_seconds_with_what_to_fix(cluster, train_data_root, tmp_path, capsys):
    from illada.cli import main

    config = write_config(tmp_path / "run", train_data_root, cluster={"workers": 4})
    code = main(["submit", "train", config, "--address", cluster.address, "--job-id", "illada-test-too-big", "--wait"])
    assert code == 1 and "job illada-test-too-big: FAILED" in capsys.readouterr().out
    main(["jobs", "logs", "illada-test-too-big", "--address", cluster.address])
    logs = capsys.readouterr().out
    assert "illada: error: 4 worker(s) of 1 CPUs do not fit: the cluster's 2 node(s) (0 GPUs, 2 CPUs) hold 2" in logs, logs[-3000:]
    assert "Started training worker group" not in logs  # it failed before asking for any worker
