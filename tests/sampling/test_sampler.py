"""The samplers' own rules, on small deterministic fake models (tests/sampling/fakes.py):
the commit schedule, determinism, committed tokens staying put, the optional speed-ups off
giving the plain sampler's output, variable length, infilling, the repetition guard."""

from __future__ import annotations

import pytest
import torch

from illada.sampling.repetition import RepetitionGuard, find_loops
from illada.sampling.sampler import Decoding, SamplerConfig, generate, infill
from illada.sampling.schedule import above_threshold, commit_schedule, top_n
from tests.sampling.fakes import SPECIAL, CachedContextModel, ContextModel, Looper, StopAt
from tests.sampling.reference import llada_generate

MASK = SPECIAL.mask


def prompts() -> list[torch.Tensor]:
    return [torch.tensor([7, 8, 9, 10, 11]), torch.tensor([12, 13]), torch.tensor([14, 15, 16, 17])]


def recorder():
    """An on_step callback keeping (canvas, committed) of every step."""
    steps = []
    return steps, lambda canvas, committed: steps.append((canvas.clone(), committed.clone()))


@pytest.mark.parametrize("masked,steps", [(32, 8), (10, 4), (3, 8), (7, 7), (0, 3)])
def test_commit_schedule_is_floor_plus_remainder_first(masked, steps):
    counts = commit_schedule(torch.tensor([masked]), steps)[0].tolist()
    assert counts == [masked // steps + (j < masked % steps) for j in range(steps)]
    assert sum(counts) == masked


def test_top_n_and_threshold_selection():
    inf = float("-inf")
    confidence = torch.tensor([[0.95, 0.5, 0.92, inf], [0.3, 0.2, inf, inf], [inf, inf, inf, inf]], dtype=torch.float64)
    assert top_n(confidence, torch.tensor([2, 1, 0])).tolist() == [[True, False, True, False], [True, False, False, False], [False] * 4]
    # the most confident candidate always, and every other candidate at >= 0.9
    assert above_threshold(confidence, 0.9).tolist() == [[True, False, True, False], [True, False, False, False], [False] * 4]
    assert above_threshold(confidence, 0.93).tolist()[0] == [True, False, False, False]


def test_each_step_commits_the_schedules_count_in_every_row():
    # Rows with 9, 4 and 1 masked positions, 4 steps: per row floor(M/s) + [j < M mod s].
    tokens = [torch.tensor([7] + [MASK] * 9), torch.tensor([7, MASK, 8, MASK, MASK, 9, MASK]), torch.tensor([MASK, 10])]
    steps, on_step = recorder()
    infill(ContextModel(), tokens, SPECIAL, steps=4, on_step=on_step)
    committed = torch.stack([c.sum(1) for _, c in steps], 1)  # [rows, steps]
    expected = commit_schedule(torch.tensor([9, 4, 1]), 4)
    assert committed.tolist() == expected[:, : committed.shape[1]].tolist() and expected[:, committed.shape[1] :].sum() == 0


def test_generate_commits_per_block_on_the_schedule():
    config = SamplerConfig(gen_length=12, steps=6, block_length=4)  # 3 blocks x 2 steps x 2 tokens
    steps, on_step = recorder()
    out = generate(ContextModel(), prompts(), config, SPECIAL, on_step=on_step)
    assert out.nfe == 6 and [int(c[0].sum()) for _, c in steps] == [2] * 6
    start = out.start
    for k, (_, committed) in enumerate(steps):  # step k falls in block k // 2
        block = range(start + 4 * (k // 2), start + 4 * (k // 2 + 1))
        assert set(committed[0].nonzero().flatten().tolist()) <= set(block)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_plain_sampler_equals_the_llada_reference(cfg_scale):
    model = ContextModel(seed=3)
    prompt = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])
    config = SamplerConfig(gen_length=16, steps=8, block_length=4, decoding=Decoding(cfg_scale=cfg_scale))
    ours = generate(model, prompt, config, SPECIAL).tokens
    reference = llada_generate(model, prompt, steps=8, gen_length=16, block_length=4, mask_id=MASK, cfg_scale=cfg_scale)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("decoding", [Decoding(), Decoding(temperature=1.0), Decoding(temperature=0.7, remasking="random", cfg_scale=1.0)], ids=["greedy", "temperature", "random-remasking-cfg"])
def test_sampling_is_deterministic_given_the_seed(decoding):
    config = SamplerConfig(gen_length=16, steps=16, block_length=8, decoding=decoding)
    runs = [generate(ContextModel(), prompts(), config, SPECIAL, generator=torch.Generator().manual_seed(5)).tokens for _ in range(2)]
    assert torch.equal(*runs)
    if decoding.temperature:
        other = generate(ContextModel(), prompts(), config, SPECIAL, generator=torch.Generator().manual_seed(6)).tokens
        assert not torch.equal(runs[0], other)


@pytest.mark.parametrize(
    "config",
    [
        SamplerConfig(gen_length=16, steps=8, block_length=8, decoding=Decoding(temperature=1.0)),
        SamplerConfig(gen_length=16, steps=16, block_length=4, decoding=Decoding(remasking="random")),
        SamplerConfig(gen_length=16, steps=16, block_length=8, decoding=Decoding(threshold=0.3)),
        SamplerConfig(gen_length=16, steps=16, block_length=8, prefix_cache=True),
        SamplerConfig(gen_length=16, steps=16, block_length=8, variable_length=True),
    ],
    ids=["temperature", "random", "threshold", "prefix-cache", "variable-length"],
)
def test_committed_tokens_never_change_and_prompts_stay(config):
    steps, on_step = recorder()
    out = generate(CachedContextModel(), prompts(), config, SPECIAL, generator=torch.Generator().manual_seed(0), on_step=on_step)
    for (before, _), (after, committed) in zip(steps, steps[1:]):
        if before.shape[0] != after.shape[0]:
            continue  # variable length: a finished row left the batch
        width = before.shape[1]  # (variable length: a new block may have been appended)
        was_set = before != MASK
        assert torch.equal(after[:, :width][was_set], before[was_set])
        assert (before[committed[:, :width]] == MASK).all()  # only masks are committed
    assert (out.tokens[:, out.start :] != MASK).all()
    given = [p.tolist() for p in prompts()]
    assert [row[out.start - len(p) : out.start] for row, p in zip(out.tokens.tolist(), given)] == given


def test_a_fully_specified_text_is_returned_unchanged_without_a_forward():
    model = ContextModel()
    text = [torch.tensor([7, 8, 9]), torch.tensor([10, 11])]
    out = infill(model, text, SPECIAL)
    assert out.tokens.tolist() == [[7, 8, 9], [SPECIAL.pad, 10, 11]] and out.nfe == 0 and model.calls == 0
    empty = generate(model, text, SamplerConfig(gen_length=0), SPECIAL)
    assert empty.tokens.tolist() == [[7, 8, 9], [SPECIAL.pad, 10, 11]] and model.calls == 0


def test_threshold_and_cache_off_or_inert_give_the_plain_output():
    plain = generate(ContextModel(), prompts(), SamplerConfig(gen_length=16, steps=16, block_length=8), SPECIAL)
    cached = generate(CachedContextModel(), prompts(), SamplerConfig(gen_length=16, steps=16, block_length=8, prefix_cache=True), SPECIAL)
    # A threshold no confidence reaches commits exactly the best proposal per step.
    unreachable = generate(ContextModel(), prompts(), SamplerConfig(gen_length=16, steps=16, block_length=8, decoding=Decoding(threshold=1.0)), SPECIAL)
    assert torch.equal(cached.tokens, plain.tokens) and torch.equal(unreachable.tokens, plain.tokens)
    assert cached.nfe == unreachable.nfe == plain.nfe == 16


def test_threshold_commits_every_confident_position_and_at_least_one():
    peaked = ContextModel(scale=40.0)  # confident almost everywhere
    config = SamplerConfig(gen_length=16, steps=16, block_length=8, decoding=Decoding(threshold=0.9))
    steps, on_step = recorder()
    out = generate(peaked, prompts(), config, SPECIAL, on_step=on_step)
    assert out.nfe < 16 and max(int(c.sum(1).max()) for _, c in steps) > 1
    assert all(int(c.sum()) >= 1 for _, c in steps)
    assert (out.tokens[:, out.start :] != MASK).all()


def test_variable_length_denoises_only_the_blocks_the_answer_needs():
    prompt = [torch.tensor([7, 8, 9])]
    stops_in_second_block = StopAt({7: 3 + 8 + 2})
    config = SamplerConfig(gen_length=64, steps=64, block_length=8, variable_length=True)  # cap: 8 blocks
    out = generate(stops_in_second_block, prompt, config, SPECIAL)
    assert out.nfe == 2 * 8 and stops_in_second_block.widths == [3 + 8] * 8 + [3 + 16] * 8
    assert out.answers(SPECIAL) == [[9] * 10]
    fixed = StopAt({7: 3 + 8 + 2})
    generate(fixed, prompt, SamplerConfig(gen_length=64, steps=64, block_length=8), SPECIAL)
    assert fixed.calls == 64 and sum(fixed.widths) > 4 * sum(stops_in_second_block.widths)


def test_variable_length_rows_stop_on_their_own():
    model = StopAt({7: 2 + 4, 8: 2 + 20, 9: 10_000})  # stops in block 1, in block 3, never
    config = SamplerConfig(gen_length=32, steps=32, block_length=8, variable_length=True)
    out = generate(model, [torch.tensor([7, 1]), torch.tensor([8, 1]), torch.tensor([9, 1])], config, SPECIAL)
    assert out.answers(SPECIAL) == [[9] * 4, [9] * 20, [9] * 32]
    assert out.tokens.shape == (3, 2 + 32) and (out.tokens[0, 2 + 8 :] == SPECIAL.pad).all()
    assert model.calls == 32 and model.widths[7] == 2 + 8 and model.widths[-1] == 2 + 32  # batch of 3, then 2, then 1


def test_infill_fills_only_the_masks_in_left_to_right_chunks():
    text = torch.tensor([[7, MASK, MASK, 8, MASK, 9, MASK, MASK]])
    steps, on_step = recorder()
    out = infill(ContextModel(), text, SPECIAL, block_length=2, on_step=on_step)
    given = text != MASK
    assert torch.equal(out.tokens[given], text[given]) and (out.tokens != MASK).all()
    # Chunks of two masked positions, in order: positions (1, 2), then (4, 6), then 7.
    chunks = [set(c[0].nonzero().flatten().tolist()) for _, c in steps]
    assert set().union(*chunks[:2]) == {1, 2} and set().union(*chunks[2:4]) == {4, 6} and chunks[4:] == [{7}]


def test_find_loops():
    guard = RepetitionGuard(max_ngram=4, min_repeats=3, min_span=6)
    tokens = [1, 2, 3, 4, 4, 4, 4, 4, 4, 9, 7, 8, 7, 8, 7, 8, 5]
    loops = [(loop.start, loop.end, loop.period) for loop in find_loops(tokens, guard)]
    assert loops == [(3, 9, 1), (10, 16, 2)]
    assert find_loops([1, 2, 1, 2, 3, 4, 3, 4], guard) == []  # too short


def test_repetition_guard_breaks_a_loop_the_plain_sampler_falls_into():
    config = SamplerConfig(gen_length=32, steps=32, block_length=16)
    plain = generate(Looper(), [torch.tensor([7, 8])], config, SPECIAL)
    guard = RepetitionGuard()
    assert find_loops(plain.answers(SPECIAL)[0], guard)  # '20 21 20 21 ...'
    guarded = generate(Looper(), [torch.tensor([7, 8])], SamplerConfig(gen_length=32, steps=32, block_length=16, repetition=guard), SPECIAL)
    assert guarded.loops > 0 and find_loops(guarded.answers(SPECIAL)[0], guard) == []
    assert guarded.answers(SPECIAL)[0][:2] == [20, 21]  # the n-gram's first occurrence stays


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"gen_length": 100, "block_length": 32}, r"gen_length \(100\) must be a multiple of block_length \(32\)"),
        ({"gen_length": 96, "block_length": 32, "steps": 64}, r"steps \(64\) must be a multiple of the number of blocks"),
    ],
)
def test_bad_configs_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_bad_decodings_say_what_to_fix():
    for threshold in (1.5, 0.0, -0.1):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
            Decoding(threshold=threshold)
    with pytest.raises(ValueError, match="threshold decoding compares model confidences"):
        Decoding(remasking="random", threshold=0.9)
    with pytest.raises(ValueError, match="remasking must be one of low_confidence, random"):
        Decoding(remasking="lowest")
    with pytest.raises(ValueError, match="offers no prefix cache"):
        generate(ContextModel(), prompts(), SamplerConfig(gen_length=8, steps=8, block_length=8, prefix_cache=True), SPECIAL)
