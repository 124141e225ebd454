"""From pre-training to text and scores: a tiny model trained on the tiny pipeline's shards,
loaded for inference, through `illada generate`, `illada infill`, `illada eval` (the
lm-evaluation-harness adapter on the repository's local tasks, and shard perplexity) and the
quickstart's sampling step. Megatron runs in child processes (tests/distributed.py)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import TinyConfigFactory
from tests.distributed import run_distributed

MODEL = {"preset": "tiny", "vocab_size": 512, "max_seq_len": 64}
TRAIN = {"steps": 8, "global_batch_size": 4, "micro_batch_size": 4, "log_interval": 4, "optim": {"lr": 3e-3, "warmup_steps": 1}, "checkpoint": {"interval": 8}}


def _train(rank: int, raw: dict) -> str:
    from illada.config import load_config
    from illada.parallel import destroy_parallel
    from illada.train.trainer import train_loop

    config = load_config(base=raw)
    train_loop(config)
    destroy_parallel()
    return f"{config.root}/checkpoints"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, ray_local) -> str:
    """A checkpoint of the tiny model after 8 steps on the tiny pipeline's shards."""
    from illada.config import load_config
    from illada.pipeline.runner import run_pipeline
    from illada.data.stages import PRETRAIN as STAGES

    tmp = tmp_path_factory.mktemp("inference")
    raw = TinyConfigFactory().raw(str(tmp / "run"), str(tmp / "raw"))
    run_pipeline(load_config(base=raw), STAGES)
    TinyConfigFactory.write_yaml({**raw, "model": MODEL, "train": TRAIN}, tmp / "train.yaml")  # for `illada train` below
    [path] = run_distributed(_train, 1, {**raw, "model": MODEL, "train": TRAIN}, timeout=300)
    return path


def _cli(rank: int, argv: list[str]) -> tuple[int, str, str]:
    """`illada ARGV` in this (child) process; returns the exit code, stdout and stderr."""
    import warnings

    from illada.cli import main

    warnings.simplefilter("ignore")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def cli(*argv: str, timeout: float = 240) -> tuple[int, str, str]:
    [result] = run_distributed(_cli, 1, list(argv), timeout=timeout)
    return result


def _sample_and_check(rank: int, checkpoint: str) -> dict:
    from illada.inference import load_for_inference
    from illada.sampling.cli import infill_tokens, sample_after_training
    from illada.sampling.repetition import RepetitionGuard, find_loops
    from illada.sampling.sampler import SamplerConfig, generate, infill

    loaded = load_for_inference(checkpoint)
    prompts = [loaded.encode("alpha document 1:"), loaded.encode("beta")]
    config = SamplerConfig(gen_length=16, steps=16, block_length=8)
    first = generate(loaded.model, prompts, config, loaded.special)
    text = infill_tokens("alpha document 2: [MASK*5] model [MASK]", loaded.encode, loaded.special.mask)
    filled = infill(loaded.model, [text], loaded.special)
    looping = {}
    for guard in (None, RepetitionGuard()):
        out = generate(loaded.model, prompts, SamplerConfig(gen_length=32, steps=32, block_length=16, repetition=guard), loaded.special)
        looping["guarded" if guard else "plain"] = sum(bool(find_loops(a, RepetitionGuard())) for a in out.answers(loaded.special))
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        samples = sample_after_training(checkpoint, ["alpha", "beta document"])
    return {
        "special": loaded.special,
        "deterministic": first.tokens.tolist() == generate(loaded.model, prompts, config, loaded.special).tokens.tolist(),
        "filled_kept_the_text": filled.tokens[0][text != loaded.special.mask].tolist() == text[text != loaded.special.mask].tolist(),
        "filled_every_mask": bool((filled.tokens != loaded.special.mask).all()),
        "looping": looping,
        "samples": samples,
        "quickstart_output": out.getvalue(),
    }


def test_a_trained_checkpoint_generates_and_infills(checkpoint):
    [r] = run_distributed(_sample_and_check, 1, checkpoint, timeout=240)
    assert r["special"].mask == 5 and r["special"].stop == (1, 6)  # as the tokenizer's manifest records
    assert r["deterministic"] and r["filled_kept_the_text"] and r["filled_every_mask"]
    # The barely trained model loops; the repetition guard undoes it.
    assert r["looping"]["plain"] > 0 and r["looping"]["guarded"] == 0, r["looping"]
    assert len(r["samples"]) == 4 and "threshold 0.9 + prefix cache" in r["quickstart_output"]


