"""Data of the repository's local lm-evaluation-harness tasks: JSON lines beside this file,
read without the Hugging Face hub (which these tasks never reach)."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**_) -> datasets.DatasetDict:
    return _load("toy_mc.jsonl")


def completion(**_) -> datasets.DatasetDict:
    return _load("toy_gen.jsonl")


def text(**_) -> datasets.DatasetDict:
    return _load("toy_text.jsonl")


def starts_with_target(doc: dict, results: list[str]) -> dict:
    """generate_until's metric for the completion task: the completion begins with the target."""
    return {"prefix_match": float(results[0].startswith(doc["target"]))}
