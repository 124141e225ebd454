"""A Hugging Face model directory, read and checked before any weight is converted:
config.json, safetensors shards (one file, or several listed by model.safetensors.index.json)
and the tokenizer. Tensors are read one at a time through `safe_open` (memory-mapped), so
nothing holds the whole model."""

from __future__ import annotations

import json
import os
from functools import cached_property

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from illada import storage
from illada.config import ConfigError
from illada.hf import convert

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Token strings tried when config.json does not give an id (LLaDA's, then illada's own).
MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>")
EOT_TOKENS = ("<|endoftext|>", "<|end_of_text|>")
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eot|>")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


class HFModelDir:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise ConfigError(f"{path} is not a directory (expected a Hugging Face model directory)")
        self.config = self._read_json("config.json")
        self.model = convert.model_config(self.config)
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}

    def _read_json(self, name: str) -> dict:
        file = os.path.join(self.path, name)
        if not os.path.isfile(file):
            raise ConfigError(f"{self.path} has no {name}")
        try:
            return json.loads(open(file).read())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None

    def _weight_map(self) -> dict[str, str]:
        if os.path.isfile(os.path.join(self.path, INDEX)):
            weight_map = self._read_json(INDEX).get("weight_map") or {}
            source = INDEX
        elif os.path.isfile(os.path.join(self.path, SINGLE)):
            with safe_open(os.path.join(self.path, SINGLE), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
            source = SINGLE
        else:
            raise ConfigError(f"{self.path} has neither {INDEX} nor {SINGLE}")
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(self.path, f))})
        if missing:
            raise ConfigError(f"{self.path} is missing shard(s) {', '.join(missing)} listed in {source}")
        return weight_map

    def check_weights(self) -> None:
        """Every weight config.json implies is there with its shape, and nothing else is."""
        expected = convert.hf_shapes(self.model)
        absent = [n for n in expected if n not in self.weight_map]
        if absent:
            raise ConfigError(f"{self.path} lacks weight(s) {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}")
        extra = sorted(set(self.weight_map) - set(expected))
        if extra:
            raise ConfigError(f"{self.path} has weight(s) config.json does not imply: {', '.join(extra[:3])} (is weight_tying right?)")
        for name, shape in expected.items():
            found = tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())
            if found != shape:
                raise ConfigError(f"weight {name} has shape {list(found)} but config.json implies {list(shape)}")

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.path, file), framework="pt")
        return self._handles[file]

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(self.weight_map[name]).get_tensor(name)

    def dtype(self) -> torch.dtype:
        return self.tensor(convert.PREFIX + "ln_f.weight").dtype

    @cached_property
    def tokenizer(self) -> Tokenizer:
        file = os.path.join(self.path, "tokenizer.json")
        if not os.path.isfile(file):
            raise ConfigError(f"{self.path} has no tokenizer.json (a fast tokenizer); save one with the model's tokenizer")
        return Tokenizer.from_file(file)

    def tokenizer_files(self) -> list[str]:
        self.tokenizer  # noqa: B018 - tokenizer.json must exist and parse
        return [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(self.path, n))]

    def special_ids(self) -> dict[str, int]:
        """mask, end-of-text, pad, end-of-turn (and chat roles where the tokenizer has them):
        config.json's ids first, else the tokens' usual strings."""
        tok = self.tokenizer
        ids = {
            "mask": self._token_id("mask_token_id", MASK_TOKENS, "mask"),
            "eot": self._token_id("eos_token_id", EOT_TOKENS, "end-of-text"),
        }
        ids["pad"] = _first_int(self.config.get("pad_token_id"))
        if ids["pad"] is None:
            ids["pad"] = ids["eot"]
        ids["end_of_turn"] = next((tok.token_to_id(t) for t in END_OF_TURN_TOKENS if tok.token_to_id(t) is not None), ids["eot"])
        ids.update({role: tok.token_to_id(t) for role, t in ROLE_TOKENS.items() if tok.token_to_id(t) is not None})
        for name, i in ids.items():
            if tok.id_to_token(i) is None or i >= self.model.vocab_size:
                raise ConfigError(f"the {name} id {i} is not a token of {self.path}/tokenizer.json within the {self.model.vocab_size}-token vocabulary")
        return ids

    def _token_id(self, key: str, tokens: tuple[str, ...], what: str) -> int:
        given = _first_int(self.config.get(key))
        if given is not None:
            return given
        found = next((self.tokenizer.token_to_id(t) for t in tokens if self.tokenizer.token_to_id(t) is not None), None)
        if found is None:
            raise ConfigError(f"{self.path}: the tokenizer has no {what} token ({' or '.join(tokens)}) and config.json has no {key}")
        return found

    def file_hashes(self) -> dict[str, str]:
        """sha256 of config.json, the weight files and the tokenizer files (the lineage's record of SRC)."""
        names = ["config.json", *([INDEX] if os.path.isfile(os.path.join(self.path, INDEX)) else []), *sorted(set(self.weight_map.values())), *self.tokenizer_files()]
        return {n: storage.sha256_file(os.path.join(self.path, n)) for n in names}


def _first_int(value) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None
