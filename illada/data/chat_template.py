"""The chat template: conversations as token ids, built from the tokenizer's role tokens.

    <|system|>You are terse.<|eot|><|user|>2+2?<|eot|><|assistant|>4<|eot|><|endoftext|><|endoftext|>...
    '--------------------------- prompt ---------------------------''- response -''--- padding ---'

Every message is its role token, its content's tokens and end-of-turn. An SFT sample is a
conversation whose last (assistant) message is the response: the prompt is everything
before that message plus the assistant role token; the response is the message's content
and its end-of-turn. The pack stage pads samples with end-of-text, which the model is
trained on, so it learns to end an answer: end-of-turn, then end-of-text to the end.

At inference the same prompt (a conversation ending with a user message, then the
assistant role token) is what the model continues. All ids come from the tokenizer
(illada.data.special_tokens.special_ids): none is hard-coded. Message contents are plain text:
a literal "<|eot|>" typed in a message is encoded as characters, not as end-of-turn.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from illada.data.special_tokens import plain_text, special_ids

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = plain_text(tokenizer)  # sets the flag on the caller's tokenizer too
        self.ids = special_ids(tokenizer)

    def _contents(self, conversations: list[list[Message]]) -> list[list[int]]:
        """Token ids of every message's content, in order (one batch call)."""
        texts = [m["content"] for messages in conversations for m in messages]
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)] if texts else []

    def _turn(self, role: str, content: list[int]) -> list[int]:
        return [self.ids[role], *content, self.ids["end_of_turn"]]

    def prompt(self, messages: list[Message]) -> list[int]:
        """The tokens a model continues to answer `messages` (ending with a user message)."""
        return self.prompts([messages])[0]

    def prompts(self, conversations: list[list[Message]]) -> list[list[int]]:
        contents = iter(self._contents(conversations))
        out = []
        for messages in conversations:
            tokens = [t for m in messages for t in self._turn(m["role"], next(contents))]
            out.append(tokens + [self.ids["assistant"]])
        return out

    def samples(self, conversations: list[list[Message]]) -> list[tuple[list[int], int]]:
        """(tokens, prompt length) of each conversation: the prompt, then the last message
        (the assistant's response) and its end-of-turn."""
        contents = iter(self._contents(conversations))
        out = []
        for messages in conversations:
            *context, response = messages
            if response["role"] != "assistant":
                raise ValueError(f"an SFT sample ends with an assistant message, not {response['role']}")
            prompt = [t for m in context for t in self._turn(m["role"], next(contents))] + [self.ids["assistant"]]
            out.append((prompt + next(contents) + [self.ids["end_of_turn"]], len(prompt)))
        return out
