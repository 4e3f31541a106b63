"""One command to run or resume the whole pipeline: shard -> dedup index -> dedup run -> pretrain.

Every stage is resumable on its own (shards finish the missing ones, dedup skips
completed corpus shards, pretraining continues from its latest checkpoint), so
re-running ``vitray run CONFIG`` after any interruption picks up where it stopped.
All stage configs are built and validated before the first stage starts, so a typo
in the pretraining section fails in seconds, not after hours of sharding.

Layout under ``workdir`` (a local path or ``s3://`` / ``gs://`` URI)::

    shards/            vitray shard output (corpus)
    dedup/index/       eval-set index
    dedup/run/         exclude.txt, removed.parquet, summary.json, report.html
    runs/<name>/       pretraining checkpoints, metrics, config
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from vitray import storage
from vitray.config import check, load, merge, to_dict
from vitray.storage import StorageOptions

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalSet:
    name: str
    """Short name used in reports and lineage, e.g. ``cifar10-test``."""
    src: str
    """Any source ``vitray dedup index`` reads."""

    def __post_init__(self):
        check(bool(self.name) and "=" not in self.name, "name", f"must be a non-empty name, got {self.name!r}")
        check(bool(self.src), "src", "is required")


@dataclasses.dataclass
class PipelineConfig:
    """The whole run. Stage sections hold overrides of each stage's own config."""

    corpus: str = ""
    """Source URI of the pretraining corpus."""
    workdir: str = ""
    """Root URI for every output (see the module docstring)."""
    eval_sets: list[EvalSet] = dataclasses.field(default_factory=list)
    """Downstream TEST sets the corpus must be cleaned against."""
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)
    """Object-store endpoint used by every stage (no credentials)."""
    shard: dict[str, Any] = dataclasses.field(default_factory=dict)
    """ShardConfig overrides (src/dst/storage are set from the fields above)."""
    dedup_index: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Dedup index config overrides."""
    dedup: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Dedup run config overrides."""
    pretrain_recipe: str = "tiny"
    """Named pretraining recipe (see ``vitray.training.config.RECIPES``)."""
    pretrain: dict[str, Any] = dataclasses.field(default_factory=dict)
    """PretrainConfig overrides (data.shards/exclude/dedup_indexes and run.storage_path are set here)."""

    def __post_init__(self):
        check(bool(self.corpus), "corpus", "is required")
        check(bool(self.workdir), "workdir", "is required")
        names = [e.name for e in self.eval_sets]
        check(len(set(names)) == len(names), "eval_sets", f"names must be unique, got {names}")

    def path(self, *parts: str) -> str:
        return storage.join(self.workdir, *parts)


@dataclasses.dataclass
class StageConfigs:
    shard: Any
    dedup_index: Any | None
    dedup: Any | None
    pretrain: Any


def stage_configs(cfg: PipelineConfig) -> StageConfigs:
    """Build and validate every stage's config up front (errors name ``<stage>.<field>``)."""
    from vitray.config import ConfigError
    from vitray.cluster import dedup_stage
    from vitray.pipeline.shard import ShardConfig
    from vitray.training.config import load_pretrain_config

    store = to_dict(cfg.storage)

    def scoped(stage, build):
        try:
            return build()
        except ConfigError as exc:
            raise ConfigError(f"{stage}.{exc.field}", str(exc).split(": ", 1)[1]) from None

    shard = scoped("shard", lambda: load(ShardConfig, overrides=merge(
        cfg.shard, {"src": cfg.corpus, "dst": cfg.path("shards"), "storage": store})))
    index = dedup = None
    exclude, indexes = [], []
    if cfg.eval_sets:
        index = scoped("dedup_index", lambda: dedup_stage.index_config(
            [(e.name, e.src) for e in cfg.eval_sets], cfg.path("dedup", "index"), cfg.storage, cfg.dedup_index))
        dedup = scoped("dedup", lambda: dedup_stage.run_config(
            cfg.path("shards"), cfg.path("dedup", "index"), cfg.path("dedup", "run"), cfg.storage, cfg.dedup))
        exclude = [dedup_stage.exclusion_file(cfg.path("dedup", "run"))]
        indexes = [dedup_stage.index_manifest(cfg.path("dedup", "index"))]
    pretrain = scoped("pretrain", lambda: load_pretrain_config(cfg.pretrain_recipe, overrides=merge(
        cfg.pretrain, {"data": {"shards": cfg.path("shards"), "exclude": exclude, "dedup_indexes": indexes,
                                "storage": store},
                       "run": {"storage_path": cfg.path("runs"), "storage": store}})))
    return StageConfigs(shard=shard, dedup_index=index, dedup=dedup, pretrain=pretrain)


@dataclasses.dataclass
class PipelineResult:
    shard: Any
    dedup_index: Any | None
    dedup: Any | None
    pretrain: Any
    seconds: dict[str, float]


def run_pipeline(cfg: PipelineConfig, stop_after: str | None = None) -> PipelineResult:
    """Run (or resume) every stage in order; ``stop_after`` in {shard, dedup, pretrain}."""
    from vitray.cluster import dedup_stage
    from vitray.pipeline.shard import run_shard
    from vitray.training.pretrain import run_pretrain

    stages = stage_configs(cfg)
    seconds: dict[str, float] = {}
    out = PipelineResult(None, None, None, None, seconds)

    def timed(name, fn):
        t0 = time.perf_counter()
        log.info("stage %s: start", name)
        value = fn()
        seconds[name] = time.perf_counter() - t0
        log.info("stage %s: done in %.1f s", name, seconds[name])
        return value

    out.shard = timed("shard", lambda: run_shard(stages.shard))
    if not out.shard.ok:
        raise RuntimeError(f"shard stage failed: {out.shard.counts['failed']} of {out.shard.counts['read']} "
                           f"inputs failed, above shard.max_failure_fraction")
    if stop_after == "shard":
        return out
    if stages.dedup_index is not None:
        out.dedup_index = timed("dedup index", lambda: dedup_stage.build_index(stages.dedup_index))
        out.dedup = timed("dedup run", lambda: dedup_stage.run(stages.dedup))
    if stop_after == "dedup":
        return out
    out.pretrain = timed("pretrain", lambda: run_pretrain(stages.pretrain))
    return out
