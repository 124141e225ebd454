"""Build the bidirectional Transformer as a megatron-core GPTModel (SPEC §5).

Calling the model (what `forward_logits` and `per_token_loss` wrap):

    model(input_ids=tokens, position_ids=None, attention_mask=None)            # logits [b, s, v/tp]
    model(input_ids=tokens, position_ids=None, attention_mask=None, labels=y)  # CE [b, s], unshifted
    model(..., labels=y, loss_mask=masked)  # CE [b, s] where masked, 0 elsewhere (cheaper)

`attention_mask=None` with the no-mask spec is full bidirectional attention; RoPE needs no
position ids. With labels the loss is the per-token cross entropy of position i against
labels[:, i] (no shift), computed on the vocabulary shards without gathering the logits.
On a middle pipeline stage the model returns hidden states; feed those stages through
megatron's `get_forward_backward_func`.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import RowParallelLinear, copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from illada.errors import UserError
from illada.model.attention import SDPAttention
from illada.model.config import ModelConfig, check_parallel_sizes
from illada.model.cross_entropy import linear_cross_entropy


def transformer_config(
    cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    sequence_parallel: bool = False,
    recompute_modules: list[str] | None = None,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
) -> TransformerConfig:
    """megatron's TransformerConfig for this shape; `recompute_modules` (e.g. ["core_attn",
    "mlp"]) turns on selective activation recomputation of those modules, `fp8` ("e4m3" or
    "hybrid") FP8 matmuls in Transformer Engine's layers with that scaling recipe."""
    check_parallel_sizes(cfg, tp, pp)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        # Without a GPU the weights must be created on the CPU. This path also draws each
        # full weight from the default generator and then keeps this rank's shard, so a seed
        # gives the same model at every tensor-parallel size.
        use_cpu_initialization=not torch.cuda.is_available(),
        # The fused kernels these enable are CUDA/TE-only; the unfused paths are exact.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        recompute_granularity="selective" if recompute_modules else None,
        recompute_modules=list(recompute_modules) if recompute_modules else None,
        fp8=fp8,
        fp8_recipe=fp8_recipe,
    )


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with megatron's norm signature. Under sequence parallelism each TP rank
    sees a slice of the sequence, so the weight is marked for megatron to all-reduce its
    gradient across TP (megatron's own torch-norm wrapper refuses sequence parallelism)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


class GroupedRowParallelLinear(RowParallelLinear):
    """megatron's RowParallelLinear, passing its own tensor-parallel group to the matmul.
    megatron-core 0.16 passes None there, which warns on rank 0 at every call and so breaks
    a torch.compile'd layer's graph in two (the group only matters for sequence-parallel or
    async all-reduce, both off on this path, so the maths does not change)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def bidirectional_layer_spec() -> ModuleSpec:
    """The local (megatron-core only) layer spec with the causal mask switched off and SDPA
    as the core attention."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.self_attention.submodules.linear_proj = GroupedRowParallelLinear
    spec.submodules.mlp.submodules.linear_fc2 = GroupedRowParallelLinear
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_impl(impl: str) -> str:
    """train.transformer_impl with "auto" decided: TE's layers where TE is importable on a
    GPU machine (NGC images), the local ones elsewhere."""
    if impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    return impl


def layer_spec(impl: str = "auto") -> ModuleSpec:
    """The layer for train.transformer_impl: "local" (megatron's layers, torch SDPA and
    RMSNorm), "transformer_engine" (TE's fused layers and attention), or "auto" (resolve_impl)."""
    impl = resolve_impl(impl)
    if impl == "local":
        return bidirectional_layer_spec()
    if not transformer_engine_available():
        raise UserError("train.transformer_impl is transformer_engine but transformer_engine is not importable on a GPU here; set it to auto or local")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_with_transformer_engine_spec()
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec


class DiffusionGPTModel(GPTModel):
    """megatron's GPTModel whose loss, given a `loss_mask` [b, s], runs the output layer and
    the cross entropy only at those positions and returns 0 elsewhere.

    The masked-diffusion loss reads the cross entropy only where tokens were masked (about
    half of them), and the output layer with its cross entropy is the widest matmul of the
    model (vocab 155,136), so skipping the others saves that much of its cost and of its
    logits' memory. `cross_entropy` "fused" (the default) runs them as one function that
    keeps the logits in the model's dtype (illada.model.cross_entropy); "megatron" runs
    megatron's output layer and vocab-parallel cross entropy (an fp32 copy of the logits).
    Without `loss_mask` (or with multi-token prediction) it is GPTModel. The state dict is
    GPTModel's, so checkpoints do not change."""

    cross_entropy = "fused"

    def _postprocess(self, **kwargs):
        # GPTModel.forward passes every argument by keyword; loss_mask is otherwise read only
        # by multi-token prediction.
        labels, where = kwargs.get("labels"), kwargs.get("loss_mask")
        if labels is None or where is None or not self.post_process or self.config.mtp_num_layers:
            return super()._postprocess(**kwargs)
        return self._loss_at(kwargs["hidden_states"], labels, where.bool())

    def _loss_at(self, hidden: torch.Tensor, labels: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        tp_group = self.pg_collection.tp
        if self.output_layer.sequence_parallel:
            # Each TP rank holds a slice of the sequence: gather it whole (every rank has the
            # same batch and masks) and go on as without sequence parallelism, whose backward
            # all-reduces the input gradient; so the gather's backward only takes this rank's slice.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=tp_group)
        where_sb = where.t()  # hidden states are [s, b, h]
        picked_hidden, picked_labels = hidden[where_sb], labels.t()[where_sb]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else self.output_layer.weight
        if self.cross_entropy == "fused":
            picked_hidden = copy_to_tensor_model_parallel_region(picked_hidden, group=tp_group)
            picked = linear_cross_entropy(picked_hidden, weight, picked_labels, tp_group)
        else:
            picked = self._megatron_loss(picked_hidden, picked_labels, weight)
        loss = picked.new_zeros(where_sb.shape)
        loss[where_sb] = picked
        return loss.t()

    def _megatron_loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        sequence_parallel = self.output_layer.sequence_parallel
        self.output_layer.sequence_parallel = False  # the input is already whole
        try:
            logits, _ = self.output_layer(hidden.unsqueeze(1), weight=weight)
        finally:
            self.output_layer.sequence_parallel = sequence_parallel
        return self.compute_language_model_loss(labels.unsqueeze(0), logits)[0]


def build_model(
    cfg: ModelConfig,
    tconfig: TransformerConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    layer_spec: ModuleSpec | None = None,
    cross_entropy: str = "fused",
) -> GPTModel:
    """This rank's part of the model: its TP shard of its PP stage's layers. `pre_process` /
    `post_process` say whether the stage holds the embedding / the final norm and LM head
    (parallel_state.is_pipeline_first_stage() / is_pipeline_last_stage()). `layer_spec`
    replaces the bidirectional spec (tests build a causal control with it); `cross_entropy`
    picks the masked-position loss: "fused" (illada.model.cross_entropy) or "megatron"."""
    layers = layer_spec or bidirectional_layer_spec()
    block = TransformerBlockSubmodules(layer_specs=[layers] * get_num_layers_to_build(tconfig), layer_norm=RMSNorm)
    model = DiffusionGPTModel(
        config=tconfig,
        transformer_layer_spec=block,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rope_theta,
    )
    model.cross_entropy = cross_entropy
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def compile_layers(model: GPTModel) -> None:
    """torch.compile each Transformer layer in place (inductor): it fuses what runs between
    the matmuls (RMSNorm, RoPE, SwiGLU, residual adds) and their backward. One graph per
    layer shape, compiled on the first step; tensor-parallel collectives split it."""
    for layer in model.decoder.layers:
        layer.compile()


def forward_logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [b, s, vocab] (gathered across TP) for a one-stage model."""
    return model(input_ids=tokens, position_ids=None, attention_mask=None, runtime_gather_output=True)


def per_token_loss(model: GPTModel, tokens: torch.Tensor, labels: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """Cross entropy [b, s] of position i against labels[:, i]; no shift, no reduction.
    With `where` [b, s] only those positions are computed (the others are 0)."""
    return model(input_ids=tokens, position_ids=None, attention_mask=None, labels=labels, loss_mask=where)
