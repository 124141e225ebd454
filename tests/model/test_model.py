"""The model: parameter counts, bidirectional attention, and TP/PP giving the model they should.

Everything megatron-related runs in child processes (tests/distributed.py), so the bridge's
patches and megatron's global parallel state never touch the pytest process; those
functions import megatron inside them for the same reason.
"""

import math

import pytest
import torch

from illada.model.config import ModelConfig, num_parameters
from tests.distributed import DistributedTestError, run_distributed

SEED = 1234
BATCH, SEQ = 2, 16


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(preset="tiny", **overrides)


def test_8b_preset_has_7_62b_parameters_by_formula():
    n = num_parameters(ModelConfig(preset="8b"))
    assert abs(n - 7.62e9) / 7.62e9 < 0.005
    spec_check = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 155136 * 4096
    assert n - spec_check == 32 * 2 * 4096 + 4096  # the RMSNorm weights the SPEC's check omits


def test_released_model_presets_have_their_published_parameter_counts():
    assert ModelConfig(preset="illada-8b").model_dump(exclude={"preset", "rope_theta"}) == ModelConfig(preset="8b").model_dump(exclude={"preset", "rope_theta"})
    llada = ModelConfig(preset="llada-8b")
    assert not llada.tie_word_embeddings and llada.num_query_groups == 32
    assert abs(num_parameters(llada) - 8.02e9) / 8.02e9 < 0.005  # SPEC §1; the untied head counted
    assert num_parameters(llada) - num_parameters(llada.model_copy(update={"tie_word_embeddings": True})) == 126464 * 4096


def test_preset_fields_can_be_overridden_and_unknown_presets_are_listed():
    cfg = ModelConfig.model_validate({"preset": "1b", "num_layers": 4})
    assert (cfg.num_layers, cfg.hidden_size, cfg.head_dim) == (4, 2048, 128)
    assert 1.0e9 < num_parameters(ModelConfig(preset="1b")) < 1.3e9
    with pytest.raises(ValueError, match="unknown model preset '2b'; known presets: 1b, 8b, illada-8b, llada-8b, tiny"):
        ModelConfig(preset="2b")


def test_heads_must_divide_hidden_and_groups_must_divide_heads():
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        tiny(hidden_size=66)
    with pytest.raises(ValueError, match="divisible by num_query_groups"):
        tiny(num_query_groups=3)


# --- in child processes -----------------------------------------------------------------


def _build(cfg: ModelConfig, tp: int = 1, pp: int = 1, sp: bool = False, layer_spec=None):
    from megatron.core import parallel_state

    from illada.model.build import build_model, transformer_config
    from illada.parallel import init_parallel

    init_parallel(tp, pp, seed=SEED)
    return build_model(
        cfg,
        transformer_config(cfg, tp=tp, pp=pp, sequence_parallel=sp),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        layer_spec=layer_spec,
    )


def _tokens(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _reference(rank: int, cfg: ModelConfig):
    """TP=1 PP=1: parameter count, weights, logits and per-token CE for _tokens(cfg)."""
    from illada.model.build import forward_logits, per_token_loss
    from illada.parallel import destroy_parallel

    model = _build(cfg)
    tokens = _tokens(cfg)
    with torch.no_grad():
        logits, loss = forward_logits(model, tokens), per_token_loss(model, tokens, tokens)
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    result = sum(p.numel() for p in model.parameters()), state, logits, loss
    destroy_parallel()
    return result


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied-head"])
def test_built_model_has_the_formula_parameter_count_and_per_token_loss(tied):
    cfg = tiny(tie_word_embeddings=tied)
    [(count, _, logits, loss)] = run_distributed(_reference, 1, cfg)
    assert count == num_parameters(cfg)
    assert logits.shape == (BATCH, SEQ, cfg.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), _tokens(cfg).flatten(), reduction="none")
    torch.testing.assert_close(loss, expected.view(BATCH, SEQ))  # [b, s], labels not shifted


