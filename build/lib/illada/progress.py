"""Progress bars with ETA for long work (tqdm), quiet enough for job logs.

On a terminal the bar redraws often; in a log file (Ray job logs, CI) every redraw is a
line, so it redraws at most every 30 s there.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total: float | None, desc: str, *, unit: str = "it", initial: float = 0, unit_scale: bool = False, disable: bool = False) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=disable,
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30,
        file=sys.stderr,
    )


def hashing(nbytes: int, desc: str, *, disable: bool = False) -> tqdm:
    """A bar over bytes read, for checksums of checkpoints and shards."""
    return progress(nbytes, desc, unit="B", unit_scale=True, disable=disable)
