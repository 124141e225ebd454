"""Hugging Face interop against LLaDA's architecture written out here in plain PyTorch (not the
project's model code): a tiny LLaDA-format directory (random weights; MHA with an untied head,
and GQA with a tied one) is imported at TP=1 and at TP=2/PP=2, its logits and generations
compared with the plain forward's, exported back bit for bit, and bad directories refused with
one line. Megatron runs in child processes (tests/distributed.py)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.conftest import WORDS as CORPUS_WORDS
from tests.conftest import REPO, TinyConfigFactory
from tests.distributed import run_distributed
from tests.sampling.reference import llada_generate

P = "model.transformer."
WORDS = 100
EOT, EOT_ID, MASK = 100, 101, 102  # ids the tokenizer gives its special tokens, after the words
VARIANTS = {
    "mha-untied": {"n_heads": 4, "n_kv_heads": 4, "weight_tying": False},
    "gqa-tied": {"n_heads": 4, "n_kv_heads": 2, "weight_tying": True},
}


# --- a tiny LLaDA directory ----------------------------------------------------------------


def llada_config(variant: str, **changes) -> dict:
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "block_type": "llama",
        "d_model": 64,
        "n_layers": 2,
        "mlp_hidden_size": 96,
        "vocab_size": 128,
        "embedding_size": 128,  # rows beyond the tokenizer's, as LLaDA pads its embedding
        "max_sequence_length": 64,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "include_bias": False,
        "rope": True,
        "init_fn": "normal",  # not the template's: shows an export kept the imported config.json
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},  # as released: code beside it
        "mask_token_id": MASK,
        "eos_token_id": EOT,
        "pad_token_id": EOT,
        **VARIANTS[variant],
        **changes,
    }


def random_weights(config: dict, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, v = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
    kv = config["n_kv_heads"] * h // config["n_heads"]

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).to(dtype)

    def norm():  # not all ones, so a norm put in the wrong place shows
        return (1 + 0.2 * torch.randn(h, generator=g)).to(dtype)

    w = {P + "wte.weight": rand(v, h)}
    for i in range(config["n_layers"]):
        b = f"{P}blocks.{i}."
        w |= {b + "attn_norm.weight": norm(), b + "q_proj.weight": rand(h, h), b + "k_proj.weight": rand(kv, h), b + "v_proj.weight": rand(kv, h)}
        w |= {b + "attn_out.weight": rand(h, h), b + "ff_norm.weight": norm(), b + "ff_proj.weight": rand(f, h), b + "up_proj.weight": rand(f, h), b + "ff_out.weight": rand(h, f)}
    w[P + "ln_f.weight"] = norm()
    if not config["weight_tying"]:
        w[P + "ff_out.weight"] = rand(v, h)
    return w


def tiny_tokenizer() -> Tokenizer:
    """Word-level: the tiny corpus's words (tests/conftest.py), then fillers, then the specials."""
    words = [*dict.fromkeys(["alpha", "beta", "document", *CORPUS_WORDS])]
    words += [f"w{i}" for i in range(WORDS - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="document"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>"])
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>")] == [EOT, EOT_ID, MASK]
    return tok


def write_llada(path: Path, config: dict, weights: dict[str, torch.Tensor], tokenizer: Tokenizer | None = None) -> Path:
    """config.json, two safetensors shards with their index, tokenizer.json."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    first = {n: t for n, t in weights.items() if n.startswith((P + "wte", P + "blocks.0."))}
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": {n: t for n, t in weights.items() if n not in first}}
    for name, tensors in shards.items():
        save_file(tensors, str(path / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: name for name, tensors in shards.items() for n in tensors}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tokenizer or tiny_tokenizer()).save(str(path / "tokenizer.json"))
    return path


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        with safe_open(str(path / file), framework="pt") as f:
            out |= {n: f.get_tensor(n) for n in f.keys()}
    assert set(out) == set(index)
    return out


# --- LLaDA's forward, from its modeling code's description, in float64 ------------------------


def llada_forward(w: dict[str, torch.Tensor], c: dict, tokens: torch.Tensor) -> torch.Tensor:
    w = {n: t.double() for n, t in w.items()}
    b, s = tokens.shape
    heads, kv_heads = c["n_heads"], c["n_kv_heads"]
    d = c["d_model"] // heads
    inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * weight

    def rope(x):  # [b, heads, s, d]: rotate the two halves of each head
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def heads_of(x, n):
        return x.view(b, s, n, d).transpose(1, 2)

    x = w[P + "wte.weight"][tokens]
    for i in range(c["n_layers"]):
        blk = lambda name: w[f"{P}blocks.{i}.{name}.weight"]  # noqa: E731
        a = rms(x, blk("attn_norm"))
        q, k, v = heads_of(a @ blk("q_proj").T, heads), heads_of(a @ blk("k_proj").T, kv_heads), heads_of(a @ blk("v_proj").T, kv_heads)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(d)  # no mask: bidirectional
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1) @ blk("attn_out").T
        m = rms(x, blk("ff_norm"))
        x = x + (torch.nn.functional.silu(m @ blk("ff_proj").T) * (m @ blk("up_proj").T)) @ blk("ff_out").T
    x = rms(x, w[P + "ln_f.weight"])
    head = w[P + "wte.weight"] if c["weight_tying"] else w[P + "ff_out.weight"]
    return x @ head.T


# --- in child processes --------------------------------------------------------------------


def _import(rank: int, src: str, out: str, tp: int, pp: int) -> str:
    from illada.hf.importer import import_hf
    from illada.parallel import destroy_parallel

    out = import_hf(src, out, tp=tp, pp=pp)
    destroy_parallel()
    return out


def _export(rank: int, checkpoint: str, out: str, dtype: str) -> str:
    from illada.hf.exporter import export_hf
    from illada.parallel import destroy_parallel

    out = export_hf(checkpoint, out, dtype=dtype, max_shard_bytes=40_000)  # several shards
    destroy_parallel()
    return out


def _logits_and_generation(rank: int, checkpoint: str, tokens: torch.Tensor, prompt: torch.Tensor):
    from illada.inference import load_for_inference
    from illada.parallel import destroy_parallel
    from illada.sampling.sampler import SamplerConfig, generate

    loaded = load_for_inference(checkpoint, bf16=False)
    logits = loaded.model(tokens)
    generated = generate(loaded.model, prompt, SamplerConfig(gen_length=8, steps=8, block_length=4), loaded.special)
    destroy_parallel()
    return logits, generated.tokens, loaded.special, loaded.decode([1, 2, EOT])


def import_at(src: Path, out: Path, tp: int = 1, pp: int = 1) -> str:
    [path, *_] = run_distributed(_import, tp * pp, str(src), str(out), tp, pp, timeout=300)
    return path


def export(checkpoint: str, out: Path, dtype: str = "fp32") -> Path:
    run_distributed(_export, 1, checkpoint, str(out), dtype, timeout=300)
    return out


TOKENS = torch.randint(0, WORDS, (2, 12), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(0, WORDS, (2, 5), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module", params=list(VARIANTS))
def imported(request, tmp_path_factory):
    """A tiny fp32 LLaDA directory and its imports at TP=1 and TP=2/PP=2."""
    tmp = tmp_path_factory.mktemp(request.param)
    config = llada_config(request.param)
    weights = random_weights(config, torch.float32)
    src = write_llada(tmp / "hf", config, weights)
    return {"config": config, "weights": weights, "src": src, "tmp": tmp, "tp1": import_at(src, tmp / "tp1"), "tp2pp2": import_with_torchrun(src, tmp / "tp2pp2", 2, 2)}


def import_with_torchrun(src: Path, out: Path, tp: int, pp: int) -> str:
    """`illada import hf --tp --pp`, which starts tp x pp processes with torchrun."""
    cmd = [sys.executable, "-m", "illada.cli", "import", "hf", str(src), "--out", str(out), "--tp", str(tp), "--pp", str(pp)]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"-> {out}" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
    return str(out)


@pytest.mark.parametrize("layout", ["tp1", "tp2pp2"])
def test_import_gives_llada_logits_and_generations(imported, layout):
    [(logits, generated, special, text)] = run_distributed(_logits_and_generation, 1, imported[layout], TOKENS, PROMPT, timeout=300)
    expected = llada_forward(imported["weights"], imported["config"], TOKENS)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    reference = llada_generate(lambda x: llada_forward(imported["weights"], imported["config"], x), PROMPT, steps=8, gen_length=8, block_length=4, mask_id=MASK)
    assert generated.tolist() == reference.tolist()
    # The tokenizer and its special ids travel with the checkpoint (no data root needed).
    assert (special.mask, special.pad, special.stop) == (MASK, EOT, (EOT, EOT_ID))
    assert text == "beta document <|endoftext|>"


def test_illada_generate_takes_an_import_as_it_is(imported):
    """The command line on an import: the prompt encoded with the tokenizer the checkpoint
    carries, LLaDA's own generation decoded the same (greedy, no repetition guard)."""
    tokenizer = Tokenizer.from_file(str(imported["src"] / "tokenizer.json"))
    text = "alpha beta document"
    prompt = torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids])
    reference = llada_generate(lambda x: llada_forward(imported["weights"], imported["config"], x), prompt, steps=8, gen_length=8, block_length=4, mask_id=MASK)
    answer = reference[0, prompt.shape[1] :].tolist()
    answer = answer[: next((i for i, t in enumerate(answer) if t in (EOT, EOT_ID)), len(answer))]
    cmd = [sys.executable, "-m", "illada.cli", "generate", imported["tp1"], "--prompt", text, "--gen-length", "8", "--steps", "8", "--block-length", "4", "--no-repetition-guard"]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == text + tokenizer.decode(answer, skip_special_tokens=False)