def _first_position_logits(rank: int, cfg: ModelConfig, causal: bool):
    """Logits at position 0 for a sequence and for the same sequence with its last token changed."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from illada.model.build import forward_logits
    from illada.parallel import destroy_parallel

    model = _build(cfg, layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm") if causal else None)
    tokens = _tokens(cfg)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        result = forward_logits(model, tokens)[:, 0], forward_logits(model, changed)[:, 0]
    destroy_parallel()
    return result


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal-control"])
def test_last_token_reaches_the_first_position_only_without_a_causal_mask(causal):
    [(before, after)] = run_distributed(_first_position_logits, 1, tiny(), causal)
    changed = (before - after).abs().max().item()
    if causal:
        assert changed == 0
    else:
        assert changed > 1e-4


def _logits_with_both_core_attentions(rank: int, cfg: ModelConfig):
    """Logits of the same weights with SDPA (ours) and megatron's DotProductAttention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from illada.model.build import forward_logits
    from illada.parallel import destroy_parallel

    model = _build(cfg)
    tokens = _tokens(cfg)
    with torch.no_grad():
        ours = forward_logits(model, tokens)
        for layer in model.decoder.layers:
            attention = layer.self_attention
            attention.core_attention = DotProductAttention(
                config=attention.config, layer_number=attention.layer_number, attn_mask_type=attention.attn_mask_type, attention_type="self"
            )
        megatrons = forward_logits(model, tokens)
    destroy_parallel()
    return ours, megatrons


def test_sdpa_core_attention_computes_what_megatrons_does():
    [(ours, megatrons)] = run_distributed(_logits_with_both_core_attentions, 1, tiny())
    torch.testing.assert_close(ours, megatrons, rtol=1e-5, atol=1e-5)


# --- tensor and pipeline parallelism ----------------------------------------------------------


def _load_full_weights(model, full: dict, cfg: ModelConfig, tp: int, pp: int) -> None:
    """Give this rank its shard of a TP=1 PP=1 state dict: split along each parameter's
    partition dim, SwiGLU's fc1 per half (megatron keeps [gate shard; up shard] on each rank),
    and with pipeline stages renumber the layers (names count from 0 on every stage)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    first_layer = parallel_state.get_pipeline_model_parallel_rank() * (cfg.num_layers // pp)
    for name, param in model.named_parameters():
        source = _global_name(name, first_layer)
        if source.startswith("output_layer."):
            source = "embedding.word_embeddings.weight"  # tied: the last stage's copy
        weight = full[source]
        if getattr(param, "tensor_model_parallel", False):
            dim = param.partition_dim
            halves = weight.chunk(2, dim) if "linear_fc1" in name else [weight]
            weight = torch.cat([h.chunk(tp, dim)[tp_rank] for h in halves], dim)
        with torch.no_grad():
            param.copy_(weight)


def _global_name(name: str, first_layer: int) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + first_layer)
    return ".".join(parts)


def _parallel_step(rank: int, cfg: ModelConfig, tp: int, pp: int, sp: bool, full: dict, microbatches: int):
    """Load the reference weights, run forward+backward through megatron's schedule; return the
    per-token CE (last stage), the names of parameters whose gradient is zero or missing, and
    the gathered logits (one stage only)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from illada.model.build import forward_logits
    from illada.parallel import destroy_parallel

    model = _build(cfg, tp, pp, sp)
    _load_full_weights(model, full, cfg, tp, pp)
    tokens = _tokens(cfg)
    micro = list(tokens.chunk(microbatches))

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if parallel_state.is_pipeline_first_stage():
            output = model(input_ids=batch, position_ids=None, attention_mask=None, labels=batch)
        else:  # the input hidden states arrive through set_input_tensor
            output = model(input_ids=None, position_ids=None, attention_mask=None, labels=batch)

        def loss_func(per_token):
            return per_token.mean(), {"per_token": per_token.detach()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=model,
        num_microbatches=microbatches,
        seq_length=SEQ,
        micro_batch_size=BATCH // microbatches,
        forward_only=False,
    )
    per_token = torch.cat([d["per_token"] for d in losses]) if losses else None
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    with torch.no_grad():
        logits = forward_logits(model, tokens) if pp == 1 else None
    destroy_parallel()
    return per_token, no_grad, logits


@pytest.mark.parametrize("tp,pp,sp", [(2, 1, False), (2, 1, True), (1, 2, False)], ids=["tp2", "tp2-sequence-parallel", "pp2"])
def test_tensor_and_pipeline_parallel_compute_what_one_process_does(tp, pp, sp):
    cfg = tiny()
    [(_, full, reference_logits, reference_loss)] = run_distributed(_reference, 1, cfg)
    results = run_distributed(_parallel_step, tp * pp, cfg, tp, pp, sp, full, 2)
    for _, no_grad, logits in results:
        assert no_grad == []
        if pp == 1:
            torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    last_stage = results[-1][0]
    assert last_stage is not None and math.isfinite(last_stage.sum().item())
    torch.testing.assert_close(last_stage, reference_loss, rtol=1e-5, atol=1e-5)


