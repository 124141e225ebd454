"""The one configuration system: typed pydantic models, YAML files, `key.sub=value` overrides.

Every model forbids unknown keys, so a typo fails loudly with the dotted key that was
wrong. `load_config` is the only way configs are read; `dump_config` writes the resolved
config (secrets masked) beside every output.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator

from illada.errors import UserError
from illada.model.config import ModelConfig, check_parallel_sizes
from illada.schema import Strict

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def expand_vars(text: str) -> str:
    """Expand $VAR and ${VAR} in paths; an unset variable is an error, not an empty string."""
    expanded = os.path.expandvars(text)
    unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:
        raise ValueError(f"environment variable {unset[0]} in {text!r} is not set")
    return expanded


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and what to fix."""


# --- storage and runtime -------------------------------------------------------------


class S3Config(Strict):
    """S3 options. Credentials may also come from the standard AWS environment variables;
    they are never written to saved configs, manifests or logs."""

    endpoint_url: str | None = None
    region: str | None = None
    key: SecretStr | None = Field(None, exclude=True)
    secret: SecretStr | None = Field(None, exclude=True)


class StorageConfig(Strict):
    s3: S3Config = S3Config()


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray cluster address; None starts (or joins) a local Ray.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for a local Ray; None uses all.")


# --- data pipeline --------------------------------------------------------------------


FilterName = Literal["language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"]


class FilterConfig(Strict):
    """The filter stage: datatrove's quality filters and a language filter (py3langid's
    bundled model), run in the listed order; a document is dropped by the first that fails."""

    filters: list[FilterName] = Field([], description="Filters for every source, in order (a source's own `filters` replaces this); empty: documents pass unfiltered.")
    languages: list[str] = Field(["en"], min_length=1, description="ISO 639-1 codes the language filter keeps.")
    min_language_score: float = Field(0.65, ge=0, le=1, description="The language filter drops a document whose top language's probability is lower.")
    params: dict[FilterName, dict[str, Any]] = Field(
        {}, description="Keyword arguments for a datatrove filter's constructor, e.g. {gopher_quality: {min_doc_words: 20}}."
    )

    def for_source(self, source: SourceConfig) -> list[str]:
        return list(self.filters if source.filters is None else source.filters)


