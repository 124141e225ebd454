"""The `illada` command line. Every command has --help; configs take `key.sub=value` overrides
anywhere on the line.

Building the parser imports only argparse and the other commands' parser modules, which
import nothing heavy either: `illada --help` starts in a blink, and a GPU node without Ray
runs `illada train`. Each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("illada")

ADDRESS_HELP = "Ray dashboard address, e.g. http://head:8265 (default: $RAY_ADDRESS)"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, anywhere on the line, e.g. data.pack.seq_len=1024")
    p.add_argument("--root", help="run root (local path or s3:// URL); same as the override root=...")


def _add_stage_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stage", help="re-run only this stage (its inputs must be complete)")
    which.add_argument("--from", dest="start", help="re-run this stage and every stage after it")
    p.add_argument("--force", action="store_true", help="re-run every stage, even those up to date")
    p.add_argument("--verify", action="store_true", help="check the sha256 of every output of the stages it would skip (sizes are always checked); rebuild what differs")


def _add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help=ADDRESS_HELP)
    p.add_argument("--job-id", help="submission id (default: generated)")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish and exit non-zero if it failed")
    p.add_argument("--wait-timeout", type=float, default=7 * 24 * 3600, metavar="SECONDS", help="with --wait: give up waiting after this long (the job keeps running)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="an environment variable for every process of the job (repeatable), e.g. NCCL_DEBUG=INFO")


def _config(args: argparse.Namespace):
    from illada.config import load_config

    overrides = list(args.overrides) + ([f"root={args.root}"] if args.root else [])
    return load_config(args.config, overrides)


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    from illada.data.stages import stages_for
    from illada.pipeline.runner import run_pipeline

    config = _config(args)
    manifests = run_pipeline(config, stages_for(config), only=args.stage, start=args.start, force=args.force, verify=args.verify)
    print_summary(manifests)
    return 0


def cmd_pipeline_status(args: argparse.Namespace) -> int:
    from illada.data.stages import stages_for
    from illada.pipeline.runner import pipeline_status

    config = _config(args)
    print(f"{'stage':<14}{'state':<10}{'tasks done':>11}  digest")
    for s in pipeline_status(config, stages_for(config), verify=args.verify):
        print(f"{s.name:<14}{s.state:<10}{s.tasks_done:>11}  {(s.digest or '-')[:16]}")
    return 0


def print_summary(manifests: dict[str, dict]) -> None:
    pack = manifests.get("pack")
    if not pack:
        return
    stats = pack["stats"]
    if stats.get("format") == "sft":
        return _print_sft_summary(stats, len(pack["files"]))
    print(f"\npacked {stats['sequences']} sequences of {stats['seq_len']} tokens ({stats['tokens']} tokens) into {len(pack['files'])} shards")
    print(f"{'source':<20}{'weight':>8}{'documents':>11}{'sequences':>11}{'tokens':>12}")
    for name, s in stats["sources"].items():
        print(f"{name:<20}{stats['mix'][name]:>8.3f}{s['documents']:>11}{s['sequences']:>11}{s['tokens']:>12}")


def _print_sft_summary(stats: dict, shards: int) -> None:
    print(f"\nwrote {stats['samples']} SFT samples into {shards} shards (buckets {stats['buckets']}); over {stats['seq_len']} tokens: {stats['dropped']} dropped, {stats['truncated']} truncated")
    print(f"{'source':<20}{'weight':>8}{'samples':>9}{'prompt tok':>12}{'response tok':>14}{'pad tok':>10}{'dropped':>9}{'truncated':>11}")
    for name, s in stats["sources"].items():
        print(f"{name:<20}{stats['mix'][name]:>8.3f}{s['samples']:>9}{s['prompt_tokens']:>12}{s['response_tokens']:>14}{s['pad_tokens']:>10}{s['dropped']:>9}{s['truncated']:>11}")


def cmd_submit_pipeline(args: argparse.Namespace) -> int:
    from illada.jobs import submit_pipeline

    config = _config(args)
    env = _env_vars(args.env)
    return _submitted(args, submit_pipeline(config, _address(args), stage=args.stage, start=args.start, force=args.force, verify=args.verify, submission_id=args.job_id, env=env))


def cmd_submit_train(args: argparse.Namespace) -> int:
    from illada.jobs import submit_train

    config = _config(args).require("model", "train")
    env = _env_vars(args.env)
    return _submitted(args, submit_train(config, _address(args), submission_id=args.job_id, image=args.image, env=env))


def _env_vars(pairs: list[str]) -> dict[str, str]:
    from illada.config import ConfigError

    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {pair!r} must look like KEY=VALUE")
        env[key] = value
    return env


def _submitted(args: argparse.Namespace, job_id: str) -> int:
    from illada.jobs import wait_for_job

    print(f"submitted job {job_id} to {args.address}")
    print(f"follow it with: illada jobs logs {job_id} --address {args.address} --follow")
    if args.wait:
        try:
            status = wait_for_job(args.address, job_id, timeout_s=args.wait_timeout)
        except TimeoutError as e:
            print(f"illada: {e}", file=sys.stderr)
            return 1
        print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from illada import jobs

    args.address = _address(args)
    if args.action != "list" and not args.job_id:
        from illada.errors import UserError

        raise UserError(f"jobs {args.action} needs a job id (illada jobs list shows them)")
    if args.action == "status":
        info = jobs.job_info(args.address, args.job_id)
        print(json.dumps(info, indent=2, default=str))
    elif args.action == "logs":
        jobs.print_logs(args.address, args.job_id, follow=args.follow)
    elif args.action == "stop":
        stopped = jobs.stop_job(args.address, args.job_id)
        print(f"job {args.job_id}: {'stop requested' if stopped else 'was not running'}")
    elif args.action == "list":
        for info in jobs.list_jobs(args.address):
            print(f"{info['submission_id']:<36}{info['status']:<11}{info['entrypoint'][:80]}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_under_torchrun(args)
    from illada.parallel import destroy_parallel
    from illada.train.trainer import train_loop

    config = _config(args)
    state = train_loop(config)
    destroy_parallel()
    log.info("trained %d steps; tokens per source: %s", state.step, state.tokens_per_source)
    return 0


def _relaunch_under_torchrun(args: argparse.Namespace) -> int:
    """`illada train --nproc-per-node N` on one machine is torchrun with N processes."""
    argv = ["train", args.config, *args.overrides] + (["--root", args.root] if args.root else [])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}"]
    os.execv(sys.executable, [*torchrun, "-m", "illada.cli", *argv])


def _address(args: argparse.Namespace) -> str:
    if not args.address:
        from illada.errors import UserError

        raise UserError("which Ray cluster? give --address http://HEAD:8265 or set RAY_ADDRESS")
    return args.address


def cmd_config_show(args: argparse.Namespace) -> int:
    from illada.config import dump_config

    print(dump_config(_config(args)), end="")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from illada.quickstart import quickstart

    return quickstart(args.root, args.overrides, num_cpus=args.num_cpus)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="illada", description="Train bidirectional masked-diffusion language models at scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quickstart", help="run the whole system on a small real corpus (the Python standard library)")
    q.add_argument("--root", default="runs/quickstart", help="where to write everything (default: runs/quickstart)")
    q.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    q.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    q.set_defaults(func=cmd_quickstart)

    pipeline = sub.add_parser("pipeline", help="run or inspect the data pipeline").add_subparsers(dest="action", required=True, metavar="ACTION")
    run = pipeline.add_parser("run", help="run the pipeline; up-to-date stages are skipped, interrupted ones resume")
    _add_config_args(run)
    _add_stage_args(run)
    run.set_defaults(func=cmd_pipeline_run)
    status = pipeline.add_parser("status", help="show each stage's state: complete, stale, partial or missing")
    _add_config_args(status)
    status.add_argument("--verify", action="store_true", help="also check the sha256 of every listed output (sizes are always checked)")
    status.set_defaults(func=cmd_pipeline_status)

    submit = sub.add_parser("submit", help="send a run to a Ray cluster as a Ray Job").add_subparsers(dest="what", required=True, metavar="WHAT")
    sp = submit.add_parser("pipeline", help="submit the data pipeline")
    _add_config_args(sp)
    _add_stage_args(sp)
    _add_submit_args(sp)
    sp.set_defaults(func=cmd_submit_pipeline)
    st = submit.add_parser(
        "train",
        help="submit pre-training: one worker per GPU, restarted from the latest checkpoint on failure",
        description="Train the model of CONFIG's model section on a Ray cluster as a Ray Job: one worker per GPU "
        "(per train.cluster.cpus_per_worker CPUs without GPUs) in a placement group packed per node. The job "
        "checks the run against the cluster first and fails in seconds if it cannot start; a worker or node that "
        "dies restarts the whole group from the latest complete checkpoint, up to train.cluster.max_failures times. "
        "See runbooks/submit-training.md.",
    )
    _add_config_args(st)
    _add_submit_args(st)
    st.add_argument("--image", help="run the job in this container image (Ray's image_uri; needs podman on the nodes) instead of a working dir with this checkout's code")
    st.set_defaults(func=cmd_submit_train)

    jobs = sub.add_parser("jobs", help="follow Ray Jobs: list, status, logs, stop")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", help="submission id (not needed for list)")
    jobs.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help=ADDRESS_HELP)
    jobs.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")
    jobs.set_defaults(func=cmd_jobs)

    tr = sub.add_parser(
        "train",
        help="pre-train or fine-tune (train.objective: sft) with megatron-core (under torchrun, or give --nproc-per-node)",
        description="Train the model of CONFIG's model section on the pack stage's shards: pre-training, or with "
        "train.objective: sft fine-tuning on an SFT data run's samples (runbooks/fine-tune.md). Resumes from the "
        "latest complete checkpoint under train.checkpoint.dir. Multi-process: torchrun --nproc-per-node N "
        "-m illada.cli train CONFIG, or --nproc-per-node N here on one machine.",
    )
    _add_config_args(tr)
    tr.add_argument("--nproc-per-node", type=int, default=1, help="start this many processes with torchrun (one machine)")
    tr.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True, metavar="ACTION")
    show = config.add_parser("show", help="print the resolved config (overrides applied, secrets masked)")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    from illada.lineage.cli import add_lineage_parser

    add_lineage_parser(sub)

    from illada.eval.cli import add_parsers as add_eval_parser
    from illada.sampling.cli import add_parsers as add_sampling_parsers

    add_sampling_parsers(sub)  # generate, infill
    add_eval_parser(sub)  # eval

    from illada.chat_cli import add_parser as add_chat_parser

    add_chat_parser(sub)  # chat

    from illada.hf.cli import add_parsers as add_hf_parsers

    add_hf_parsers(sub)  # import hf, export hf
    from illada.train.plan import add_parsers as add_plan_parser

    add_plan_parser(sub)  # plan
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse a command line; `key.sub=value` overrides may stand anywhere after the command
    (argparse alone takes positionals only before the first option)."""
    parser = parser or build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet = int(os.environ.get("RANK", 0)) > 0  # one log per job, from global rank 0
    level = logging.WARNING if quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from illada import redaction

    redaction.install()  # no credential in any log line, botocore's DEBUG headers included
    if not args.verbose:
        logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter
    try:
        return args.func(args)
    except Exception as e:
        code = _report(e, verbose=args.verbose)
        if code is None:
            raise
        return code


def _report(error: Exception, verbose: bool) -> int | None:
    """A mistake the user can fix: one line and exit 2 (the traceback with -v). A stage that
    failed: one line and exit 1. Anything else is a bug: None, and the caller re-raises."""
    from illada.errors import missing_extra, user_error_in

    user = user_error_in(error) or missing_extra(error) or (error if isinstance(error, FileNotFoundError) else None)
    if user is None and not _is_pipeline_error(error):
        return None
    if verbose:
        import traceback

        traceback.print_exception(error)
    message = " ".join(str(user or error).split())  # one line, however the message was built
    print(f"illada: error: {message}", file=sys.stderr)
    return 2 if user is not None else 1


def _is_pipeline_error(error: Exception) -> bool:
    if "illada.pipeline.runner" not in sys.modules:
        return False
    from illada.pipeline.runner import PipelineError

    return isinstance(error, PipelineError)


if __name__ == "__main__":
    sys.exit(main())
