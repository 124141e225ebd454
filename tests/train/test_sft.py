"""SFT end to end on the tiny preset: a pre-trained checkpoint fine-tuned in each masking mode on
generated instructions (copy / reverse three digits) answers held-out prompts better than it
did before; SFT resumes exactly at another parallel layout; lineage names the parent
checkpoint and the SFT data; `illada chat` talks to the result. Megatron runs in child
processes (tests/distributed.py); losses are read back from MLflow."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from illada.layout import CHECKPOINT_MARKER as MARKER, complete_checkpoints
from tests.distributed import run_distributed

MODEL = {"preset": "tiny", "vocab_size": 512, "max_seq_len": 64}
STEPS = {"llada": 400, "illada": 400}
OPTIM = {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5}


def _train(rank: int, raw: dict) -> str:
    from illada.config import load_config
    from illada.parallel import destroy_parallel
    from illada.train.trainer import train_loop

    config = load_config(base=raw)
    train_loop(config)
    destroy_parallel()
    return f"{config.root}/checkpoints"


def train(raw: dict, world: int = 1) -> str:
    return run_distributed(_train, world, raw, timeout=300)[0]


def losses(name: str) -> dict[int, float]:
    """Every step's loss over the runs of experiment illada/<name> (resumed runs continue)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"illada/{name}")
    out = {}
    for run in client.search_runs([experiment.experiment_id]):
        out.update({m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")})
    return dict(sorted(out.items()))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, train_data_root) -> str:
    root = tmp_path_factory.mktemp("sft-pretrained")
    train_cfg = {"data_root": train_data_root, "steps": 8, "global_batch_size": 8, "micro_batch_size": 8, "optim": OPTIM, "checkpoint": {"interval": 8}}
    return train({"name": "sft-pretrained", "root": str(root), "model": MODEL, "train": train_cfg})


@pytest.fixture(scope="module")
def instructions(tmp_path_factory, train_data_root, ray_local) -> tuple[str, list[dict]]:
    """The SFT data run's root and the held-out examples."""
    from illada.config import load_config
    from illada.eval import toy_instruct
    from illada.pipeline.runner import run_pipeline
    from illada.data.stages import SFT as STAGES

    tmp = tmp_path_factory.mktemp("sft-data")
    train_set, held_out = toy_instruct.split(toy_instruct.make_examples(400, seed=0, tasks=("copy", "reverse"), lengths=(3, 3)), 64)
    toy_instruct.write_jsonl(train_set, tmp / "raw" / "toy.jsonl")
    config = {
        "name": "sft-data",
        "root": str(tmp / "run"),
        "ray": {"num_cpus": 2},
        "data": {
            "kind": "sft",
            "sources": [{"name": "toy", "paths": [str(tmp / "raw" / "toy.jsonl")], "format": "chat", "weight": 1, "id_field": "id"}],
            "dedup": {"exact": {"num_partitions": 2}, "fuzzy": {"enabled": False}},
            "tokenizer": {"path": f"{train_data_root}/tokenizer/tokenizer.json"},
            "sft": {"buckets": [16, 24, 32]},
        },
    }
    stats = run_pipeline(load_config(base=config), STAGES)["pack"]["stats"]
    assert stats["samples"] == 336 and stats["dropped"] == 0
    return str(tmp / "run"), held_out


def sft_config(root: Path, name: str, data_root: str, init_from: str, mode: str, steps: int, **train) -> dict:
    train = {
        "data_root": data_root,
        "objective": "sft",
        "sft": {"mode": mode},
        "init_from": init_from,
        "steps": steps,
        "global_batch_size": 32,
        "micro_batch_size": 32,
        "log_interval": 50,
        "optim": OPTIM,
        "checkpoint": {"interval": steps, "keep_last": 2},
        **train,
    }
    return {"name": name, "root": str(root / name), "model": MODEL, "train": train}


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, instructions, pretrained) -> dict[str, str]:
    """Each mode fine-tuned from the same pre-trained checkpoint; checkpoint folders by mode."""
    tmp = tmp_path_factory.mktemp("sft-runs")
    return {mode: train(sft_config(tmp, f"sft-{mode}", instructions[0], pretrained, mode, steps)) for mode, steps in STEPS.items()}


def _score(rank: int, checkpoints: dict[str, str], held_out: list[dict]) -> dict[str, dict]:
    from illada.eval.toy_instruct import answer_nll, evaluate
    from illada.inference import load_for_inference
    from illada.sampling.sampler import SamplerConfig

    sampler = SamplerConfig(gen_length=16, steps=16, block_length=8, variable_length=True)
    scores = {}
    for name, path in checkpoints.items():
        loaded = load_for_inference(path)
        scores[name] = {**evaluate(loaded, held_out, sampler), "nll": answer_nll(loaded, held_out)}
    return scores