def test_checkpoint_is_complete_with_checksums_and_its_source(imported):
    from illada import storage
    from illada.layout import CHECKPOINT_MARKER as MARKER
    from illada.train.checkpoint import files_digest

    path = Path(imported["tp2pp2"])
    info = json.loads((path / MARKER).read_text())
    assert info["step"] == 0 and info["parallel"] == {"tensor": 2, "pipeline": 2, "data": 1}
    assert info["model"]["tie_word_embeddings"] == imported["config"]["weight_tying"] and info["model"]["num_query_groups"] == imported["config"]["n_kv_heads"]
    assert info["source"]["path"] == str(imported["src"])
    assert info["source"]["files"]["model-00002-of-00002.safetensors"] == storage.sha256_file(str(imported["src"] / "model-00002-of-00002.safetensors"))
    assert "tokenizer/tokenizer.json" in info["files"] and info["digest"] == files_digest(info["files"])
    for name, meta in info["files"].items():
        assert storage.sha256_file(str(path / name)) == meta["sha256"], name
    assert not Path(str(path) + ".partial").exists()


def test_export_round_trips_bit_exactly_at_every_layout(imported):
    tmp, source = imported["tmp"], imported["weights"]
    exported = export(imported["tp1"], tmp / "export-tp1")
    exported_tensors = read_safetensors(exported)
    assert set(exported_tensors) == set(source)
    for name, tensor in source.items():
        assert torch.equal(exported_tensors[name], tensor), name
    assert len(set(json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    from_tp2pp2 = read_safetensors(export(imported["tp2pp2"], tmp / "export-tp2pp2"))
    assert all(torch.equal(from_tp2pp2[n], t) for n, t in exported_tensors.items())
    config = json.loads((exported / "config.json").read_text())
    kept = {k: v for k, v in imported["config"].items() if k != "auto_map"}
    assert {k: config[k] for k in kept} == kept and config["torch_dtype"] == "float32"
    # The released code is not copied, so the export names where trust_remote_code finds it.
    assert config["auto_map"] == {
        "AutoConfig": "GSAI-ML/LLaDA-8B-Base--configuration_llada.LLaDAConfig",
        "AutoModel": "GSAI-ML/LLaDA-8B-Base--modeling_llada.LLaDAModelLM",
    }
    assert Tokenizer.from_file(str(exported / "tokenizer.json")).token_to_id("<|mdm_mask|>") == MASK
    # import -> export -> import: the second import exports the same bits again.
    again = read_safetensors(export(import_at(exported, tmp / "reimported"), tmp / "export-again"))
    assert all(torch.equal(again[n], t) for n, t in source.items())


def test_bf16_weights_are_kept_in_bf16_load_into_fp32_and_round_trip_bit_exactly(tmp_path):
    config = llada_config("mha-untied")
    weights = random_weights(config, torch.bfloat16, seed=3)
    checkpoint = import_at(write_llada(tmp_path / "hf", config, weights), tmp_path / "ckpt")
    shard_bytes = sum(p.stat().st_size for p in Path(checkpoint).glob("*.distcp"))
    assert shard_bytes < 4 * sum(t.numel() for t in weights.values())  # stored at 2 bytes a weight, not fp32's 4
    [(logits, *_)] = run_distributed(_logits_and_generation, 1, checkpoint, TOKENS, PROMPT, timeout=300)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), llada_forward(weights, config, TOKENS), rtol=1e-5, atol=1e-5)
    exported = read_safetensors(export(checkpoint, tmp_path / "export", dtype="bf16"))
    assert all(exported[n].dtype == torch.bfloat16 and torch.equal(exported[n], t) for n, t in weights.items())


