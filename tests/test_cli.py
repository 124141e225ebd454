"""The command line as a user meets it: overrides anywhere on the line, a start that imports
nothing heavy, one line and exit 2 for each mistake a user can make, and every `illada ...`
line of README.md and runbooks/ accepted as written."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from illada.cli import build_parser, main, parse_args
from tests.conftest import REPO, TinyConfigFactory, free_port

HEAVY = ("torch", "ray", "megatron", "mlflow")
DOCS = [REPO / "README.md", *sorted((REPO / "runbooks").glob("*.md")), REPO / "infra" / "README.md"]


def run_cli(*argv: str, env: dict | None = None, unset: tuple[str, ...] = (), cwd: Path = REPO) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run([sys.executable, "-m", "illada.cli", *argv], capture_output=True, text=True, cwd=cwd, env=environment, timeout=300)


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, no traceback, and the last line says what to fix (log lines may come before)."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("illada: error: "), done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last


# --- overrides anywhere ----------------------------------------------------------------------


def test_overrides_are_taken_after_options():
    args = parse_args(["pipeline", "run", "configs/quickstart.yaml", "--root", "R", "--from", "tokenizer", "data.tokenizer.vocab_size=8192"])
    assert (args.config, args.root, args.start, args.overrides) == ("configs/quickstart.yaml", "R", "tokenizer", ["data.tokenizer.vocab_size=8192"])
    args = parse_args(["train", "C.yaml", "a.b=1", "--nproc-per-node", "2", "c.d=2", "--root", "R", "e.f=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"] and args.nproc_per_node == 2


def test_a_stray_word_is_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["pipeline", "run", "configs/quickstart.yaml", "--root", "R", "stray"])
    assert e.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["jobs", "logs", "JOB", "key=value"])  # jobs take no config overrides


def test_an_override_after_an_option_reaches_the_config(capsys):
    assert main(["config", "show", "configs/quickstart.yaml", "--root", "/tmp/x", "data.pack.seq_len=128", "train.steps=400"]) == 0
    out = capsys.readouterr().out
    assert "seq_len: 128" in out and "steps: 400" in out and "root: /tmp/x" in out


# --- a light start ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["pipeline", "status", "--help"], ["config", "show", "configs/train/1b.yaml"], ["generate", "--help"], ["chat", "--help"], ["import", "hf", "--help"], ["export", "hf", "--help"], ["plan", "--help"], ["plan", "configs/train/8b.yaml", "--gpus", "8"]])
def test_parsing_and_help_import_nothing_heavy(argv):
    probe = (
        "import sys\nfrom illada.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "HEAVY []" in done.stderr, done.stderr[-2000:]


# --- one line for each mistake ---------------------------------------------------------------

QUICKSTART = "configs/quickstart.yaml"  # 300 steps, warm-up 30, decay 100, global batch 16, micro 8


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["config", "show", "no/such.yaml"], ["config file not found: no/such.yaml"]),
        (["config", "show", QUICKSTART, "train.optim.warmup_steps=250"], ["warmup_steps (250) + optim.decay_steps (100) exceed train.steps (300)"]),
        (["config", "show", QUICKSTART, "train.global_batch_size=12"], ["global_batch_size (12) must be a multiple of micro_batch_size (8)"]),
        (["config", "show", QUICKSTART, "train.parallel.tensor=3"], ["num_attention_heads (4) is not divisible by the tensor-parallel size 3"]),
        (["config", "show", QUICKSTART, "train.parallel.pipeline=4"], ["num_layers (2) is not divisible by the pipeline-parallel size 4"]),
        (["config", "show", QUICKSTART, "train.stepz=4"], ["unknown config key 'train.stepz'", "did you mean 'steps'"]),
        (["pipeline", "run", QUICKSTART, "--stage", "nope"], ["unknown stage 'nope'"]),
        (["config", "show", QUICKSTART, "train.parallel.overlap_param_gather=true"], ["overlap_param_gather needs use_distributed_optimizer: true"]),
        (["plan", QUICKSTART, "--gpus", "2", "--gpu-memory", "lots"], ["--gpu-memory 'lots' is not a size"]),
        pytest.param(
            ["train", QUICKSTART, "train.parallel.use_distributed_optimizer=true"],
            ["train.parallel.use_distributed_optimizer: needs a GPU"],
            marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the data-only install has no torch"),
        ),
    ],
)
def test_config_mistakes_are_one_line(argv, fragments, tmp_path):
    assert_one_line_error(run_cli(*argv, "--root", str(tmp_path)), *fragments)


def test_a_command_whose_extra_is_not_installed_names_the_extra(tmp_path):
    """`illada train` on the data-only install (no torch): which extra to install, in one line."""
    hide_torch = "import sys; sys.modules['torch'] = None; from illada.cli import main; sys.exit(main())"
    argv = ["train", QUICKSTART, "--root", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", hide_torch, *argv], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert_one_line_error(done, "needs torch, which is not installed: pip install 'illada[train]'")


def test_an_unreachable_ray_dashboard_is_one_line_and_ray_address_is_honoured():
    address = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(run_cli("jobs", "list", "--address", address), f"cannot reach the Ray dashboard at {address}")
    assert_one_line_error(run_cli("jobs", "list", env={"RAY_ADDRESS": address}), f"cannot reach the Ray dashboard at {address}")
    assert_one_line_error(run_cli("jobs", "list", unset=("RAY_ADDRESS",)), "give --address")


def test_an_s3_source_without_credentials_is_one_line(tmp_path):
    raw = TinyConfigFactory().raw(str(tmp_path / "run"), str(tmp_path / "raw"))
    raw["data"]["sources"][0]["paths"] = ["s3://no-such-bucket/raw/*.jsonl"]
    config = TinyConfigFactory.write_yaml(raw, tmp_path / "s3.yaml")
    no_files = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    aws = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")
    done = run_cli("pipeline", "run", config, env=no_files, unset=aws)
    assert_one_line_error(done, "s3://no-such-bucket/raw/*.jsonl: no S3 credentials; set AWS_ACCESS_KEY_ID")


def test_a_damaged_mlflow_database_is_one_line(tmp_path):
    raw = TinyConfigFactory().raw(str(tmp_path / "run"), str(tmp_path / "raw"))
    config = TinyConfigFactory.write_yaml(raw, tmp_path / "tiny.yaml")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mlflow.db").write_text("not a database")
    done = run_cli("pipeline", "run", config, unset=("MLFLOW_TRACKING_URI",))
    assert_one_line_error(done, f"cannot open the MLflow store sqlite:///{tmp_path}/run/mlflow.db", "move a damaged database aside")


# --- every documented command ----------------------------------------------------------------


def documented_commands() -> list[tuple[str, list[str]]]:
    """Each `illada ...` line of a fenced block in README.md, runbooks/ and infra/README.md, as
    argv: continuation lines joined, comments and what follows `;` dropped, and a synopsis's
    [optional] brackets and `...` read as the options they stand for."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().split(";")[0]
                if not line.startswith("illada "):
                    continue
                words = [w for w in shlex.split(line.replace("[", " ").replace("]", " "), comments=True) if w != "..."]
                found.append((f"{doc.relative_to(REPO)}: {line}", words[1:]))
    return found