def test_fine_tuning_answers_held_out_instructions_better_than_the_pretrained_checkpoint(pretrained, fine_tuned, instructions):
    [scores] = run_distributed(_score, 1, {"pretrained": pretrained, **fine_tuned}, instructions[1], timeout=300)
    before, llada = scores["pretrained"], scores["llada"]
    # Never having seen the chat template, the pre-trained model does not answer at all.
    assert before["exact"] == 0 and before["form"] < 0.1, scores
    # Both modes make the right answers (response and end of turn) far more likely: at least
    # e^2 (7x) per token.
    for mode in STEPS:
        assert scores[mode]["nll"] < before["nll"] - 2, (mode, scores)
    # In LLaDA mode the replies take the answers' form (three digits, then the end of the
    # turn) and copy or reverse well above chance (a tenth of the digits in place). iLLaDA
    # mode, which also denoises the random prompts, gets there more slowly (bench/sft_modes.py).
    assert llada["form"] >= 0.8 and llada["chars"] >= 0.25, scores


def test_sft_losses_fall_and_lineage_names_the_parent_checkpoint_and_the_sft_data(fine_tuned, pretrained, instructions):
    from mlflow.tracking import MlflowClient

    from illada.layout import resolve_checkpoint as resolve

    for mode, steps in STEPS.items():
        curve = losses(f"sft-{mode}")
        assert list(curve) == list(range(1, steps + 1))
        assert sum(list(curve.values())[-10:]) < 0.5 * sum(list(curve.values())[:10]), mode
        info = json.loads(Path(complete_checkpoints(fine_tuned[mode])[-1], MARKER).read_text())
        assert info["parent"] == resolve(pretrained) and info["data_root"] == instructions[0]
        client = MlflowClient()
        [run] = client.search_runs([client.get_experiment_by_name(f"illada/sft-{mode}").experiment_id])
        manifest = json.loads(Path(instructions[0], "pack", "manifest.json").read_text())
        assert run.data.params["data_digest"] == manifest["digest"]  # the SFT shards it read
        assert run.data.params["parent"] == resolve(pretrained) and run.data.params["parent_relation"] == "initialised"


def test_sft_at_pipeline_parallel_2_resumes_exactly_from_a_tp1_checkpoint(tmp_path, fine_tuned, pretrained, instructions):
    # Samples of different lengths go through the pipeline schedule; the run stops after 2
    # steps and resumes (the data position comes from its checkpoint); the loss curve is the
    # uninterrupted one-process run's.
    config = sft_config(tmp_path, "sft-pp2", instructions[0], pretrained, "illada", STEPS["illada"], exit_after_steps=2)
    config["train"]["parallel"] = {"pipeline": 2}
    config["train"]["checkpoint"] = {"interval": 100, "keep_last": 1}
    train(config, world=2)
    train(config, world=2)
    assert losses("sft-pp2") == pytest.approx({k: v for k, v in losses("sft-illada").items() if k <= 4}, rel=1e-4)
    info = json.loads(Path(complete_checkpoints(str(tmp_path / "sft-pp2" / "checkpoints"))[-1], MARKER).read_text())
    assert info["step"] == 4 and info["parent"].endswith("step_00000002")


def _chat(rank: int, argv: list[str], stdin: str) -> tuple[int, str, str]:
    import sys
    import warnings

    from illada.cli import main

    warnings.simplefilter("ignore")
    out, err = io.StringIO(), io.StringIO()
    sys.stdin = io.StringIO(stdin)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_chat_command(fine_tuned):
    checkpoint = fine_tuned["llada"]
    short = ["--max-length", "16", "--block-length", "8"]
    messages = ["--message", "copy 123", "--message", "reverse 123", "--message", "copy " + "9" * 60]
    [(code, out, err)] = run_distributed(_chat, 1, ["chat", checkpoint, *messages, *short], "", timeout=240)
    assert code == 0, err
    replies = out.splitlines()  # one per message; the second continues the conversation
    assert len(replies) == 3 and replies[0].strip().isdigit() and len(replies[0].strip()) == 3, out
    assert replies[2].startswith("[the message does not fit: with a reply of up to 16 tokens the prompt may have 48 tokens")
    [(code, out, err)] = run_distributed(_chat, 1, ["chat", checkpoint, *short], "copy 456\n/reset\nreverse 456\n/exit\nnever read\n", timeout=240)
    assert code == 0 and out.count("assistant> ") == 2 and "you> " in out, (out, err)
    [(code, _, err)] = run_distributed(_chat, 1, ["chat", checkpoint, "--max-length", "10", "--block-length", "4", "--message", "x"], "", timeout=240)
    assert code == 2 and "gen_length (10) must be a multiple of block_length (4)" in err
