"""The special tokens a masked-diffusion model needs, by role, and their ids in a tokenizer.

Light (only `tokenizers`), so inference and chat find them without the data pipeline.
"""

from __future__ import annotations

from tokenizers import Tokenizer

SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "eot": "<|endoftext|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "mask": "<|mask|>",
    "end_of_turn": "<|eot|>",
}


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[n] for n, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}")
    return ids


def plain_text(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer set to encode special-token strings found in text as ordinary text
    (tokenizers' `encode_special_tokens`), never as their special ids. Returns it."""
    tokenizer.encode_special_tokens = True
    return tokenizer
