"""``vitray job ...`` (cluster jobs), ``vitray run`` (whole pipeline) and ``vitray demo``."""

from __future__ import annotations

import argparse
import json
import sys


def _job_submit(args) -> int:
    from vitray.cluster import jobs

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("vitray job submit: give the vitray command to run after --", file=sys.stderr)
        return 2
    spec = jobs.JobSpec(args=command, address=args.address, submission_id=args.submission_id,
                        working_dir=args.working_dir, pip=args.pip or [], num_cpus=args.num_cpus)
    sid = jobs.submit(spec)
    print(sid)
    if args.follow:
        state = jobs.follow(sid, args.address)
        print(f"\njob {sid}: {state}")
        return 0 if state == "SUCCEEDED" else 1
    return 0


def _job_status(args) -> int:
    from vitray.cluster import jobs

    print(json.dumps(jobs.status(args.submission_id, args.address), indent=2, default=str))
    return 0


def _job_list(args) -> int:
    from vitray.cluster import jobs

    for job in jobs.list_jobs(args.address):
        print(f"{job['submission_id']:<36} {job['status']:<10} {job['entrypoint']}")
    return 0


def _job_logs(args) -> int:
    from vitray.cluster import jobs

    if args.follow:
        state = jobs.follow(args.submission_id, args.address)
        print(f"\njob {args.submission_id}: {state}")
        return 0 if state == "SUCCEEDED" else 1
    sys.stdout.write(jobs.logs(args.submission_id, args.address))
    return 0


def _job_stop(args) -> int:
    from vitray.cluster import jobs

    print(jobs.stop(args.submission_id, args.address))
    return 0


def _run(args) -> int:
    from vitray import config
    from vitray.cluster.pipeline import PipelineConfig, run_pipeline

    cfg = config.load(PipelineConfig, path=args.config, overrides=config.parse_overrides(args.set))
    result = run_pipeline(cfg, stop_after=args.stop_after)
    print(_pipeline_summary(result))
    return 0


def _pipeline_summary(result) -> str:
    lines = [result.shard.summary()]
    if result.dedup is not None:
        lines.append(result.dedup.summary())
    if result.pretrain is not None:
        p = result.pretrain
        loss = p.metrics.get("loss")
        lines.append(f"vitray pretrain: {p.run_uri} reached step {p.step}"
                     + (f", loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
                     + f"; clean against {', '.join(p.lineage.get('clean_against') or []) or 'no eval sets'}")
        lines.append(f"  final checkpoint: {p.checkpoint}")
    lines.append("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    return "\n".join(lines)


def _demo(args) -> int:
    from vitray.cluster.demo import run_demo

    result = run_demo(args.out, steps=args.steps)
    print(_pipeline_summary(result.pipeline))
    print(f"planted near-duplicates removed from the corpus: {result.planted_found} of {result.planted}")
    return 0


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("run", help="run or resume the whole pipeline: shard -> dedup -> pretrain",
                       description="Run every stage of a PipelineConfig YAML in order; re-running resumes.")
    p.add_argument("config", help="YAML file mapping onto vitray.cluster.pipeline.PipelineConfig")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (repeatable)")
    p.add_argument("--stop-after", choices=("shard", "dedup", "pretrain"), default=None)
    p.set_defaults(func=_run)

    p = sub.add_parser("demo", help="the whole pipeline on generated data, local Ray, local storage")
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--steps", type=int, default=30, help="pretraining steps (default 30)")
    p.set_defaults(func=_demo)

    job = sub.add_parser("job", help="submit any vitray stage as a Ray job; follow, inspect and stop it")
    job_sub = job.add_subparsers(dest="job_command", metavar="ACTION", required=True)

    def add(name, func, help_):
        p = job_sub.add_parser(name, help=help_)
        p.add_argument("--address", default=None,
                       help="Ray dashboard address, e.g. http://head:8265 (default: RAY_ADDRESS)")
        p.set_defaults(func=func)
        return p

    p = add("submit", _job_submit, "run `vitray ARGS...` on the cluster")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--working-dir", default=None, help="directory uploaded with the job")
    p.add_argument("--pip", action="append", help="extra pip requirement for the job (repeatable)")
    p.add_argument("--num-cpus", type=float, default=0, help="CPUs reserved for the job's driver")
    p.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the vitray command, e.g. -- shard SRC DST")
    add("status", _job_status, "show a job's status").add_argument("submission_id")
    add("list", _job_list, "list jobs")
    p = add("logs", _job_logs, "print (or --follow) a job's logs")
    p.add_argument("submission_id")
    p.add_argument("--follow", action="store_true")
    add("stop", _job_stop, "stop a job").add_argument("submission_id")
