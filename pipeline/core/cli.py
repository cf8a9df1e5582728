"""The ``kope`` command: run a pipeline (here or on a cluster), show a run's status, cancel its jobs, print a
resolved config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pipeline.core.errors import ConfigError, KopeError
from pipeline.core.logs import setup_console


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.core.cluster_profile import load_profile
    from pipeline.core.config.loader import load_pipeline
    from pipeline.core.launch import scheduler
    from pipeline.core.run_dir import RunDir
    from pipeline.core.runner import Selection, run_pipeline

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    config = load_pipeline(args.pipeline, overrides)
    cluster = load_profile(args.cluster) if args.cluster else None
    if args.wait and (cluster is None or cluster.executor != "slurm"):
        raise ConfigError("--wait follows Slurm jobs: it needs a --cluster profile with executor: slurm",
                          file="<command line>")
    summary = run_pipeline(config, Selection(only=args.only or [], start=args.start, until=args.until,
                                             force=args.force or []), cluster)
    if summary.submitted:
        jobs = ", ".join(f"{name}={job}" for name, job in summary.submitted.items())
        print(f"run directory: {config.run_dir}  submitted: {jobs}  skipped (done): "
              f"{', '.join(summary.skipped) or '-'}")
        if args.wait:
            scheduler().follow(RunDir(config.run_dir), list(summary.submitted), interval_s=args.poll_s)
        else:
            print(f"follow with: kope status {config.run_dir}")
        return 0
    print(f"run directory: {config.run_dir}  ran: {', '.join(summary.ran) or '-'}  "
          f"skipped (done): {', '.join(summary.skipped) or '-'}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.core.status import format_status

    print(format_status(Path(args.run_dir)))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from pipeline.core.launch import scheduler
    from pipeline.core.run_dir import RunDir

    cancelled = scheduler().cancel(RunDir(args.run_dir).require())
    if cancelled:
        print("cancelled: " + ", ".join(f"{name} (job {' '.join(jobs)})" for name, jobs in cancelled.items()))
    else:
        print("nothing queued or running")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from pipeline.core.config.loader import load_pipeline

    config = load_pipeline(args.pipeline, args.overrides)
    print(yaml.safe_dump(config.resolved(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kope", description="KoPE pretraining pipeline: staged, resumable jobs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the stages of a pipeline that are not done yet",
                         description="Run every stage whose outputs are missing, in dependency order. "
                                     "Running the same command again after a failure resumes.")
    run.add_argument("pipeline", help="pipeline YAML file")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="override any value, e.g. pretrain.optimizer.lr=1e-3 or seed=1")
    run.add_argument("--run-dir", help="run directory (default: the file's run_dir, or runs/<name>)")
    run.add_argument("--only", action="append", metavar="STAGE", help="run only this stage (repeatable)")
    run.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and its dependents")
    run.add_argument("--until", metavar="STAGE", help="run this stage and what it depends on")
    run.add_argument("--force", action="append", metavar="STAGE",
                     help="re-run this stage (and its dependents) even if done (repeatable)")
    run.add_argument("--cluster", metavar="PROFILE",
                     help="where stages run: a profile in configs/cluster/ (local, slurm-example, ...) or a YAML "
                          "path; Slurm profiles submit every pending stage as a job and return")
    run.add_argument("--wait", action="store_true", help="with a Slurm profile: follow the jobs until they end")
    run.add_argument("--poll-s", type=float, default=10.0, metavar="SECONDS",
                     help="with --wait: seconds between status refreshes (default 10)")
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser("status", help="show the state of every stage of a run",
                            description="A table of stages: status, duration, key outputs, error line; for "
                                        "stages submitted to Slurm also the job, its Slurm state and log.")
    status.add_argument("run_dir", help="run directory")
    status.set_defaults(func=_cmd_status)

    cancel = sub.add_parser("cancel", help="cancel a run's queued and running Slurm jobs",
                            description="Cancel every queued or running Slurm job of the run and wait until "
                                        "Slurm has ended them; `kope run` again resumes.")
    cancel.add_argument("run_dir", help="run directory")
    cancel.set_defaults(func=_cmd_cancel)

    config = sub.add_parser("config", help="print the fully resolved config",
                            description="Load the pipeline with its includes and overrides, validate it "
                                        "and print the result as YAML.")
    config.add_argument("pipeline", help="pipeline YAML file")
    config.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as for run")
    config.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    setup_console()
    try:
        return args.func(args)
    except KopeError as exc:
        print(f"kope: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