class SourceConfig(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    paths: list[str] = Field(min_length=1, description="Files, directories or globs; local or s3://.")
    format: Literal["auto", "jsonl", "parquet", "text", "chat"] = Field(
        "auto", description="chat: conversations (jsonl or parquet records with a messages list), for SFT data."
    )
    weight: float = Field(gt=0, description="Mix weight; normalised over all sources.")
    text_field: str = "text"
    messages_field: str = Field("messages", description="chat sources: the field holding [{role, content}, ...].")
    id_field: str | None = None
    filters: list[FilterName] | None = Field(None, description="Quality/language filters for this source, in order; None: data.filter.filters.")
    languages: list[str] | None = Field(None, description="The language filter's accepted languages for this source; None: data.filter.languages.")

    @field_validator("paths")
    @classmethod
    def _expand(cls, paths: list[str]) -> list[str]:
        return [expand_vars(p) for p in paths]


class IngestConfig(Strict):
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(1_000_000, gt=0)
    max_quarantine_fraction: float = Field(0.05, ge=0, le=1)
    rows_per_batch: int = Field(2048, gt=0, description="Documents per Arrow record batch written.")

    @model_validator(mode="after")
    def _bounds(self) -> IngestConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")
        return self


class ExactDedupConfig(Strict):
    enabled: bool = True
    num_partitions: int = Field(16, gt=0, description="Hash partitions; each reducer holds 1/N of the hashes.")


class FuzzyDedupConfig(Strict):
    enabled: bool = True
    n_grams: int = Field(5, gt=0)
    num_buckets: int = Field(14, gt=0)
    hashes_per_bucket: int = Field(8, gt=0)
    num_partitions: int = Field(16, gt=0, description="Partitions of the duplicate graph for connected components.")
    seed: int = 1
    jaccard_threshold: float = Field(
        0.7, ge=0, le=1, description="An LSH candidate pair is a near-duplicate only if the Jaccard of its shingles reaches this; 0: every candidate is."
    )
    chain_stopping: bool = Field(
        True,
        description="Remove a document only if it is within jaccard_threshold of its cluster's kept document (the rest are "
        "re-clustered); false: remove every member of a connected component but the earliest.",
    )


class DedupConfig(Strict):
    exact: ExactDedupConfig = ExactDedupConfig()
    fuzzy: FuzzyDedupConfig = FuzzyDedupConfig()


class EvalSetConfig(Strict):
    """An evaluation set to keep out of the training data: a jsonl file of records."""

    name: str = Field(pattern=NAME_PATTERN, description="The benchmark's name in the manifest and `illada lineage`.")
    path: str = Field(description="A jsonl file, local or s3://.")
    fields: list[str] | None = Field(None, description="The fields holding evaluation text; default: every string (or list of strings) field.")

    @field_validator("path")
    @classmethod
    def _expand_path(cls, path: str) -> str:
        path = expand_vars(path)
        return path if "://" in path else os.path.abspath(path)


class DecontaminateConfig(Strict):
    """Documents sharing a long word n-gram with an evaluation text are removed (or flagged)."""

    enabled: bool = True
    action: Literal["remove", "flag"] = Field(
        "remove", description="remove: move to contaminated/ with the reason; flag: keep, with the benchmarks in the metadata's `contamination`."
    )
    ngram: int = Field(13, gt=0, description="Words in a matching n-gram (lowercased \\w+ words).")
    min_words: int = Field(
        8, gt=0, description="An evaluation text shorter than ngram words is matched whole if it has at least this many; shorter ones are skipped."
    )
    project_tasks: bool = Field(True, description="Match the data of the project's lm-eval tasks (illada/eval/tasks/*.jsonl).")
    eval_sets: list[EvalSetConfig] = Field([], description="More evaluation sets (jsonl).")

    @model_validator(mode="after")
    def _lengths(self) -> DecontaminateConfig:
        if self.min_words > self.ngram:
            raise ValueError(f"min_words ({self.min_words}) must not exceed ngram ({self.ngram})")
        names = [e.name for e in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError("eval_sets names must be unique")
        return self


class TokenizerConfig(Strict):
    path: str | None = Field(None, description="A tokenizer.json to load instead of training one, or a checkpoint directory carrying a tokenizer and its special ids (e.g. an `illada import hf` output).")
    vocab_size: int = Field(155_136, gt=16)
    train_sample_docs: int = Field(100_000, gt=0)
    min_frequency: int = Field(2, ge=1)

    @field_validator("path")
    @classmethod
    def _expand_path(cls, path: str | None) -> str | None:
        if path is None:
            return None
        path = expand_vars(path)
        return path if "://" in path else os.path.abspath(path)


class TokenizeConfig(Strict):
    batch_size: int = Field(1024, gt=0, description="Documents per encode_batch call.")
    num_workers: int | None = Field(None, gt=0, description="Tokenize tasks running at once; None: one per CPU.")


class PackConfig(Strict):
    seq_len: int = Field(8192, gt=1)
    sequences_per_shard: int = Field(4096, gt=0)
    zstd_level: int = Field(3, ge=1, le=22)
    validation_fraction: float = Field(
        0.01, ge=0, lt=1, description="Documents held out per source as validation shards (pack/validation/), chosen by a hash of the document id."
    )


class SFTDataConfig(Strict):
    """How conversations become SFT samples: each is padded with end-of-text up to the
    smallest bucket that holds it; a longer one is truncated or dropped (and counted)."""

    buckets: list[int] = Field([512, 1024, 2048, 4096, 8192], min_length=1, description="Sample lengths, ascending; the last is the maximum.")
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="A sample over the last bucket: drop it, or cut its response at the maximum length."
    )
    samples_per_shard: int = Field(4096, gt=0)
    zstd_level: int = Field(3, ge=1, le=22)

    @field_validator("buckets")
    @classmethod
    def _ascending(cls, buckets: list[int]) -> list[int]:
        if any(b < 2 for b in buckets) or buckets != sorted(set(buckets)):
            raise ValueError("buckets must be distinct lengths >= 2 in ascending order")
        return buckets

    @property
    def max_len(self) -> int:
        return self.buckets[-1]


class DataConfig(Strict):
    kind: Literal["pretrain", "sft"] = Field(
        "pretrain", description="Which pipeline `illada pipeline run` runs: pretrain (pipelines/pretrain_data.py) or sft (pipelines/sft_data.py)."
    )
    sources: list[SourceConfig] = Field(min_length=1)
    ingest: IngestConfig = IngestConfig()
    filter: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    pack: PackConfig = PackConfig()
    sft: SFTDataConfig = SFTDataConfig()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicated)}")
        return sources

    @model_validator(mode="after")
    def _sft_sources_and_tokenizer(self) -> DataConfig:
        sft = self.kind == "sft"
        for i, source in enumerate(self.sources):
            if sft != (source.format == "chat"):
                fix = "set its format: chat" if sft else "set data.kind: sft to build SFT data from conversations"
                raise ValueError(f"sources.{i} ({source.name!r}) has format {source.format!r} but data.kind is {self.kind!r}: {fix}")
        if sft and any(self.filter.for_source(s) for s in self.sources):
            raise ValueError("the filter stage does not filter conversations (data.kind sft): remove data.filter.filters and the sources' filters")
        if sft and self.tokenizer.path is None:
            raise ValueError(
                "data.kind sft needs tokenizer.path: the pre-training run's tokenizer.json "
                "(<pre-training data root>/tokenizer/tokenizer.json), so SFT samples use the model's vocabulary"
            )
        return self

    def mix(self) -> dict[str, float]:
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}


