"""Stage 4, tokenizer: train a byte-level BPE on a sample of the corpus, or load one.

The special tokens the model needs sit at fixed ids 0-6 of a trained tokenizer (the
iLLaDA release uses mask id 5). A loaded tokenizer.json keeps its own ids; tokens it lacks are
added. A checkpoint directory given as the path (e.g. what `illada import hf` wrote from
LLaDA-8B) brings its tokenizer with the special ids it carries (LLaDA's mask is
`<|mdm_mask|>` = 126336), so the data is tokenized as the model expects. Either way the ids
are recorded in the manifest and read from there downstream: no other module hard-codes them.

Special ids come only from the pipeline (noising, document ends, the chat template): raw
text is encoded with `plain_text`, so a literal "<|mask|>" in a document is ordinary text.
"""

from __future__ import annotations

from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from illada import storage
from illada.config import ConfigError
from illada.data.documents import iter_batches
from illada.data.special_tokens import SPECIAL_TOKENS, special_ids
from illada.layout import checkpoint_info, is_complete_checkpoint
from illada.pipeline.stage import Stage, StageContext, file_entry

def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),  # in this order: ids 0..6
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenizer_source(path: str) -> tuple[str, dict[str, int] | None]:
    """The tokenizer.json to load for data.tokenizer.path, and the special ids that come with
    it: a checkpoint's carried tokenizer and ids, or a tokenizer.json (ids found by name)."""
    if not (storage.is_local(path) and is_complete_checkpoint(path)):
        return path, None
    carried = checkpoint_info(path).tokenizer
    if not carried:
        raise ConfigError(f"data.tokenizer.path {path} is a checkpoint that carries no tokenizer; give its data run's tokenizer.json")
    return storage.join(path, carried["path"]), carried["special_ids"]


def load_tokenizer(url: str) -> Tokenizer:
    tokenizer = Tokenizer.from_str(storage.read_bytes(url).decode())
    absent = [t for t in SPECIAL_TOKENS.values() if tokenizer.token_to_id(t) is None]
    if absent:
        tokenizer.add_special_tokens(absent)
    return tokenizer


def sample_texts(files: list[dict], root: str, quota: dict[str, int]) -> Iterator[str]:
    """The first `quota[source]` documents of each source, in file order: a deterministic
    sample proportional to the mix."""
    taken = dict.fromkeys(quota, 0)
    for f in files:
        source = f["source"]
        if taken[source] >= quota[source]:
            continue
        for batch in iter_batches(storage.join(root, f["path"]), columns=["text"]):
            for text in batch.column("text").to_pylist():
                if taken[source] >= quota[source]:
                    break
                taken[source] += 1
                yield text


def tokenizer_task(spec: dict) -> dict:
    ids = None
    if spec["path"]:
        url, ids = tokenizer_source(spec["path"])
        tokenizer = Tokenizer.from_str(storage.read_bytes(url).decode()) if ids else load_tokenizer(url)
    else:
        texts = sample_texts(spec["files"], spec["root"], spec["quota"])
        tokenizer = train_bpe(texts, spec["vocab_size"], spec["min_frequency"])
    data = tokenizer.to_str().encode()
    storage.write_bytes(spec["out_url"], data)
    return {
        "sha256": storage.sha256_file(spec["out_url"]),
        "bytes": len(data),
        "vocab_size": tokenizer.get_vocab_size(),
        "special_ids": ids or special_ids(tokenizer),
    }


def run_tokenizer(ctx: StageContext) -> dict:
    cfg = ctx.config.data.tokenizer
    mix = ctx.config.data.mix()
    spec = {
        "path": cfg.path,
        "files": ctx.input_files("decontaminate", "documents"),
        "root": ctx.root,
        "quota": {name: max(1, round(share * cfg.train_sample_docs)) for name, share in mix.items()},
        "vocab_size": cfg.vocab_size,
        "min_frequency": cfg.min_frequency,
        "out_url": ctx.path("tokenizer.json"),
    }
    # BPE training is one process using every core of its node through Rust threads.
    r = ctx.run_tasks("train", tokenizer_task, {"tokenizer": spec})["tokenizer"]
    entry = file_entry(ctx, spec["out_url"], "tokenizer", r["sha256"], r["bytes"])
    return {"files": [entry], "stats": {"vocab_size": r["vocab_size"], "special_ids": r["special_ids"], "trained": cfg.path is None}}


def tokenizer_url(manifest: dict, root: str) -> str:
    return storage.join(root, manifest["files"][0]["path"])


def _loaded_identity(path: str | None) -> str | dict | None:
    if path is None:
        return None
    url, ids = tokenizer_source(path)
    return {"sha256": storage.sha256_file(url), "special_ids": ids} if ids else storage.sha256_file(url)


STAGE = Stage(
    name="tokenizer",
    inputs=("decontaminate",),
    run=run_tokenizer,
    identity=lambda config: {
        "tokenizer": config.data.tokenizer.model_dump(mode="json"),
        "mix": config.data.mix(),
        "loaded": _loaded_identity(config.data.tokenizer.path),
    },
    description="Train a byte-level BPE with fixed special-token ids, or load a tokenizer.json or a checkpoint's tokenizer.",
)
