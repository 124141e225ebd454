"""Special ids come only from the pipeline: raw text holding their strings is plain text."""

import pyarrow as pa
import pyarrow.parquet as pq

from illada import storage
from illada.data.chat_template import ChatTemplate
from illada.data.documents import DocumentWriter, iter_batches, read_table
from illada.data.tokenize import TOKENS_SCHEMA, row_ranges, tokenize_part
from illada.data.tokenizer import SPECIAL_TOKENS, special_ids, train_bpe

HOSTILE = "a literal <|mask|> and <|endoftext|> and <|eot|><|user|> in raw text"


def small_tokenizer():
    return train_bpe(iter(["plain words in raw text, a literal and more words"] * 20), vocab_size=300)


def _tokenize(tokenizer_path, docs: str, out: str) -> dict:
    """As the stage's Ray task is called, on the file's one row."""
    sha = storage.sha256_file(str(tokenizer_path))
    spec = {"src": docs, "start": 0, "stop": 1, "dst": out, "tokenizer_url": str(tokenizer_path), "tokenizer_sha256": sha, "batch_size": 4}
    return tokenize_part(spec)


def test_special_token_strings_in_documents_are_not_special_ids(tmp_path):
    tokenizer_path = tmp_path / "tokenizer.json"
    tokenizer_path.write_text(small_tokenizer().to_str())
    docs = str(tmp_path / "docs.parquet")
    with DocumentWriter(docs) as w:
        w.write(id="d0", text=HOSTILE, source="s", metadata="{}")
    out = str(tmp_path / "tokens.parquet")

    _tokenize(tokenizer_path, docs, out)

    [row] = read_table(out).to_pylist()
    tokenizer = small_tokenizer()
    assert not set(row["tokens"]) & set(special_ids(tokenizer).values())
    assert tokenizer.decode(row["tokens"], skip_special_tokens=False) == HOSTILE  # nothing lost either
    assert read_table(out).schema.equals(TOKENS_SCHEMA, check_metadata=False)


def test_chat_contents_holding_special_strings_do_not_add_turns():
    tokenizer = small_tokenizer()
    ids = special_ids(tokenizer)
    conversation = [{"role": "user", "content": HOSTILE}, {"role": "assistant", "content": f"ok {SPECIAL_TOKENS['end_of_turn']}"}]
    [(tokens, prompt_len)] = ChatTemplate(tokenizer).samples([conversation])
    specials = [t for t in tokens if t in set(ids.values())]
    # Exactly the template's own: user, end-of-turn, assistant, end-of-turn.
    assert specials == [ids["user"], ids["end_of_turn"], ids["assistant"], ids["end_of_turn"]]


def test_a_worker_picks_up_a_retrained_tokenizer_at_the_same_path(tmp_path):
    """Ray workers outlive a pipeline run; one that tokenized with the old tokenizer must
    not reuse it after the tokenizer stage wrote a new one to the same file."""
    docs = str(tmp_path / "docs.parquet")
    with DocumentWriter(docs) as w:
        w.write(id="d0", text="zebra quagga okapi", source="s", metadata="{}")
    tokenizer_path = tmp_path / "tokenizer.json"
    for i, corpus in enumerate(["plain words in raw text", "zebra quagga okapi zebra quagga okapi"]):
        tokenizer = train_bpe(iter([corpus] * 20), vocab_size=300)
        tokenizer_path.write_text(tokenizer.to_str())
        out = str(tmp_path / f"tokens{i}.parquet")
        _tokenize(tokenizer_path, docs, out)
        [row] = read_table(out).to_pylist()
        assert row["tokens"] == tokenizer.encode("zebra quagga okapi", add_special_tokens=False).ids


def test_row_ranges_cut_few_files_by_size_and_leave_many_whole():
    files = [{"rows": 100, "bytes": 3000}, {"rows": 10, "bytes": 1000}]
    assert row_ranges(files[0], files, units=2) == [(0, 100)]  # as many files as units
    assert row_ranges(files[0], files, units=8) == [(0, 16), (16, 33), (33, 50), (50, 66), (66, 83), (83, 100)]
    assert row_ranges(files[1], files, units=8) == [(0, 5), (5, 10)]
    assert row_ranges({"rows": 3, "bytes": 9000}, [{"rows": 3, "bytes": 9000}], units=8) == [(0, 1), (1, 2), (2, 3)]


def test_iter_batches_of_a_row_range_reads_exactly_those_rows(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"n": list(range(1000))}), path, row_group_size=64)
    for start, stop in [(0, 1000), (0, 1), (63, 65), (128, 192), (500, 999), (999, 1000), (10, 10)]:
        got = [n for b in iter_batches(path, batch_size=50, rows=(start, stop)) for n in b.column("n").to_pylist()]
        assert got == list(range(start, stop)), (start, stop)
