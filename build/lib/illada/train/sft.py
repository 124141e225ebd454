"""Supervised fine-tuning data for the trainer: samples and their micro-batches.

- Samples come from an SFT data run's shards (illada.data.sft_pack) through the same
  machinery as pre-training sequences (illada.train.data.PackedData): per source a seeded
  permutation, re-drawn every epoch (so every epoch is reshuffled), sources blended by
  their weights, each data-parallel rank reading its slice, the position saved in every
  checkpoint.
- A micro-batch holds samples of different length buckets: each is padded with
  end-of-text (trained on, like the padding the pack stage added) to the micro-batch's
  longest, itself a bucket.
- The noise (illada.objective.sft_noise) masks the whole sequence (iLLaDA) or only the
  answer (LLaDA, whose loss is then normalised by the answer length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from illada.config import Config, ConfigError, TrainConfig
from illada.objective import Noised, sft_noise
from illada.train.data import PackedData, ShardReader


@dataclass
class Sample:
    tokens: np.ndarray  # prompt, response, end-of-text padding to its bucket
    prompt_len: int


class SampleReader(ShardReader):
    def read_sample(self, url: str, row: int) -> tuple[Sample, int]:
        """A sample and its count of padding tokens."""
        batch, i = self.locate(url, row)
        tokens = batch.column("tokens")
        offsets = tokens.offsets.to_numpy()
        values = tokens.values.to_numpy(zero_copy_only=False)[offsets[i] : offsets[i + 1]]
        return Sample(values.astype(np.int64), int(batch.column("prompt_len")[i].as_py())), int(batch.column("pad")[i].as_py())


class SFTData(PackedData):
    """Global batches of SFT samples for one data-parallel rank."""

    def __init__(self, pack_manifest: dict, root: str, weights: dict[str, float], seed: int, dp_rank: int = 0, dp_size: int = 1):
        super().__init__(pack_manifest, root, weights, seed, dp_rank, dp_size)
        self.reader = SampleReader()

    def next_batch(self, global_batch: int) -> list[Sample]:
        """This rank's global_batch // dp_size samples of the next global batch."""
        out = []
        for source, url, row in self._draw(global_batch):
            sample, pad = self.reader.read_sample(url, row)
            self.tokens_seen[source] += len(sample.tokens) - pad
            out.append(sample)
        return out


def check_objective(manifest: dict, train: TrainConfig) -> None:
    """SFT reads an SFT data run's shards, pre-training a pre-training run's."""
    holds_sft = manifest["stats"].get("format") == "sft"
    if train.objective == "sft" and not holds_sft:
        raise ValueError(
            f"train.objective is sft but {train.data_root}/pack holds pre-training shards; point train.data_root "
            "at the root of an SFT data run (`illada pipeline run` with data.kind: sft)"
        )
    if train.objective != "sft" and holds_sft:
        raise ValueError(f"{train.data_root}/pack holds SFT samples; set train.objective: sft to fine-tune on them")


def with_steps(config: Config, manifest: dict, mix: dict[str, float]) -> Config:
    """The config with train.steps set from train.sft.epochs (unchanged without epochs): the
    steps that pass `epochs` times over the samples of the mix's sources, the last batch
    rounded up."""
    train = config.train
    if train.sft.epochs is None:
        return config
    sources = manifest["stats"]["sources"]
    samples = sum(sources[name]["samples"] for name, weight in mix.items() if weight > 0 and name in sources)
    steps = max(1, math.ceil(train.sft.epochs * samples / train.global_batch_size))
    if train.optim.warmup_steps + train.optim.decay_steps > steps:
        raise ConfigError(
            f"train.sft.epochs={train.sft.epochs} gives {steps} steps, fewer than optim.warmup_steps ({train.optim.warmup_steps}) "
            f"+ optim.decay_steps ({train.optim.decay_steps}); shorten the warm-up or the decay, or train more epochs"
        )
    # model_copy: the resolved config keeps epochs for the record; validation would refuse both
    return config.model_copy(update={"train": train.model_copy(update={"steps": steps})})


def collate(samples: list[Sample], eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [b, longest] padded with end-of-text, and each row's prompt length [b]."""
    length = max(len(s.tokens) for s in samples)
    tokens = torch.full((len(samples), length), eot_id, dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, : len(s.tokens)] = torch.from_numpy(s.tokens)
    return tokens, torch.tensor([s.prompt_len for s in samples], dtype=torch.long)


def micro_batch(samples: list[Sample], mode: str, special_ids: dict[str, int], generator: torch.Generator) -> tuple[torch.Tensor, Noised, torch.Tensor | None]:
    """(clean tokens, their noised version, answer lengths) of one micro-batch; the answer
    lengths (response + padding) only in LLaDA mode, whose loss divides by them."""
    clean, prompt_len = collate(samples, special_ids["eot"])
    noised = sft_noise(clean, prompt_len, special_ids["mask"], mode, generator)
    answer_len = clean.shape[1] - prompt_len if mode == "llada" else None
    return clean, noised, answer_len
