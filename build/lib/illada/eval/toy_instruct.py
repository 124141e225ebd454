"""Instruction tasks whose answers can be checked, for SFT smoke tests and bench/sft_modes.py.

    examples = make_examples(200, seed=0)                 # [{"messages": [...], "answer": "..."}]
    write_jsonl(examples, "sft/raw/train.jsonl")           # the SFT pipeline's chat format
    evaluate(loaded, held_out, sampler_config)             # {"exact": ..., "form": ..., "chars": ...}
    answer_nll(loaded, held_out)                           # nats per answer token, all of it masked

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


def score(replies: list[str], examples: list[dict]) -> dict[str, float]:
    """How well replies answer their examples, each a share in [0, 1]:
    exact: the reply is the answer (surrounding whitespace aside);
    form: the reply is an answer of the right shape (digits, as many as the answer has);
    chars: the answer's characters the reply has in their place (chance: 0.1 per digit)."""
    got = [r.strip() for r in replies]
    answers = [e["answer"] for e in examples]
    exact = sum(g == a for g, a in zip(got, answers))
    form = sum(g.isdigit() and len(g) == len(a) for g, a in zip(got, answers))
    chars = sum(sum(x == y for x, y in zip(g, a)) / len(a) for g, a in zip(got, answers))
    n = len(examples)
    return {"exact": exact / n, "form": form / n, "chars": chars / n}


def evaluate(loaded, examples: list[dict], sampler_config, batch_size: int = 64) -> dict[str, float]:
    """`score` of the checkpoint's generated replies to the examples' conversations
    (without their answers)."""
    from illada.chat import replies

    got = []
    for i in range(0, len(examples), batch_size):
        got += replies(loaded, [e["messages"][:-1] for e in examples[i : i + batch_size]], sampler_config)
    return score(got, examples)


def answer_nll(loaded, examples: list[dict], batch_size: int = 64) -> float:
    """The mean cross-entropy (nats per token) of the examples' answers, response and
    end-of-turn, predicted in one pass with every answer position masked and the prompt
    clean: how likely the checkpoint finds the right answers (lower is better)."""
    import torch
    import torch.nn.functional as F

    from illada.data.chat_template import ChatTemplate
    from illada.sampling.model import left_pad

    template = ChatTemplate(loaded.tokenizer)
    total = count = 0.0
    for i in range(0, len(examples), batch_size):
        samples = template.samples([e["messages"] for e in examples[i : i + batch_size]])
        clean, keep = left_pad([torch.tensor(t) for t, _ in samples], loaded.special.pad)
        width = clean.shape[1]
        answer = torch.zeros_like(clean, dtype=torch.bool)
        for row, (tokens, prompt_len) in enumerate(samples):
            answer[row, width - len(tokens) + prompt_len :] = True
        noised = clean.masked_fill(answer, loaded.special.mask).to(loaded.device)
        logits = loaded.model(noised, None if keep is None else keep.to(loaded.device)).float()
        ce = F.cross_entropy(logits[answer.to(loaded.device)], clean.to(loaded.device)[answer.to(loaded.device)], reduction="sum")
        total += ce.item()
        count += int(answer.sum())
    return total / count


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m illada.eval.toy_instruct", description="Write toy instruction conversations (copy / reverse / add digits) as SFT jsonl.")
    p.add_argument("out", help="the training jsonl to write; the held-out examples go beside it as <out>.held-out.jsonl")
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--held-out", type=int, default=64)
    p.add_argument("--tasks", default="copy,reverse", help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--digits", type=int, default=3, help="digit-string length of copy and reverse")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    examples = make_examples(args.examples, args.seed, tuple(args.tasks.split(",")), (args.digits, args.digits))
    train, held_out = split(examples, args.held_out)
    print(write_jsonl(train, args.out), write_jsonl(held_out, f"{args.out}.held-out.jsonl"))


if __name__ == "__main__":
    main()
