"""Repetition loops: find an n-gram repeating back to back, so the sampler can undo it.

Masked-diffusion samplers can fall into loops ("the model the model the model ...", LLaDA
issues #59, #100). A loop here is a span in which the same n-gram (n <= max_ngram) occurs
at least `min_repeats` times in a row, covering at least `min_span` tokens. The sampler
(see `sampler.py`) checks each block once it is committed; for a loop it re-masks the
block's positions after the n-gram's first occurrence and denoises them again with the
loop's tokens penalised (`penalty` subtracted from their logits) and a frequency penalty
(`frequency_penalty` subtracted per use from the logits of each token committed during the
re-denoise: masked positions denoised in parallel would otherwise all take the same next
best token), at most `max_retries` times per block.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RepetitionGuard:
    max_ngram: int = 8
    min_repeats: int = 3
    min_span: int = 8
    penalty: float = 10.0
    frequency_penalty: float = 1.0
    max_retries: int = 2

    def __post_init__(self):
        if self.max_ngram < 1 or self.min_repeats < 2 or self.max_retries < 1:
            raise ValueError("RepetitionGuard needs max_ngram >= 1, min_repeats >= 2 and max_retries >= 1")


@dataclass(frozen=True)
class Loop:
    start: int  # first token of the span
    end: int  # one past its last token
    period: int  # n of the repeating n-gram

    def ngram(self, tokens: list[int]) -> list[int]:
        return tokens[self.start : self.start + self.period]


def find_loops(tokens: list[int], guard: RepetitionGuard) -> list[Loop]:
    """Maximal periodic spans of `tokens`, shortest period first, none inside another.
    (The sampler looks only at an answer's tokens before the first that ends it, so
    end-of-text padding is never taken for a loop.)"""
    loops: list[Loop] = []
    for period in range(1, guard.max_ngram + 1):
        i = 0
        while i + period < len(tokens):
            if tokens[i] != tokens[i + period]:
                i += 1
                continue
            j = i
            while j + period < len(tokens) and tokens[j] == tokens[j + period]:
                j += 1
            span = Loop(i, j + period, period)
            if _is_loop(span, tokens, guard) and not any(_inside(span, other) for other in loops):
                loops.append(span)
            i = j + 1
    return loops


def _is_loop(span: Loop, tokens: list[int], guard: RepetitionGuard) -> bool:
    length = span.end - span.start
    if length < guard.min_span or length < guard.min_repeats * span.period:
        return False
    return not _has_shorter_period(span.ngram(tokens))  # "a a a a" as a 2-gram: the 1-gram describes it


def _has_shorter_period(ngram: list[int]) -> bool:
    n = len(ngram)
    return any(n % p == 0 and ngram == ngram[:p] * (n // p) for p in range(1, n))


def _inside(a: Loop, b: Loop) -> bool:
    return b.start <= a.start and a.end <= b.end
