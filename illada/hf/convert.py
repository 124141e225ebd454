"""LLaDA's Hugging Face format as data: its config keys and weight names, and how each weight
becomes a megatron GPTModel weight and back.

Facts, read from public code (nothing copied):

- `config.json` (GSAI-ML/LLaDA-8B-Base, -Instruct): `architectures: [LLaDAModelLM]`,
  OLMo-style keys `d_model`, `n_layers`, `n_heads`, `n_kv_heads`, `mlp_hidden_size`,
  `vocab_size` / `embedding_size` (the embedding's rows), `max_sequence_length`,
  `rope_theta` (500000), `rms_norm_eps`, `weight_tying`, `mask_token_id` (126336,
  `<|mdm_mask|>`), `eos_token_id` = `pad_token_id` (126081). Source: LLaDA's
  `configuration_llada.py` and released config.json as quoted by ports (mlx-lm's
  `models/llada.py` ModelArgs; jax-ml/bonsai `models/llada_8b`).
- Weights, under `model.transformer.` (`LLaDAModelLM.model` is a `LLaDAModel` whose
  `transformer` ModuleDict holds `wte`, `blocks`, `ln_f` and, untied only, `ff_out`).
  A block (`LLaDALlamaBlock`) computes
      h = x + attn_out(attention(rope(q_proj(attn_norm(x))), rope(k_proj(.)), v_proj(.)))
      y = h + ff_out(silu(ff_proj(ff_norm(h))) * up_proj(ff_norm(h)))
  so `ff_proj` is the SwiGLU **gate** (activation_type "silu" is applied to it) and
  `up_proj` the linear branch; the block's `ff_out` is the down projection, the top-level
  `ff_out` the LM head. Source: LLaDA's `modeling_llada.py` (`LLaDALlamaBlock.forward`,
  `LLaDAModel.forward`), agreeing with mlx-lm's key remap (ff_proj -> gate_proj,
  up_proj -> up_proj, ff_out -> down_proj, attn_out -> o_proj).
- RoPE: `RotaryEmbedding.rotate_half` views each head as [2, head_dim/2] and returns
  cat(-x2, x1), with cos/sin over cat(freqs, freqs), inv_freq = theta^(-2i/head_dim):
  the rotate-half (GPT-NeoX) convention, the one megatron applies with
  `rotary_interleaved=False` (its default). So q_proj/k_proj need **no permutation**
  (unlike Meta-Llama checkpoints, whose q/k are interleaved). Checked numerically by
  tests/hf/test_hf.py against a plain-PyTorch forward.
- Attention scale 1/sqrt(head_dim), no biases (`include_bias`, `include_qkv_bias` false),
  no q/k norm, no input-embedding or logit scaling: the settings this module requires.

Megatron's layout (megatron-core 0.16, local layer spec): `linear_qkv` holds, per key/value
group g, [the group's query heads; k_g; v_g] stacked on dim 0; `linear_fc1` is [gate; up].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from illada.config import ConfigError
from illada.model.config import ModelConfig

ARCHITECTURE = "LLaDAModelLM"
PREFIX = "model.transformer."

# config.json key -> ModelConfig field.
CONFIG_KEYS = {
    "n_layers": "num_layers",
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_query_groups",
    "mlp_hidden_size": "ffn_hidden_size",
    "embedding_size": "vocab_size",
    "max_sequence_length": "max_seq_len",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "norm_eps",
    "weight_tying": "tie_word_embeddings",
}

# config.json keys LLaDA's code reads whose value must be this for the model to be the one
# megatron builds here (a missing key takes LLaDA's default, also listed here).
REQUIRED_VALUES = {
    "activation_type": "silu",
    "block_type": "llama",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "rope": True,
    "alibi": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "block_group_size": 1,
}

# What export writes besides the shape: LLaDA's released config with its constant keys.
# auto_map points at the public repository's code (trust_remote_code loads it from there).
LLADA_CODE_REPO = "GSAI-ML/LLaDA-8B-Base"
CONFIG_TEMPLATE = {
    "architectures": [ARCHITECTURE],
    "auto_map": {
        "AutoConfig": f"{LLADA_CODE_REPO}--configuration_llada.LLaDAConfig",
        "AutoModel": f"{LLADA_CODE_REPO}--modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": f"{LLADA_CODE_REPO}--modeling_llada.LLaDAModelLM",
    },
    "model_type": "llada",
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mlp_ratio": 4,
    "multi_query_attention": None,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rope": True,
    "rope_full_precision": True,
    "scale_logits": False,
    "use_cache": False,
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --- config ------------------------------------------------------------------------------


def model_config(hf: dict) -> ModelConfig:
    """The ModelConfig of a LLaDA config.json; a one-line error for anything else."""
    architectures = hf.get("architectures") or []
    if architectures != [ARCHITECTURE]:
        raise ConfigError(f"config.json names architecture(s) {architectures}; only {ARCHITECTURE} (LLaDA's format) can be imported")
    for key, want in REQUIRED_VALUES.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"config.json has {key}={hf[key]!r}; illada's model needs {key}={want!r}")
    hf = {**hf, "embedding_size": hf.get("embedding_size") or hf.get("vocab_size")}
    if hf.get("n_kv_heads") is None:
        hf["n_kv_heads"] = 1 if hf.get("multi_query_attention") else hf.get("n_heads")
    missing = [k for k in CONFIG_KEYS if hf.get(k) is None]
    if missing:
        raise ConfigError(f"config.json lacks {', '.join(missing)}")
    try:
        return ModelConfig(**{field: hf[key] for key, field in CONFIG_KEYS.items()})
    except ValueError as e:
        raise ConfigError(f"config.json describes a model illada cannot build: {e}") from None


def hf_config(cfg: ModelConfig, special_ids: dict[str, int], dtype: torch.dtype, base: dict | None = None) -> dict:
    """LLaDA's config.json for cfg: `base` (the imported config, if any) or the template,
    with the shape, the special ids and the dtype written over it."""
    out = dict(base or CONFIG_TEMPLATE)
    out.update({key: getattr(cfg, field) for key, field in CONFIG_KEYS.items()})
    if not base or not 0 < out.get("vocab_size", 0) <= cfg.vocab_size:  # an imported one may be below the padded rows
        out["vocab_size"] = cfg.vocab_size
    out["mask_token_id"] = special_ids["mask"]
    out["eos_token_id"] = special_ids["eot"]
    out["pad_token_id"] = special_ids["pad"]
    out["torch_dtype"] = TORCH_DTYPE_NAMES[dtype]
    out["auto_map"] = public_code(out.get("auto_map") or CONFIG_TEMPLATE["auto_map"])
    return out


def public_code(auto_map: dict[str, str]) -> dict[str, str]:
    """auto_map with each local reference (`modeling_llada.LLaDAModelLM`: code shipped beside
    a released config.json, which import does not copy) pointed at LLaDA's public code."""
    return {key: ref if "--" in ref else f"{LLADA_CODE_REPO}--{ref}" for key, ref in auto_map.items()}


