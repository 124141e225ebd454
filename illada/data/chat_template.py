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

A tokenizer with Llama-3's header tokens (LLaDA-8B-Instruct's, imported with `illada import
hf`) gets that model's template instead, as its tokenizer_config.json chat_template renders it:

    <|startoftext|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n

a role is then the tokens of its header, end-of-turn is <|eot_id|>, and the conversation
starts with <|startoftext|>. Headers and contents are encoded apart: the ids of the rendered
text for a tokenizer that splits newlines off before merging (Llama-3's pre-tokenizer does).
"""

from __future__ import annotations

from tokenizers import Tokenizer

from illada.data.special_tokens import plain_text, special_ids

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


HEADER, END_HEADER, END_OF_TURN, BEGIN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|startoftext|>"
ROLES = ("system", "user", "assistant")


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = plain_text(tokenizer)  # sets the flag on the caller's tokenizer too
        if all(tokenizer.token_to_id(t) is not None for t in (HEADER, END_HEADER, END_OF_TURN)):
            # Header tokens by id, the text between them encoded as text (as the whole rendered
            # header encodes: special tokens split the text before pre-tokenization).
            header, end_header = tokenizer.token_to_id(HEADER), tokenizer.token_to_id(END_HEADER)
            texts = [e.ids for e in tokenizer.encode_batch_fast([*ROLES, "\n\n"], add_special_tokens=False)]
            self.roles = {role: [header, *ids, end_header, *texts[-1]] for role, ids in zip(ROLES, texts)}
            self.end_of_turn = [tokenizer.token_to_id(END_OF_TURN)]
            self.begin = [tokenizer.token_to_id(BEGIN)] if tokenizer.token_to_id(BEGIN) is not None else []
        else:
            ids = special_ids(tokenizer)
            self.roles = {role: [ids[role]] for role in ROLES}
            self.end_of_turn = [ids["end_of_turn"]]
            self.begin = []

    def _contents(self, conversations: list[list[Message]]) -> list[list[int]]:
        """Token ids of every message's content, in order (one batch call)."""
        texts = [m["content"] for messages in conversations for m in messages]
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)] if texts else []

    def _turn(self, role: str, content: list[int]) -> list[int]:
        return [*self.roles[role], *content, *self.end_of_turn]

    def prompt(self, messages: list[Message]) -> list[int]:
        """The tokens a model continues to answer `messages` (ending with a user message)."""
        return self.prompts([messages])[0]

    def prompts(self, conversations: list[list[Message]]) -> list[list[int]]:
        contents = iter(self._contents(conversations))
        out = []
        for messages in conversations:
            tokens = [t for m in messages for t in self._turn(m["role"], next(contents))]
            out.append(self.begin + tokens + self.roles["assistant"])
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
            prompt = self.begin + [t for m in context for t in self._turn(m["role"], next(contents))] + self.roles["assistant"]
            out.append((prompt + next(contents) + self.end_of_turn, len(prompt)))
        return out
