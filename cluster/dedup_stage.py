"""The dedup stage as the pipeline runner sees it: configs from pipeline fields, results it can print.

Thin on purpose: :mod:`vitray.dedup.index` and :mod:`vitray.dedup.run` do the work;
this module only maps the pipeline's layout onto their configs and reads back the
few facts the runner and the demo report.
"""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq

from vitray import storage
from vitray.config import load, merge, to_dict
from vitray.dedup import outputs
from vitray.dedup.index import IndexConfig
from vitray.dedup.index import build_index as _build_index
from vitray.dedup.run import DedupConfig, DedupResult, run_dedup
from vitray.pipeline.schema import MANIFEST_NAME
from vitray.storage import StorageOptions


def index_config(evals: list[tuple[str, str]], out: str, options: StorageOptions, overrides: dict) -> IndexConfig:
    return load(IndexConfig, overrides=merge(overrides, {
        "evals": [f"{name}={src}" for name, src in evals], "out": out, "storage": to_dict(options)}))


def run_config(corpus: str, index: str, out: str, options: StorageOptions, overrides: dict) -> DedupConfig:
    return load(DedupConfig, overrides=merge(overrides, {
        "corpus": corpus, "index": index, "out": out, "storage": to_dict(options)}))


def exclusion_file(out: str) -> str:
    return storage.join(out, outputs.EXCLUDE_FILE)


def index_manifest(index: str) -> str:
    return storage.join(index, MANIFEST_NAME)


def build_index(cfg: IndexConfig) -> dict:
    return _build_index(cfg)


@dataclasses.dataclass
class StageResult:
    result: DedupResult
    removed_sources: list[str]
    """Corpus source URIs of every removed row (for audits and the demo's score)."""

    def summary(self) -> str:
        return self.result.table


def run(cfg: DedupConfig) -> StageResult:
    result = run_dedup(cfg)
    fs, root = storage.resolve(cfg.out, cfg.storage)
    with fs.open_input_file(f"{root}/{outputs.REMOVED_FILE}") as f:
        removed = pq.read_table(f, columns=["source"]).column("source").to_pylist()
    return StageResult(result=result, removed_sources=sorted(set(removed)))