# --- weights -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Weight:
    """One megatron weight and the LLaDA weights it is made of ("{i}": the layer)."""

    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"  # copy | qkv | gate_up


LAYER_WEIGHTS = (
    Weight("decoder.layers.{i}.input_layernorm.weight", ("blocks.{i}.attn_norm.weight",)),
    Weight("decoder.layers.{i}.self_attention.linear_qkv.weight", ("blocks.{i}.q_proj.weight", "blocks.{i}.k_proj.weight", "blocks.{i}.v_proj.weight"), "qkv"),
    Weight("decoder.layers.{i}.self_attention.linear_proj.weight", ("blocks.{i}.attn_out.weight",)),
    Weight("decoder.layers.{i}.pre_mlp_layernorm.weight", ("blocks.{i}.ff_norm.weight",)),
    Weight("decoder.layers.{i}.mlp.linear_fc1.weight", ("blocks.{i}.ff_proj.weight", "blocks.{i}.up_proj.weight"), "gate_up"),
    Weight("decoder.layers.{i}.mlp.linear_fc2.weight", ("blocks.{i}.ff_out.weight",)),
)
EMBEDDING = Weight("embedding.word_embeddings.weight", ("wte.weight",))
FINAL_NORM = Weight("decoder.final_layernorm.weight", ("ln_f.weight",))
HEAD = Weight("output_layer.weight", ("ff_out.weight",))