# --- training -----------------------------------------------------------------------------


class ParallelConfig(Strict):
    """The layout (`illada plan` proposes one that fits) and megatron's data-parallel options.
    The distributed optimizer (and so overlap_param_gather) needs GPUs: megatron refuses CPU tensors."""

    tensor: int = Field(1, gt=0, description="Tensor-parallel size.")
    pipeline: int = Field(1, gt=0, description="Pipeline-parallel size; data parallel is world / (tensor x pipeline).")
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = Field(
        False, description="Shard the fp32 main weights and Adam moments over the data-parallel ranks (12 bytes per parameter become 12/DP). GPU only."
    )
    overlap_grad_reduce: bool = Field(False, description="Reduce gradients in buckets during the backward pass.")
    overlap_param_gather: bool = Field(
        False, description="With the distributed optimizer: gather the updated weights during the next forward pass. GPU only."
    )

    @model_validator(mode="after")
    def _param_gather_needs_sharding(self) -> ParallelConfig:
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("overlap_param_gather needs use_distributed_optimizer: true (only sharded weights are gathered)")
        return self

    @property
    def gpu_only(self) -> list[str]:
        """The switches set here that megatron refuses on CPU tensors."""
        return [k for k in ("use_distributed_optimizer", "overlap_param_gather") if getattr(self, k)]


class OptimConfig(Strict):
    """AdamW with a Warmup-Stable-Decay schedule: linear warm-up, constant, cosine decay."""

    lr: float = Field(4e-4, gt=0)
    min_lr: float = Field(4e-5, ge=0)
    warmup_steps: int = Field(2000, ge=0)
    decay_steps: int = Field(0, ge=0, description="Cosine decay over the last N steps (WSD); 0: no decay.")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 turns clipping off.")
    torch_impl: Literal["fused", "foreach", "for_loop"] = Field(
        "fused",
        description="Without Transformer Engine or Apex megatron steps with torch's AdamW: its fused kernel, "
        "its multi-tensor (foreach) one, or a loop over the parameters.",
    )


class CheckpointConfig(Strict):
    dir: str | None = Field(None, description="Default: <root>/checkpoints.")
    interval: int = Field(1000, gt=0)
    keep_last: int = Field(3, gt=0)
    verify: bool = Field(
        True, description="Check every file's sha256 against illada.json before loading (resume, init_from); sizes are checked either way."
    )


class ClusterConfig(Strict):
    """Training as a Ray job (`illada submit train`): one worker process per GPU, or per
    cpus_per_worker CPUs on a CPU-only cluster; on a failure the whole group restarts from
    the latest complete checkpoint."""

    workers: int | None = Field(None, gt=0, description="World size; default: every GPU of the cluster (every cpus_per_worker CPUs without GPUs).")
    use_gpu: bool | None = Field(None, description="Default: GPUs if the cluster has any.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved for each worker (data reading, the checkpoint writer).")
    max_failures: int = Field(3, ge=-1, description="Restarts after a worker or node failure before the job fails; -1: no limit.")
    resource_wait_s: float = Field(0, ge=0, description="Wait this long for nodes still joining before failing for lack of GPUs/CPUs.")


