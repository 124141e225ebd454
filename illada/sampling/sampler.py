"""The masked-diffusion samplers (SPEC §3): LLaDA's remasking sampler, semi-autoregressive
blocks, iLLaDA's variable-length generation, infilling, and Fast-dLLM's speed-ups.

Every sampler fills a canvas: the given tokens, left-padded to one length across the
batch, with mask tokens where text is wanted. It denoises one region at a time (a block of
the answer, or a chunk of an infill's masked positions); each step of a region

  1. computes logits for the canvas (with classifier-free guidance: a second pass with the
     given tokens masked, logits = u + (w + 1)(c - u));
  2. proposes x_hat = argmax(logits + T * Gumbel) at every masked position of the region
     (float64; T = 0 is the plain argmax; the mask token itself is never proposed);
  3. scores each proposal: softmax(logits)[x_hat] ('low_confidence') or uniform noise
     ('random'); positions outside the region and committed positions are -inf;
  4. commits the top n_j (the step schedule of `schedule.py`) or, with a threshold, the
     best one plus every proposal whose confidence passes the threshold (Fast-dLLM).

Committed tokens never change again, except that the repetition guard (`repetition.py`),
when asked for, re-masks a block's looping positions and denoises them once more.

Prefix cache (Fast-dLLM): with `prefix_cache=True`, a block's first step is a full forward
that keeps every position's keys and values; its later steps recompute only the block and
what follows it, reading the keys and values of everything before the block from that
cache. The first step is exact. Later steps are an approximation: the cached keys and
values of the prefix were computed when the block was still masked, and in a bidirectional
model they depend on it (from the second layer on), so they are stale by whatever the
block has committed since. A one-layer model is exact at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from illada.sampling.model import LogitsFn, PrefixCache, SpecialTokens, forward, guided, left_pad
from illada.sampling.repetition import RepetitionGuard, find_loops
from illada.sampling.schedule import above_threshold, commit_schedule, top_n

REMASKING = ("low_confidence", "random")

# on_step(canvas [b, s], committed [b, s]): called after every denoising step.
StepCallback = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Decoding:
    """How one step proposes and commits tokens."""

    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None  # Fast-dLLM parallel decoding; None: the step schedule

    def __post_init__(self):
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {', '.join(REMASKING)} (got {self.remasking!r})")
        if self.temperature < 0 or self.cfg_scale < 0:
            raise ValueError("temperature and cfg_scale must be >= 0")
        if self.threshold is not None:
            if not 0 < self.threshold <= 1:
                raise ValueError(f"threshold must be in (0, 1] (got {self.threshold}); leave it unset for the step schedule")
            if self.remasking != "low_confidence":
                raise ValueError("threshold decoding compares model confidences: use remasking='low_confidence'")


@dataclass(frozen=True)
class SamplerConfig:
    """Generation: `gen_length` positions after the prompt in blocks of `block_length`,
    `steps` steps in all (steps / blocks per block). Defaults are LLaDA's (SPEC §3); chat
    uses block_length 32. With `variable_length`, gen_length is the cap: blocks are
    appended one at a time until a stop token appears."""

    gen_length: int = 128
    steps: int = 128
    block_length: int = 128
    decoding: Decoding = field(default_factory=Decoding)
    prefix_cache: bool = False
    variable_length: bool = False
    repetition: RepetitionGuard | None = None

    def __post_init__(self):
        if self.gen_length < 0 or self.block_length <= 0 or self.steps <= 0:
            raise ValueError("gen_length must be >= 0, block_length and steps > 0")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length})")
        if self.num_blocks and self.steps % self.num_blocks:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of the number of blocks "
                f"(gen_length / block_length = {self.num_blocks}); try steps={self.num_blocks * max(1, self.steps // self.num_blocks)}"
            )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


@dataclass
class Generation:
    tokens: torch.Tensor  # [b, s]: left-padded given tokens, then the generated positions
    start: int  # the first generated position (0 for infilling)
    nfe: int = 0  # model calls; a guided step (two passes in one batch) counts once
    loops: int = 0  # repetition loops found and denoised again

    def answers(self, special: SpecialTokens) -> list[list[int]]:
        """The generated tokens of each row, up to (not including) the first that ends it
        (a stop token or padding)."""
        out = []
        for row in self.tokens[:, self.start :].tolist():
            cut = next((i for i, t in enumerate(row) if t in special.ends), len(row))
            out.append(row[:cut])
        return out


@dataclass
class _Canvas:
    x: torch.Tensor  # [b, s]
    keep: torch.Tensor | None  # [b, s]: False at left padding
    given: torch.Tensor  # [b, s]: the prompt's tokens, masked in guidance's unconditional pass

    def extend(self, n: int, mask_id: int) -> _Canvas:
        b = self.x.shape[0]
        masks = torch.full((b, n), mask_id, dtype=self.x.dtype, device=self.x.device)
        keep = None if self.keep is None else torch.cat([self.keep, torch.ones_like(masks, dtype=torch.bool)], 1)
        return _Canvas(torch.cat([self.x, masks], 1), keep, torch.cat([self.given, torch.zeros_like(masks, dtype=torch.bool)], 1))

    def rows(self, index: torch.Tensor) -> _Canvas:
        return _Canvas(self.x[index], None if self.keep is None else self.keep[index], self.given[index])

    def span(self, lo: int, hi: int) -> torch.Tensor:
        region = torch.zeros_like(self.x, dtype=torch.bool)
        region[:, lo:hi] = True
        return region


class _Sampler:
    """One sampling run: the model, the decoding rule, the cache, counters."""

    def __init__(self, model: LogitsFn, decoding: Decoding, special: SpecialTokens, generator=None, cache: PrefixCache | None = None, on_step: StepCallback | None = None):
        self.model, self.decoding, self.special = model, decoding, special
        self.generator, self.cache, self.on_step = generator, cache, on_step
        self.nfe = 0
        self.loops = 0

    def denoise(self, c: _Canvas, region: torch.Tensor, steps: int, cache_start: int | None = None, repetition: tuple[RepetitionGuard, list[set[int]]] | None = None) -> None:
        """Commit every masked position of `region` ([b, s] bool) in `steps` steps (with a
        threshold: until none is left). `cache_start`: the region starts there and nothing
        before it is masked, so the prefix cache may serve it. `repetition`: (guard, token ids
        per row) for a re-denoise: those tokens' logits are lowered by guard.penalty, and
        every token committed meanwhile by guard.frequency_penalty per use."""
        mask_id = self.special.mask
        masked = (c.x == mask_id) & region
        threshold = self.decoding.threshold
        schedule = commit_schedule(masked.sum(1), steps) if threshold is None else None
        step = 0
        bias = None  # [b, vocab] subtracted from the logits (the repetition guard's penalties)
        while masked.any():
            logits, offset = self._logits(c, refresh=step == 0, start=cache_start)
            rows, cols = masked.nonzero(as_tuple=True)
            chosen = logits[rows, cols - offset].double()
            if repetition is not None:
                guard, penalised = repetition
                if bias is None:
                    bias = guard.penalty * _one_hot(penalised, chosen.shape[-1], chosen.device)
                chosen = chosen - bias[rows]
            x_hat, confidence = self._propose(chosen)
            scores = torch.full(masked.shape, float("-inf"), dtype=torch.float64, device=c.x.device)
            scores[rows, cols] = confidence
            commit = top_n(scores, schedule[:, step]) if threshold is None else above_threshold(scores, threshold)
            proposal = c.x.clone()
            proposal[rows, cols] = x_hat.to(c.x.dtype)
            c.x = torch.where(commit, proposal, c.x)
            masked &= ~commit
            if bias is not None and guard.frequency_penalty:
                r, col = commit.nonzero(as_tuple=True)
                bias.index_put_((r, c.x[r, col]), torch.full(r.shape, guard.frequency_penalty, dtype=bias.dtype, device=bias.device), accumulate=True)
            step += 1
            if self.on_step is not None:
                self.on_step(c.x, commit)
            assert threshold is not None or step <= steps or not masked.any(), "the step schedule left positions masked"

    def _logits(self, c: _Canvas, refresh: bool, start: int | None) -> tuple[torch.Tensor, int]:
        """Logits of positions offset.. of the canvas, and the offset (> 0 when the prefix
        cache served the step)."""
        if self.cache is None or start is None:
            run, offset = (lambda tokens, keep: forward(self.model, tokens, keep)), 0
        elif refresh:
            run, offset = self.cache.full, 0
        else:
            run, offset = (lambda tokens, keep: self.cache.suffix(tokens, start, keep)), start
        self.nfe += 1
        return guided(run, c.x, c.keep, c.given, self.decoding.cfg_scale, self.special.mask), offset

    def _propose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_hat and its confidence at each of n positions, from float64 logits [n, v]."""
        d = self.decoding
        proposable = logits.clone()
        proposable[:, self.special.mask] = float("-inf")  # never propose the mask token itself
        if d.temperature > 0:
            u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=self.generator)
            x_hat = (proposable - d.temperature * torch.log(-torch.log(u))).argmax(-1)  # + T * Gumbel
        else:
            x_hat = proposable.argmax(-1)
        if d.remasking == "low_confidence":
            confidence = logits.softmax(-1).gather(-1, x_hat[:, None]).squeeze(-1)
        else:
            confidence = torch.rand(x_hat.shape, dtype=torch.float64, device=logits.device, generator=self.generator)
        return x_hat, confidence

    def guard(self, c: _Canvas, guard: RepetitionGuard, lo: int, hi: int, start: int, steps: int) -> None:
        """Re-denoise block [lo, hi) while it continues a loop, with the loops' tokens penalised."""
        ends = self.special.ends
        penalised: list[set[int]] = [set() for _ in range(c.x.shape[0])]  # the loops' tokens, over the retries
        for _ in range(guard.max_retries):
            remask = torch.zeros_like(c.x, dtype=torch.bool)
            for r, row in enumerate(c.x[:, start:hi].tolist()):
                cut = next((i for i, t in enumerate(row) if t in ends), len(row))
                for loop in find_loops(row[:cut], guard):
                    a, e = max(lo, start + loop.start + loop.period), min(hi, start + loop.end)
                    if a < e:
                        remask[r, a:e] = True
                        penalised[r].update(loop.ngram(row))
            if not remask.any():
                return
            self.loops += int(remask.any(1).sum())
            c.x = c.x.masked_fill(remask, self.special.mask)
            retry_steps = max(1, math.ceil(steps * int(remask.sum(1).max()) / (hi - lo)))
            self.denoise(c, remask, retry_steps, cache_start=lo, repetition=(guard, penalised))


