"""Training end to end through `illada train` under real torchrun on gloo: the loss curve
does not depend on the parallel layout, a resumed run continues exactly, and checkpoints
saved at TP=2 or PP=2 load at TP=1 with the same logits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from illada.layout import CHECKPOINT_MARKER as MARKER, complete_checkpoints
from tests.conftest import REPO
from tests.distributed import run_distributed

STEPS = 4
TRAIN = {
    "steps": STEPS,
    "global_batch_size": 8,
    "micro_batch_size": 2,
    "log_interval": 1,
    "random_length_fraction": 0.25,
    "optim": {"lr": 3e-3, "warmup_steps": 1, "decay_steps": 2},
    "checkpoint": {"interval": 2, "keep_last": 2},
}
MODEL = {"preset": "tiny", "vocab_size": 512, "max_seq_len": 64}


def train(tmp_path: Path, name: str, data_root: str, nproc: int, *overrides: str) -> Path:
    """Run `illada train` with nproc processes (torchrun); returns the run root."""
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    config = {"name": experiment(root), "root": str(root), "model": MODEL, "train": {**TRAIN, "data_root": data_root}}
    config_path = root / "train.yaml"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # MLflow: the session's store (conftest)
    cmd = [sys.executable, "-m", "illada.cli", "train", str(config_path), *overrides, "--nproc-per-node", str(nproc)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return root


def experiment(root: Path) -> str:
    """One config name, so one MLflow experiment, per run root."""
    return "train-" + hashlib.sha256(str(root).encode()).hexdigest()[:12]


def losses(root: Path) -> dict[int, float]:
    """Every step's loss over all of this root's training runs (resumed runs continue)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out = {}
    exp = client.get_experiment_by_name(f"illada/{experiment(root)}")
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]):
        out.update({m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")})
    return dict(sorted(out.items()))


def latest_info(root: Path) -> dict:
    return json.loads(Path(complete_checkpoints(str(root / "checkpoints"))[-1], MARKER).read_text())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, train_data_root):
    """One process, TP=PP=DP=1, 4 uninterrupted steps."""
    return train(tmp_path_factory.mktemp("dp1"), "dp1", train_data_root, 1)


LAYOUTS = {"dp1": (1, 1, 1), "dp2": (2, 1, 1), "tp2": (2, 2, 1), "pp2": (2, 1, 2)}  # processes, TP, PP


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, train_data_root, baseline):
    """The same training at each layout, all initialised from the baseline's step-2 weights
    (a fresh model's random init depends on the pipeline layout; a checkpoint's does not)."""
    tmp = tmp_path_factory.mktemp("layouts")
    init = complete_checkpoints(str(baseline / "checkpoints"))[0]
    return {
        name: train(tmp, name, train_data_root, nproc, f"train.parallel.tensor={tp}", f"train.parallel.pipeline={pp}", f"train.init_from={init}")
        for name, (nproc, tp, pp) in LAYOUTS.items()
    }


def test_loss_curve_is_the_same_at_every_parallel_layout(layout_runs):
    expected = losses(layout_runs["dp1"])
    assert list(expected) == list(range(1, STEPS + 1))
    assert expected[STEPS] < expected[1]
    for name, root in layout_runs.items():
        assert losses(root) == pytest.approx(expected, rel=1e-4), name
        assert latest_info(root)["parent"].endswith("step_00000002")


def test_resume_continues_exactly_past_a_crashed_save(tmp_path, train_data_root, baseline):
    root = train(tmp_path, "resumed", train_data_root, 2, f"train.exit_after_steps={STEPS // 2}", "train.checkpoint.keep_last=1")
    assert latest_info(root)["step"] == STEPS // 2
    crashed = root / "checkpoints" / "step_00000003"  # a save that died before its marker
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"partial")

    train(tmp_path, "resumed", train_data_root, 2, "train.checkpoint.keep_last=1")
    assert losses(root) == pytest.approx(losses(baseline), rel=1e-5)
    info, base_info = latest_info(root), latest_info(baseline)
    assert info["step"] == STEPS
    assert info["tokens_per_source"] == base_info["tokens_per_source"]
    assert info["parent"].endswith(f"step_{STEPS // 2:08d}")
    assert [Path(p).name for p in complete_checkpoints(str(root / "checkpoints"))] == [f"step_{STEPS:08d}"]  # keep_last=1
    assert not crashed.exists()


def test_checkpoint_files_are_checksummed(baseline):
    from illada import storage

    info = latest_info(baseline)
    path = complete_checkpoints(str(baseline / "checkpoints"))[-1]
    assert {"common.pt", "metadata.json"} <= set(info["files"])
    for name, meta in info["files"].items():
        assert storage.sha256_file(os.path.join(path, name)) == meta["sha256"]


# --- resharding: logits of a checkpoint at its own layout and at TP=1 ----------------------------

TOKENS = torch.arange(2 * 24).reshape(2, 24) % 300 + 7


def _logits(rank: int, checkpoint: str, tp: int, pp: int) -> torch.Tensor | None:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from illada.model.build import build_model, forward_logits, transformer_config
    from illada.model.config import ModelConfig
    from illada.parallel import init_parallel
    from illada.layout import checkpoint_info
    from illada.train.checkpoint import load_model_weights

    init_parallel(tp, pp)
    cfg = ModelConfig(**checkpoint_info(checkpoint).model)
    model = build_model(
        cfg,
        transformer_config(cfg, tp=tp, pp=pp),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    load_model_weights(model, checkpoint)
    model.eval()
    with torch.no_grad():
        if pp == 1:
            return forward_logits(model, TOKENS)

        def step(data, model):
            out = model(input_ids=next(data), position_ids=None, attention_mask=None, runtime_gather_output=True)
            return out, lambda output, non_loss_data=False: output

        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([TOKENS]),
            model=[model],
            num_microbatches=1,
            seq_length=TOKENS.shape[1],
            micro_batch_size=TOKENS.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
        return outputs[0] if parallel_state.is_pipeline_last_stage() else None


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_checkpoint_reshards_to_tp1_with_the_same_logits(layout_runs, layout):
    _, tp, pp = LAYOUTS[layout]
    checkpoint = complete_checkpoints(str(layout_runs[layout] / "checkpoints"))[-1]
    saved = [x for x in run_distributed(_logits, 2, checkpoint, tp, pp) if x is not None][0]
    (resharded,) = run_distributed(_logits, 1, checkpoint, 1, 1)
    assert saved.shape == (2, 24, MODEL["vocab_size"])
    torch.testing.assert_close(resharded, saved, rtol=1e-5, atol=1e-5)
