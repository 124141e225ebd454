"""Distributed checkpoints with megatron-core `dist_checkpointing` (torch_dist format).

Why dist_checkpointing: it saves each rank's tensor shards with their global offsets, so a
checkpoint written at one TP/PP/DP layout loads at any other (resharding), and it runs
the same on CPU (gloo) and GPU (NCCL). The optimizer state is sharded like the parameters
(we use megatron's non-distributed optimizer), so it reshards too.

Layout under the checkpoint directory:

    step_00001000/              one checkpoint
        __<rank>_<n>.distcp     tensor shards, written in parallel across DP ranks
        common.pt               scheduler, data position, train state (rank 0)
        metadata.json           dist_checkpointing's
        tokenizer/tokenizer.json  the training data's tokenizer (its special ids in illada.json)
        illada.json             written last: the checkpoint is complete only with it

A crash mid-save leaves a step directory without `illada.json`; it is never loaded and is
removed by the next save. `illada.json` also records what the lineage needs: the step,
tokens per source, the parent checkpoint, the data it read and a checksum of every file;
and the tokenizer's special ids, so sampling needs the checkpoint only, not the data root.

Nothing of a checkpoint is read before its files are checked against `illada.json`
(illada.checkpoint_files: size always, sha256 unless train.checkpoint.verify is off). On
resume a damaged newest checkpoint is moved aside (`step_N.damaged`) with a warning naming
the bad file, and the previous complete one is loaded instead.

RNG state: every random draw of training (masks, noise levels, random lengths) comes from a
generator seeded by (seed, step, micro-batch, DP rank), and the model has no dropout, so
the step is the whole RNG state; nothing else needs saving for an exact resume.

Checkpoints go to a filesystem path every rank can reach (local disk for one node; a shared
filesystem on a cluster). torch_dist writes through the filesystem, not fsspec, so s3://
is refused with a message.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import queue
import shutil
import time
from dataclasses import asdict

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies import filesystem_async

from illada import layout, storage
from illada.checkpoint_files import DamagedCheckpoint, check_files
from illada.config import Config, ConfigError
from illada.layout import CHECKPOINT_MARKER, CHECKPOINT_TOKENIZER, STEP_DIR, checkpoint_info, complete_checkpoints, resolve_checkpoint
from illada.progress import hashing

log = logging.getLogger(__name__)


def checkpoint_root(config: Config) -> str:
    return layout.checkpoint_root(config.root, config.train.checkpoint.dir)


def unwrap(model):
    """The megatron model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def model_state(model) -> dict:
    return unwrap(model).sharded_state_dict()


def load_model_weights(model, path: str, *, verify: bool = True) -> None:
    """Load only the weights of a checkpoint (saved at any TP/PP layout) into this rank's
    model, built for the current layout (a GPTModel, or megatron's DDP around one). Its
    files are checked against its illada.json first (sha256 too unless verify=False)."""
    path = resolve_checkpoint(path)
    check_files(path, sha256=verify)
    state = dist_checkpointing.load({"model": model_state(model)}, path)
    unwrap(model).load_state_dict(state["model"])


