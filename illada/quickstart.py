"""`illada quickstart`: the whole system on the Python standard library, on this machine."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import zstandard

from illada.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def write_python_docs(path: Path) -> int:
    """Python's documentation topics (shipped with every CPython as pydoc_data) as jsonl.zst."""
    from pydoc_data.topics import topics

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"id": name, "text": text}) + "\n" for name, text in sorted(topics.items()))
    path.write_bytes(zstandard.ZstdCompressor(level=10).compress(lines.encode()))
    return len(topics)


def quickstart(root: str, overrides: list[str], num_cpus: int | None = None) -> int:
    from illada.cli import _print_summary
    from illada.pipeline.runner import run_pipeline
    from pipelines.pretrain_data import STAGES

    root_path = Path(root).resolve()
    os.environ.setdefault("PYTHON_STDLIB", sysconfig.get_paths()["stdlib"])
    os.environ["QUICKSTART_RAW"] = str(root_path / "raw")
    write_python_docs(root_path / "raw" / "python_docs.jsonl.zst")
    extra = [f"root={root_path}"] + ([f"ray.num_cpus={num_cpus}"] if num_cpus else [])
    config = load_config(CONFIG, [*overrides, *extra])

    print(f"== data pipeline -> {config.root}")
    manifests = run_pipeline(config, STAGES)
    _print_summary(manifests)
    config_arg = CONFIG.relative_to(Path.cwd()) if CONFIG.is_relative_to(Path.cwd()) else CONFIG
    print(f"\nre-run one stage:   illada pipeline run {config_arg} --root {config.root} --stage pack")

    print(f"\n== pre-training the tiny model ({config.train.steps} steps) -> {config.root}/checkpoints")
    checkpoint = pretrain(config)
    print(f"checkpoint: {checkpoint}")
    print(f"train further:      illada train {config_arg} --root {config.root} train.steps={2 * config.train.steps}")

    from illada.lineage.cli import print_checkpoint_lineage
    from illada.sampling.cli import sample_after_training

    sample_after_training(checkpoint)
    print("\n== its lineage")
    print_checkpoint_lineage(checkpoint)
    return 0


def pretrain(config) -> str:
    """Train in this process (one rank, no torchrun needed); returns the last checkpoint."""
    from illada.parallel import destroy_parallel
    from illada.train.checkpoint import checkpoint_root, complete_checkpoints
    from illada.train.trainer import train_loop

    train_loop(config)
    destroy_parallel()
    return complete_checkpoints(checkpoint_root(config))[-1]
