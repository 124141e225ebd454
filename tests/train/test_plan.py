"""The memory planner against independent numbers: parameter counts worked out by hand,
megatron's documented bytes per parameter, and the bytes autograd actually saves in
megatron's model (CPU, fp32)."""

from __future__ import annotations

import pytest

from illada.config import ConfigError, load_config
from illada.model.config import ModelConfig, num_parameters
from illada.train import plan as P
from tests.conftest import REPO

GiB = 1024**3
EIGHT_B = ModelConfig(preset="8b")


def test_parameters_of_the_8b_preset_match_a_hand_count():
    # per layer: q, o 2 x 4096^2; k, v 2 x 4096 x 1024; gate, up, down 3 x 4096 x 14336 -> 218,103,808 (+ 8,192 norms)
    # whole model: 32 x 218,111,999+1 + 155,136 x 4096 + 4096 = 7,615,025,152
    assert P.stage_parameters(EIGHT_B, tp=1, pp=1, first=True, last=True) == 7_615_025_152 == num_parameters(EIGHT_B)
    # TP=4, PP=2: 16 layers of 218,103,808 / 4 + 8,192, plus the embedding's 155,136 x 4096 / 4
    assert P.stage_parameters(EIGHT_B, tp=4, pp=2, first=True, last=False) == 1_031_405_568
    assert P.stage_parameters(EIGHT_B, tp=4, pp=2, first=False, last=True) == 1_031_405_568 + 4096  # + final norm


def test_bytes_per_parameter_are_megatrons_documented_ones():
    # megatron-core docs (distributed optimizer): bf16 params + fp32 grads: 18 | 6 + 12/d; fp32: 16 | 8 + 8/d
    assert sum(P.state_bytes_per_parameter(bf16=True, distributed_optimizer=False, dp=8)) == 18
    assert sum(P.state_bytes_per_parameter(bf16=True, distributed_optimizer=True, dp=8)) == 6 + 12 / 8
    assert sum(P.state_bytes_per_parameter(bf16=False, distributed_optimizer=False, dp=4)) == 16
    assert sum(P.state_bytes_per_parameter(bf16=False, distributed_optimizer=True, dp=4)) == 8 + 8 / 4


def test_weights_gradients_and_optimizer_of_the_8b_config_layout():
    layout = P.Layout(tp=4, pp=2, dp=8, micro_batch=1, sequence_parallel=True, distributed_optimizer=True)
    first = P.plan(EIGHT_B, layout, seq_len=8192, global_batch=512).stages[0]
    assert first.stage == "first"
    assert (first.weights, first.grads, first.optimizer) == (2 * 1_031_405_568, 4 * 1_031_405_568, 12 * 1_031_405_568 / 8)
    assert first.in_flight == 2  # 1F1B: the first of 2 stages holds 2 micro-batches
    assert P.plan(EIGHT_B, layout, 8192, global_batch=8).micro_batches == 1


def test_the_pipelines_first_stage_holds_as_many_micro_batches_as_stages_or_the_step_has():
    many = P.plan(EIGHT_B, P.Layout(tp=1, pp=4, dp=1), 4096, global_batch=16)
    few = P.plan(EIGHT_B, P.Layout(tp=1, pp=4, dp=1), 4096, global_batch=2)
    assert [s.in_flight for s in many.stages] == [4, 1]
    assert [s.in_flight for s in few.stages] == [2, 1]


SMALL = ModelConfig(preset="tiny", num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=352, vocab_size=1024, max_seq_len=256)
SEQ, BATCH = 256, 2


