"""The ``vitray`` command. Subcommands parse arguments, build a config and call one function.

Each stage registers its own subcommands (``register(subparsers)`` in its ``cli``
module), so this file only assembles them; no logic lives in the CLI layer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import vitray
from vitray.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from vitray.cluster import cli as cluster_cli
    from vitray.dedup import cli as dedup_cli
    from vitray.pipeline import cli as pipeline_cli
    from vitray.training import cli as training_cli

    parser = argparse.ArgumentParser(prog="vitray", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"vitray {vitray.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (pipeline_cli, dedup_cli, training_cli, cluster_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"vitray {args.command}: invalid config: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
