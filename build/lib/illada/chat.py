"""`illada chat CHECKPOINT`: talk to a fine-tuned checkpoint.

Each user message is appended to the conversation, the conversation goes through the chat
template the SFT data was built with (illada.data.chat_template: role tokens, end-of-turn,
then the assistant role token), and the reply is generated with iLLaDA's variable-length
sampler (illada.sampling): a block of masks is appended and denoised, again and again,
until a block holds an end-of-turn or end-of-text token, or the length cap is reached.

    chat = Chat(load_for_inference(checkpoint), SamplerConfig(...), system="Be brief.")
    print(chat.send("What is 2 + 3?"))

`replies` answers many conversations at once (what evaluations use).
"""

from __future__ import annotations

import torch

from illada.data.chat_template import ChatTemplate, Message

def replies(loaded, conversations: list[list[Message]], config, *, template: ChatTemplate | None = None, seed: int = 0, on_step=None) -> list[str]:
    """The model's reply to each conversation (each ending with a user message), in one
    batch. `config` is a SamplerConfig; `loaded` an InferenceModel (illada.inference)."""
    from illada.sampling.sampler import generate

    template = template or ChatTemplate(loaded.tokenizer)
    prompts = [torch.tensor(p, dtype=torch.long, device=loaded.device) for p in template.prompts(conversations)]
    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    result = generate(loaded.model, prompts, config, loaded.special, generator=generator, on_step=on_step)
    return [loaded.decode(a) for a in result.answers(loaded.special)]


class Chat:
    """One conversation with a loaded checkpoint; the oldest turns are dropped when the
    conversation and a reply would not fit the model's max_seq_len."""

    def __init__(self, loaded, config, *, system: str | None = None, seed: int = 0, view: bool = False):
        self.loaded, self.config, self.seed, self.view = loaded, config, seed, view
        self.template = ChatTemplate(loaded.tokenizer)
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[Message] = []

    def reset(self) -> None:
        self.turns = []

    def send(self, text: str) -> str:
        """The reply to `text`; both join the conversation (neither does if it fails)."""
        turns = self._fit(self.turns + [{"role": "user", "content": text}])
        on_step = None
        if self.view:
            from illada.sampling.view import CanvasView

            on_step = CanvasView(self.loaded.decode, self.loaded.special.mask, len(self.template.prompt(self.system + turns)))
        [reply] = replies(self.loaded, [self.system + turns], self.config, template=self.template, seed=self.seed, on_step=on_step)
        self.turns = turns + [{"role": "assistant", "content": reply}]
        return reply

    def _fit(self, turns: list[Message]) -> list[Message]:
        """The latest turns whose prompt leaves room for a reply of gen_length tokens."""
        budget = self.loaded.config.max_seq_len - self.config.gen_length
        while len(self.template.prompt(self.system + turns)) > budget:
            if len(turns) <= 1:
                raise ValueError(
                    f"the message does not fit: with a reply of up to {self.config.gen_length} tokens the prompt may have "
                    f"{budget} tokens (the model's max_seq_len is {self.loaded.config.max_seq_len}); shorten it or lower --max-length"
                )
            turns = turns[2:]  # the oldest user message and its reply
        return turns
