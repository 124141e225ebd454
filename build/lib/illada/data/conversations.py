"""Conversations for SFT: what a valid one is, and its canonical text.

A conversation is a list of messages {role, content}: an optional system message first,
then user and assistant turns alternating, starting with a user turn and ending with an
assistant turn (the response trained on). Content is a non-blank string. Other keys of a
message are dropped.

Ingest stores a valid conversation as its canonical JSON text (keys in a fixed order, no
whitespace), so the dedup stages treat it as any document's text: two conversations are
exact duplicates when their messages are.
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant")


class InvalidConversation(ValueError):
    """`str(e)` is a quarantine problem: "<reason>: <detail>"."""


def canonical(messages: object, field: str = "messages") -> str:
    """The canonical JSON text of a valid conversation; raises InvalidConversation."""
    return json.dumps(validate(messages, field), ensure_ascii=False, separators=(",", ":"))


def parse(text: str) -> list[dict[str, str]]:
    """The messages of a canonical text (as ingest wrote it)."""
    return json.loads(text)


def validate(messages: object, field: str = "messages") -> list[dict[str, str]]:
    """The messages as [{role, content}], checked; raises InvalidConversation saying why not."""
    if messages is None:
        raise InvalidConversation(f"missing_messages: no {field!r} field")
    if not isinstance(messages, list):
        raise InvalidConversation(f"bad_messages: {field!r} is a {type(messages).__name__}, not a list")
    if not messages:
        raise InvalidConversation(f"bad_messages: {field!r} is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidConversation(f"bad_messages: message {i} is a {type(m).__name__}, not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidConversation(f"bad_role: message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidConversation(f"bad_content: message {i} ({role}) has content of type {type(content).__name__}, not a string")
        if not content.strip():
            raise InvalidConversation(f"empty_content: message {i} ({role}) is blank")
        out.append({"role": role, "content": content})
    _check_order([m["role"] for m in out])
    return out


def _check_order(roles: list[str]) -> None:
    turns = roles[1:] if roles[0] == "system" else roles
    if "system" in turns:
        raise InvalidConversation(f"bad_order: a system message may only come first (message {roles.index('system', 1)})")
    if "user" not in turns:
        raise InvalidConversation("no_user_turn: the conversation has no user message")
    if turns[-1] != "assistant":
        raise InvalidConversation(f"no_response: the last message is from {turns[-1]}, not assistant")
    offset = len(roles) - len(turns)
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise InvalidConversation(f"bad_order: message {i + offset} is from {role}; turns alternate user, assistant starting with user")