def saved_activation_bytes(rank: int = 0, tp: int = 1, sequence_parallel: bool = False, fused: bool = False) -> int:
    """Bytes of every tensor (weights aside) autograd saves in one forward pass of megatron's
    model, on this rank: its own output layer and cross entropy at every position, or (fused)
    training's fused cross entropy with every position masked."""
    import torch

    from illada.model.build import build_model, transformer_config
    from illada.parallel import destroy_parallel, init_parallel

    init_parallel(tp, 1)
    try:
        model = build_model(SMALL, transformer_config(SMALL, tp=tp, sequence_parallel=sequence_parallel))
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def keep(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        tokens = torch.randint(0, SMALL.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            everywhere = torch.ones_like(tokens, dtype=torch.bool) if fused else None
            model(input_ids=tokens, position_ids=None, attention_mask=None, labels=tokens, loss_mask=everywhere)
    finally:
        destroy_parallel()
    return sum(n for ptr, n in saved.items() if ptr not in weights)


def predicted_activation_bytes(layout, fused: bool = False) -> float:
    stage = P.plan(SMALL, layout, SEQ, BATCH, bf16=False, fused_norm=False, fused_cross_entropy=fused).stages[0]
    return stage.activations + stage.stage_extra


@pytest.mark.parametrize("fused", [False, True], ids=["megatron-cross-entropy", "fused-cross-entropy"])
def test_activations_count_what_autograd_saves_in_megatrons_model(fused):
    """The planner's activation and logits bytes for one micro-batch against the storage of
    every tensor autograd saves in a forward pass of the real model (CPU: fp32, composite
    RMSNorm). What the planner leaves out (token ids, the loss's [b, s] tensors) is tiny."""
    measured = saved_activation_bytes(fused=fused)
    predicted = predicted_activation_bytes(P.Layout(micro_batch=BATCH), fused)
    assert abs(predicted - measured) / measured < 0.01, (predicted, measured)


def test_bf16_logits_take_2_bytes_fused_and_6_with_megatrons_cross_entropy():
    layout = P.Layout(tp=4, micro_batch=2, sequence_parallel=True)
    fused, megatron = (P.last_stage_bytes(EIGHT_B, layout, 4096, fused_cross_entropy=f) for f in (True, False))
    assert megatron - fused == 2 * 4096 * 155_136 / 4 * 4
    # the fused scratch (an fp32 chunk of 2^26) is transient, as is the head's weight gradient
    assert P.head_transient_bytes(EIGHT_B, P.Layout(tp=8), 4096) == 4 * 2**26 > P.head_transient_bytes(EIGHT_B, P.Layout(tp=8), 4096, fused_cross_entropy=False)
    assert P.head_transient_bytes(EIGHT_B, P.Layout(tp=1), 4096) == 155_136 * 4096 * 2


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_and_sequence_parallelism_divide_what_the_planner_says(sequence_parallel):
    from tests.distributed import run_distributed

    measured = run_distributed(saved_activation_bytes, 2, 2, sequence_parallel)
    predicted = predicted_activation_bytes(P.Layout(tp=2, micro_batch=BATCH, sequence_parallel=sequence_parallel))
    for rank_bytes in measured:
        assert abs(predicted - rank_bytes) / rank_bytes < 0.02, (predicted, measured)


def test_recomputing_the_mlp_drops_its_four_tensors():
    layout = P.Layout(tp=2, micro_batch=1, sequence_parallel=True)
    full = P.layer_activation_bytes(EIGHT_B, layout, 4096)
    mlp = P.layer_activation_bytes(EIGHT_B, P.Layout(tp=2, micro_batch=1, sequence_parallel=True, recompute=("mlp",)), 4096)
    assert full - mlp == 4096 * 5 * 14336 * 2 / 2  # fc1 output (2 ffn), silu, up + 0, product; bf16; over TP=2


def test_proposals_fit_are_ranked_and_leave_out_what_cannot_fit():
    usable = 80 * GiB * 0.9
    best = P.proposals(EIGHT_B, gpus=8, gpu_bytes=80 * GiB, seq_len=8192, global_batch=512)
    assert best and all(p.peak <= usable for p in best)
    assert [P.rank_key(p.layout) for p in best] == sorted(P.rank_key(p.layout) for p in best)
    assert all(p.layout.gpus == 8 for p in best)
    # One GPU cannot hold the whole 8B at TP=PP=1: 2 + 4 bytes per parameter, a distributed
    # optimizer's 12/8, the bf16 logits of 8192 x 155,136 and the head's bf16 weight gradient
    # leave less than 32 layers' activations of room below 72 GiB.
    floor = 7_615_025_152 * (2 + 4 + 12 / 8) + 8192 * 155_136 * 2 + 155_136 * 4096 * 2
    assert floor < usable < floor + 32 * P.layer_activation_bytes(EIGHT_B, P.Layout(recompute=("mlp",)), 8192)
    assert (1, 1) not in {(p.layout.tp, p.layout.pp) for p in best}


def test_the_preflight_refuses_a_layout_that_does_not_fit_with_the_numbers():
    config = load_config(REPO / "configs" / "train" / "8b.yaml", ["train.parallel.tensor=1", "train.parallel.pipeline=1"])
    with pytest.raises(ConfigError) as err:
        P.check_fits(config, dp=8, seq_len=8192, gpu_bytes=80 * GiB)
    message = str(err.value)
    assert "needs" in message and "weights 14.2 GiB" in message and "of 80.0 GiB is usable" in message
    assert "a layout that fits: train.parallel.tensor=" in message
    assert P.check_fits(load_config(REPO / "configs" / "train" / "8b.yaml"), dp=8, seq_len=8192, gpu_bytes=80 * GiB).peak < 72 * GiB
    warned = load_config(REPO / "configs" / "train" / "8b.yaml", ["train.parallel.tensor=1", "train.parallel.pipeline=1", "train.memory_check=false"])
    assert P.check_fits(warned, dp=8, seq_len=8192, gpu_bytes=80 * GiB).peak > 72 * GiB  # only a warning


def test_gpu_memory_from_the_ray_gpu_type_or_the_config():
    from illada.train.preflight import gpu_memory_bytes

    train = load_config(REPO / "configs" / "train" / "8b.yaml").train
    h100 = {"CPU": 96, "GPU": 8, "accelerator_type:H100": 1}
    assert gpu_memory_bytes(train, [h100]) == 79.6 * GiB
    assert gpu_memory_bytes(train, [{"CPU": 96, "GPU": 8, "accelerator_type:A100": 1}]) is None  # 40 or 80 GB
    assert gpu_memory_bytes(train, [{"CPU": 8}]) is None
    assert gpu_memory_bytes(train.model_copy(update={"gpu_memory_gib": 40.0}), [h100]) == 40 * GiB


def test_illada_plan_prints_the_layout_and_proposals(capsys):
    from illada.cli import main

    assert main(["plan", str(REPO / "configs" / "train" / "8b.yaml"), "--gpus", "64", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "7.62B parameters" in out and "4,194,304 tokens per step" in out
    assert "the config's layout: TP=4 PP=2 DP=8" in out and "peak" in out and "fits" in out
    assert "use #1 with these overrides:" in out
    assert P.parse_size("141GB") == 141e9 and P.parse_size("80") == 80 * GiB


def test_the_ray_jobs_check_refuses_a_layout_too_big_for_the_clusters_gpus():
    from illada.train.preflight import LaunchError, Plan, check_memory

    config = load_config(REPO / "configs" / "train" / "8b.yaml", ["train.parallel.tensor=1", "train.parallel.pipeline=1"])
    l4_nodes = [{"CPU": 48, "GPU": 8, "accelerator_type:L4": 1}] * 8
    with pytest.raises(LaunchError, match=r"needs .* GiB on a GPU .* of 22\.0 GiB is usable"):
        check_memory(config, Plan(workers=64, use_gpu=True, cpus_per_worker=1), 8192, l4_nodes)
    unknown = [{"CPU": 48, "GPU": 8, "accelerator_type:A100": 1}] * 8
    check_memory(config, Plan(workers=64, use_gpu=True, cpus_per_worker=1), 8192, unknown)  # size unknown: skipped
    check_memory(config, Plan(workers=64, use_gpu=False, cpus_per_worker=1), 8192, l4_nodes)  # CPU workers: skipped
