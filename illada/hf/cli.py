"""`illada import hf` and `illada export hf` (runbooks/from-huggingface.md)."""

from __future__ import annotations

import argparse
import os
import sys



def cmd_import_hf(args: argparse.Namespace) -> int:
    from illada.hf.importer import check_out, check_source, import_hf

    processes = args.tp * args.pp
    if processes > 1 and "WORLD_SIZE" not in os.environ:
        check_source(args.src)  # bad input fails here, once, before any process starts
        check_out(args.out)
        return _relaunch_under_torchrun(processes, ["import", "hf", args.src, "--out", args.out, "--tp", str(args.tp), "--pp", str(args.pp)])
    from illada.parallel import destroy_parallel

    out = import_hf(args.src, args.out, tp=args.tp, pp=args.pp)
    destroy_parallel()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"imported {args.src} -> {out}")
    return 0


def _relaunch_under_torchrun(processes: int, argv: list[str]) -> int:
    """The same command in `processes` processes on this machine (like `illada train --nproc-per-node`)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    os.execv(sys.executable, [*torchrun, "-m", "illada.cli", *argv])


def cmd_export_hf(args: argparse.Namespace) -> int:
    from illada.hf.exporter import export_hf
    from illada.parallel import destroy_parallel

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    destroy_parallel()
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def add_parsers(sub) -> None:
    imp = sub.add_parser("import", help="bring released weights in: import hf").add_subparsers(dest="format", required=True, metavar="FORMAT")
    hf = imp.add_parser(
        "hf",
        help="a Hugging Face LLaDA directory -> an illada checkpoint",
        description="Convert a Hugging Face directory in LLaDA's format (config.json, safetensors shards, tokenizer.json) "
        "into a complete illada checkpoint with its tokenizer and special ids, loadable at any TP/PP by train "
        "(train.init_from), generate, chat, infill and eval. --tp/--pp write it from tp x pp processes (torchrun), "
        "each holding only its part of the model. See runbooks/from-huggingface.md.",
    )
    hf.add_argument("src", metavar="SRC", help="the Hugging Face model directory (download it first, e.g. with `hf download`)")
    hf.add_argument("--out", required=True, metavar="CKPT", help="the checkpoint directory to create (must not exist)")
    hf.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write with (default 1)")
    hf.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write with (default 1)")
    hf.set_defaults(func=cmd_import_hf)

    exp = sub.add_parser("export", help="publish a checkpoint: export hf").add_subparsers(dest="format", required=True, metavar="FORMAT")
    hf = exp.add_parser(
        "hf",
        help="an illada checkpoint -> a Hugging Face directory in LLaDA's layout",
        description="Write safetensors shards with model.safetensors.index.json, config.json (auto_map pointing at LLaDA's "
        "public modeling code, loaded with trust_remote_code) and the tokenizer, from a checkpoint saved at any TP/PP.",
    )
    hf.add_argument("checkpoint", metavar="CKPT", help="a checkpoint, or a folder of them (its latest)")
    hf.add_argument("--out", required=True, metavar="DIR", help="the directory to create (must not exist)")
    hf.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weight dtype (default bf16, as LLaDA is released)")
    hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard in GiB (default 5)")
    hf.set_defaults(func=cmd_export_hf)
