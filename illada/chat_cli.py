"""`illada chat CHECKPOINT`: the command line of illada.chat (parsing imports nothing heavy)."""

from __future__ import annotations

import argparse
import sys

COMMANDS = "/reset starts over, /exit (or end of input) quits"


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
        print(f"illada: error: chat: {e}", file=sys.stderr)
        return 2
    from illada.chat import Chat
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


def _answer(chat, message: str) -> str:
    try:
        return chat.send(message)
    except ValueError as e:
        return f"[{e}]"