# --- continued pre-training from an import ----------------------------------------------------


def _train(rank: int, raw: dict) -> str:
    from illada.config import load_config
    from illada.parallel import destroy_parallel
    from illada.train.trainer import train_loop

    train_loop(load_config(base=raw))
    destroy_parallel()
    return f"{raw['root']}/checkpoints"


def test_continued_pretraining_starts_from_the_import_and_the_lineage_names_its_source(tmp_path, ray_local):
    from illada.config import load_config
    from illada.lineage.graph import build
    from illada.lineage.render import text
    from illada.pipeline.runner import run_pipeline
    from illada.layout import CHECKPOINT_MARKER as MARKER, complete_checkpoints
    from illada.data.stages import PRETRAIN as STAGES

    config = llada_config("gqa-tied")
    weights = random_weights(config, torch.float32)
    src = write_llada(tmp_path / "hf", config, weights)
    imported = import_at(src, tmp_path / "llada")
    raw = TinyConfigFactory().raw(str(tmp_path / "run"), str(tmp_path / "raw"))
    raw["data"]["tokenizer"] = {"path": imported}  # tokenize with the released tokenizer and its ids
    run_pipeline(load_config(base=raw), STAGES)
    pack = json.loads((tmp_path / "run" / "pack" / "manifest.json").read_text())
    assert pack["stats"]["special_ids"]["mask"] == MASK and pack["stats"]["special_ids"]["eot"] == EOT

    model = json.loads((Path(imported) / MARKER).read_text())["model"]
    train = {"steps": 5, "global_batch_size": 4, "micro_batch_size": 4, "log_interval": 5, "optim": {"lr": 1e-3, "warmup_steps": 1}, "checkpoint": {"interval": 5}, "init_from": imported}
    [root] = run_distributed(_train, 1, {**raw, "model": model, "train": train}, timeout=300)
    [trained] = complete_checkpoints(root)
    info = json.loads((Path(trained) / MARKER).read_text())
    assert info["step"] == 5 and info["parent"] == imported and info["tokenizer"]["special_ids"]["mask"] == MASK

    # Five small steps moved the released weights a little (a fresh init would be far away).
    exported = export(trained, tmp_path / "export")
    assert json.loads((exported / "config.json").read_text())["init_fn"] == "normal"  # the import's config.json, inherited
    moved = read_safetensors(exported)
    change = max((moved[n] - t).abs().max().item() for n, t in weights.items())
    assert 0 < change < 0.02, change
    graph = text(build(trained))
    assert "initialised from" in graph and "converted from" in graph and str(src) in graph, graph
    from illada.lineage.verify import verify

    def released(findings):
        return [(f.kind, f.state) for f in findings if f.kind.startswith("released")]

    assert released(verify(build(trained)).findings) == [("released model", "ok")]
    (src / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))  # the source changed since
    assert released(verify(build(trained)).findings) == [("released file", "changed")]


