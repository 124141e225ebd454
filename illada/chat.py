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

import argparse
import sys

import torch

from illada.data.chat_template import ChatTemplate, Message

COMMANDS = "/reset starts over, /exit (or end of input) quits"


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


def add_parser(sub) -> None:
    c = sub.add_parser(
        "chat",
        help="chat with a fine-tuned checkpoint (chat template + variable-length generation)",
        description="Talk to CHECKPOINT: each message goes through the chat template of the SFT data and the reply is "
        "generated block by block until the model ends its turn (iLLaDA's variable-length sampling). Without "
        f"--message, messages are read from the terminal ({COMMANDS}).",
    )
    c.add_argument("checkpoint", help="a checkpoint directory, or a folder of them (the latest complete one is used)")
    c.add_argument("--message", action="append", help="send this message and print the reply; repeat for a scripted conversation")
    c.add_argument("--system", help="a system message that starts the conversation")
    c.add_argument("--max-length", type=int, default=256, help="the longest reply, in tokens (a multiple of --block-length; default 256)")
    c.add_argument("--block-length", type=int, default=32, help="tokens generated per block (default 32, LLaDA's chat setting)")
    c.add_argument("--steps-per-block", type=int, default=None, help="denoising steps per block (default: the block length, one token per step)")
    c.add_argument("--no-repetition-guard", action="store_true", help="do not re-denoise blocks that fall into a repeating n-gram loop")
    from illada.sampling.cli import add_decoding_args

    add_decoding_args(c)  # --temperature, --cfg, --remasking, --threshold, --seed, --view
    c.set_defaults(func=cmd_chat)


def sampler_config(args: argparse.Namespace):
    from illada.sampling.cli import decoding_from_args
    from illada.sampling.repetition import RepetitionGuard
    from illada.sampling.sampler import SamplerConfig

    blocks = max(1, args.max_length // args.block_length)
    return SamplerConfig(
        gen_length=args.max_length,
        steps=(args.steps_per_block or args.block_length) * blocks,
        block_length=args.block_length,
        decoding=decoding_from_args(args),
        variable_length=True,
        repetition=None if args.no_repetition_guard else RepetitionGuard(),
    )


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        config = sampler_config(args)
    except ValueError as e:
        print(f"illada chat: error: {e}", file=sys.stderr)
        return 2
    from illada.inference import load_for_inference

    chat = Chat(load_for_inference(args.checkpoint), config, system=args.system, seed=args.seed, view=args.view)
    if args.message:
        for message in args.message:
            print(_answer(chat, message))
        return 0
    print(f"chatting with {chat.loaded.checkpoint} ({COMMANDS})", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            chat.reset()
        elif line.strip():
            print(f"assistant> {_answer(chat, line)}", flush=True)


def _answer(chat: Chat, message: str) -> str:
    try:
        return chat.send(message)
    except ValueError as e:
        return f"[{e}]"