def _one_hot(ids: list[set[int]], vocab: int, device) -> torch.Tensor:
    out = torch.zeros(len(ids), vocab, dtype=torch.float64, device=device)
    for row, tokens in enumerate(ids):
        out[row, list(tokens)] = 1.0
    return out


def generate(
    model: LogitsFn,
    prompts: list[torch.Tensor] | torch.Tensor,
    config: SamplerConfig,
    special: SpecialTokens,
    *,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
) -> Generation:
    """Generate after each prompt (1-D token tensors of any lengths, or one [b, s] tensor)."""
    x, keep = left_pad(prompts, special.pad)
    given = keep.clone() if keep is not None else torch.ones_like(x, dtype=torch.bool)
    canvas, start = _Canvas(x, keep, given), x.shape[1]
    cache = _cache(model, config, rows=x.shape[0], max_len=start + config.gen_length)
    sampler = _Sampler(model, config.decoding, special, generator, cache, on_step)
    if config.variable_length:
        tokens = _variable_length(sampler, canvas, config, start)
    else:
        canvas = canvas.extend(config.gen_length, special.mask)
        for lo in range(start, start + config.gen_length, config.block_length):
            _block(sampler, canvas, config, lo, start)
        tokens = canvas.x
    return Generation(tokens, start, sampler.nfe, sampler.loops)