class Checkpointer:
    def __init__(self, config: Config):
        self.config = config
        self.root = checkpoint_root(config)
        self.keep_last = config.train.checkpoint.keep_last
        self.verify = config.train.checkpoint.verify
        self.parent: str | None = None  # the checkpoint this run continued or started from
        self.rank0 = dist.get_rank() == 0
        self.tokenizer = _data_tokenizer(config.train.data_root) if self.rank0 else None

    def restore(self, model, optimizer, scheduler, data, state) -> str | None:
        """Resume from the latest complete checkpoint here; otherwise start from
        train.init_from's weights if set. Returns what was loaded, or None."""
        latest = self._latest_intact()
        if latest:
            if self.rank0:
                log.info("loading checkpoint %s", latest)
            self._load_full(latest, model, optimizer, scheduler, data, state)
            self.parent = latest
            log.info("resumed from %s at step %d", latest, state.step)
        elif self.config.train.init_from:
            self.parent = resolve_checkpoint(self.config.train.init_from)
            self._on_rank0(lambda: check_files(self.parent, sha256=self.verify))
            check_same_shape(self.config.model.model_dump(), checkpoint_info(self.parent).model, self.parent)
            load_model_weights(model, self.parent, verify=False)  # every rank: sizes and pickles again, cheap
            log.info("initialised weights from %s", self.parent)
        return self.parent

    def _on_rank0(self, fn):
        """fn() on rank 0 only (the files are on a filesystem every rank reads: one hash is
        enough); every rank returns its result, or raises the ConfigError it raised."""
        answer: list = [None]
        if self.rank0:
            try:
                answer[0] = fn()
            except ConfigError as e:
                answer[0] = e
        dist.broadcast_object_list(answer, src=0)
        if isinstance(answer[0], ConfigError):
            raise answer[0]
        return answer[0]

    def _latest_intact(self) -> str | None:
        """The newest complete checkpoint whose files match its illada.json. Damaged ones
        are moved aside, so that keep_last never prunes a good checkpoint in favour of one."""
        return self._on_rank0(self._check_newest_first)

    def _check_newest_first(self) -> str | None:
        found = complete_checkpoints(self.root)
        for path in reversed(found):
            try:
                check_files(path, sha256=self.verify)
                return path
            except DamagedCheckpoint as e:
                aside = f"{path}.damaged"
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(path, aside)
                log.warning("%s; moved it aside to %s and resuming from the previous complete checkpoint", e, aside)
        if found:
            raise ConfigError(f"no intact checkpoint under {self.root}: every one was damaged and moved aside (*.damaged); fix or remove them to start over")
        return None

    def _load_full(self, path: str, model, optimizer, scheduler, data, state) -> None:
        model_sd = model_state(model)
        sharded = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}
        loaded = dist_checkpointing.load(sharded, path)
        unwrap(model).load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        data.load_state_dict(loaded["data"])
        state.step = loaded["train_state"]["step"]
        state.tokens_per_source = dict(loaded["train_state"]["tokens_per_source"])

    def save(self, model, optimizer, scheduler, data, state, extra_info: dict | None = None) -> str:
        """Write step_<step>/ on every rank; complete (visible) once rank 0 writes the marker."""
        start = time.perf_counter()
        path = layout.step_dir(self.root, state.step)
        if self.rank0:
            log.info("saving checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)  # a crashed save of this same step
            os.makedirs(path)
        dist.barrier()
        model_sd = model_state(model)
        sharded = {
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd),
            "scheduler": scheduler.state_dict(),
            "data": data.state_dict(),
            "train_state": asdict(state),
        }
        save_sharded(sharded, path)
        if self.rank0 and self.tokenizer:
            storage.write_bytes(os.path.join(path, CHECKPOINT_TOKENIZER), self.tokenizer[0].encode())
        files = self._checksums(path)
        if self.rank0:
            carried = {"tokenizer": {"path": CHECKPOINT_TOKENIZER, "special_ids": self.tokenizer[1]}} if self.tokenizer else {}
            info = self._info(state, files, {**carried, **(extra_info or {})})
            storage.write_json(os.path.join(path, CHECKPOINT_MARKER), info)  # atomic: temp file + rename
            self._prune()
        dist.barrier()
        log.info("saved checkpoint %s in %.1f s", path, time.perf_counter() - start)
        return path

    def _checksums(self, path: str) -> dict[str, dict] | None:
        """Each rank hashes the shard files it wrote; rank 0 gathers them (None elsewhere)."""
        rank = dist.get_rank()
        mine = sorted(glob.glob(os.path.join(path, f"__{rank}_*.distcp")))
        if rank == 0:
            mine += [os.path.join(path, n) for n in ("common.pt", "metadata.json", ".metadata", CHECKPOINT_TOKENIZER) if os.path.exists(os.path.join(path, n))]
        with hashing(sum(os.path.getsize(f) for f in mine), f"checksums of {os.path.basename(path)}", disable=not self.rank0) as bar:
            local = {os.path.relpath(f, path): file_checksum(f, bar.update) for f in mine}
        gathered = [None] * dist.get_world_size() if self.rank0 else None
        dist.gather_object(local, gathered, dst=0)
        if not self.rank0:
            return None
        return dict(sorted((k, v) for part in gathered for k, v in part.items()))

    def _info(self, state, files: dict, extra: dict) -> dict:
        train = self.config.train
        return {
            "step": state.step,
            "tokens_per_source": state.tokens_per_source,
            "parent": self.parent,
            "init_from": train.init_from,
            "data_root": train.data_root,
            "parallel": {
                "tensor": parallel_state.get_tensor_model_parallel_world_size(),
                "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
                "data": parallel_state.get_data_parallel_world_size(),
            },
            "model": self.config.model.model_dump(),
            "files": files,
            "digest": files_digest(files),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }

    def _prune(self) -> None:
        """Keep the newest keep_last complete checkpoints; drop older ones and crashed saves."""
        complete = complete_checkpoints(self.root)
        latest = complete[-1] if complete else None
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if STEP_DIR.match(name) and path not in complete and (latest is None or path < latest):
                shutil.rmtree(path, ignore_errors=True)


SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size", "tie_word_embeddings")


def save_sharded(sharded: dict, path: str) -> None:
    """dist_checkpointing.save in torch_dist format, the DP ranks sharing the writing."""
    _write_results_in_this_process()
    strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy("torch_dist"), parallel_state.get_data_parallel_group()
    )
    dist_checkpointing.save(sharded, path, sharded_strategy=strategy)


def _write_results_in_this_process() -> None:
    """megatron's torch_dist writer hands its write results back through a queue served by
    a Manager process that it spawns on the first save: made for asynchronous saves, whose
    results are read in another process. Ours are synchronous (read by the process that
    wrote them), so a plain queue does. Inside a Ray worker that Manager process was seen
    to die, failing a save with EOFError."""
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def check_same_shape(model: dict, saved: dict, path: str) -> None:
    """train.init_from's weights fit the configured model (else megatron fails deep in loading)."""
    saved = {"tie_word_embeddings": True, **saved}  # checkpoints from before the field were tied
    differ = [f"{f}={saved[f]} (model.{f} is {model[f]})" for f in SHAPE_FIELDS if saved[f] != model[f]]
    if differ:
        raise ConfigError(f"train.init_from {path} holds a model with {', '.join(differ)}; give the model section its shape (illada.json's \"model\", e.g. model.preset=llada-8b)")


def _data_tokenizer(data_root: str | None) -> tuple[str, dict[str, int]] | None:
    """The training data's tokenizer.json text and special ids (None without a tokenizer stage)."""
    from illada.inference import load_tokenizer_ids

    try:
        tokenizer, ids = load_tokenizer_ids(data_root) if data_root else (None, None)
    except FileNotFoundError:
        return None
    return (tokenizer.to_str(), ids) if tokenizer else None


def file_checksum(path: str, on_read=None) -> dict:
    return {"size": os.path.getsize(path), "sha256": storage.sha256_file(path, on_read=on_read)}


def files_digest(files: dict[str, dict]) -> str:
    """One content hash of a checkpoint: over its files' names and hashes."""
    h = hashlib.sha256()
    for name, meta in sorted(files.items()):
        h.update(f"{name}\0{meta['sha256']}\n".encode())
    return h.hexdigest()
