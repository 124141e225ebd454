"""Pre-training with megatron-core: the masked-diffusion objective under TP, PP and DP.

One process per device, started by torchrun (or by Ray in the cluster path). Each step:
this rank's slice of the global batch is cut into micro-batches, each noised with a
generator seeded by (seed, step, its place in the global batch) — so a resumed run, or a
run at another parallel layout, sees the same masks — and run through megatron's pipeline
schedule; megatron's DDP reduces the gradients and its optimizer (AdamW, clipping) steps
under a WSD schedule. Every `train.eval_interval` steps it logs val_loss, the same loss
over fixed validation sequences at fixed masks (illada.train.validation).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from illada import layout, storage
from illada.config import Config, ConfigError, TrainConfig
from illada.model.build import build_model, compile_layers, layer_spec, per_token_loss, resolve_impl, transformer_config
from illada.model.config import ModelConfig
from illada.objective import Noised, add_noise, answer_length_loss, diffusion_loss, random_length
from illada.parallel import init_parallel
from illada.progress import progress
from illada.train import sft
from illada.train.data import PackedData, Sequences, stable_seed
from illada.train.metrics import MetricsLogger, flops_per_token, peak_flops
from illada.train.validation import validation_micro_batches, validation_sequences

if TYPE_CHECKING:
    from illada.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    tokens_per_source: dict[str, int] = field(default_factory=dict)  # summed over all DP ranks


@dataclass
class Batch:
    clean: torch.Tensor  # the labels
    noised: Noised  # noised.tokens is the input
    answer_len: torch.Tensor | None = None  # SFT in LLaDA mode: the loss divides by it


def data_manifest(train: TrainConfig) -> dict:
    url = layout.manifest_url(train.data_root, "pack")
    if not storage.exists(url):
        raise ConfigError(f"no pack manifest at {url}: run the data pipeline first (illada pipeline run CONFIG), or set train.data_root to a completed run")
    return storage.read_json(url)


def build(config: Config):
    """Model (wrapped in megatron DDP), optimizer and LR schedule for this rank."""
    train, model_cfg = config.train, config.model
    on_gpu = torch.cuda.is_available()
    check_device_support(train, on_gpu)
    check_layer_support(train)
    bf16 = train.bf16 and on_gpu
    recompute = train.recompute
    tconfig = transformer_config(
        model_cfg,
        tp=train.parallel.tensor,
        pp=train.parallel.pipeline,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        sequence_parallel=train.parallel.sequence_parallel,
        recompute_modules=recompute.modules if recompute.granularity == "selective" else None,
        fp8=None if train.fp8 == "off" else train.fp8,
        fp8_recipe=train.fp8_recipe,
    )
    tconfig.variable_seq_lengths = train.parallel.pipeline > 1 and (train.random_length_fraction > 0 or train.objective == "sft")
    model = build_model(
        model_cfg,
        tconfig,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        layer_spec=layer_spec(train.transformer_impl),
        cross_entropy=train.cross_entropy,
    )
    if on_gpu:
        model.cuda()
    if train.compile:
        compile_layers(model)
    model = DistributedDataParallel(tconfig, ddp_config(train), model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model.no_sync
    optim = train.optim
    optimizer = get_megatron_optimizer(optimizer_config(train, bf16), [model])
    use_torch_adamw(optimizer, optim.torch_impl)
    decay_style = "WSD" if optim.decay_steps else "constant"
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=train.steps,
        lr_decay_style=decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=train.steps,
        wd_incr_style="constant",
        wsd_decay_steps=optim.decay_steps or None,
        lr_wsd_decay_style="cosine" if optim.decay_steps else None,
    )
    return model, optimizer, scheduler, tconfig


def check_device_support(train: TrainConfig, on_gpu: bool) -> None:
    """Megatron's distributed optimizer (so also overlap_param_gather) refuses CPU tensors and
    its recomputation saves CUDA RNG states: say so in one line instead of deep in megatron.
    (overlap_grad_reduce works on gloo.)"""
    if on_gpu:
        return
    gpu_only = [f"train.parallel.{k}" for k in train.parallel.gpu_only]
    if train.recompute.granularity != "none":
        gpu_only.append("train.recompute.granularity")
    if gpu_only:
        raise ConfigError(f"{', '.join(gpu_only)}: needs a GPU (megatron runs it on CUDA tensors only); turn it off for CPU runs")


def check_layer_support(train: TrainConfig) -> None:
    """train.compile is for megatron's local layers, train.fp8 for Transformer Engine's."""
    impl = resolve_impl(train.transformer_impl)
    if train.compile and impl != "local":
        raise ConfigError(
            "train.compile compiles megatron's local layers, but Transformer Engine's are in use (fused already): "
            "set train.transformer_impl: local, or train.compile: false"
        )
    if train.fp8 != "off" and impl != "transformer_engine":
        raise ConfigError(
            "train.fp8 needs Transformer Engine's layers, which are not in use here (they need a GPU node with transformer_engine, "
            "e.g. the image in infra/docker, and train.transformer_impl auto or transformer_engine); set train.fp8: off"
        )


def ddp_config(train: TrainConfig) -> DistributedDataParallelConfig:
    parallel = train.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
    )


def optimizer_config(train: TrainConfig, bf16: bool) -> OptimizerConfig:
    optim = train.optim
    return OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=train.parallel.use_distributed_optimizer,
        overlap_param_gather=train.parallel.overlap_param_gather,
    )


def use_torch_adamw(optimizer, impl: str) -> None:
    """Without TE or Apex, megatron builds torch's AdamW with its defaults (the foreach kernel
    on GPUs) and has no option for the fused one, which steps about twice as fast. torch's
    AdamW reads `fused`/`foreach` from each parameter group at every step, so set them there;
    megatron's wrapper and its checkpoints keep the same optimizer object. (A checkpoint's
    groups carry their own flags: call this again after loading one.)"""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, torch.optim.AdamW):
        return  # TE's or Apex's fused Adam: already fused
    fused, foreach = impl == "fused", impl == "foreach"
    inner.defaults.update(fused=fused, foreach=foreach)
    inner._step_supports_amp_scaling = fused
    for group in inner.param_groups:
        group.update(fused=fused, foreach=foreach)
        for p in group["params"]:
            step = inner.state.get(p, {}).get("step")
            if fused and step is not None:  # the fused kernel keeps its step count on the parameter's device
                inner.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def micro_batches(rows: Sequences, train: TrainConfig, step: int, mask_id: int, device) -> tuple[list[Batch], dict[str, int]]:
    """Noise this rank's rows in micro-batches (padding is never masked nor scored), and
    count the real tokens trained on per source, after any random-length cut. Each
    micro-batch's generator is seeded by its index in the global batch, so the masks do not
    depend on the parallel layout: DP=2 sees what DP=1 sees, and a resumed run what an
    uninterrupted one saw."""
    first = parallel_state.get_data_parallel_rank() * len(rows.tokens)
    valid = torch.from_numpy(rows.valid())
    out, tokens = [], {}
    for m in range(0, len(rows.tokens), train.micro_batch_size):
        g = torch.Generator().manual_seed(stable_seed(train.seed, step, first + m))
        clean = random_length(torch.from_numpy(rows.tokens[m : m + train.micro_batch_size]), train.random_length_fraction, g)
        noised = add_noise(clean, mask_id, g, valid=valid[m : m + train.micro_batch_size, : clean.shape[1]])
        out.append(Batch(clean.to(device), noised.to(device)))
        for source, n in rows.real_tokens(slice(m, m + train.micro_batch_size), clean.shape[1]).items():
            tokens[source] = tokens.get(source, 0) + n
    return out, tokens


def sft_micro_batches(samples: list[sft.Sample], train: TrainConfig, step: int, special_ids: dict[str, int], device) -> list[Batch]:
    """SFT's micro-batches, seeded as `micro_batches` are; each padded with end-of-text to
    its longest sample's bucket (illada.train.sft)."""
    first = parallel_state.get_data_parallel_rank() * len(samples)
    out = []
    for m in range(0, len(samples), train.micro_batch_size):
        g = torch.Generator().manual_seed(stable_seed(train.seed, step, first + m))
        clean, noised, answer_len = sft.micro_batch(samples[m : m + train.micro_batch_size], train.sft.mode, special_ids, g)
        out.append(Batch(clean.to(device), noised.to(device), None if answer_len is None else answer_len.to(device)))
    return out


