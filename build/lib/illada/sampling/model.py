"""What the samplers and scorers call: any model mapping tokens to logits.

    logits = model(tokens)          # tokens [b, s] -> logits [b, s, vocab]
    logits = model(tokens, keep)    # keep [b, s] bool: False marks left padding, which no
                                    # position may attend to

A model without padding support may take one argument; batches of different lengths then
fail with a message. A model may also offer `prefix_cache(batch_size, max_len)`, returning
a `PrefixCache` (Fast-dLLM's prefix cache; the megatron adapter has one).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

LogitsFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the samplers need, from the tokenizer's manifest (never hard-coded)."""

    mask: int
    pad: int
    stop: tuple[int, ...]  # generation ends at the first of these (end-of-text, end-of-turn)

    @property
    def ends(self) -> tuple[int, ...]:
        """Ids that end an answer: the stop ids, and padding (which packing puts after
        the last end-of-text, so a model may produce it once its text is over)."""
        return (*self.stop, self.pad)

    @classmethod
    def from_ids(cls, ids: dict[str, int]) -> SpecialTokens:
        """From the `special_ids` a tokenizer or pack manifest records."""
        missing = [k for k in ("mask", "pad", "eot", "end_of_turn") if k not in ids]
        if missing:
            raise ValueError(f"special_ids lack {missing}; re-run the tokenizer stage of the data pipeline")
        return cls(mask=ids["mask"], pad=ids["pad"], stop=(ids["eot"], ids["end_of_turn"]))


class PrefixCache(Protocol):
    def full(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Logits of every position; keeps every position's keys and values."""

    def suffix(self, tokens: torch.Tensor, start: int, keep: torch.Tensor | None) -> torch.Tensor:
        """Logits of positions start: of the whole canvas `tokens`, recomputing only those
        positions; positions before `start` attend and are attended through the keys and
        values kept by the last `full` call."""


def forward(model: LogitsFn, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return model(tokens)
    if not _takes_padding(model):
        raise TypeError(f"{model!r} takes no padding mask: give prompts of one length, or a model taking (tokens, keep)")
    return model(tokens, keep)


def guided(run: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], tokens: torch.Tensor, keep: torch.Tensor | None, given: torch.Tensor, cfg_scale: float, mask_id: int) -> torch.Tensor:
    """Classifier-free guidance: `run` on the canvas and, in the same batch, on the canvas
    with its `given` positions masked; logits = u + (w + 1)(c - u). w = 0 is one plain pass."""
    if not cfg_scale:
        return run(tokens, keep)
    unconditional = tokens.masked_fill(given, mask_id)
    out = run(torch.cat([tokens, unconditional]), None if keep is None else torch.cat([keep, keep]))
    cond, uncond = out.chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


def _takes_padding(model: LogitsFn) -> bool:
    try:
        params = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)


class ExactPrefixCache:
    """A `PrefixCache` that recomputes everything: the reference a real cache is checked
    against (and what the sampler's cache path does when it is exact)."""

    def __init__(self, model: LogitsFn):
        self.model = model

    def full(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return forward(self.model, tokens, keep)

    def suffix(self, tokens: torch.Tensor, start: int, keep: torch.Tensor | None) -> torch.Tensor:
        return forward(self.model, tokens, keep)[:, start:]


def left_pad(sequences: list[torch.Tensor] | torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack 1-D token tensors to [b, max_len], padded on the left; `keep` is None when no
    row needed padding."""
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() != 2:
            raise ValueError(f"expected token ids [batch, length], got shape {tuple(sequences.shape)}")
        return sequences, None
    if not sequences:
        raise ValueError("no sequences given")
    width = max(len(s) for s in sequences)
    device = sequences[0].device if isinstance(sequences[0], torch.Tensor) else None
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    keep = torch.zeros((len(sequences), width), dtype=torch.bool, device=device)
    for i, s in enumerate(sequences):
        if len(s):
            tokens[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long, device=device)
        keep[i, width - len(s) :] = True
    return tokens, (None if bool(keep.all()) else keep)