def _block(sampler: _Sampler, canvas: _Canvas, config: SamplerConfig, lo: int, start: int) -> None:
    hi = lo + config.block_length
    sampler.denoise(canvas, canvas.span(lo, hi), config.steps_per_block, cache_start=lo)
    if config.repetition is not None:
        sampler.guard(canvas, config.repetition, lo, hi, start, config.steps_per_block)


def _variable_length(sampler: _Sampler, canvas: _Canvas, config: SamplerConfig, start: int) -> torch.Tensor:
    """Append a masked block, denoise it, and stop the rows whose block holds a token that
    ends the answer; the rest go on, up to gen_length positions. Finished rows are
    right-padded."""
    special = sampler.special
    stop = torch.tensor(special.ends, device=canvas.x.device)
    active = torch.arange(canvas.x.shape[0], device=canvas.x.device)
    finished: dict[int, torch.Tensor] = {}
    for lo in range(start, start + config.gen_length, config.block_length):
        canvas = canvas.extend(config.block_length, special.mask)
        _block(sampler, canvas, config, lo, start)
        stopped = torch.isin(canvas.x[:, lo:], stop).any(1)
        for i in stopped.nonzero().flatten().tolist():
            finished[int(active[i])] = canvas.x[i]
        canvas, active = canvas.rows(~stopped), active[~stopped]
        if not active.numel():
            break
    for i, row in zip(active.tolist(), canvas.x):
        finished[i] = row
    width = max(len(row) for row in finished.values())
    out = torch.full((len(finished), width), special.pad, dtype=canvas.x.dtype, device=canvas.x.device)
    for i, row in finished.items():
        out[i, : len(row)] = row
    return out


