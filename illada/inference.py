"""Load a checkpoint for inference: one process, tensor and pipeline parallel size 1.

    loaded = load_for_inference("runs/x/checkpoints")        # a checkpoint or a folder of them
    ids = loaded.encode("def add(a, b):")
    out = generate(loaded.model, [ids], SamplerConfig(...), loaded.special)
    print(loaded.decode(out.answers(loaded.special)[0]))

The model is rebuilt from the checkpoint's illada.json ("model": the ModelConfig it was
trained with) and its weights loaded with dist_checkpointing, which reshards, so a
checkpoint saved at any TP/PP layout loads here. The tokenizer and its special ids are the
ones the checkpoint carries (illada.json's "tokenizer": its tokenizer/ folder and ids; every
imported and newly trained checkpoint has them); an older checkpoint's come from the
data-pipeline run it was trained on ("data_root": its tokenizer stage's tokenizer.json and
the special ids its manifests record).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from illada import layout, storage
from illada.layout import CheckpointInfo
from illada.model.config import ModelConfig
from illada.sampling.model import SpecialTokens


@dataclass
class InferenceModel:
    model: object  # MegatronDenoiser: logits = model(tokens, keep=None)
    tokenizer: Tokenizer
    special: SpecialTokens
    config: ModelConfig
    checkpoint: str
    device: torch.device

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long, device=self.device)

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load_for_inference(checkpoint: str, *, bf16: bool | None = None, seed: int = 1234, verify: bool = True) -> InferenceModel:
    """Build the checkpoint's model in this process (on the GPU if there is one; bf16 there
    unless bf16=False) and load its weights and tokenizer. The checkpoint's files are
    checked against its illada.json before any is read (sizes; sha256 too unless
    verify=False): a file that differs raises DamagedCheckpoint, naming it. A checkpoint
    from elsewhere brings its own illada.json: load one only from a source you trust, or
    after comparing its digest with a trusted record (runbooks/resume-training.md)."""
    from illada.model.build import build_model, transformer_config
    from illada.parallel import init_parallel
    from illada.sampling.megatron import MegatronDenoiser
    from illada.layout import checkpoint_info, resolve_checkpoint
    from illada.train.checkpoint import load_model_weights

    path = resolve_checkpoint(checkpoint)
    info = checkpoint_info(path)
    config = ModelConfig.model_validate(info.model)
    tokenizer, special_ids = checkpoint_tokenizer(path, info)
    special = SpecialTokens.from_ids(special_ids)
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu if bf16 is None else bf16
    _init_one_process(init_parallel, seed)
    # Weights are loaded in fp32 (as saved) and cast afterwards; bf16=True in the config
    # keeps the attention softmax in fp32 for bf16 activations.
    model = build_model(config, transformer_config(config, bf16=bf16))
    load_model_weights(model, path, verify=verify)
    if bf16:
        model = model.bfloat16()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return InferenceModel(MegatronDenoiser(model), tokenizer, special, config, path, device)


def _init_one_process(init_parallel, seed: int) -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != 1 or parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise RuntimeError("inference runs at tensor and pipeline parallel size 1; this process was set up for another layout")
        return
    init_parallel(1, 1, seed=seed)


def checkpoint_tokenizer(path: str, info: CheckpointInfo) -> tuple[Tokenizer, dict[str, int]]:
    """The tokenizer and special ids a checkpoint carries, else those of its data run."""
    if info.tokenizer:
        return Tokenizer.from_str(storage.read_bytes(storage.join(path, info.tokenizer["path"])).decode()), info.tokenizer["special_ids"]
    if not info.data_root:
        raise FileNotFoundError(f"{path} carries no tokenizer and names no data_root to take one from")
    return load_tokenizer_ids(info.data_root)


def load_tokenizer(data_root: str) -> tuple[Tokenizer, SpecialTokens]:
    """The tokenizer a data-pipeline run trained (or loaded) and its special ids."""
    tokenizer, ids = load_tokenizer_ids(data_root)
    return tokenizer, SpecialTokens.from_ids(ids)


def load_tokenizer_ids(data_root: str) -> tuple[Tokenizer, dict[str, int]]:
    manifest_url = layout.manifest_url(data_root, "tokenizer")
    if not storage.exists(manifest_url):
        raise FileNotFoundError(f"no tokenizer manifest at {manifest_url}: the checkpoint's data_root must hold a completed data-pipeline run")
    manifest = storage.read_json(manifest_url)
    tokenizer = Tokenizer.from_str(storage.read_bytes(storage.join(data_root, manifest["files"][0]["path"])).decode())
    pack_url = layout.manifest_url(data_root, "pack")
    ids = storage.read_json(pack_url)["stats"]["special_ids"] if storage.exists(pack_url) else manifest["stats"]["special_ids"]
    return tokenizer, ids
