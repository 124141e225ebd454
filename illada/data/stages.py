"""The data pipelines as chains of stages; `data.kind` picks one.

    pretrain  ingest -> dedup_exact -> dedup_fuzzy -> decontaminate -> tokenizer -> tokenize -> pack
    sft       ingest -> dedup_exact -> dedup_fuzzy -> decontaminate -> tokenizer -> chat -> pack
"""

from __future__ import annotations

from illada.config import Config
from illada.data import chat_tokenize, decontaminate, dedup_exact, dedup_fuzzy, ingest, pack, sft_pack, tokenize, tokenizer
from illada.pipeline.stage import Stage

PRETRAIN: list[Stage] = [ingest.STAGE, dedup_exact.STAGE, dedup_fuzzy.STAGE, decontaminate.STAGE, tokenizer.STAGE, tokenize.STAGE, pack.STAGE]
SFT: list[Stage] = [ingest.STAGE, dedup_exact.STAGE, dedup_fuzzy.STAGE, decontaminate.STAGE, tokenizer.STAGE, chat_tokenize.STAGE, sft_pack.STAGE]


def stages_for(config: Config) -> list[Stage]:
    """The stages of the pipeline the config's data.kind names."""
    config.require("data")
    return SFT if config.data.kind == "sft" else PRETRAIN
