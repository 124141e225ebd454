"""decontaminate: a document sharing a 13-word run with an evaluation text is removed (or
flagged) with its reason, counted per benchmark; one sharing only 12 words is kept."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import Tokenizer

from illada.config import ConfigError
from illada.data.documents import read_table
from illada.data.decontaminate import PROJECT_TASKS
from illada.pipeline.runner import run_pipeline
from illada.data.stages import PRETRAIN as STAGES
from tests.helpers import make_config, write_jsonl

UPTO_DECONTAMINATE = STAGES[: [s.name for s in STAGES].index("decontaminate") + 1]

QUESTION = "which river flows through the ancient city that was founded on seven hills according to the legend of its twin founders"


def word_count(text: str) -> int:
    return len([w for w in re.split(r"[^0-9A-Za-z_]+", text) if w])


def project_text() -> str:
    """A text of the project's own lm-eval data (toy_text.jsonl), as it is there."""
    return json.loads((PROJECT_TASKS / "toy_text.jsonl").read_text().splitlines()[0])["text"]


def corpus(tmp_path) -> dict[str, str]:
    words = QUESTION.split()
    docs = {
        "clean-0": "a page about cooking pasta with tomatoes garlic olive oil and fresh basil leaves from the garden",
        "clean-1": "notes on the weather this week rain on monday sun on tuesday and wind for the rest of it",
        # 12 words of the question in a row, then another word: not a 13-gram match.
        "near-miss": "quiz night " + " ".join(words[:12]) + " banana " + " ".join(words[13:]),
        # 13 words of the question, in other case and punctuation.
        "leaked-user": "Trivia! " + " ".join(w.upper() for w in words[3:16]) + "? The answer is the Tiber.",
        # the project's own evaluation text inside a longer page
        "leaked-project": "Here is some code I found online:\n" + project_text() + "\nHope it helps.",
    }
    write_jsonl(tmp_path / "raw" / "web.jsonl", [{"id": k, "text": v} for k, v in docs.items()])
    write_jsonl(tmp_path / "evals" / "trivia.jsonl", [{"question": QUESTION, "choices": ["tiber", "po"], "answer": 0}])
    return docs


def config(tmp_path, *overrides: str):
    sources = [{"name": "web", "paths": [str(tmp_path / "raw")], "weight": 1, "id_field": "id"}]
    eval_set = f"data.decontaminate.eval_sets=[{{name: trivia, path: {tmp_path / 'evals' / 'trivia.jsonl'}, fields: [question]}}]"
    return make_config(tmp_path / "run", sources, [eval_set, *overrides])


def rows(root, manifest: dict, kind: str) -> list[dict]:
    out = []
    for f in sorted((f for f in manifest["files"] if f["kind"] == kind), key=lambda f: f["path"]):
        out += read_table(f"{root}/{f['path']}").to_pylist()
    return out


def test_contaminated_documents_are_removed_with_their_reason(tmp_path, ray_local):
    docs = corpus(tmp_path)
    cfg = config(tmp_path)
    manifest = run_pipeline(cfg, UPTO_DECONTAMINATE)["decontaminate"]

    kept = {r["id"] for r in rows(cfg.root, manifest, "documents")}
    assert kept == {"clean-0", "clean-1", "near-miss"}
    side = {r["id"]: r for r in rows(cfg.root, manifest, "contaminated")}
    assert set(side) == {"leaked-user", "leaked-project"}
    assert side["leaked-user"]["benchmarks"] == ["trivia"]
    assert side["leaked-user"]["reason"] == 'shares a 13-word n-gram with trivia: "' + " ".join(QUESTION.split()[3:16]) + '"'
    assert side["leaked-project"]["benchmarks"] == ["toy_text"]
    assert side["leaked-project"]["text"] == docs["leaked-project"]  # the whole document, untouched

    stats = manifest["stats"]
    assert (stats["documents_in"], stats["contaminated"], stats["documents_out"]) == (5, 2, 3)
    assert stats["benchmarks"]["trivia"] == {"documents": 1, "words": word_count(docs["leaked-user"]), "texts": 1, "too_short": 0}
    assert stats["benchmarks"]["toy_text"]["documents"] == 1
    assert stats["benchmarks"]["toy_text"]["words"] == word_count(docs["leaked-project"])
    assert stats["benchmarks"]["toy_mc"]["documents"] == 0 and stats["benchmarks"]["toy_mc"]["texts"] > 0

    # the next stages read only what was kept; tokenize counts the removed ones' tokens
    after = run_pipeline(cfg, STAGES[: [s.name for s in STAGES].index("tokenize") + 1])
    assert after["tokenizer"]["inputs"] == {"decontaminate": manifest["digest"]}
    tokenizer = Tokenizer.from_file(f"{cfg.root}/tokenizer/tokenizer.json")
    tokens = {k: len(tokenizer.encode(docs[k], add_special_tokens=False).ids) for k in ("leaked-user", "leaked-project")}
    assert after["tokenize"]["stats"]["contaminated_tokens"] == {"toy_text": tokens["leaked-project"], "trivia": tokens["leaked-user"]}


def test_flag_keeps_the_documents_and_marks_them(tmp_path, ray_local):
    corpus(tmp_path)
    cfg = config(tmp_path, "data.decontaminate.action=flag", "data.decontaminate.project_tasks=false")
    manifest = run_pipeline(cfg, UPTO_DECONTAMINATE)["decontaminate"]

    kept = {r["id"]: json.loads(r["metadata"]) for r in rows(cfg.root, manifest, "documents")}
    assert set(kept) == {"clean-0", "clean-1", "near-miss", "leaked-user", "leaked-project"}
    assert kept["leaked-user"]["contamination"] == ["trivia"]
    assert "contamination" not in kept["leaked-project"]  # project tasks were not matched
    assert [r["id"] for r in rows(cfg.root, manifest, "contaminated")] == ["leaked-user"]
    assert manifest["stats"]["action"] == "flag" and list(manifest["stats"]["benchmarks"]) == ["trivia"]


def test_a_missing_eval_set_is_a_config_error(tmp_path, ray_local):
    corpus(tmp_path)
    cfg = make_config(
        tmp_path / "run",
        [{"name": "web", "paths": [str(tmp_path / "raw")], "weight": 1}],
        [f"data.decontaminate.eval_sets=[{{name: gone, path: {tmp_path / 'nope.jsonl'}}}]"],
    )
    with pytest.raises(ConfigError, match="nope.jsonl does not exist"):
        run_pipeline(cfg, UPTO_DECONTAMINATE)