def forward_step(data_iterator, model, *, logits_everywhere: bool = False):
    """One micro-batch's per-token cross entropy, computed only at its masked positions
    (the loss reads no other); `logits_everywhere` computes all of them (the bench's control)."""
    batch = next(data_iterator)
    where = None if logits_everywhere else batch.noised.masked
    token_ce = per_token_loss(model, batch.noised.tokens, batch.clean, where)

    def loss_func(output: torch.Tensor):
        if batch.answer_len is None:
            loss = diffusion_loss(output.float(), batch.noised)
        else:
            loss = answer_length_loss(output.float(), batch.noised, batch.answer_len)
        # A copy: megatron divides the returned loss by the micro-batch count in place.
        return loss, {"loss": loss.detach().clone()}

    return token_ce, loss_func


def global_mean_loss(losses: list[dict]) -> float:
    """The step's loss averaged over micro-batches and DP ranks (known on the last stage)."""
    local = torch.stack([d["loss"] for d in losses]).mean() if losses else torch.zeros(())
    local = local.float().to(_device())
    dist.all_reduce(local)
    tp_dp = parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_data_parallel_world_size()
    return local.item() / tp_dp


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sum_over_data_parallel(counts: dict[str, int]) -> dict[str, int]:
    names = sorted(counts)
    t = torch.tensor([counts[n] for n in names], dtype=torch.float64, device=_device())
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return {n: int(v) for n, v in zip(names, t.tolist())}


