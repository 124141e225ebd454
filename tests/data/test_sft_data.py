"""The SFT data pipeline: conversations checked and quarantined, deduplicated, put through
the chat template with the pre-training tokenizer, padded to length buckets; overlong
samples counted and dropped or truncated; run by `illada pipeline run` from data.kind."""

from __future__ import annotations

import contextlib
import io
import json

import pyarrow as pa
import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from illada.config import ConfigError, load_config
from illada.data import conversations
from illada.data.chat_template import ChatTemplate
from illada.data.documents import read_table
from illada.data.shards import read_sequences
from illada.data.tokenizer import SPECIAL_TOKENS
from tests.helpers import write_jsonl

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"


def msg(role: str, content) -> dict:
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    """A pre-training tokenizer whose special tokens are NOT at ids 0-6 (they come after
    the byte alphabet, in reverse order), so any hard-coded id would show."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["add the numbers 1 2 3 and reply with the sum"] * 10, trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values())[::-1])
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_text(tokenizer.to_str())
    return str(path)


# --- conversations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, reason",
    [
        (None, "missing_messages"),
        ("hello", "bad_messages"),
        ([], "bad_messages"),
        (["hi"], "bad_messages"),
        ([msg("tool", "x"), msg(ASSISTANT, "y")], "bad_role"),
        ([msg(USER, ["x"]), msg(ASSISTANT, "y")], "bad_content"),
        ([msg(USER, "  "), msg(ASSISTANT, "y")], "empty_content"),
        ([msg(USER, "x"), msg(SYSTEM, "s"), msg(ASSISTANT, "y")], "bad_order"),
        ([msg(SYSTEM, "s"), msg(ASSISTANT, "y")], "no_user_turn"),
        ([msg(USER, "x"), msg(ASSISTANT, "y"), msg(USER, "z")], "no_response"),
        ([msg(USER, "x"), msg(USER, "x2"), msg(ASSISTANT, "y")], "bad_order"),
        ([msg(ASSISTANT, "y"), msg(USER, "x"), msg(ASSISTANT, "y")], "bad_order"),
    ],
)
def test_malformed_conversations_are_refused_with_a_reason(messages, reason):
    with pytest.raises(conversations.InvalidConversation) as e:
        conversations.validate(messages)
    assert str(e.value).split(":", 1)[0] == reason


def test_a_valid_conversation_has_one_canonical_text():
    a = [{"content": "hi", "role": "user", "name": "bob"}, msg(ASSISTANT, "hello")]
    b = [msg(USER, "hi"), msg(ASSISTANT, "hello")]
    assert conversations.canonical(a) == conversations.canonical(b) == '[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]'
    assert conversations.parse(conversations.canonical(b)) == b


def test_the_chat_template_is_built_from_the_tokenizers_role_tokens(tokenizer_path):
    tokenizer = Tokenizer.from_file(tokenizer_path)
    template = ChatTemplate(tokenizer)
    ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    assert ids["eot"] != 1 and ids["user"] != 3  # not the trained tokenizer's fixed ids

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    conversation = [msg(SYSTEM, "be brief"), msg(USER, "add 1 2"), msg(ASSISTANT, "3"), msg(USER, "add 2 2"), msg(ASSISTANT, "4")]
    [(tokens, prompt_len)] = template.samples([conversation])
    prompt = [ids["system"], *enc("be brief"), ids["end_of_turn"], ids["user"], *enc("add 1 2"), ids["end_of_turn"]]
    prompt += [ids["assistant"], *enc("3"), ids["end_of_turn"], ids["user"], *enc("add 2 2"), ids["end_of_turn"], ids["assistant"]]
    assert tokens == prompt + enc("4") + [ids["end_of_turn"]]
    assert prompt_len == len(prompt)
    assert template.prompt(conversation[:-1]) == prompt  # what chat asks the model to continue


# --- the pipeline -------------------------------------------------------------------------------


def sft_config(tmp_path, tokenizer_path: str, sources: list[dict], **sft) -> dict:
    return {
        "name": "sft-test",
        "root": str(tmp_path / "run"),
        "ray": {"num_cpus": 2},
        "data": {
            "kind": "sft",
            "sources": sources,
            "dedup": {"exact": {"num_partitions": 2}, "fuzzy": {"enabled": False}},
            "tokenizer": {"path": tokenizer_path},
            "ingest": {"max_quarantine_fraction": 0.5},
            "sft": {"buckets": [16, 24], "samples_per_shard": 4, **sft},
        },
    }


def cli(*argv: str) -> tuple[int, str]:
    from illada.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def samples_of(root) -> list[dict]:
    manifest = json.loads((root / "pack" / "manifest.json").read_text())
    rows = []
    for f in manifest["files"]:
        table = read_sequences(str(root / f["path"]))
        assert table.schema.metadata[b"illada.format"] == b"sft-samples/1"
        rows += table.to_pylist()
    return sorted(rows, key=lambda r: r["id"])


def test_the_sft_pipeline_end_to_end(tmp_path, tokenizer_path, ray_local):
    good = [
        {"id": "a1", "messages": [msg(USER, "add 1 2"), msg(ASSISTANT, "3")]},
        {"id": "a2", "messages": [msg(SYSTEM, "be brief"), msg(USER, "add 2 2"), msg(ASSISTANT, "4")]},
        {"id": "a3", "messages": [msg(USER, "add 1 1"), msg(ASSISTANT, "2"), msg(USER, "and 2 3"), msg(ASSISTANT, "5")]},
        {"id": "long", "messages": [msg(USER, "add " + " ".join("1" * 12)), msg(ASSISTANT, "12 " * 6)]},
        {"id": "dup", "messages": [msg(USER, "add 1 2"), msg(ASSISTANT, "3")]},  # a1 again
    ]
    bad = [
        {"id": "b1", "messages": [msg(USER, "no answer")]},
        {"id": "b2", "messages": [msg("robot", "x"), msg(ASSISTANT, "y")]},
        {"id": "b3", "text": "not a conversation"},
    ]
    write_jsonl(tmp_path / "raw" / "toy.jsonl", good + bad)
    sources = [{"name": "toy", "paths": [str(tmp_path / "raw" / "toy.jsonl")], "format": "chat", "weight": 1, "id_field": "id"}]
    config_path = tmp_path / "sft.yaml"
    config_path.write_text(yaml.safe_dump(sft_config(tmp_path, tokenizer_path, sources)))

    code, out = cli("pipeline", "run", str(config_path))
    assert code == 0
    assert "wrote 3 SFT samples" in out and "1 dropped" in out
    root = tmp_path / "run"

    # Quarantine: every malformed conversation, with its reason and the raw record.
    quarantine = [json.loads(line) for f in (root / "ingest" / "quarantine" / "toy").iterdir() for line in f.read_text().splitlines()]
    assert sorted(q["reason"] for q in quarantine) == ["bad_role", "missing_messages", "no_response"]
    assert {q["raw"] for q in quarantine if q["reason"] == "no_response"} == {json.dumps(bad[0])}

    # Exact dedup works on the canonical text: "dup" is gone, a1 (the earliest) kept.
    manifest = json.loads((root / "pack" / "manifest.json").read_text())
    stats = manifest["stats"]
    assert stats["format"] == "sft" and stats["seq_len"] == 24 and stats["samples"] == 3
    assert stats["dropped"] == 1 and stats["sources"]["toy"]["dropped"] == 1 and stats["truncated"] == 0

    tokenizer = Tokenizer.from_file(tokenizer_path)
    ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    assert stats["special_ids"] == ids
    template = ChatTemplate(tokenizer)
    rows = samples_of(root)
    assert [r["id"] for r in rows] == ["a1", "a2", "a3"]
    for row, conversation in zip(rows, [good[0]["messages"], good[1]["messages"], good[2]["messages"]]):
        [(expected, prompt_len)] = template.samples([conversation])
        tokens, p, r = row["tokens"], row["prompt_len"], row["response_len"]
        assert len(tokens) in (16, 24) and len(tokens) == min(b for b in (16, 24) if b >= len(expected))
        assert tokens[:p] == expected[:prompt_len] and tokens[p - 1] == ids["assistant"]  # the prompt span
        assert tokens[p : p + r] == expected[prompt_len:] and tokens[p + r - 1] == ids["end_of_turn"]  # the response
        assert tokens[p + r :] == [ids["eot"]] * row["pad"] and p + r + row["pad"] == len(tokens)  # end-of-text padding
    assert sum(r["pad"] for r in rows) == stats["pad_tokens"]

    # A second run finds everything up to date; status says so.
    code, out = cli("pipeline", "run", str(config_path))
    assert json.loads((root / "pack" / "manifest.json").read_text())["created_unix"] == manifest["created_unix"]
    code, out = cli("pipeline", "status", str(config_path))
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [
        [name, "complete"] for name in ("ingest", "dedup_exact", "dedup_fuzzy", "decontaminate", "tokenizer", "chat", "pack")
    ]

    # Truncating instead: the long sample is cut to the last bucket, its prompt whole.
    code, out = cli("pipeline", "run", str(config_path), "data.sft.overlong=truncate", "--stage", "pack")
    truncated = json.loads((root / "pack" / "manifest.json").read_text())["stats"]
    assert truncated["truncated"] == 1 and truncated["dropped"] == 0 and truncated["samples"] == 4
    long = next(r for r in samples_of(root) if r["id"] == "long")
    [(expected, prompt_len)] = template.samples([good[3]["messages"]])
    assert long["tokens"] == expected[:24] and long["prompt_len"] == prompt_len and long["pad"] == 0


def test_configs_say_what_to_fix(tmp_path, tokenizer_path):
    chat = {"name": "c", "paths": [str(tmp_path)], "format": "chat", "weight": 1}
    plain = {"name": "p", "paths": [str(tmp_path)], "weight": 1}

    def config(*overrides: str, sources=(chat,), **sections):
        return load_config(base={**sft_config(tmp_path, tokenizer_path, list(sources)), **sections}, overrides=list(overrides))

    assert config().data.sft.max_len == 24
    with pytest.raises(ConfigError, match="needs tokenizer.path: the pre-training run's tokenizer.json"):
        config("data.tokenizer.path=null")
    with pytest.raises(ConfigError, match="format 'auto' but data.kind is 'sft': set its format: chat"):
        config(sources=[plain])
    with pytest.raises(ConfigError, match="set data.kind: sft"):
        config("data.kind=pretrain")
    with pytest.raises(ConfigError, match="ascending"):
        config("data.sft.buckets=[32, 16]")
    train = {"data_root": str(tmp_path), "global_batch_size": 4}
    assert config(train={**train, "objective": "sft", "sft": {"epochs": 3}}).train.steps is None
    with pytest.raises(ConfigError, match="train.steps is required"):
        config(train=train)
    with pytest.raises(ConfigError, match="not both"):
        config(train={**train, "steps": 5, "objective": "sft", "sft": {"epochs": 3}})
    with pytest.raises(ConfigError, match="sft.epochs applies to train.objective: sft"):
        config(train={**train, "sft": {"epochs": 3}})


def test_chat_parquet_records_are_read_too(tmp_path, tokenizer_path):
    from illada.config import IngestConfig, SourceConfig
    from illada.data.ingest import expand_paths, ingest_task, plan_tasks

    table = pa.table({"id": ["x", "y"], "conversation": [[msg(USER, "add 1 2"), msg(ASSISTANT, "3")], [msg(USER, "hi")]]})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "chats.parquet")
    source = SourceConfig(name="pq", paths=[str(tmp_path / "chats.parquet")], format="chat", messages_field="conversation", weight=1, id_field="id")
    [task] = plan_tasks(source, expand_paths(source))
    spec = {**task, "source": source.model_dump(mode="json"), "ingest": IngestConfig().model_dump(mode="json")}
    result = ingest_task({**spec, "docs_url": str(tmp_path / "docs.parquet"), "quarantine_url": str(tmp_path / "q.jsonl")})
    assert result["documents"] == 1 and result["quarantined"] == {"no_response": 1}
    [doc] = read_table(str(tmp_path / "docs.parquet")).to_pylist()
    assert conversations.parse(doc["text"]) == [msg(USER, "add 1 2"), msg(ASSISTANT, "3")] and doc["id"] == "x"