class SFTConfig(Strict):
    """Supervised fine-tuning (train.objective: sft) on an SFT data-pipeline run's shards."""

    mode: Literal["illada", "llada"] = Field(
        "illada",
        description="illada: mask the whole sequence (prompt, response, end-of-text padding) as in pre-training; "
        "llada: keep the prompt clean and normalise the loss by the answer length (SPEC §2).",
    )
    epochs: float | None = Field(None, gt=0, description="Train this many passes over the SFT samples (sets the steps); instead of train.steps.")


class RecomputeConfig(Strict):
    """Activation recomputation: keep fewer activations and recompute them in the backward pass."""

    granularity: Literal["none", "selective"] = Field("none", description="selective: recompute the modules below (megatron's recompute_granularity).")
    modules: list[Literal["core_attn", "mlp"]] = Field(
        ["core_attn"],
        min_length=1,
        description="core_attn: the attention kernel (little to save with SDPA, which keeps no [s, s] scores); "
        "mlp: the whole SwiGLU MLP (saves most, costs about a fifth more compute).",
    )


class TrainConfig(Strict):
    data_root: str | None = Field(None, description="Root of a data-pipeline run (its pack/manifest.json is read); default: root.")
    mix: dict[str, float] | None = Field(None, description="Source weights; default: the data config's mix.")
    objective: Literal["pretrain", "sft"] = Field("pretrain", description="pretrain: packed sequences; sft: conversations from an SFT data run.")
    sft: SFTConfig = SFTConfig()
    steps: int | None = Field(None, gt=0, description="Optimizer steps; required unless train.sft.epochs gives them.")
    micro_batch_size: int = Field(1, gt=0)
    global_batch_size: int = Field(gt=0)
    seed: int = 1234
    random_length_fraction: float = Field(0.01, ge=0, le=1)
    bf16: bool = Field(True, description="bf16 on GPU; CPU runs in fp32.")
    log_interval: int = Field(10, gt=0)
    eval_interval: int | None = Field(
        None, ge=0, description="Every N steps, log val_loss: the masked-diffusion loss at fixed masks over the validation shards; 0 or None: off."
    )
    eval_sequences: int = Field(64, gt=0, description="Validation sequences val_loss averages over (the first of the validation shards).")
    init_from: str | None = Field(None, description="A checkpoint whose weights start this run (not its optimizer).")
    exit_after_steps: int | None = Field(
        None, gt=0, description="Stop this run after N steps with a checkpoint (to fit a scheduler's time limit); the next run resumes."
    )
    parallel: ParallelConfig = ParallelConfig()
    recompute: RecomputeConfig = RecomputeConfig()
    transformer_impl: Literal["auto", "local", "transformer_engine"] = Field(
        "auto",
        description="The layer implementation: auto picks Transformer Engine's when it is importable on a GPU machine, "
        "else megatron's local layers with torch SDPA. Both name the weights alike in checkpoints; loading across them is untested.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each Transformer layer (megatron's local layers): fuses RMSNorm, RoPE, SwiGLU and residual adds; "
        "the first step compiles (tens of seconds).",
    )
    cross_entropy: Literal["fused", "megatron"] = Field(
        "fused",
        description="The output layer and cross entropy at masked positions: fused keeps the logits in the model's dtype and "
        "turns them into their gradient in place (2 bytes a logit in bf16); megatron uses its vocab-parallel cross entropy "
        "(an fp32 copy: 6 bytes a logit at the peak).",
    )
    fp8: Literal["off", "e4m3", "hybrid"] = Field(
        "off",
        description="FP8 matmuls in Transformer Engine's layers (megatron's fp8 format: hybrid is e4m3 forward, e5m2 gradients); "
        "needs TE on a GPU with FP8 (H100 and later).",
    )
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = Field("delayed", description="TE's FP8 scaling recipe (mxfp8: Blackwell only).")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="GPU memory for the memory preflight when the device or the cluster's GPU type does not tell (e.g. A100 40 or 80 GB)."
    )
    memory_check: bool = Field(
        True, description="Refuse to start a layout the memory planner (illada plan) says will not fit a GPU; false: only warn."
    )
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    collective_timeout_s: float = Field(
        600, gt=0, description="A collective waiting longer raises (a hung worker becomes a failure; on Ray, a restart)."
    )
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("data_root")
    @classmethod
    def _expand_data_root(cls, root: str | None) -> str | None:
        if root is None:
            return None
        root = expand_vars(root).rstrip("/")
        return root if "://" in root else os.path.abspath(root)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        epochs = self.sft.epochs
        if epochs is not None and self.objective != "sft":
            raise ValueError("sft.epochs applies to train.objective: sft; pre-training counts train.steps")
        if epochs is not None and self.steps is not None:
            raise ValueError("give train.steps or train.sft.epochs, not both")
        if epochs is None and self.steps is None:
            raise ValueError("train.steps is required (for SFT, train.sft.epochs may give it instead)")
        if self.eval_interval and self.objective == "sft":
            raise ValueError("eval_interval applies to pre-training (the pack stage's validation shards); SFT data has no validation split")
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        optim = self.optim
        if self.steps is not None and optim.warmup_steps + optim.decay_steps > self.steps:
            raise ValueError(
                f"optim.warmup_steps ({optim.warmup_steps}) + optim.decay_steps ({optim.decay_steps}) exceed train.steps ({self.steps}); "
                "shorten the warm-up or the decay, or train longer"
            )
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        return self