def validation_batches(manifest: dict, train: TrainConfig) -> list[Batch]:
    """This rank's micro-batches of the validation set, or none when val_loss is off."""
    if not train.eval_interval:
        return []
    tokens = validation_sequences(manifest, train.data_root, train.eval_sequences)
    mask_id = manifest["stats"]["special_ids"]["mask"]
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    return [Batch(clean, noised) for clean, noised in validation_micro_batches(tokens, train, mask_id, dp_rank, dp_size, _device())]


def validation_loss(model, forward_backward, batches: list[Batch], train: TrainConfig) -> float:
    """The loss over the validation micro-batches, averaged over them and the DP ranks."""
    model.eval()
    with torch.no_grad():
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=batches[0].clean.shape[1],
            micro_batch_size=train.micro_batch_size,
            forward_only=True,
        )
    model.train()
    return global_mean_loss(losses)


@dataclass
class Run:
    """What a training run works with, once set up (`start_run`)."""

    config: Config
    manifest: dict
    mix: dict[str, float]
    model: DistributedDataParallel
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    data: PackedData | sft.SFTData
    state: TrainState
    checkpointer: Checkpointer

    @property
    def seq_len(self) -> int:
        return self.manifest["stats"]["seq_len"]


def start_run(config: Config) -> Run:
    """Process groups, checks, model, optimizer and data, resumed from the latest checkpoint if any."""
    from illada.train.checkpoint import Checkpointer

    config.require("model", "train")
    train = config.train
    check_device_support(train, torch.cuda.is_available())
    init_parallel(train.parallel.tensor, train.parallel.pipeline, train.seed, timeout_s=train.collective_timeout_s)
    storage.configure(config.storage)
    manifest = data_manifest(train)
    check_data_fits_model(manifest, config.model)
    sft.check_objective(manifest, train)
    mix = train.mix or manifest["stats"]["mix"]
    if train.objective == "sft":
        config = sft.with_steps(config, manifest, mix)  # train.sft.epochs -> train.steps
        train = config.train
    dp_size = parallel_state.get_data_parallel_world_size()
    if train.global_batch_size % (dp_size * train.micro_batch_size):
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) must be divisible by data-parallel size ({dp_size}) "
            f"x train.micro_batch_size ({train.micro_batch_size})"
        )
    check_memory(config, dp_size, manifest["stats"]["seq_len"])
    model, optimizer, scheduler, _ = build(config)
    data = (sft.SFTData if train.objective == "sft" else PackedData)(manifest, train.data_root, mix, train.seed, parallel_state.get_data_parallel_rank(), dp_size)
    run = Run(config, manifest, mix, model, optimizer, scheduler, data, TrainState(tokens_per_source=dict.fromkeys(data.schedule.names, 0)), Checkpointer(config))
    if run.checkpointer.restore(model, optimizer, scheduler, data, run.state):
        use_torch_adamw(optimizer, train.optim.torch_impl)  # the loaded param groups carry the saving run's flags
    return run


def next_micro_batches(run: Run) -> tuple[list[Batch], dict[str, int]]:
    """This rank's micro-batches for the next step and the tokens it read from each source."""
    train, data, special_ids = run.config.train, run.data, run.manifest["stats"]["special_ids"]
    if train.objective == "sft":
        before = dict(data.tokens_seen)
        batches = sft_micro_batches(data.next_batch(train.global_batch_size), train, run.state.step, special_ids, _device())
        return batches, {n: data.tokens_seen[n] - before[n] for n in before}
    return micro_batches(data.next_sequences(train.global_batch_size), train, run.state.step, special_ids["mask"], _device())


