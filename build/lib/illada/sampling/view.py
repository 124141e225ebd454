"""Watch a canvas being unmasked: one line per denoising step, masks shown as '░'."""

from __future__ import annotations

import sys
from typing import Callable, TextIO

import torch

MASK_GLYPH = "░"


def render(tokens: list[int], mask_id: int, decode: Callable[[list[int]], str]) -> str:
    """Decode runs of unmasked tokens; every mask shows as one glyph; newlines as '↵'."""
    out, run = [], []
    for t in tokens + [mask_id]:  # a final mask flushes the last run
        if t == mask_id:
            if run:
                out.append(decode(run))
                run = []
            out.append(MASK_GLYPH)
        else:
            run.append(t)
    return "".join(out)[:-1].replace("\n", "↵")


class CanvasView:
    """An `on_step` callback printing the canvas after every step from position `start`."""

    def __init__(self, decode: Callable[[list[int]], str], mask_id: int, start: int, out: TextIO = sys.stdout):
        self.decode, self.mask_id, self.start, self.out = decode, mask_id, start, out
        self.step = 0

    def __call__(self, canvas: torch.Tensor, committed: torch.Tensor) -> None:
        self.step += 1
        rows = canvas[:, self.start :].tolist()
        for i, row in enumerate(rows):
            label = f"step {self.step:4d}" + (f" [{i}]" if len(rows) > 1 else "")
            print(f"{label} +{int(committed[i].sum()):<3d}| {render(row, self.mask_id, self.decode)}", file=self.out, flush=True)