def test_sft_from_an_import_with_illadas_chat_tokens(tmp_path, ray_local):
    """An iLLaDA-style release (GQA, tied, illada's role and mask tokens) fine-tuned directly."""
    from illada.config import load_config
    from illada.data.tokenizer import SPECIAL_TOKENS
    from illada.eval import toy_instruct
    from illada.pipeline.runner import run_pipeline
    from illada.layout import CHECKPOINT_MARKER as MARKER, complete_checkpoints
    from illada.data.stages import SFT as STAGES

    tokenizer = Tokenizer(models.WordLevel({f"{i}": i for i in range(WORDS)}, unk_token="0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    config = llada_config("gqa-tied", mask_token_id=ids["mask"], eos_token_id=ids["eot"], pad_token_id=ids["pad"])
    imported = import_at(write_llada(tmp_path / "hf", config, random_weights(config, torch.float32), tokenizer), tmp_path / "illada")
    assert json.loads((Path(imported) / MARKER).read_text())["tokenizer"]["special_ids"] == ids

    examples, _ = toy_instruct.split(toy_instruct.make_examples(64, seed=0, tasks=("copy",), lengths=(3, 3)), 8)
    toy_instruct.write_jsonl(examples, tmp_path / "raw" / "toy.jsonl")
    raw = {
        "name": "sft-from-import",
        "root": str(tmp_path / "run"),
        "ray": {"num_cpus": 2},
        "data": {
            "kind": "sft",
            "sources": [{"name": "toy", "paths": [str(tmp_path / "raw" / "toy.jsonl")], "format": "chat", "weight": 1, "id_field": "id"}],
            "dedup": {"exact": {"num_partitions": 2}, "fuzzy": {"enabled": False}},
            "tokenizer": {"path": imported},
            "sft": {"buckets": [32, 64]},
        },
    }
    run_pipeline(load_config(base=raw), STAGES)
    model = json.loads((Path(imported) / MARKER).read_text())["model"]
    train = {"objective": "sft", "sft": {"epochs": 1}, "global_batch_size": 8, "micro_batch_size": 8, "optim": {"lr": 1e-3, "warmup_steps": 1}, "checkpoint": {"interval": 100}, "init_from": imported}
    [root] = run_distributed(_train, 1, {**raw, "model": model, "train": train}, timeout=300)
    [trained] = complete_checkpoints(root)
    info = json.loads((Path(trained) / MARKER).read_text())
    assert info["step"] > 0 and info["parent"] == imported and info["tokenizer"]["special_ids"] == ids


LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def test_llada_instruct_tokenizers_get_its_released_chat_template():
    """LLaDA-8B-Instruct's template (Llama-3 headers, <|startoftext|> first), as the released
    tokenizer_config.json renders it, encoded whole by a byte-level BPE with Llama-3's split."""
    from tokenizers import Regex, decoders, trainers

    from illada.data.chat_template import ChatTemplate

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["system user assistant\n\nBe brief. What is 2+2? It is 4.\n\n"] * 20, trainer=trainer)
    tok.add_special_tokens(["<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|endoftext|>"])
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    rendered = (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    expected_prompt = tok.encode(rendered, add_special_tokens=False).ids  # special tokens recognised, as the release renders them
    expected_sample = tok.encode(rendered + "It is 4.<|eot_id|>", add_special_tokens=False).ids
    template = ChatTemplate(tok)  # (it makes the tokenizer read contents as plain text)
    assert template.prompt(conversation) == expected_prompt
    [(tokens, prompt_len)] = template.samples([[*conversation, {"role": "assistant", "content": "It is 4."}]])
    assert tokens == expected_sample
    assert prompt_len == len(template.prompt(conversation))


# --- bad input: one line, exit 2, before any model is built -------------------------------------


def cli(*argv: str) -> tuple[int, str]:
    from illada.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


def _broken(tmp_path: Path, how: str) -> Path:
    config = llada_config("mha-untied")
    weights = random_weights(config, torch.float32)
    tokenizer = None
    if how == "architecture":
        config["architectures"] = ["LlamaForCausalLM"]
    elif how == "shape":
        config["mlp_hidden_size"] = 128
    elif how == "no-mask":
        del config["mask_token_id"]
        tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(WORDS)}, unk_token="w0"))
        tokenizer.add_special_tokens(["<|endoftext|>"])
    src = write_llada(tmp_path / how, config, weights, tokenizer)
    if how == "shard":
        (src / "model-00002-of-00002.safetensors").unlink()
    return src