def test_the_docs_have_commands_to_check():
    assert len(documented_commands()) > 40


@pytest.mark.parametrize("where, argv", documented_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_command_parses(where, argv):
    args = parse_args(argv, build_parser())
    assert callable(args.func), where


def test_documented_config_commands_run(tmp_path, capsys):
    """The documented lines that run in seconds on a CPU, for real (runs/ moved to tmp):
    showing configs, a pipeline's status, memory plans."""
    ran = 0
    for where, argv in documented_commands():
        if (argv[:2] not in (["config", "show"], ["pipeline", "status"]) and argv[0] != "plan") or "key.sub=value" in argv:  # a synopsis
            continue
        argv = [a.replace("runs/", f"{tmp_path}/runs/").replace("CONFIG", QUICKSTART).replace("ROOT", str(tmp_path / "root")) for a in argv]
        assert main(argv) == 0, where
        ran += 1
    assert ran >= 8
    out = capsys.readouterr().out
    assert "stage" in out and "pretrain-8b: 7.62B parameters" in out


def test_the_quickstart_hints_run_as_printed(tmp_path, capsys):
    """What `illada quickstart` tells the user to run next parses, and its config loads for a
    root that has been made, with no environment set up by the quickstart."""
    from illada.config import load_config
    from illada.quickstart import CONFIG, next_steps

    config = load_config(CONFIG, [f"root={tmp_path}"])
    hints = next_steps(config)
    for command in hints.values():
        argv = shlex.split(command)[1:]
        parse_args(argv)
        assert main(["config", "show", *argv[1:]] if argv[0] == "train" else ["pipeline", "status", *argv[2:-2]]) == 0
    shown = capsys.readouterr().out
    assert f"root: {tmp_path}" in shown and "steps: 600" in shown and f"{tmp_path}/raw/stdlib/*.py" in shown

