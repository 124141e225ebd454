"""Checkpoints under faults and hostile files: a truncated or flipped file is caught before
loading and resume falls back to the previous complete checkpoint; a crafted pickle is never
unpickled; a training run that fails or is stopped is never left RUNNING in MLflow."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from illada.checkpoint_files import DamagedCheckpoint, check_files
from tests.distributed import run_distributed

MODEL = {"preset": "tiny", "vocab_size": 512, "max_seq_len": 64}
TRAIN = {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "log_interval": 1, "optim": {"warmup_steps": 1}, "checkpoint": {"interval": 1}}


def write_config(root: Path, data_root: str, **train) -> str:
    root.mkdir(parents=True, exist_ok=True)
    name = "integrity-" + hashlib.sha256(str(root).encode()).hexdigest()[:12]  # its own MLflow experiment
    config = {"name": name, "root": str(root), "model": MODEL, "train": {**TRAIN, "data_root": data_root, **train}}
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def cli(*argv: str, log: Path) -> int:
    """`illada ARGV` in a child process (megatron's state stays out of the test process); its
    log and stderr go to `log`."""
    [code] = run_distributed(_cli_child, 1, list(argv), str(log), timeout=300)
    return code


def _cli_child(rank: int, argv: list[str], log: str) -> int:
    import logging
    import sys

    from illada.cli import main

    sys.stderr = open(log, "a", buffering=1)  # noqa: SIM115  (the child's stderr: `illada: error:` lines)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    return main(argv)


def steps(root: Path) -> Path:
    return root / "checkpoints"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_data_root) -> Path:
    """Two steps, a checkpoint after each: a pristine copy for every test to damage."""
    root = tmp_path_factory.mktemp("integrity") / "base"
    log = root.parent / "base.log"
    assert cli("train", write_config(root, train_data_root), log=log) == 0, log.read_text()[-4000:]
    return root


@pytest.fixture
def run_root(trained, tmp_path, train_data_root) -> Path:
    root = tmp_path / "run"
    shutil.copytree(steps(trained), steps(root))
    return root


def test_resume_falls_back_past_a_truncated_file_with_a_warning_naming_it(run_root, train_data_root):
    newest = steps(run_root) / "step_00000002"
    shard = sorted(newest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    log = run_root / "resume.log"

    assert cli("train", write_config(run_root, train_data_root, steps=3), log=log) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert f"checkpoint {newest} is damaged: {shard.name} has" in text and "WARNING" in text
    assert "Traceback" not in text
    assert f"resumed from {steps(run_root) / 'step_00000001'} at step 1" in text
    assert (steps(run_root) / "step_00000002.damaged" / shard.name).exists()  # kept aside, never pruned into
    info = json.loads((steps(run_root) / "step_00000003" / "illada.json").read_text())
    assert info["step"] == 3 and info["parent"] == str(steps(run_root) / "step_00000001")


def test_a_flipped_byte_is_caught_by_sha256_and_sizes_alone_miss_it(trained, tmp_path):
    copy = tmp_path / "step"
    shutil.copytree(steps(trained) / "step_00000002", copy)
    check_files(str(copy))  # pristine
    common = copy / "common.pt"
    data = bytearray(common.read_bytes())
    data[len(data) // 2] ^= 0x01
    common.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match=r"common\.pt has sha256 .*, illada\.json recorded"):
        check_files(str(copy))
    check_files(str(copy), sha256=False)  # train.checkpoint.verify=false: sizes only
    (copy / "extra.pt").write_bytes(b"x")
    with pytest.raises(DamagedCheckpoint, match=r"extra\.pt is not listed in illada\.json"):
        check_files(str(copy), sha256=False)


class _Payload:
    """Unpickling this creates a directory: proof that code in a pickle ran."""

    def __init__(self, proof: str):
        self.proof = proof

    def __reduce__(self):
        return (os.mkdir, (self.proof,))


def test_generate_never_unpickles_a_crafted_metadata_file(run_root, train_data_root):
    checkpoint = steps(run_root) / "step_00000002"
    proof = run_root / "code-ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Payload(str(proof))))
    log = run_root / "generate.log"

    code = cli("generate", str(checkpoint), "--prompt", "alpha", "--gen-length", "8", "--block-length", "8", log=log)
    assert not proof.exists()
    errors = [line for line in log.read_text().splitlines() if line.startswith("illada: error:")]
    assert code == 2 and len(errors) == 1 and ".metadata has" in errors[0], log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()


def test_a_crafted_pickle_is_refused_even_beside_a_matching_illada_json(trained, tmp_path):
    """Whoever can write the files can rewrite illada.json too: the metadata pickle is read
    with an unpickler that resolves only torch's checkpoint classes."""
    copy = tmp_path / "step"
    shutil.copytree(steps(trained) / "step_00000002", copy)
    proof = tmp_path / "code-ran"
    crafted = pickle.dumps(_Payload(str(proof)))
    (copy / ".metadata").write_bytes(crafted)
    info = json.loads((copy / "illada.json").read_text())
    info["files"][".metadata"] = {"size": len(crafted), "sha256": hashlib.sha256(crafted).hexdigest()}
    (copy / "illada.json").write_text(json.dumps(info))
    with pytest.raises(DamagedCheckpoint, match=r"\.metadata is not plain checkpoint metadata \(it refers to posix\.mkdir\)"):
        check_files(str(copy))
    assert not proof.exists()


# --- the MLflow run of a training that does not finish -----------------------------------------


def _train_until(rank: int, config_path: str, signal_at: int | None) -> str:
    """train_loop in this child; at step `signal_at` the process sends itself SIGTERM.
    Returns how training ended."""
    from illada.config import load_config
    from illada.train.trainer import train_loop

    def on_step(step: int, loss: float) -> None:
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        train_loop(load_config(config_path), on_step=on_step)
    except BaseException as e:  # noqa: BLE001
        return type(e).__name__
    return "finished"


def run_status(config_path: str) -> str:
    client = MlflowClient()
    name = yaml.safe_load(Path(config_path).read_text())["name"]
    experiment = client.get_experiment_by_name(f"illada/{name}")
    (run,) = client.search_runs([experiment.experiment_id])
    return run.info.status


def test_a_nan_loss_fails_the_mlflow_run_and_sigterm_kills_it(tmp_path, train_data_root):
    diverging = write_config(tmp_path / "nan", train_data_root, steps=4, optim={"lr": 1e30, "warmup_steps": 1, "clip_grad": 0})
    assert run_distributed(_train_until, 1, diverging, None, timeout=300) == ["FloatingPointError"]
    assert run_status(diverging) == "FAILED"

    stopped = write_config(tmp_path / "term", train_data_root, steps=4)
    assert run_distributed(_train_until, 1, stopped, 1, timeout=300) == ["Terminated"]
    assert run_status(stopped) == "KILLED"


def test_training_and_its_saves_show_progress_with_eta(trained):
    """On rank 0: a bar over the steps with ETA, loss and tokens/s; one over the bytes each
    save hashes. (Outside a terminal tqdm redraws every 30 s, so the log has the last state.)"""
    log = (trained.parent / "base.log").read_text()
    assert re.search(r"train integrity-\w+: 100%\|.*\| 2/2 \[[\d:]+<[\d:]+, .*loss \d+\.\d+, [\d,]+ tokens/s\]", log), log[-3000:]
    assert re.search(r"checksums of step_00000002: 100%", log), log[-3000:]


def test_saves_leave_no_helper_process_behind(tmp_path, train_data_root):
    """megatron's checkpoint writer used to hand its results back through a Manager server
    process spawned on the first save; inside a Ray worker that process died once, failing
    a save with EOFError. A synchronous save needs no such process."""
    root = tmp_path / "run"
    [children] = run_distributed(_train_and_list_children, 1, write_config(root, train_data_root), str(tmp_path / "log"), timeout=300)
    assert (steps(root) / "step_00000002" / "illada.json").exists()
    assert children == []


def _train_and_list_children(rank: int, config: str, log: str) -> list[str]:
    import multiprocessing

    assert _cli_child(rank, ["train", config], log) == 0, Path(log).read_text()[-4000:]
    return [child.name for child in multiprocessing.active_children()]