@pytest.mark.parametrize(
    "how, message",
    [
        ("shard", "is missing shard(s) model-00002-of-00002.safetensors listed in model.safetensors.index.json"),
        ("architecture", "config.json names architecture(s) ['LlamaForCausalLM']; only LLaDAModelLM (LLaDA's format) can be imported"),
        ("shape", "weight model.transformer.blocks.0.ff_proj.weight has shape [96, 64] but config.json implies [128, 64]"),
        ("no-mask", "the tokenizer has no mask token (<|mdm_mask|> or <|mask|>) and config.json has no mask_token_id"),
    ],
)
def test_bad_directories_are_refused_in_one_line(tmp_path, how, message):
    code, err = cli("import", "hf", str(_broken(tmp_path, how)), "--out", str(tmp_path / "out"))
    last = err.splitlines()[-1]  # (import-time library warnings may come before it)
    assert code == 2 and last.startswith("illada: error: ") and message in last and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_never_overwritten(tmp_path):
    src = write_llada(tmp_path / "hf", llada_config("gqa-tied"), random_weights(llada_config("gqa-tied"), torch.float32))
    (tmp_path / "out").mkdir()
    code, err = cli("import", "hf", str(src), "--out", str(tmp_path / "out"))
    assert code == 2 and "exists already; remove it or choose another --out" in err
    shutil.rmtree(tmp_path / "out")