def optimizer_step(run: Run, forward_backward, batches: list[Batch]) -> tuple[float, float]:
    """Forward and backward over the micro-batches, then one optimizer and LR step; the loss
    (mean over every micro-batch of every data-parallel rank) and the gradient norm."""
    run.optimizer.zero_grad()
    run.model.zero_grad_buffer()
    losses = forward_backward(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[run.model],
        num_microbatches=len(batches),
        seq_length=max(b.clean.shape[1] for b in batches),
        micro_batch_size=run.config.train.micro_batch_size,
        forward_only=False,
    )
    _, grad_norm, _ = run.optimizer.step()
    run.scheduler.step(increment=1)
    run.state.step += 1
    loss = global_mean_loss(losses)
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {run.state.step}; lower optim.lr or check the data")
    return loss, grad_norm


def train_loop(config: Config, on_step=None) -> TrainState:
    """Run config.train.steps steps (from the latest checkpoint if one exists); return the state."""
    run = start_run(config)
    config, train, state = run.config, run.config.train, run.state
    step_tokens = train.global_batch_size * run.seq_len
    metrics = MetricsLogger(config, flops_per_token(config.model, run.seq_len), peak_flops(), data_manifest=run.manifest, mix=run.mix, parent=run.checkpointer.parent)
    forward_backward = get_forward_backward_func()
    val_batches = validation_batches(run.manifest, train)
    last_step = min(train.steps, state.step + (train.exit_after_steps or train.steps))
    bar = progress(last_step, f"train {config.name}", unit="step", initial=state.step, disable=dist.get_rank() != 0)
    with recorded(metrics), bar:  # the MLflow run ends FINISHED, FAILED or KILLED, never left RUNNING
        while state.step < last_step:
            start = time.perf_counter()
            batches, local_tokens = next_micro_batches(run)
            loss, grad_norm = optimizer_step(run, forward_backward, batches)
            for n, v in sum_over_data_parallel({n: local_tokens.get(n, 0) for n in run.data.schedule.names}).items():
                state.tokens_per_source[n] += v
            seconds = time.perf_counter() - start
            metrics.log_step(state.step, loss, run.scheduler.get_lr(run.optimizer.param_groups[0]), grad_norm, step_tokens, seconds, state.tokens_per_source)
            bar.set_postfix_str(f"loss {loss:.4f}, {step_tokens / seconds:,.0f} tokens/s", refresh=False)
            bar.update(1)
            if val_batches and state.step % train.eval_interval == 0:
                metrics.log_validation(state.step, validation_loss(run.model, forward_backward, val_batches, train))
            if on_step:
                on_step(state.step, loss)
            if state.step % train.checkpoint.interval == 0 or state.step == last_step:
                with weights_gathered(run.model):
                    path = run.checkpointer.save(run.model, run.optimizer, run.scheduler, run.data, state)
                metrics.log_checkpoint(path)
    return state


def check_memory(config: Config, dp: int, seq_len: int) -> None:
    """Refuse, with the planner's numbers, a layout that will not fit this GPU (illada.train.plan)."""
    if not torch.cuda.is_available():
        return
    from illada.train.plan import GiB, check_fits

    gib = config.train.gpu_memory_gib
    total = gib * GiB if gib else torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    check_fits(config, dp, seq_len, total)


@contextmanager
def weights_gathered(model):
    """With overlap_param_gather the optimizer's updated weight shards are gathered lazily, in
    the next forward pass; gather them now (what megatron's own training loop does before
    saving) and go back to lazy gathering after."""
    lazy = getattr(model, "use_forward_hook", False)
    if lazy:
        model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        if lazy:
            model.enable_forward_pre_hook()


class Terminated(Exception):
    """SIGTERM arrived (torchrun stopping its workers, a scheduler's time limit)."""


@contextmanager
def sigterm_as_exception():
    """Turn SIGTERM into an exception while training, so the run is closed as KILLED
    instead of the process vanishing with its MLflow run still RUNNING. (Only the main
    thread can take signals; elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def recorded(metrics: MetricsLogger):
    """Training under an MLflow run that ends with the training's outcome: FINISHED, FAILED
    (an error, a NaN loss) or KILLED (SIGTERM, Ctrl-C)."""
    try:
        with sigterm_as_exception():
            yield
    except BaseException as e:
        metrics.close(status=run_status(e))
        raise
    metrics.close()


def run_status(error: BaseException) -> str:
    """The MLflow status of a run that ended with `error`: stopped from outside, or failed."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, Terminated)) else "FAILED"


def check_data_fits_model(manifest: dict, model: ModelConfig) -> None:
    stats = manifest["stats"]
    if stats["vocab_size"] > model.vocab_size:
        raise ConfigError(f"the tokenizer has {stats['vocab_size']} tokens but model.vocab_size is {model.vocab_size}")
    if stats["seq_len"] > model.max_seq_len:
        raise ConfigError(f"the shards hold {stats['seq_len']}-token sequences but model.max_seq_len is {model.max_seq_len}")
