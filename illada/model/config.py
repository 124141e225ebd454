"""The model's shape: a Llama-like dense Transformer with bidirectional attention (SPEC §1).

Presets live in configs/model/<name>.yaml; `preset: 1b` loads one and any field given beside
it overrides the preset, so `model.preset=1b model.num_layers=4` works as a CLI override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from illada.schema import Strict

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"  # package data (illada/configs)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(preset_names())}")
    return yaml.safe_load(path.read_text()) or {}


class ModelConfig(Strict):
    preset: str | None = Field(None, description="A configs/model/<preset>.yaml to start from.")
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_query_groups: int = Field(gt=0, description="Key/value heads (GQA); equal to the heads for MHA.")
    ffn_hidden_size: int = Field(gt=0, description="SwiGLU inner size.")
    vocab_size: int = Field(gt=0, description="Must be divisible by the tensor-parallel size.")
    max_seq_len: int = Field(gt=0)
    rope_theta: float = Field(500_000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    tie_word_embeddings: bool = Field(True, description="One matrix for the input embedding and the LM head (iLLaDA); false gives the head its own (LLaDA).")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            return {**load_preset(data["preset"]), **data}
        return data

    @model_validator(mode="after")
    def _divisible(self) -> ModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_query_groups ({self.num_query_groups})")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def check_parallel_sizes(cfg: ModelConfig, tp: int, pp: int) -> None:
    """The tensor-parallel size must divide the heads, KV groups, FFN and vocabulary; the
    pipeline-parallel size the layers."""
    problems = []
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size"):
        if getattr(cfg, name) % tp:
            problems.append(f"{name} ({getattr(cfg, name)}) is not divisible by the tensor-parallel size {tp}")
    if cfg.num_layers % pp:
        problems.append(f"num_layers ({cfg.num_layers}) is not divisible by the pipeline-parallel size {pp}")
    if problems:
        raise ValueError("; ".join(problems))


def num_parameters(cfg: ModelConfig) -> int:
    """Parameters by formula: a tied embedding counted once, RMSNorm weights included, no biases."""
    h = cfg.hidden_size
    kv = cfg.num_query_groups * cfg.head_dim
    attention = h * h + 2 * h * kv + h * h  # q, k, v, output projection
    mlp = 3 * h * cfg.ffn_hidden_size  # gate, up, down
    norms = 2 * h  # before attention and before the MLP
    embeddings = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * (attention + mlp + norms) + embeddings + h  # + final norm
