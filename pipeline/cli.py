"""Subcommands of this stage (registered into the ``vitray`` parser): ``vitray shard``."""

from __future__ import annotations

import argparse
import sys

from vitray import config


def register(sub: "argparse._SubParsersAction") -> None:
    """Add this stage's subcommands to ``sub``."""
    p = sub.add_parser(
        "shard", help="image corpus (files, WebDataset tars, Parquet) -> Parquet shards",
        description="Read an image corpus from SRC (s3://, gs:// or a local path) and write Parquet shards, "
                    "_failures.parquet and _manifest.json to DST. Re-running resumes; exit status 1 when the "
                    "failure fraction passes --max-failure-fraction.")
    p.add_argument("src", help="source URI: image files under a prefix, WebDataset .tar shards, or Parquet files")
    p.add_argument("dst", help="destination URI of the shard directory")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, ...); credentials come from the AWS chain")
    p.add_argument("--source-format", choices=("auto", "images", "webdataset", "parquet"))
    p.add_argument("--target-shard-mb", type=float, help="planned input MiB per shard (default 128)")
    p.add_argument("--max-side", type=int, help="re-encode images whose shorter side exceeds this")
    p.add_argument("--max-pixels", type=int, help="decompression-bomb limit in pixels")
    p.add_argument("--max-failure-fraction", type=float, help="fail the run above this failed/read (default 0.01)")
    p.add_argument("--labels", help="CSV/JSONL mapping of paths (relative to SRC) to label or labels")
    p.add_argument("--image-column", help="Parquet sources: column of encoded image bytes (default image)")
    p.add_argument("--label-column", help="Parquet sources: label column (default label, if present)")
    p.add_argument("--config", help="YAML file with ShardConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any ShardConfig field, e.g. --set concurrency=4 (repeatable)")
    p.set_defaults(func=shard_command)


def shard_command(args: argparse.Namespace) -> int:
    from vitray.pipeline.shard import ShardConfig, ShardError, run_shard

    flags = {"src": args.src, "dst": args.dst, "source_format": args.source_format,
             "max_side": args.max_side, "max_pixels": args.max_pixels,
             "max_failure_fraction": args.max_failure_fraction, "labels": args.labels,
             "image_column": args.image_column, "label_column": args.label_column}
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.target_shard_mb is not None:
        overrides["target_shard_bytes"] = int(args.target_shard_mb * 1024 * 1024)
    if args.endpoint_url:
        overrides["storage"] = {"endpoint_url": args.endpoint_url}
    overrides = config.merge(overrides, config.parse_overrides(args.set))
    cfg = config.load(ShardConfig, path=args.config, overrides=overrides)
    try:
        result = run_shard(cfg)
    except ShardError as exc:
        print(f"vitray shard: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    if not result.ok:
        c = result.counts
        print(f"vitray shard: {c['failed']} of {c['read']} inputs failed ({100 * result.failure_fraction:.2f}%), "
              f"above the limit of {100 * cfg.max_failure_fraction:.2f}% (--max-failure-fraction); "
              f"reasons are in {cfg.dst.rstrip('/')}/_failures.parquet", file=sys.stderr)
        return 1
    return 0
