"""CPU time of `illada --help` (and of two commands' parsing) against Python's own start-up
and against importing what the CLI imported before it was made light (torch and Ray through
illada.chat and the pipeline stages), all measured in this run.

    python bench/cli_startup.py [--repeat 5]

Each command runs in a fresh interpreter; the figure is the median CPU time (user + system)
of the child processes, which a loaded machine inflates far less than wall time.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "illada --help": [sys.executable, "-m", "illada.cli", "--help"],
    "illada pipeline status --help": [sys.executable, "-m", "illada.cli", "pipeline", "status", "--help"],
    "illada config show configs/train/1b.yaml": [sys.executable, "-m", "illada.cli", "config", "show", "configs/train/1b.yaml"],
    "import torch, ray (the old CLI's imports)": [sys.executable, "-c", "import illada.chat, illada.data.tokenizer"],
}


def cpu_seconds(cmd: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cpu_seconds(COMMANDS["illada --help"])  # warm the file cache
    medians = {name: statistics.median(cpu_seconds(cmd) for _ in range(args.repeat)) for name, cmd in COMMANDS.items()}
    heavy = medians["import torch, ray (the old CLI's imports)"]
    print(f"{'command':<44}{'CPU s':>8}{'x heavy imports':>17}")
    for name, seconds in medians.items():
        print(f"{name:<44}{seconds:>8.3f}{seconds / heavy:>17.3f}")


if __name__ == "__main__":
    main()
