"""Subcommands of this stage: ``vitray dedup index`` and ``vitray dedup run``."""

from __future__ import annotations

import argparse
import sys

from vitray import config


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``vitray dedup {index,run}`` to ``sub``."""
    p = sub.add_parser("dedup", help="remove near-duplicates of eval (test) sets from a corpus",
                       description="Build a perceptual-hash index of eval sets, then find and remove their "
                                   "near-duplicates from a sharded corpus.")
    dsub = p.add_subparsers(dest="dedup_command", metavar="SUBCOMMAND", required=True)

    ix = dsub.add_parser("index", help="hash eval sets (+ crops, flips, zoom-outs) into an index",
                         description="Hash every image of one or more eval sets, as several views each, into "
                                     "an index directory (Parquet + _manifest.json with a content digest). SRC is "
                                     "a CIFAR-10/100 python-pickle directory, a vitray shard directory, or any "
                                     "source `vitray shard` reads (ImageFolder trees, image prefixes, WebDataset "
                                     "tars, Parquet with an image column).")
    ix.add_argument("--eval", dest="evals", action="append", required=True, metavar="NAME=SRC",
                    help="an eval set (repeatable), e.g. --eval cifar10=~/data/cifar-10-batches-py")
    ix.add_argument("--out", required=True, help="index directory URI")
    _common(ix)
    ix.set_defaults(func=index_command)

    run = dsub.add_parser("run", help="find and remove eval near-duplicates from a shard directory",
                          description="Search CORPUS (a `vitray shard` directory) for near-duplicates of the "
                                      "indexed eval images; write exclude.txt, removed.parquet, "
                                      "exact_duplicates.parquet, summary.json and report.html to OUT. Re-running "
                                      "resumes an interrupted run.")
    run.add_argument("corpus", help="shard directory URI")
    run.add_argument("--index", required=True, help="index directory URI (from `vitray dedup index`)")
    run.add_argument("--out", required=True, help="output directory URI")
    run.add_argument("--threshold", type=float, help="verification score threshold (verify.threshold)")
    run.add_argument("--write-clean", action="store_true", default=None,
                     help="also write the corpus without removed rows to OUT/clean/")
    run.add_argument("--exclude-exact-duplicates", action="store_true", default=None,
                     help="also exclude repeated copies (same SHA-256) within the corpus")
    _common(run)
    run.set_defaults(func=run_command)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, ...); credentials come from the AWS chain")
    p.add_argument("--config", help="YAML file with the config's fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set verify.threshold=0.85 (repeatable)")


def _overrides(args: argparse.Namespace, flags: dict) -> dict:
    out = {k: v for k, v in flags.items() if v is not None}
    if args.endpoint_url:
        out["storage"] = {"endpoint_url": args.endpoint_url}
    return config.merge(out, config.parse_overrides(args.set))


def index_command(args: argparse.Namespace) -> int:
    from vitray.dedup.index import IndexConfig, build_index

    cfg = config.load(IndexConfig, path=args.config, overrides=_overrides(args, {"evals": args.evals, "out": args.out}))
    manifest = build_index(cfg)
    for name, s in manifest["sets"].items():
        print(f"{name}: {s['indexed']} images indexed, {s['failed']} failed ({s['layout']}: {s['src']})")
    print(f"index {cfg.out}: {manifest['counts']['views']} view hashes, digest {manifest['digest']}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    from vitray.dedup.outputs import IncompleteRun
    from vitray.dedup.run import DedupConfig, run_dedup

    flags = {"corpus": args.corpus, "index": args.index, "out": args.out, "write_clean": args.write_clean,
             "exclude_exact_duplicates": args.exclude_exact_duplicates}
    overrides = _overrides(args, flags)
    if args.threshold is not None:
        overrides = config.merge({"verify": {"threshold": args.threshold}}, overrides)
    cfg = config.load(DedupConfig, path=args.config, overrides=overrides)
    try:
        result = run_dedup(cfg)
    except IncompleteRun as exc:
        print(f"vitray dedup run: {exc}", file=sys.stderr)
        return 1
    print(result.table)
    return 0
