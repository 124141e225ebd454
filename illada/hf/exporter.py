"""`illada export hf`: an illada checkpoint (any TP/PP it was saved at) -> a Hugging Face
directory in LLaDA's layout: safetensors shards with model.safetensors.index.json,
config.json (auto_map pointing at LLaDA's public modeling code) and the tokenizer.

The model is loaded in one process at TP = PP = 1 (dist_checkpointing reshards); weights
are converted and written shard by shard, so beyond the model only one shard is held.
The directory is written as OUT.partial and renamed to OUT when complete.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from illada.config import ConfigError
from illada.hf import convert
from illada.hf.importer import build_empty, check_out
from illada.layout import CHECKPOINT_TOKENIZER_DIR, CheckpointInfo, checkpoint_info, is_complete_checkpoint
from illada.model.config import ModelConfig

MAX_SHARD_BYTES = 5 * 2**30


def export_hf(checkpoint: str, out: str, dtype: str = "bf16", max_shard_bytes: int = MAX_SHARD_BYTES, seed: int = 1234) -> str:
    from illada.inference import _init_one_process
    from illada.parallel import init_parallel
    from illada.layout import checkpoint_info, resolve_checkpoint
    from illada.train.checkpoint import load_model_weights

    if dtype not in convert.DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(convert.DTYPES)}")
    torch_dtype = convert.DTYPES[dtype]
    path = resolve_checkpoint(checkpoint)
    info = checkpoint_info(path)
    cfg = ModelConfig.model_validate(info.model)
    out = check_out(out)
    _init_one_process(init_parallel, seed)
    model = build_empty(cfg, 1, 1)
    load_model_weights(model, path)
    params = dict(model.named_parameters())
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    special_ids = write_tokenizer(path, info, partial)
    write_weights(cfg, params, torch_dtype, partial, max_shard_bytes)
    config = convert.hf_config(cfg, special_ids, torch_dtype, base=imported_hf_config(info))
    with open(os.path.join(partial, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    os.rename(partial, out)
    return out


def imported_hf_config(info: CheckpointInfo, max_depth: int = 1000) -> dict | None:
    """The config.json of the import this checkpoint descends from (through its parents), if any."""
    for _ in range(max_depth):
        if info.hf_config or not info.parent:
            return info.hf_config
        if not is_complete_checkpoint(info.parent):
            return None
        info = checkpoint_info(info.parent)
    return None


def plan_shards(cfg: ModelConfig, itemsize: int, max_shard_bytes: int) -> list[list[convert.Weight]]:
    """Weights grouped into shards of at most max_shard_bytes (a bigger weight gets its own)."""
    shapes = convert.hf_shapes(cfg)
    shards: list[list[convert.Weight]] = [[]]
    size = 0
    for weight in convert.weights(cfg):
        nbytes = sum(itemsize * torch.Size(shapes[n]).numel() for n in weight.hf)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(weight)
        size += nbytes
    return shards


def write_weights(cfg: ModelConfig, params: dict[str, torch.Tensor], dtype: torch.dtype, out: str, max_shard_bytes: int) -> None:
    shards = plan_shards(cfg, torch.tensor([], dtype=dtype).element_size(), max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for weight in shard:
            converted = convert.to_hf(cfg, weight, params[weight.megatron].detach())
            tensors.update({n: t.to(device="cpu", dtype=dtype, copy=True).contiguous() for n, t in converted.items()})
        save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def write_tokenizer(path: str, info: CheckpointInfo, out: str) -> dict[str, int]:
    """The checkpoint's tokenizer files (or its data run's tokenizer.json); returns the special ids."""
    from illada.inference import checkpoint_tokenizer

    tokenizer, special_ids = checkpoint_tokenizer(path, info)
    carried = os.path.join(path, CHECKPOINT_TOKENIZER_DIR)
    if info.tokenizer and os.path.isdir(carried):
        for name in sorted(os.listdir(carried)):
            shutil.copyfile(os.path.join(carried, name), os.path.join(out, name))
    else:
        tokenizer.save(os.path.join(out, "tokenizer.json"))
    if not os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        names = {key: tokenizer.id_to_token(special_ids[i]) for key, i in (("mask_token", "mask"), ("eos_token", "eot"), ("pad_token", "pad"))}
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **names}, f, indent=2)
    return special_ids
