"""What checking a checkpoint against its illada.json costs, against loading it.

Saves the weights of a model with megatron's dist_checkpointing (torch_dist, one process)
and its illada.json, then times, each `--repeats` times (alternating, median reported):

- baseline: dist_checkpointing.load of the weights into the model (what resume and
  `illada generate` do after the check);
- sizes: illada.checkpoint_files.check_files(sha256=False) (always done);
- sha256: check_files(sha256=True) (train.checkpoint.verify: true, the default).

    PYTHONPATH=. python bench/checkpoint_verify.py [--preset 1b --num-layers 2] [--dir /fast/disk]

The ratio sha256 / baseline is the share of a resume's load time the check adds. Both read
the same files, so the page cache serves whichever comes second: the figures are for a
warm cache (a cold one makes both slower, the load more so).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--num-layers", type=int, default=2, help="override the preset's layer count (default 2: ~0.4B parameters)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch
    from megatron.core import dist_checkpointing

    from illada import storage
    from illada.checkpoint_files import check_files
    from illada.model.build import build_model, transformer_config
    from illada.model.config import ModelConfig, num_parameters
    from illada.parallel import init_parallel

    init_parallel(1, 1)
    config = ModelConfig(preset=args.preset, num_layers=args.num_layers)
    model = build_model(config, transformer_config(config))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "step_00000001")
        os.makedirs(path)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, path)
        files = {n: {"size": os.path.getsize(os.path.join(path, n)), "sha256": storage.sha256_file(os.path.join(path, n))} for n in os.listdir(path)}
        storage.write_json(os.path.join(path, "illada.json"), {"files": files})
        total = sum(f["size"] for f in files.values())

        def load() -> None:
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
            model.load_state_dict(state["model"])

        timings: dict[str, list[float]] = {"baseline": [], "sizes": [], "sha256": []}
        runs = {"baseline": load, "sizes": lambda: check_files(path, sha256=False), "sha256": lambda: check_files(path, sha256=True)}
        load()  # warm the page cache and megatron's first-call work
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in timings.items()}
    print(f"{platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"model {args.preset} with {args.num_layers} layers: {num_parameters(config) / 1e6:.0f}M parameters, {len(files)} files, {total / 1e6:.0f} MB")
    for name in ("baseline", "sizes", "sha256"):
        print(f"{name:<9} {median[name]:8.3f} s  {total / median[name] / 1e6:8.0f} MB/s  ratio to baseline {median[name] / median['baseline']:.3f}")


if __name__ == "__main__":
    main()
