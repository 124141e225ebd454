"""Memory planner: what one GPU holds for a TP/PP/DP/micro-batch/recompute layout, and which
layouts fit (`illada plan`, and the preflight of `illada train` / `illada submit train`).

Pure arithmetic on the config's model section, no torch: it counts what megatron-core keeps
on the busiest GPU at its peak (the numbers `torch.cuda.max_memory_allocated` sees).

Weights, gradients and optimizer state, bytes per parameter (megatron-core's distributed
optimizer docs, docs/source/api-guide/dist_optimizer.md): bf16 weights (2) with fp32
gradients (4, megatron DDP's grad_reduce_in_fp32, which the trainer sets) and an fp32 main
copy plus Adam's two moments (4 + 4 + 4 = 12): 18 bytes, or 6 + 12/DP with the distributed
optimizer. fp32 training (CPU) has no main copy: 4 + 4 + 8 = 16, or 8 + 8/DP.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198), section 4: count, per layer, every tensor autograd
saves for the backward pass; sequence parallelism divides the ones outside the TP region by
TP; the pipeline's first stage holds min(PP, micro-batches) micro-batches in flight (1F1B).
Their 34 s b h + 5 a s^2 b per layer is for GPT (MHA, GeLU, dropout, [s, s] scores); this
model differs, so the count is redone for it (elements per token, bf16 = 2 bytes each):

    outside the TP region: both norms' inputs, the QKV and fc1 inputs          4 h
    QKV output (kept whole: V is a view of it), Q and K after RoPE           2 h + 3 kv
    SDPA's output, also linear_proj's input (SDPA keeps its query's layout,
    so the reshape back to [s, b, h] is a view)                                  h
    SwiGLU: fc1 output (gate and up), silu(gate), megatron's `up + 0.0`
    (glu_linear_offset), the product (fc2's input)                             5 ffn
    fp32 statistics: 2 norms' 1/rms, SDPA's log-sum-exp per head            (8 + 4 heads) bytes

with kv = query groups x head dim, plus RoPE's cos and sin for Q and K (4 s head_dim per
layer and micro-batch). The token ids and the loss's [b, s] tensors are left out (under
0.1%). No dropout (no masks), and torch SDPA's flash and memory-efficient kernels keep no
[s, s] score matrix, so there is no 5 a s^2 b term. torch's RMSNorm is one fused kernel on
CUDA (it keeps its input and 1/rms); on CPU it is composite and also keeps the normalised
input (h more per norm: `fused_norm=False`).

Selective recomputation (megatron's recompute_modules) drops what the recomputed module
alone keeps: "core_attn" only SDPA's log-sum-exp (its output stays: it is linear_proj's
input), so it saves next to nothing here; "mlp" the four SwiGLU tensors. The last stage
adds the final norm's and the LM head's inputs and the logits: with train.cross_entropy
fused (illada.model.cross_entropy) the bf16 [tokens, vocab/TP] logits, which become their
own gradient (2 bytes per element), and one fp32 chunk of FUSED_CE_CHUNK_ELEMENTS of
scratch (transient, in the forward pass); with megatron's cross entropy the bf16 logits
plus the fp32 copy it works in (6 bytes per element). Then the LM head's transient bf16
weight gradient before megatron adds it into the fp32 gradient buffer. The logits are
counted at every position: training computes them only where tokens are masked, but a
micro-batch's mask rate runs up to 1.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

from illada.model.config import ModelConfig, check_parallel_sizes

GiB = 1024**3
RECOMPUTE_OPTIONS = ((), ("mlp",))  # what proposals try, cheapest first (core_attn saves next to nothing)
RECOMPUTE_SHOWN = ((), ("core_attn",), ("mlp",), ("core_attn", "mlp"))
MICRO_BATCHES = (1, 2, 4, 8, 16)
FUSED_CE_CHUNK_ELEMENTS = 2**26  # illada.model.cross_entropy.FP32_CHUNK_ELEMENTS (this module imports no torch)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: tuple[str, ...] = ()  # selectively recomputed modules

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        sp = ", sequence parallel" if self.sequence_parallel else ""
        dist = ", distributed optimizer" if self.distributed_optimizer else ""
        return f"TP={self.tp} PP={self.pp} DP={self.dp}, micro-batch {self.micro_batch}{sp}, recompute {recompute_name(self.recompute)}{dist}"

    def overrides(self) -> list[str]:
        """The config overrides that select this layout."""
        out = [
            f"train.parallel.tensor={self.tp}",
            f"train.parallel.pipeline={self.pp}",
            f"train.micro_batch_size={self.micro_batch}",
            f"train.parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"train.parallel.use_distributed_optimizer={str(self.distributed_optimizer).lower()}",
        ]
        if self.recompute:
            out += ["train.recompute.granularity=selective", f"train.recompute.modules=[{','.join(self.recompute)}]"]
        else:
            out.append("train.recompute.granularity=none")
        return out


def recompute_name(modules: tuple[str, ...]) -> str:
    return "+".join(modules) if modules else "none"


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of a pipeline stage at its peak."""

    stage: str  # "only", "first" or "last"
    parameters: int
    weights: float
    grads: float
    optimizer: float
    activations_per_micro_batch: float  # this stage's layers, one micro-batch
    in_flight: int
    stage_extra: float  # the last stage's head and logits
    transient: float

    @property
    def activations(self) -> float:
        return self.activations_per_micro_batch * self.in_flight

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.stage_extra + self.transient