def test_generate_and_infill_commands(checkpoint):
    code, out, err = cli("generate", checkpoint, "--prompt", "alpha document", "--gen-length", "16", "--block-length", "8", "--view", "--prefix-cache", "--threshold", "0.9", "--no-repetition-guard")
    assert code == 0, err
    steps = [line for line in out.splitlines() if line.startswith("step")]
    assert 2 <= len(steps) <= 16 and "░" in steps[0] and "░" not in steps[-1]  # unmasked step by step
    assert "--- 'alpha document'\nalpha document" in out and "forward passes" in err
    code, out, err = cli("infill", checkpoint, "--text", "alpha [MASK*3] document")
    assert code == 0 and out.startswith("alpha") and out.rstrip().endswith("document") and "<|mask|>" not in out
    code, _, err = cli("generate", checkpoint, "--prompt", "x", "--gen-length", "10", "--block-length", "4")
    assert code == 2 and "gen_length (10) must be a multiple of block_length (4)" in err


def test_eval_command_runs_harness_tasks_and_perplexity(checkpoint, tmp_path):
    path = tmp_path / "results.json"
    tasks = ["--task", "illada_toy_mc", "--task", "illada_toy_gen", "--task", "illada_toy_ppl", "--task", "perplexity"]
    code, _, err = cli("eval", checkpoint, *tasks, "--limit", "3", "--mc-num", "4", "--max-sequences", "4", "--block-length", "8", "--json", str(path))
    assert code == 0, err
    results = json.loads(path.read_text())
    assert 0 <= results["illada_toy_mc"]["acc,none"] <= 1 and results["illada_toy_mc"]["sample_len"] == 3
    assert 0 <= results["illada_toy_gen"]["prefix_match,none"] <= 1
    assert math.isfinite(results["illada_toy_ppl"]["bits_per_byte,none"])
    assert results["perplexity"]["perplexity"] > 1 and results["perplexity"]["sequences"] == 4
    code, out, err = cli("eval", checkpoint, "--task", "illada_toy_mc", "--scorer", "likelihood", "--mc-num", "2", "--limit", "2")
    assert code == 0 and json.loads(out)["illada_toy_mc"]["sample_len"] == 2, err
    code, _, err = cli("eval", checkpoint, "--task", "no_such_task")
    assert code == 2 and "unknown task(s) no_such_task; local tasks: illada_toy_gen, illada_toy_mc, illada_toy_ppl" in err


def test_a_run_root_names_its_latest_checkpoint(checkpoint):
    """`generate ROOT` finds ROOT/checkpoints' latest, as `lineage show ROOT` does."""
    run_root = os.path.dirname(checkpoint)
    code, out, err = cli("generate", run_root, "--prompt", "alpha", "--gen-length", "8", "--block-length", "8")
    assert code == 0 and out.startswith("--- 'alpha'"), err


def test_resuming_with_another_seed_is_one_line(checkpoint):
    config = os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "train.yaml")
    code, _, err = cli("train", config, "train.seed=99", "train.steps=16")
    assert code == 2 and err.strip().splitlines()[-1].startswith("illada: error: train.seed is 99 but the checkpoint being resumed was trained with seed 1234"), err[-2000:]


def test_lm_evals_own_command_line_runs_the_illada_model(checkpoint, tmp_path):
    from illada.eval.harness import TASKS_DIR

    argv = ["--model", "illada", "--model_args", f"checkpoint={checkpoint},mc_num=2", "--include_path", str(TASKS_DIR), "--tasks", "illada_toy_mc", "--limit", "2", "--output_path", str(tmp_path)]
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "illada-lm-eval"), *argv], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "illada_toy_mc" in done.stdout and "acc" in done.stdout, done.stdout[-2000:]


def test_training_runs_where_ray_is_not_installed(checkpoint, tmp_path):
    """A GPU node under torchrun may have no Ray: `illada train` must not import it."""
    config = os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "train.yaml")
    without_ray = "import sys; sys.modules['ray'] = None; from illada.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["train", config, f"train.checkpoint.dir={tmp_path / 'ckpt'}", f"train.init_from={checkpoint}", "train.steps=2", "train.checkpoint.interval=2"]
    done = subprocess.run([sys.executable, "-c", without_ray, *argv], capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ckpt" / "step_00000002" / "illada.json").is_file()