def _cache(model: LogitsFn, config: SamplerConfig, rows: int, max_len: int) -> PrefixCache | None:
    if not config.prefix_cache:
        return None
    if not hasattr(model, "prefix_cache"):
        raise ValueError(f"{type(model).__name__} offers no prefix cache (wrap a megatron model in MegatronDenoiser), or set prefix_cache=False")
    return model.prefix_cache(rows * (2 if config.decoding.cfg_scale else 1), max_len)


def infill(
    model: LogitsFn,
    tokens: list[torch.Tensor] | torch.Tensor,
    special: SpecialTokens,
    *,
    steps: int | None = None,
    block_length: int | None = None,
    decoding: Decoding = Decoding(),
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
) -> Generation:
    """Fill every mask token of `tokens`, wherever it is. The masked positions are denoised
    in chunks of `block_length` (left to right; default: all at once) with `steps` steps in
    all, split evenly over the chunks (default: one step per position of a chunk)."""
    x, keep = left_pad(tokens, special.pad)
    masked = x == special.mask
    given = ~masked if keep is None else keep & ~masked
    canvas = _Canvas(x, keep, given)
    sampler = _Sampler(model, decoding, special, generator, None, on_step)
    most = int(masked.sum(1).max()) if masked.numel() else 0
    if most == 0:
        return Generation(x, 0)
    block_length = block_length or most
    num_blocks = math.ceil(most / block_length)
    steps_per_block = max(1, steps // num_blocks) if steps else block_length
    rank = masked.long().cumsum(1) - 1  # order of each masked position in its row
    for k in range(num_blocks):
        region = masked & (rank >= k * block_length) & (rank < (k + 1) * block_length)
        sampler.denoise(canvas, region, steps_per_block)
    return Generation(canvas.x, 0, sampler.nfe, sampler.loops)
