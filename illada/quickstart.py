"""`illada quickstart`: the whole system on the Python standard library, on this machine."""

from __future__ import annotations

import json
import shlex
import shutil
import sysconfig
from pathlib import Path

import zstandard

from illada.config import load_config

CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"  # package data


def write_raw_corpus(raw: Path) -> None:
    """The quickstart's raw data under <root>/raw/: the standard library's top-level modules
    and Python's documentation topics (pydoc_data, in every CPython) as jsonl.zst. Files
    already there are left alone, so a second run finds the ingest stage up to date."""
    code = raw / "stdlib"
    code.mkdir(parents=True, exist_ok=True)
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if not (code / source.name).exists():
            shutil.copy2(source, code / source.name)
    docs = raw / "python_docs.jsonl.zst"
    if not docs.exists():
        from pydoc_data.topics import topics

        lines = "".join(json.dumps({"id": name, "text": text}) + "\n" for name, text in sorted(topics.items()))
        docs.write_bytes(zstandard.ZstdCompressor(level=10).compress(lines.encode()))


def config_argument() -> str:
    """How to name the quickstart config in a command a user can paste: the repository's
    configs/quickstart.yaml when run from a checkout, else the installed file."""
    local = Path("configs/quickstart.yaml")
    return str(local) if local.is_file() and local.resolve() == CONFIG.resolve() else str(CONFIG)


def next_steps(config, overrides: list[str] = ()) -> dict[str, str]:
    """The commands the quickstart suggests, as a user would paste them: its own overrides
    repeated, so they name the config that made the root."""
    config_arg = config_argument()
    given = "".join(f" {shlex.quote(o)}" for o in overrides if not o.startswith("train.steps="))
    return {
        "rerun": f"illada pipeline run {config_arg} --root {config.root} --stage pack{given}",
        "train": f"illada train {config_arg} --root {config.root}{given} train.steps={2 * config.train.steps}",
    }


def quickstart(root: str, overrides: list[str], num_cpus: int | None = None) -> int:
    from illada.cli import print_summary
    from illada.data.stages import PRETRAIN
    from illada.pipeline.runner import run_pipeline

    root_path = Path(root).resolve()
    write_raw_corpus(root_path / "raw")
    extra = [f"root={root_path}"] + ([f"ray.num_cpus={num_cpus}"] if num_cpus else [])
    config = load_config(CONFIG, [*overrides, *extra])

    print(f"== data pipeline -> {config.root}")
    manifests = run_pipeline(config, PRETRAIN)
    print_summary(manifests)
    hints = next_steps(config, overrides)
    print(f"\nre-run one stage:   {hints['rerun']}")

    print(f"\n== pre-training the tiny model ({config.train.steps} steps) -> {config.root}/checkpoints")
    checkpoint = pretrain(config)
    print(f"checkpoint: {checkpoint}")
    print(f"train further:      {hints['train']}")

    from illada.lineage.cli import print_checkpoint_lineage
    from illada.sampling.cli import sample_after_training

    sample_after_training(checkpoint)
    print("\n== its lineage")
    print_checkpoint_lineage(checkpoint)
    return 0


def pretrain(config) -> str:
    """Train in this process (one rank, no torchrun needed); returns the last checkpoint."""
    from illada.layout import checkpoint_root, complete_checkpoints
    from illada.parallel import destroy_parallel
    from illada.train.trainer import train_loop

    train_loop(config)
    destroy_parallel()
    return complete_checkpoints(checkpoint_root(config.root, config.train.checkpoint.dir))[-1]
