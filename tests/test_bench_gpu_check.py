"""bench/gpu_check.py runs on a GPU box this CI never sees: check here that its planner part
still runs against the trainer's code (its --dry-run path: tiny preset, CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import math

from tests.conftest import REPO


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_planner_check_trains_each_layout_and_predicts_its_peak():
    gpu_check = load_gpu_check()
    for layout in gpu_check.LAYOUTS:
        row = gpu_check.measure_layout(argparse.Namespace(dry_run=True, layout=layout, seq_len=64))
        assert row["measured"] is None  # no allocator to read on the CPU
        assert row["predicted"] > 0 and len(row["losses"]) == 3 and all(math.isfinite(x) for x in row["losses"])


def test_the_cross_entropy_bench_runs_all_three_sides():
    out = load_gpu_check().cross_entropy_check(argparse.Namespace(dry_run=True))
    rows = {line.split()[0] for line in out.splitlines()[2:5]}
    assert rows == {"fused", "megatron", "plain"} and "fused / megatron:" in out
