"""`illada lineage show|mix|verify`: audit a checkpoint or run from its MLflow records."""

from __future__ import annotations

import argparse
import sys

TRACKING_HELP = (
    "MLflow tracking URI to read (default: MLFLOW_TRACKING_URI, else the mlflow.db of the run root that holds "
    "each checkpoint and data set)"
)


def _target_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("target", metavar=what, help="a checkpoint directory (step_*), a checkpoint folder or run root (its latest checkpoint)" + (", an MLflow run id or a model id (m-...)" if what != "CHECKPOINT" else ""))
    p.add_argument("--tracking-uri", help=TRACKING_HELP)


def add_lineage_parser(sub) -> None:
    lineage = sub.add_parser(
        "lineage",
        help="audit a checkpoint: its parents, training runs, shards and pipeline stages back to the raw data",
        description="Read the lineage recorded in MLflow (and on storage, where MLflow has no record).",
    ).add_subparsers(dest="action", required=True, metavar="ACTION")

    show = lineage.add_parser("show", help="the chain checkpoint <- parents <- training run <- shards <- pack <- ... <- ingest")
    _target_args(show, "CHECKPOINT_OR_RUN")
    show.add_argument("--format", choices=["text", "json", "mermaid"], default="text", help="output format (default: text)")
    show.add_argument("--picture", metavar="FILE", help="also draw the graph to FILE (.png or .svg)")
    show.set_defaults(func=cmd_show)

    mix = lineage.add_parser("mix", help="tokens consumed per source against the target mix")
    _target_args(mix, "CHECKPOINT")
    mix.add_argument("--format", choices=["text", "json"], default="text", help="output format (default: text)")
    mix.add_argument("--plot", metavar="FILE", help="also plot it to FILE (.png or .svg)")
    mix.set_defaults(func=cmd_mix)

    verify = lineage.add_parser("verify", help="re-hash the shards and checkpoints it depends on; exit 1 if any changed or vanished (ancestors pruned by keep_last are reported, not failures)")
    _target_args(verify, "CHECKPOINT_OR_RUN")
    verify.add_argument("--format", choices=["text", "json"], default="text", help="output format (default: text)")
    verify.set_defaults(func=cmd_verify)


def _build(args: argparse.Namespace):
    from illada.lineage.graph import build

    return build(args.target, args.tracking_uri)


def _guarded(fn):
    """Lineage errors are the user's to fix: print them without a traceback."""

    def run(args: argparse.Namespace) -> int:
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError

        from illada.lineage.graph import LineageError

        try:
            return fn(args)
        except (LineageError, MlflowException, ValueError) as e:
            print(f"illada: error: {_first_line(e)}", file=sys.stderr)
            return 2
        except SQLAlchemyError as e:  # a damaged database, found past its first query
            print(f"illada: error: the MLflow database cannot be read: {_first_line(e)}", file=sys.stderr)
            return 2

    return run


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@_guarded
def cmd_show(args: argparse.Namespace) -> int:
    from illada.lineage import render

    lineage = _build(args)
    print({"text": render.text, "json": render.as_json, "mermaid": render.mermaid}[args.format](lineage), end="")
    if args.picture:
        print(f"picture: {render.picture(lineage, args.picture)}", file=sys.stderr)
    return 0


@_guarded
def cmd_mix(args: argparse.Namespace) -> int:
    from illada.lineage import mix

    report = mix.mix_report(_build(args))
    print(mix.as_json(report) if args.format == "json" else mix.table(report), end="")
    if args.plot:
        print(f"plot: {mix.plot(report, args.plot)}", file=sys.stderr)
    return 0


@_guarded
def cmd_verify(args: argparse.Namespace) -> int:
    from illada.lineage import verify

    report = verify.verify(_build(args))
    print(verify.as_json(report) if args.format == "json" else verify.text(report), end="")
    return 1 if report.problems else 0


def print_checkpoint_lineage(checkpoint: str) -> None:
    """For the end of `illada quickstart`: the lineage of a checkpoint it made and how to
    open the MLflow UI on it."""
    from illada.lineage import render
    from illada.lineage.graph import build
    from illada.tracking import ui_command, ui_link

    lineage = build(checkpoint)
    print(f"\n== lineage of {checkpoint}")
    print(render.text(lineage), end="")
    root = lineage.nodes[lineage.root]
    uri = root.detail.get("tracking_uri")
    if uri:
        print(f"\nopen it in the MLflow UI:  {ui_command(uri)}")
        print(f"  then {ui_link(uri, root.detail['experiment_id'], root.facts['model'])}")
    path = root.facts.get("path", checkpoint)
    print(f"audit it:  illada lineage verify {path}")
    print(f"           illada lineage mix {path} --plot mix.png")