@dataclass(frozen=True)
class MemoryPlan:
    layout: Layout
    seq_len: int
    global_batch: int
    stages: tuple[StageMemory, ...]

    @property
    def peak(self) -> float:
        return max(s.total for s in self.stages)

    @property
    def busiest(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step on each data-parallel rank."""
        return self.global_batch // (self.layout.dp * self.layout.micro_batch)


# --- the arithmetic -----------------------------------------------------------------------------


def layer_parameters(model: ModelConfig, tp: int) -> int:
    """One Transformer layer's parameters on one TP rank (the two RMSNorm weights are replicated)."""
    h, kv = model.hidden_size, model.num_query_groups * model.head_dim
    attention = 2 * h * h + 2 * h * kv  # q and output projections, k and v
    mlp = 3 * h * model.ffn_hidden_size  # gate, up, down
    return (attention + mlp) // tp + 2 * h


def stage_parameters(model: ModelConfig, tp: int, pp: int, first: bool, last: bool) -> int:
    """Parameters on one GPU of a stage: its layers, the embedding on the first stage and
    (tied) the LM head's copy of it on the last; one tensor when one stage is both."""
    embedding = model.vocab_size * model.hidden_size // tp if first or last else 0
    final_norm = model.hidden_size if last else 0
    return model.num_layers // pp * layer_parameters(model, tp) + embedding + final_norm


def state_bytes_per_parameter(bf16: bool, distributed_optimizer: bool, dp: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per parameter; see the module docstring."""
    weights, grads, optimizer = (2, 4, 12) if bf16 else (4, 4, 8)
    return weights, grads, optimizer / dp if distributed_optimizer else optimizer


def layer_activation_bytes(model: ModelConfig, layout: Layout, seq_len: int, act_bytes: int = 2, fused_norm: bool = True) -> float:
    """What one layer keeps for its backward pass for one micro-batch on one GPU."""
    tp = layout.tp
    h, kv, ffn = model.hidden_size, model.num_query_groups * model.head_dim, model.ffn_hidden_size
    tokens = seq_len * layout.micro_batch
    outside = (4 if fused_norm else 6) * h * act_bytes + 2 * 4  # norm, QKV, norm, fc1 inputs; the norms' fp32 1/rms
    qkv = (2 * h + 3 * kv) * act_bytes
    attention_out = h * act_bytes  # SDPA's output = linear_proj's input
    log_sum_exp = 4 * model.num_attention_heads
    mlp = 5 * ffn * act_bytes
    if "core_attn" in layout.recompute:
        log_sum_exp = 0
    if "mlp" in layout.recompute:
        mlp = 0
    inside = qkv + attention_out + log_sum_exp + mlp
    rope_tables = 4 * seq_len * model.head_dim * act_bytes
    return tokens * (outside / (tp if layout.sequence_parallel else 1) + inside / tp) + rope_tables


def last_stage_bytes(model: ModelConfig, layout: Layout, seq_len: int, act_bytes: int = 2, fused_norm: bool = True, fused_cross_entropy: bool = True) -> float:
    """The final norm's and LM head's inputs and the logits (see the module docstring)."""
    tokens = seq_len * layout.micro_batch
    head_inputs = ((2 if fused_norm else 3) * model.hidden_size * act_bytes + 4) / (layout.tp if layout.sequence_parallel else 1)
    logit_bytes = act_bytes if fused_cross_entropy or act_bytes == 4 else act_bytes + 4
    return tokens * (head_inputs + model.vocab_size / layout.tp * logit_bytes)


def head_transient_bytes(model: ModelConfig, layout: Layout, seq_len: int, act_bytes: int = 2, fused_cross_entropy: bool = True) -> float:
    """The larger of what lives only for a moment on the last stage: the fused cross
    entropy's fp32 scratch (forward) or the LM head's bf16 weight gradient (backward),
    before megatron adds it into the fp32 gradient buffer."""
    head_grad = model.vocab_size * model.hidden_size / layout.tp * act_bytes
    if not fused_cross_entropy:
        return head_grad
    return max(head_grad, 4 * min(seq_len * layout.micro_batch * model.vocab_size / layout.tp, FUSED_CE_CHUNK_ELEMENTS))


def plan(model: ModelConfig, layout: Layout, seq_len: int, global_batch: int, bf16: bool = True, fused_norm: bool = True, fused_cross_entropy: bool = True) -> MemoryPlan:
    """Memory on the first and last pipeline stage's GPUs (one stage when PP=1)."""
    act_bytes = 2 if bf16 else 4
    weight_b, grad_b, optim_b = state_bytes_per_parameter(bf16, layout.distributed_optimizer, layout.dp)
    micro_batches = max(1, global_batch // (layout.dp * layout.micro_batch))
    per_layer = layer_activation_bytes(model, layout, seq_len, act_bytes, fused_norm)
    layers = model.num_layers // layout.pp
    stage_output = seq_len * layout.micro_batch * model.hidden_size * act_bytes / (layout.tp if layout.sequence_parallel else 1)
    stages = []
    for name, first, last in (("only", True, True),) if layout.pp == 1 else (("first", True, False), ("last", False, True)):
        params = stage_parameters(model, layout.tp, layout.pp, first, last)
        in_flight = min(layout.pp, micro_batches) if first and not last else 1
        activations = layers * per_layer + (0 if last else stage_output)  # a stage keeps its outputs until their backward
        stages.append(
            StageMemory(
                stage=name,
                parameters=params,
                weights=params * weight_b,
                grads=params * grad_b,
                optimizer=params * optim_b,
                activations_per_micro_batch=activations,
                in_flight=in_flight,
                stage_extra=last_stage_bytes(model, layout, seq_len, act_bytes, fused_norm, fused_cross_entropy) if last else 0,
                transient=head_transient_bytes(model, layout, seq_len, act_bytes, fused_cross_entropy),
            )
        )
    return MemoryPlan(layout, seq_len, global_batch, tuple(stages))


# --- proposals ------------------------------------------------------------------------------------


def candidate_layouts(model: ModelConfig, gpus: int, global_batch: int, gpus_per_node: int = 8):
    """Every layout for `gpus` GPUs: TP within a node dividing the model's heads, groups,
    FFN and vocabulary; PP dividing the layers; micro-batches dividing each DP rank's share;
    the distributed optimizer whenever DP > 1 (same traffic as an all-reduce, 12/DP bytes);
    sequence parallelism whenever TP > 1."""
    for tp in _divisors(gpus):
        if tp > gpus_per_node or not _valid(model, tp, 1):
            continue
        for pp in _divisors(gpus // tp):
            if not _valid(model, tp, pp):
                continue
            dp = gpus // (tp * pp)
            for mb in MICRO_BATCHES:
                if global_batch % (dp * mb):
                    continue
                for recompute in RECOMPUTE_OPTIONS:
                    yield Layout(tp, pp, dp, mb, sequence_parallel=tp > 1, distributed_optimizer=dp > 1, recompute=recompute)


def rank_key(layout: Layout) -> tuple:
    """Best first: fewest model-parallel ranks (TP x PP: the least communication and pipeline
    bubble), then the least recomputation (it costs compute), then the largest micro-batch
    (larger matmuls), then fewer pipeline stages (smaller bubble) for the same TP x PP."""
    return (layout.tp * layout.pp, RECOMPUTE_OPTIONS.index(layout.recompute), -layout.micro_batch, layout.pp)


def proposals(
    model: ModelConfig, gpus: int, gpu_bytes: float, seq_len: int, global_batch: int, *, bf16: bool = True, fused_cross_entropy: bool = True, headroom: float = 0.1, gpus_per_node: int = 8
) -> list[MemoryPlan]:
    """For each TP x PP that fits, its best layout (rank_key) whose busiest GPU fits in
    (1 - headroom) of its memory; best first."""
    usable = gpu_bytes * (1 - headroom)
    layouts = candidate_layouts(model, gpus, global_batch, gpus_per_node)
    plans = [plan(model, layout, seq_len, global_batch, bf16, fused_cross_entropy=fused_cross_entropy) for layout in layouts]
    best: dict[tuple[int, int], MemoryPlan] = {}
    for p in sorted((p for p in plans if p.peak <= usable), key=lambda p: rank_key(p.layout)):
        best.setdefault((p.layout.tp, p.layout.pp), p)
    return list(best.values())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _valid(model: ModelConfig, tp: int, pp: int) -> bool:
    try:
        check_parallel_sizes(model, tp, pp)
    except ValueError:
        return False
    return True


# --- the config's layout and the preflight -------------------------------------------------------


def config_layout(train, dp: int) -> Layout:
    """The layout a TrainConfig asks for at this data-parallel size."""
    parallel = train.parallel
    return Layout(
        tp=parallel.tensor,
        pp=parallel.pipeline,
        dp=dp,
        micro_batch=train.micro_batch_size,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor > 1,
        distributed_optimizer=parallel.use_distributed_optimizer,
        recompute=tuple(train.recompute.modules) if train.recompute.granularity == "selective" else (),
    )


def config_plan(config, layout: Layout, seq_len: int) -> MemoryPlan:
    """plan() for this layout with the config's batch, precision and cross entropy."""
    train = config.train
    return plan(config.model, layout, seq_len, train.global_batch_size, train.bf16, fused_cross_entropy=train.cross_entropy == "fused")


def config_proposals(config, gpus: int, gpu_bytes: float, seq_len: int, headroom: float = 0.1, gpus_per_node: int = 8) -> list[MemoryPlan]:
    """proposals() with the config's model, batch, precision and cross entropy."""
    train = config.train
    fused = train.cross_entropy == "fused"
    return proposals(config.model, gpus, gpu_bytes, seq_len, train.global_batch_size, bf16=train.bf16, fused_cross_entropy=fused, headroom=headroom, gpus_per_node=gpus_per_node)


def check_fits(config, dp: int, seq_len: int, gpu_bytes: float, headroom: float = 0.1) -> MemoryPlan:
    """Raise a one-line ConfigError with the numbers (and the best layout that fits, if any)
    when the config's layout does not fit a GPU of gpu_bytes; with train.memory_check off,
    log it as a warning instead."""
    from illada.config import ConfigError

    train = config.train
    p = config_plan(config, config_layout(train, dp), seq_len)
    usable = gpu_bytes * (1 - headroom)
    if p.peak <= usable:
        return p
    s = p.busiest
    numbers = (
        f"weights {_gib(s.weights)}, gradients {_gib(s.grads)}, optimizer {_gib(s.optimizer)}, "
        f"activations {_gib(s.activations_per_micro_batch)} x {s.in_flight} in flight, logits and head {_gib(s.stage_extra + s.transient)}"
    )
    best = config_proposals(config, p.layout.gpus, gpu_bytes, seq_len, headroom)
    hint = f"; a layout that fits: {' '.join(best[0].layout.overrides())}" if best else "; no layout fits on this many GPUs: add GPUs or shorten the sequences"
    message = (
        f"the layout {p.layout.describe()} needs {_gib(p.peak)} on a GPU ({numbers}) but {_gib(usable)} of {_gib(gpu_bytes)} is usable{hint} "
        "(illada plan CONFIG --gpus N shows the numbers; train.memory_check=false only warns)"
    )
    if not train.memory_check:
        logging.getLogger(__name__).warning("%s", message)
        return p
    raise ConfigError(message)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


# --- GPU memory sizes ---------------------------------------------------------------------------

# Per Ray accelerator type (ray.util.accelerators); types sold with several sizes (A100, V100)
# are left out: give train.gpu_memory_gib for those.
GPU_MEMORY_GIB = {"H100": 79.6, "H200": 139.8, "H20": 95.0, "B200": 178.0, "L40S": 44.4, "L4": 22.0, "A10G": 22.0, "T4": 14.6}


def parse_size(text: str) -> float:
    """'80GiB', '80GB', '141 G', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|tib|tb|t|mib|mb|m)?\s*", text.lower())
    if not m:
        from illada.errors import UserError

        raise UserError(f"--gpu-memory {text!r} is not a size; write e.g. 80GiB, 80GB or 141")
    unit = m.group(2) or "gib"
    scale = {"gib": GiB, "g": GiB, "gb": 1e9, "tib": 1024 * GiB, "t": 1024 * GiB, "tb": 1e12, "mib": 1024**2, "m": 1024**2, "mb": 1e6}[unit]
    return float(m.group(1)) * scale


# --- `illada plan` -----------------------------------------------------------------------------


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-GPU memory of the config's training layout, and the layouts that fit, best first",
        description="Print what one GPU holds for the config's TP/PP/DP/micro-batch/recompute layout (weights, "
        "gradients, optimizer state with and without the distributed optimizer, activations with and without "
        "selective recomputation, logits, the pipeline's micro-batches in flight) and the layouts that fit, best "
        "first: fewest model-parallel ranks, then the least recomputation, then the largest micro-batch. "
        "Arithmetic only (illada/train/plan.py has the formulas and their sources).",
    )
    p.add_argument("config", help="YAML config with model and train sections")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, anywhere on the line")
    p.add_argument("--root", help="run root; same as the override root=...")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-memory", default="80GiB", help="memory per GPU, e.g. 80GiB, 141GB (default: 80GiB)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="tensor parallelism stays within a node (default: 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: model.max_seq_len)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of GPU memory kept free for the CUDA context, NCCL and fragmentation (default: 0.1)")
    p.add_argument("--top", type=int, default=8, help="how many fitting layouts to list (default: 8)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from illada.config import ConfigError, load_config

    overrides = list(args.overrides) + ([f"root={args.root}"] if args.root else [])
    config = load_config(args.config, overrides).require("model", "train")
    model = config.model
    if args.gpus < 1:
        raise ConfigError("--gpus must be at least 1")
    gpu_bytes = parse_size(args.gpu_memory)
    seq_len = args.seq_len or model.max_seq_len
    print(format_report(config, args.gpus, gpu_bytes, seq_len, args.headroom, args.gpus_per_node, args.top), end="")
    return 0


def format_report(config, gpus: int, gpu_bytes: float, seq_len: int, headroom: float = 0.1, gpus_per_node: int = 8, top: int = 8) -> str:
    from illada.model.config import num_parameters

    train, model = config.train, config.model
    usable = gpu_bytes * (1 - headroom)
    lines = [
        f"{config.name}: {num_parameters(model) / 1e9:.2f}B parameters ({model.num_layers} layers, hidden {model.hidden_size}, vocab {model.vocab_size:,}); "
        f"{train.global_batch_size} x {seq_len} = {train.global_batch_size * seq_len:,} tokens per step; "
        f"{gpus} GPU{'s' if gpus > 1 else ''} of {gpu_bytes / GiB:.1f} GiB ({usable / GiB:.1f} usable, {headroom:.0%} headroom); {'bf16' if train.bf16 else 'fp32'}",
        "",
    ]
    tp, pp = train.parallel.tensor, train.parallel.pipeline
    if gpus % (tp * pp):
        lines.append(f"the config's layout (TP={tp} x PP={pp}) does not divide {gpus} GPUs")
    else:
        lines += _layout_table(config, gpus // (tp * pp), seq_len, usable)
    lines += ["", "layouts that fit, best first (fewest TP x PP ranks, then the least recomputation, then the largest micro-batch, then fewer stages):"]
    best = config_proposals(config, gpus, gpu_bytes, seq_len, headroom, gpus_per_node)
    if not best:
        lines.append("  none: add GPUs or shorten the sequences")
    else:
        lines.append(f"  {'#':>2} {'TP':>3} {'PP':>3} {'DP':>4} {'micro-batch':>12}  {'recompute':<15}{'dist. optimizer':>16}{'GiB/GPU':>9}{'micro-batches/step':>20}")
        for i, p in enumerate(best[:top], 1):
            lo = p.layout
            dist = "on" if lo.distributed_optimizer else "off"
            lines.append(f"  {i:>2} {lo.tp:>3} {lo.pp:>3} {lo.dp:>4} {lo.micro_batch:>12}  {recompute_name(lo.recompute):<15}{dist:>16}{p.peak / GiB:>9.1f}{p.micro_batches:>20}")
        if len(best) > top:
            lines.append(f"  ... {len(best) - top} more (--top N)")
        lines += ["", "use #1 with these overrides:", "  " + " ".join(best[0].layout.overrides())]
    return "\n".join(lines) + "\n"


def _layout_table(config, dp: int, seq_len: int, usable: float) -> list[str]:
    train = config.train
    layout = config_layout(train, dp)
    p = config_plan(config, layout, seq_len)
    dist = config_plan(config, replace(layout, distributed_optimizer=True), seq_len)
    recomputed = {r: config_plan(config, replace(layout, recompute=r), seq_len) for r in RECOMPUTE_SHOWN}
    names = [s.stage for s in p.stages]
    header = "GPU" if names == ["only"] else "stage"
    out = [f"the config's layout: {layout.describe()}; {p.micro_batches} micro-batches per step per DP rank", f"  {'per GPU, GiB':<52}" + "".join(f"{(n if n != 'only' else header):>10}" for n in names)]

    def row(label: str, values) -> None:
        out.append(f"  {label:<52}" + "".join(f"{v:>10}" for v in values))

    def gib(values) -> list[str]:
        return [f"{v / GiB:.2f}" for v in values]

    weight_b, grad_b, _ = state_bytes_per_parameter(train.bf16, False, dp)
    row("parameters (millions)", [f"{s.parameters / 1e6:,.0f}" for s in p.stages])
    row(f"weights ({weight_b:g} B/param)", gib(s.weights for s in p.stages))
    row(f"gradients ({grad_b:g} B/param)", gib(s.grads for s in p.stages))
    replicated = config_plan(config, replace(layout, distributed_optimizer=False), seq_len)
    row(f"optimizer state, replicated ({12 if train.bf16 else 8} B/param)", gib(s.optimizer for s in replicated.stages))
    row(f"optimizer state, distributed optimizer (/DP={dp})", gib(s.optimizer for s in dist.stages))
    for r, rp in recomputed.items():
        row(f"activations per micro-batch, recompute {recompute_name(r)}", gib(s.activations_per_micro_batch for s in rp.stages))
    row("micro-batches in flight (1F1B)", [str(s.in_flight) for s in p.stages])
    row(f"LM head inputs + logits ({train.cross_entropy} cross entropy)", gib(s.stage_extra for s in p.stages))
    row("LM head's transient weight gradient or CE scratch", gib(s.transient for s in p.stages))
    row("total (as configured)", gib(s.total for s in p.stages))
    verdict = "fits" if p.peak <= usable else f"does NOT fit ({usable / GiB:.1f} GiB usable)"
    out.append(f"  peak {p.peak / GiB:.2f} GiB per GPU: {verdict}")
    if train.global_batch_size % (dp * layout.micro_batch):
        out.append(f"  note: global batch {train.global_batch_size} is not divisible by DP {dp} x micro-batch {layout.micro_batch}: training refuses it")
    return out
