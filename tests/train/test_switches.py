"""Each training switch of the config reaches the megatron object it sets: torch's AdamW
implementation, the distributed optimizer and overlapped communication (DDP and optimizer
configs), selective recomputation (TransformerConfig), the layer implementation (spec),
torch.compile of the layers, FP8 (TransformerConfig; refused without TE's layers).
Built for real on the CPU; the GPU-only switches are refused there in one line."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from illada.config import Config, ConfigError
from illada.errors import UserError
from illada.model.attention import SDPAttention
from illada.model.build import layer_spec, transformer_config
from illada.parallel import destroy_parallel, init_parallel
from illada.train import trainer


def config(**train) -> Config:
    return Config.model_validate(
        {
            "name": "switches",
            "root": "/tmp/illada-switches",
            "model": {"preset": "tiny", "max_seq_len": 32},
            "train": {"steps": 10, "global_batch_size": 2, "micro_batch_size": 2, "optim": {"warmup_steps": 0}, **train},
        }
    )


@pytest.fixture
def one_process():
    init_parallel(1, 1)
    yield
    destroy_parallel()


@pytest.mark.parametrize("impl, fused, foreach", [("fused", True, False), ("foreach", False, True), ("for_loop", False, False)])
def test_torch_adamw_implementation_reaches_the_optimizer_and_steps(one_process, impl, fused, foreach):
    model, optimizer, _, _ = trainer.build(config(optim={"warmup_steps": 0, "torch_impl": impl}))
    inner = optimizer.optimizer
    assert type(inner) is torch.optim.AdamW  # megatron's fallback without TE or Apex
    assert all(g["fused"] is fused and g["foreach"] is foreach for g in inner.param_groups)
    before = [p.detach().clone() for g in inner.param_groups for p in g["params"]]
    for p in model.parameters():
        p.main_grad.fill_(0.01)
    assert optimizer.step()[0]
    after = [p for g in inner.param_groups for p in g["params"]]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))


def test_overlap_grad_reduce_reaches_megatrons_ddp(one_process):
    model, _, _, _ = trainer.build(config(parallel={"overlap_grad_reduce": True}))
    assert model.ddp_config.overlap_grad_reduce is True
    assert model.ddp_config.grad_reduce_in_fp32 is True


def test_distributed_optimizer_and_param_gather_reach_both_configs():
    train = config(parallel={"use_distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True}).train
    ddp = trainer.ddp_config(train)
    opt = trainer.optimizer_config(train, bf16=True)
    assert (ddp.use_distributed_optimizer, ddp.overlap_grad_reduce, ddp.overlap_param_gather) == (True, True, True)
    assert (opt.use_distributed_optimizer, opt.overlap_param_gather) == (True, True)
    plain = config().train
    assert not trainer.ddp_config(plain).use_distributed_optimizer and not trainer.optimizer_config(plain, bf16=True).use_distributed_optimizer


def test_gpu_only_switches_are_refused_on_cpu_in_one_line():
    with pytest.raises(ConfigError, match=r"train\.parallel\.use_distributed_optimizer: needs a GPU"):
        trainer.check_device_support(config(parallel={"use_distributed_optimizer": True}).train, on_gpu=False)
    with pytest.raises(ConfigError, match=r"train\.recompute\.granularity: needs a GPU"):
        trainer.check_device_support(config(recompute={"granularity": "selective"}).train, on_gpu=False)
    trainer.check_device_support(config(parallel={"overlap_grad_reduce": True}).train, on_gpu=False)  # works on CPU
    trainer.check_device_support(config(parallel={"use_distributed_optimizer": True}).train, on_gpu=True)
    with pytest.raises(ValidationError, match="overlap_param_gather needs use_distributed_optimizer"):
        config(parallel={"overlap_param_gather": True})


def test_selective_recomputation_reaches_the_transformer_config():
    cfg = config(recompute={"granularity": "selective", "modules": ["core_attn", "mlp"]})
    tconfig = transformer_config(cfg.model, recompute_modules=cfg.train.recompute.modules)
    assert tconfig.recompute_granularity == "selective"
    assert tconfig.recompute_modules == ["core_attn", "mlp"]
    assert transformer_config(cfg.model).recompute_granularity is None
    with pytest.raises(ValidationError, match="recompute.modules"):
        config(recompute={"granularity": "selective", "modules": ["layernorm"]})


def test_the_layer_implementation_is_local_without_transformer_engine():
    assert not torch.cuda.is_available()  # CI: no GPU, no Transformer Engine
    assert layer_spec("auto").submodules.self_attention.submodules.core_attention is SDPAttention
    assert layer_spec("local").submodules.self_attention.submodules.core_attention is SDPAttention
    with pytest.raises(UserError, match="transformer_engine is not importable"):
        layer_spec("transformer_engine")


def _one_step_at_dp2(rank: int, train: dict) -> tuple[list[float], int]:
    """One optimizer step at DP=2, each rank on its own batch: this rank's updated weights,
    and how many times torch.compile broke a graph."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from illada.objective import add_noise

    init_parallel(1, 1)
    torch.manual_seed(0)
    model, optimizer, _, _ = trainer.build(config(**train))
    g = torch.Generator().manual_seed(rank)
    clean = torch.randint(7, 4096, (2, 32), generator=g)
    batch = trainer.Batch(clean, add_noise(clean, 5, g))
    optimizer.zero_grad()
    model.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=trainer.forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1, seq_length=32, micro_batch_size=2, forward_only=False
    )
    optimizer.step()
    weights = [float(p.detach().double().sum()) for p in model.parameters()]
    destroy_parallel()
    return weights, sum(torch._dynamo.utils.counters["graph_break"].values())


