"""`illada import hf`: a Hugging Face LLaDA directory -> a complete illada checkpoint.

Run in tp x pp processes (torchrun; one process for 1 x 1): each builds its part of the
model for that layout, copies its shards in from the source one weight at a time, and
megatron's dist_checkpointing writes them, so the checkpoint loads at any TP/PP (like a
training checkpoint) and a process never holds more than its part of the model plus one
source weight. Weights keep the source's dtype (bf16 for LLaDA); loading casts them to the
dtype of the model they load into (fp32 for training, exactly).

The checkpoint is written as OUT.partial and renamed to OUT once complete, with the files
training checkpoints have (illada.json last, with every file's sha256), plus the tokenizer
(tokenizer/) and its special ids, and the source's path and file hashes for the lineage.
"""

from __future__ import annotations

import os
import shutil
import time

import torch
import torch.distributed as dist

from illada import storage
from illada.config import ConfigError
from illada.hf import convert
from illada.hf.source import HFModelDir
from illada.layout import CHECKPOINT_MARKER, CHECKPOINT_TOKENIZER, CHECKPOINT_TOKENIZER_DIR, CheckpointInfo



def check_source(src: str) -> HFModelDir:
    """Read and check everything but the weights' values: fails in seconds on bad input."""
    model_dir = HFModelDir(src)
    model_dir.check_weights()
    model_dir.special_ids()
    return model_dir


def check_out(out: str) -> str:
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ConfigError(f"{out} exists already; remove it or choose another --out")
    return out


def import_hf(src: str, out: str, tp: int = 1, pp: int = 1, seed: int = 1234) -> str:
    """Call in each of tp x pp processes (or in one, for 1 x 1); returns OUT."""
    model_dir = check_source(src)
    cfg = model_dir.model
    out = check_out(out)

    from megatron.core import dist_checkpointing, parallel_state

    from illada.model.build import check_parallel_sizes
    from illada.parallel import init_parallel

    try:
        check_parallel_sizes(cfg, tp, pp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    init_parallel(tp, pp, seed)
    partial = out + ".partial"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)  # an import that died: never looks complete
        os.makedirs(partial)
    dist.barrier()
    model = build_empty(cfg, tp, pp, model_dir.dtype())
    copy_weights(model, model_dir, parallel_state.get_tensor_model_parallel_rank(), tp)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, partial)
    dist.barrier()
    if rank0:
        _finish(partial, out, model_dir, tp, pp)
    dist.barrier()
    return out


def build_empty(cfg, tp: int, pp: int, dtype: torch.dtype = torch.float32):
    """This rank's part of the model with uninitialised weights (they are all overwritten)."""
    from megatron.core import parallel_state

    from illada.model.build import build_model, transformer_config

    tconfig = transformer_config(cfg, tp=tp, pp=pp, params_dtype=dtype)
    tconfig.perform_initialization = False
    return build_model(cfg, tconfig, pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage())


def global_name(model, name: str) -> str:
    """A parameter's name with its layer numbered as in the whole model (a pipeline stage
    numbers its layers from 0)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def copy_weights(model, model_dir: HFModelDir, tp_rank: int, tp: int) -> None:
    cfg = model_dir.model
    named = convert.by_megatron_name(cfg)
    for name, param in model.named_parameters():
        full_name = global_name(model, name)
        weight = named[full_name]
        full = convert.to_megatron(cfg, weight, [model_dir.tensor(n) for n in weight.hf])
        with torch.no_grad():
            param.copy_(convert.tp_shard(full_name, full, tp, tp_rank))


def _finish(partial: str, out: str, model_dir: HFModelDir, tp: int, pp: int) -> None:
    from illada.train.checkpoint import file_checksum, files_digest

    os.makedirs(os.path.join(partial, CHECKPOINT_TOKENIZER_DIR))
    for name in model_dir.tokenizer_files():
        shutil.copyfile(os.path.join(model_dir.path, name), os.path.join(partial, CHECKPOINT_TOKENIZER_DIR, name))
    files = {rel: file_checksum(os.path.join(partial, rel)) for rel in _files_under(partial)}
    info = CheckpointInfo(
        step=0,
        model=model_dir.model.model_dump(),
        files=files,
        digest=files_digest(files),
        parallel={"tensor": tp, "pipeline": pp, "data": 1},
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        tokenizer={"path": CHECKPOINT_TOKENIZER, "special_ids": model_dir.special_ids()},
        source={"format": "huggingface", "path": model_dir.path, "dtype": str(model_dir.dtype()).removeprefix("torch."), "files": model_dir.file_hashes()},
        hf_config=model_dir.config,
    )
    storage.write_json(os.path.join(partial, CHECKPOINT_MARKER), info.to_dict())
    os.rename(partial, out)


def _files_under(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)