def _ce_and_grads_two_ways(rank: int, cfg: ModelConfig, tp: int, sp: bool, full: dict, where: torch.Tensor, cross_entropy: str):
    """Per-token CE and this rank's gradients of a weighted sum over `where`, computed once
    at every position (megatron's own output layer and cross entropy) and once only at
    `where` (DiffusionGPTModel, with its `cross_entropy`)."""
    from illada.model.build import per_token_loss
    from illada.parallel import destroy_parallel

    model = _build(cfg, tp, 1, sp)
    model.cross_entropy = cross_entropy
    _load_full_weights(model, full, cfg, tp, 1)
    tokens = _tokens(cfg)
    labels = torch.randint(0, cfg.vocab_size, tokens.shape, generator=torch.Generator().manual_seed(1))
    scale = torch.linspace(0.5, 2.0, tokens.numel()).view_as(tokens)
    out = []
    for only in (None, where):
        model.zero_grad(set_to_none=True)
        ce = per_token_loss(model, tokens, labels, only)
        (ce * where * scale).sum().backward()
        out.append((ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    nothing = per_token_loss(model, tokens, labels, torch.zeros_like(where))
    nothing.sum().backward()  # a micro-batch with no masked token still runs backward
    destroy_parallel()
    return out, nothing.detach()


@pytest.mark.parametrize(
    "tp,sp,cross_entropy,tied",
    [(1, False, "fused", True), (2, True, "fused", True), (2, True, "fused", False), (1, False, "megatron", False)],
    ids=["tp1-fused", "tp2-sequence-parallel-fused", "tp2-sequence-parallel-fused-untied", "tp1-megatron-untied"],
)
def test_cross_entropy_at_masked_positions_only_equals_megatrons_at_all_positions(tp, sp, cross_entropy, tied):
    cfg = tiny(tie_word_embeddings=tied)
    [(_, full, _, _)] = run_distributed(_reference, 1, cfg)
    where = torch.rand(BATCH, SEQ, generator=torch.Generator().manual_seed(2)) < 0.4
    where[1] = False  # a row with nothing masked
    for [(everywhere, grads), (only, only_grads)], nothing in run_distributed(_ce_and_grads_two_ways, tp, cfg, tp, sp, full, where, cross_entropy):
        assert nothing.shape == (BATCH, SEQ) and (nothing == 0).all()
        torch.testing.assert_close(only, everywhere * where, rtol=1e-5, atol=1e-6)
        assert (only[~where] == 0).all() and (only[where] > 0).all()
        assert grads.keys() == only_grads.keys()
        for name in grads:
            torch.testing.assert_close(only_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def _ce_and_grads(rank: int, cfg: ModelConfig, full: dict, compiled: bool):
    """Per-token CE at TP=2 with sequence parallelism and this rank's gradients of its sum,
    with the layers torch.compile'd (inductor) or eager."""
    from illada.model.build import compile_layers, per_token_loss
    from illada.parallel import destroy_parallel

    model = _build(cfg, 2, 1, sp=True)
    _load_full_weights(model, full, cfg, 2, 1)
    if compiled:
        compile_layers(model)
    tokens = _tokens(cfg)
    ce = per_token_loss(model, tokens, tokens)
    ce.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    destroy_parallel()
    return ce.detach(), grads, torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_layers_compute_what_eager_ones_do_under_tensor_and_sequence_parallelism():
    """torch.compile across megatron's collectives (all-gather and reduce-scatter of the
    sequence, all-reduce of the input gradient): same values and gradients."""
    cfg = tiny()
    [(_, full, _, _)] = run_distributed(_reference, 1, cfg)
    eager = run_distributed(_ce_and_grads, 2, cfg, full, False)
    compiled = run_distributed(_ce_and_grads, 2, cfg, full, True, timeout=600)
    for (ce, grads, _), (compiled_ce, compiled_grads, graphs) in zip(eager, compiled):
        assert graphs > 0
        torch.testing.assert_close(compiled_ce, ce, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(compiled_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _fails(rank: int):
    if rank == 1:
        raise ValueError("rank one broke")
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()  # never completes: rank 1 is gone


def test_harness_reports_a_failing_rank_with_its_traceback():
    with pytest.raises(DistributedTestError, match="(?s)rank 1 failed.*rank one broke"):
        run_distributed(_fails, 2, timeout=60)


def _hangs(rank: int):
    import time

    time.sleep(600)


def test_harness_fails_a_hung_rank_at_the_deadline():
    with pytest.raises(DistributedTestError, match=r"ranks \[0\] did not finish in time"):
        run_distributed(_hangs, 1, timeout=2)