def test_overlapped_gradient_reduce_gives_the_same_step_at_dp2():
    """Megatron's bucketed, overlapped reduce (on gloo here) averages the same gradients:
    both ranks end with the weights of the plain all-reduce."""
    from tests.distributed import run_distributed

    plain = [weights for weights, _ in run_distributed(_one_step_at_dp2, 2, {})]
    overlapped = [weights for weights, _ in run_distributed(_one_step_at_dp2, 2, {"parallel": {"overlap_grad_reduce": True}})]
    assert plain[0] == pytest.approx(plain[1])  # the ranks agree: the gradients were reduced
    assert overlapped[0] == pytest.approx(plain[0], rel=1e-6)
    assert overlapped[1] == pytest.approx(plain[1], rel=1e-6)


def test_compiled_layers_give_the_same_step_at_dp2_in_whole_graphs():
    """train.compile: the trainer's step with inductor-compiled layers under megatron's DDP
    (whose gradient hooks must still fire) ends with the eager step's weights, and no layer's
    graph is broken (megatron's RowParallelLinear warned on rank 0 at every call, which did)."""
    from tests.distributed import run_distributed

    eager = [weights for weights, _ in run_distributed(_one_step_at_dp2, 2, {})]
    compiled = run_distributed(_one_step_at_dp2, 2, {"compile": True}, timeout=600)
    for rank in range(2):
        weights, graph_breaks = compiled[rank]
        assert weights == pytest.approx(eager[rank], rel=1e-5, abs=1e-5)  # inductor orders sums its own way
        assert graph_breaks == 0


def test_compile_is_refused_with_transformer_engine_layers(one_process):
    trainer.check_layer_support(config(compile=True, transformer_impl="local").train)
    with pytest.raises(ConfigError, match="train.compile compiles megatron's local layers"):
        trainer.check_layer_support(config(compile=True, transformer_impl="transformer_engine").train)
    model, _, _, _ = trainer.build(config(compile=True))
    assert all(layer._compiled_call_impl is not None for layer in model.module.decoder.layers)


def test_fp8_reaches_the_transformer_config_and_needs_transformer_engines_layers():
    cfg = config(fp8="hybrid", fp8_recipe="tensorwise", transformer_impl="transformer_engine")
    trainer.check_layer_support(cfg.train)
    tconfig = transformer_config(cfg.model, fp8=cfg.train.fp8, fp8_recipe=cfg.train.fp8_recipe)
    assert (tconfig.fp8, tconfig.fp8_recipe) == ("hybrid", "tensorwise")
    assert transformer_config(cfg.model).fp8 is None
    with pytest.raises(ConfigError, match="train.fp8 needs Transformer Engine's layers"):
        trainer.check_layer_support(config(fp8="e4m3").train)  # auto: the local layers without TE
    with pytest.raises(ConfigError, match="train.fp8 needs"):
        trainer.build(config(fp8="e4m3"))
    with pytest.raises(ValidationError, match="fp8"):
        config(fp8="e5m2")