class Config(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    root: str = Field(description="Where every stage writes; a local path or s3:// URL.")

    @field_validator("root")
    @classmethod
    def _expand_root(cls, root: str) -> str:
        root = expand_vars(root).rstrip("/")
        return root if "://" in root else os.path.abspath(root)

    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig | None = None
    model: ModelConfig | None = None
    train: TrainConfig | None = None

    def require(self, *sections: str) -> Config:
        """Fail with a clear message when a command needs a section the config lacks."""
        missing = [s for s in sections if getattr(self, s) is None]
        if missing:
            raise ConfigError(f"config {self.name!r} has no {', '.join(missing)} section; this command needs it")
        return self

    @model_validator(mode="after")
    def _layout_fits_model(self) -> Config:
        if self.train is None or self.model is None:
            return self
        check_parallel_sizes(self.model, self.train.parallel.tensor, self.train.parallel.pipeline)
        return self

    @model_validator(mode="after")
    def _train_reads_own_root_by_default(self) -> Config:
        if self.train is not None and self.train.data_root is None:
            self.train.data_root = self.root
        return self


# --- loading ----------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read YAML (or start from `base`), apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
    for override in overrides:
        apply_override(raw, override)
    _substitute_root(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, path)) from None


def _substitute_root(raw: dict) -> None:
    """`${root}` in any value means the run root (after overrides), so a config can keep
    its inputs beside its outputs and `--root` moves both."""
    root = raw.get("root")
    if not isinstance(root, str) or not any("${root}" in str(v) for k, v in raw.items() if k != "root"):
        return
    root = expand_vars(root).rstrip("/")
    root = root if "://" in root else os.path.abspath(root)

    def sub(node: Any) -> Any:
        if isinstance(node, str):
            return node.replace("${root}", root)
        if isinstance(node, list):
            return [sub(v) for v in node]
        if isinstance(node, dict):
            return {k: (v if k == "root" and node is raw else sub(v)) for k, v in node.items()}
        return node

    raw.update(sub(raw))


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.0.c=value` in a nested dict; the value is parsed as YAML (so 3, true, [a, b] work)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    value = yaml.safe_load(text) if text else ""
    parts = key.split(".")
    _check_key_exists(Config, parts, key)
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        node = _child(node, part, create_list=nxt.isdigit(), key=key)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    else:
        node[last] = value


def _child(node: Any, part: str, create_list: bool, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if part not in node or node[part] is None:
        node[part] = [] if create_list else {}
    return node[part]


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: index {part} is out of range (the list has {len(node)} items)")
    return int(part)


def _check_key_exists(model: type[BaseModel], parts: list[str], key: str) -> None:
    """Walk the model classes so an override typo fails with a suggestion, before validation."""
    current: Any = model
    for part in parts:
        if part.isdigit():
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None:
            return
        if part not in fields:
            hint = difflib.get_close_matches(part, list(fields), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(fields)})"
            raise ConfigError(f"unknown config key {key!r}: no field {part!r}{suggestion}")
        current = _model_of(fields[part].annotation)


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _format_validation_error(e: ValidationError, path: Path | None) -> str:
    """One line: every key that is wrong and what is wrong with it."""
    where = f" in {path}" if path else ""
    problems = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key; remove it or check its spelling")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            problems.append(f"{key}: {err['msg'].removeprefix('Value error, ')}{shown}")
    return f"invalid config{where}: " + "; ".join(problems)


def dump_config(config: BaseModel) -> str:
    """YAML of the resolved config with secrets masked; safe to store beside outputs."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
