"""Subcommands of this stage (registered into the ``vitray`` parser)."""

from __future__ import annotations

import argparse
import sys


def register(sub: "argparse._SubParsersAction") -> None:
    """Add this stage's subcommands to ``sub``."""
    _register_pretrain(sub)


# ---------------------------------------------------------------- vitray pretrain

def _register_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a ViT on Ray Train (re-run the same command to resume)",
        description="Pretrain a ViT on Parquet shards with Ray Train. The config is the recipe, "
                    "then --config YAML, then the flags below, then --set overrides. Re-running "
                    "with the same --run-name and --storage resumes from the latest complete checkpoint.")
    p.add_argument("--recipe", default="tiny", help="named recipe (tiny, vit-b16-i21k, vit-b16-i1k); default tiny")
    p.add_argument("--config", help="YAML file mapping onto PretrainConfig")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set model.depth=2 --set optim.lr=3e-3 (repeatable)")
    p.add_argument("--shards", help="shard directory URI (data.shards)")
    p.add_argument("--exclude", action="append", default=None, metavar="URI",
                   help="exclusion file from dedup (data.exclude; repeatable)")
    p.add_argument("--dedup-index", action="append", default=None, metavar="URI",
                   help="dedup index manifest recorded in checkpoint lineage (data.dedup_indexes; repeatable)")
    p.add_argument("--run-name", help="run name (run.name); the same name resumes")
    p.add_argument("--storage", help="run storage: local path or s3://bucket/prefix (run.storage_path)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for shards and run storage")
    p.add_argument("--workers", type=int, help="Ray Train workers (scaling.num_workers)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (scaling.use_gpu)")
    p.add_argument("--steps", type=int, help="optimizer steps (steps)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_pretrain)


def _pretrain_overrides(args: argparse.Namespace) -> dict:
    """Flags -> nested overrides; ``--set`` wins over the named flags."""
    from vitray.config import merge, parse_overrides

    out: dict = {}
    pairs = {
        ("data", "shards"): args.shards, ("data", "exclude"): args.exclude,
        ("data", "dedup_indexes"): args.dedup_index, ("run", "name"): args.run_name,
        ("run", "storage_path"): args.storage, ("scaling", "num_workers"): args.workers,
        ("scaling", "use_gpu"): args.gpu, ("steps",): args.steps,
        ("run", "storage", "endpoint_url"): args.endpoint_url,
        ("data", "storage", "endpoint_url"): args.endpoint_url,
    }
    for keys, value in pairs.items():
        if value is None:
            continue
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return merge(out, parse_overrides(args.overrides))


def _pretrain(args: argparse.Namespace) -> int:
    from vitray.config import dump_yaml
    from vitray.training.config import load_pretrain_config
    from vitray.training.pretrain import NonFiniteLossError, run_pretrain

    cfg = load_pretrain_config(args.recipe, args.config, _pretrain_overrides(args))
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    try:
        result = run_pretrain(cfg)
    except NonFiniteLossError as exc:
        print(f"vitray pretrain: {exc}", file=sys.stderr)
        return 3
    print(f"vitray pretrain: {result.run_uri} reached step {result.step}; final checkpoint {result.checkpoint}")
    return 0
