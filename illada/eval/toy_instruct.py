"""Instruction tasks whose answers can be checked, for SFT smoke tests and bench/sft_modes.py.

    examples = make_examples(200, seed=0)                 # [{"messages": [...], "answer": "..."}]
    write_jsonl(examples, "sft/raw/train.jsonl")           # the SFT pipeline's chat format
    exact_match(loaded, held_out, sampler_config)          # the share of replies equal to the answer

Each task is an instruction over a short string of digits: copy it, reverse it, or add two
digits. A model that never saw the chat template cannot answer; one fine-tuned on it can,
exactly, so the accuracy of generated replies measures what SFT taught.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS = ("copy", "reverse", "add")


def _example(task: str, rng: random.Random, length: int) -> tuple[str, str]:
    if task == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return f"add {a} {b}", str(a + b)
    digits = "".join(str(rng.randrange(10)) for _ in range(length))
    return f"{task} {digits}", digits if task == "copy" else digits[::-1]


def make_examples(n: int, seed: int, tasks: tuple[str, ...] = TASKS, lengths: tuple[int, int] = (2, 5)) -> list[dict]:
    """n distinct conversations (a user instruction, the assistant's answer), drawn with
    `seed`; digit strings have lengths in [lengths[0], lengths[1]]."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        task = tasks[len(out) % len(tasks)]
        for _ in range(10_000):
            prompt, answer = _example(task, rng, rng.randint(*lengths))
            if prompt not in seen:
                break
        else:
            raise ValueError(f"task {task!r} has too few distinct prompts for {n} examples; ask for fewer or longer digit strings")
        seen.add(prompt)
        out.append({"id": f"{seed}-{len(out)}", "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "answer": answer})
    return out


def split(examples: list[dict], held_out: int) -> tuple[list[dict], list[dict]]:
    """(training examples, held-out examples): the held-out prompts are never trained on."""
    return examples[held_out:], examples[:held_out]


def write_jsonl(examples: list[dict], path: str | Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": e["id"], "messages": e["messages"]}) + "\n" for e in examples))
    return str(path)


def exact_match(loaded, examples: list[dict], sampler_config, batch_size: int = 64) -> float:
    """The share of examples whose generated reply (to the conversation without its answer)
    is exactly the answer, surrounding whitespace aside."""
    from illada.chat import replies

    right = 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        got = replies(loaded, [e["messages"][:-1] for e in batch], sampler_config)
        right += sum(g.strip() == e["answer"] for g, e in zip(got, batch))
    return right / len(examples)