def weights(cfg: ModelConfig) -> list[Weight]:
    """Every weight of the model, layer placeholders filled, in LLaDA's order."""
    layers = [Weight(w.megatron.format(i=i), tuple(n.format(i=i) for n in w.hf), w.kind) for i in range(cfg.num_layers) for w in LAYER_WEIGHTS]
    out = [EMBEDDING, *layers, FINAL_NORM, *([] if cfg.tie_word_embeddings else [HEAD])]
    return [Weight(w.megatron, tuple(PREFIX + n for n in w.hf), w.kind) for w in out]


def by_megatron_name(cfg: ModelConfig) -> dict[str, Weight]:
    named = {w.megatron: w for w in weights(cfg)}
    if cfg.tie_word_embeddings:  # a last pipeline stage keeps a copy of the tied embedding
        named[HEAD.megatron] = Weight(HEAD.megatron, (PREFIX + EMBEDDING.hf[0],))
    return named


# The dim megatron splits each weight along across tensor-parallel ranks (None: replicated).
# Column-parallel weights split their outputs (dim 0), row-parallel ones their inputs (dim 1);
# linear_fc1 splits each half ([gate; up]) separately, so every rank holds [gate_r; up_r].
TP_SPLIT_DIM = {
    "embedding.word_embeddings.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
    "output_layer.weight": 0,
}


def tp_shard(megatron_name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This tensor-parallel rank's part of a full megatron weight."""
    dim = next((d for suffix, d in TP_SPLIT_DIM.items() if megatron_name.endswith(suffix)), None)
    if dim is None or tp == 1:
        return full
    halves = full.chunk(2, dim) if megatron_name.endswith("linear_fc1.weight") else [full]
    return torch.cat([h.chunk(tp, dim)[rank] for h in halves], dim)


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every LLaDA weight of cfg."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    kv = cfg.num_query_groups * cfg.head_dim
    per_layer = {
        "attn_norm": (h,), "q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "attn_out": (h, h),
        "ff_norm": (h,), "ff_proj": (f, h), "up_proj": (f, h), "ff_out": (h, f),
    }  # fmt: skip
    shapes = {PREFIX + "wte.weight": (v, h), PREFIX + "ln_f.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes[PREFIX + "ff_out.weight"] = (v, h)
    for i in range(cfg.num_layers):
        shapes.update({f"{PREFIX}blocks.{i}.{name}.weight": shape for name, shape in per_layer.items()})
    return shapes


def _join_qkv(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups, d, h = cfg.num_query_groups, cfg.head_dim, cfg.hidden_size
    per_group = [q.reshape(groups, -1, h), k.reshape(groups, d, h), v.reshape(groups, d, h)]
    return torch.cat(per_group, dim=1).reshape(-1, h)


def _split_qkv(cfg: ModelConfig, qkv: torch.Tensor) -> list[torch.Tensor]:
    groups, d, h = cfg.num_query_groups, cfg.head_dim, cfg.hidden_size
    heads_per_group = cfg.num_attention_heads // groups
    q, k, v = qkv.reshape(groups, (heads_per_group + 2) * d, h).split([heads_per_group * d, d, d], dim=1)
    return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]


JOIN: dict[str, Callable[..., torch.Tensor]] = {
    "copy": lambda cfg, t: t,
    "qkv": _join_qkv,
    "gate_up": lambda cfg, gate, up: torch.cat([gate, up]),
}
SPLIT: dict[str, Callable[[ModelConfig, torch.Tensor], list[torch.Tensor]]] = {
    "copy": lambda cfg, t: [t],
    "qkv": _split_qkv,
    "gate_up": lambda cfg, t: list(t.chunk(2)),
}


def to_megatron(cfg: ModelConfig, weight: Weight, tensors: list[torch.Tensor]) -> torch.Tensor:
    return JOIN[weight.kind](cfg, *tensors)


def to_hf(cfg: ModelConfig, weight: Weight, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: t.contiguous() for name, t in zip(weight.hf, SPLIT[weight.kind](cfg, tensor))}