def test_init_from_refuses_weights_of_another_shape():
    from illada.config import ConfigError
    from illada.model.config import ModelConfig
    from illada.train.checkpoint import check_same_shape

    llada, illada_8b = ModelConfig(preset="llada-8b").model_dump(), ModelConfig(preset="illada-8b").model_dump()
    check_same_shape(llada, {**llada, "max_seq_len": 8192}, "ckpt")  # positions are not weights
    with pytest.raises(ConfigError, match=r"holds a model with num_query_groups=8 \(model.num_query_groups is 32\), .*tie_word_embeddings=True"):
        check_same_shape(llada, illada_8b, "ckpt")


def test_a_checkpoint_never_imported_exports_llada_s_config_pointing_at_its_public_code():
    from illada.hf.convert import hf_config, model_config
    from illada.model.config import ModelConfig

    cfg = ModelConfig(preset="tiny", vocab_size=512)
    config = hf_config(cfg, {"mask": 5, "eot": 1, "pad": 1}, torch.bfloat16)
    assert model_config(config).model_dump(exclude={"preset"}) == cfg.model_dump(exclude={"preset"})  # the whole shape
    assert config["architectures"] == ["LLaDAModelLM"] and config["torch_dtype"] == "bfloat16"
    assert (config["mask_token_id"], config["eos_token_id"]) == (5, 1)
    assert all(ref.startswith("GSAI-ML/LLaDA-8B-Base--") for ref in config["auto_map"].values())
