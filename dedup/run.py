"""`vitray dedup run CORPUS --index INDEX --out OUT`: remove eval-set near-duplicates from a corpus.

How a run goes:

1. **Load** (driver): the index (thumbnails + view hashes, not previews) and the
   corpus manifest. Views of degenerate eval images are left out of the search.
   The pHash and dHash :class:`search.HammingIndex` es are built once and put in
   the object store once (``ray.put``); every worker maps the same copy.
2. **Scan** (Ray Data streaming job over the shard list, a fixed pool of actors
   holding the index): a task reads its shards' hash columns only, searches,
   decodes just the candidate rows, verifies and writes its per-shard
   results atomically (``scan.process_shards``; consecutive shards are grouped into
   tasks of ~``task_rows`` rows, searched together). Shards whose results exist for
   this exact run (same index digest, settings and shard checksum) are skipped:
   re-running resumes, and a finished run re-runs as a no-op.
3. **Finish** (driver, :func:`finish`): from the per-shard results write
   ``exclude.txt`` (sample ids, one per line: what the training reader
   consumes), ``removed.parquet`` (one row per verified (corpus, eval) pair),
   ``exact_duplicates.parquet`` (corpus rows sharing a SHA-256), ``failures.parquet``,
   ``summary.json`` (per eval set: contamination), ``report.html``, and with
   ``write_clean`` the cleaned shards + their manifest under ``clean/``.
   Corpus rows = kept + removed + failed is checked, per shard and in total.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import numpy as np

from vitray import storage
from vitray.config import ConfigError, check, to_dict
from vitray.dedup import scan
from vitray.dedup.index import EvalIndex, load_index
from vitray.dedup.search import MAX_RADIUS, HammingIndex
from vitray.dedup.verify import Verifier, VerifyConfig
from vitray.pipeline import images, schema
from vitray.storage import StorageOptions

log = logging.getLogger(__name__)

RUN_VERSION = 1
"""Bump when per-shard results change meaning, so old parts stop counting as done."""


@dataclasses.dataclass
class DedupConfig:
    """Settings of one `vitray dedup run` (written to OUT/run_config.json)."""

    corpus: str = ""
    """Shard directory URI written by `vitray shard` (must have its _manifest.json)."""
    index: str = ""
    """Index directory URI written by `vitray dedup index`."""
    out: str = ""
    """Output directory URI."""
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)
    phash_radius: int = 12
    """Search radius: views whose pHash is within this many bits of a corpus pHash are hits (-1: off)."""
    dhash_radius: int = 12
    """... and views whose dHash is within this many bits of the corpus dHash (-1: off)."""
    joint_radius: int = 30
    """A hit makes its eval image a candidate when pHash + dHash distance (same view) <= this ..."""
    strong_radius: int = 8
    """... or when either distance alone is <= this."""
    max_candidates_per_row: int = 32
    """Eval images verified per corpus row at most (closest hashes first)."""
    verify: VerifyConfig = dataclasses.field(default_factory=VerifyConfig)
    borderline: float = 0.08
    """Pairs whose score is within this of the threshold are kept with previews for the report."""
    report_pairs: int = 60
    """Pairs shown per report section."""
    preview_side: int = 64
    """Longer side of corpus previews in the report."""
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    """Decode limit when verifying candidate rows."""
    write_clean: bool = False
    """Also write the corpus without the removed rows to OUT/clean/ (shards + manifest)."""
    exclude_exact_duplicates: bool = False
    """Also put corpus rows whose SHA-256 repeats an earlier row's into exclude.txt (else: flagged only)."""
    concurrency: int | None = None
    """Shard workers (actors holding the index); default: cluster CPUs / num_cpus."""
    num_cpus: float = 1.0
    """CPUs per shard worker."""
    task_rows: int = 100_000
    """Consecutive shards are grouped into tasks of about this many rows (one hash search per task)."""

    def __post_init__(self):
        for f in ("corpus", "index", "out"):
            check(bool(getattr(self, f)), f, "a URI is required")
            try:
                storage.scheme_of(getattr(self, f))
            except ValueError as exc:
                raise ConfigError(f, str(exc)) from None
        for f in ("phash_radius", "dhash_radius"):
            check(-1 <= getattr(self, f) <= MAX_RADIUS, f, f"must be in -1..{MAX_RADIUS}")
        check(self.phash_radius >= 0 or self.dhash_radius >= 0, "phash_radius", "at least one hash must be searched")
        check(0 <= self.joint_radius <= 128, "joint_radius", "must be in 0..128")
        check(-1 <= self.strong_radius <= MAX_RADIUS, "strong_radius", f"must be in -1..{MAX_RADIUS}")
        check(self.max_candidates_per_row >= 1, "max_candidates_per_row", "must be >= 1")
        check(0 <= self.borderline <= 1, "borderline", "must be in [0, 1]")
        check(self.report_pairs >= 0, "report_pairs", "must be >= 0")
        check(16 <= self.preview_side <= 256, "preview_side", "must be in 16..256")
        check(self.num_cpus > 0, "num_cpus", "must be positive")
        check(self.task_rows >= 1, "task_rows", "must be >= 1")
        check(self.concurrency is None or self.concurrency >= 1, "concurrency", "must be >= 1 or null")


@dataclasses.dataclass
class DedupResult:
    summary: dict
    table: str
    """The per-eval-set summary as printed."""
    shards_run: int


# ---------------------------------------------------------------- driver: setup

def read_corpus_manifest(cfg: DedupConfig) -> dict:
    try:
        return schema.load_manifest(cfg.corpus, cfg.storage)
    except OSError as exc:  # missing or incomplete (FileNotFoundError), unreadable
        raise ConfigError("corpus", f"{exc} (finish `vitray shard` first)") from None
    except ValueError as exc:
        raise ConfigError("corpus", f"not a vitray shard directory: {exc}") from None


def fingerprint(cfg: DedupConfig, index: EvalIndex) -> str:
    """Identifies what per-shard results depend on: index version and result-changing settings."""
    keys = ("phash_radius", "dhash_radius", "joint_radius", "strong_radius", "max_candidates_per_row", "verify", "borderline", "preview_side",
            "max_pixels", "write_clean")
    d = {k: v for k, v in to_dict(cfg).items() if k in keys}
    d.update(index=index.digest, version=RUN_VERSION)
    return "sha256:" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def make_bundle(cfg: DedupConfig, index: EvalIndex) -> dict:
    """Everything a shard worker needs, as numpy arrays (shared zero-copy through the object store)."""
    check(index.thumbs.shape[1] == cfg.verify.thumb_size, "verify.thumb_size",
          f"the index stores {index.thumbs.shape[1]}px thumbnails; set verify.thumb_size to match")
    usable = index.detail >= cfg.verify.min_detail  # degenerate eval images are not searched at all
    views = np.flatnonzero(usable[index.view_row])
    return {
        "p_index": HammingIndex(index.view_phash[views]), "d_index": HammingIndex(index.view_dhash[views]),
        "view_row": index.view_row[views].astype(np.int64), "view_id": index.view_id[views],
        "view_phash": index.view_phash[views], "view_dhash": index.view_dhash[views],
        "view_names": index.view_names, "thumbs": index.thumbs, "thumb_size": index.thumbs.shape[1],
        "n_eval": len(index.eval_id), "fingerprint": fingerprint(cfg, index),
    }


# ---------------------------------------------------------------- scan (Ray Data)

class _ShardWorker:
    """Ray Data actor: holds the index bundle (fetched once from the object store)."""

    def __init__(self, bundle_ref: list, cfg: DedupConfig):
        import ray

        self.bundle = ray.get(bundle_ref[0])
        self.cfg = cfg
        self.verifier = Verifier(cfg.verify)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {}
        for group_json in batch["shards"]:
            for stats in scan.process_shards(json.loads(group_json), self.bundle, self.cfg, self.verifier):
                for k in ("shard", "rows", "removed", "failed", "candidate_rows", "resumed", "seconds"):
                    out.setdefault(k, []).append(stats[k])
        return out


def _ensure_ray():
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    return ray


def _scan(cfg: DedupConfig, bundle: dict, shards: list[dict]) -> int:
    """Run the shard tasks not done yet; returns how many ran."""
    ofs, oroot = storage.resolve(cfg.out, cfg.storage)
    todo = []
    for s in shards:
        done = scan.read_done(ofs, scan.part_paths(oroot, s["name"])["done"])
        if not (done and done.get("fingerprint") == bundle["fingerprint"]
                and done.get("shard_checksum") == s.get("checksum")):
            todo.append(s)
    log.info("%d of %d shards to scan (%d already done)", len(todo), len(shards), len(shards) - len(todo))
    if not todo:
        return 0
    ray = _ensure_ray()
    import ray.data

    groups: list[list[dict]] = [[]]
    for s in todo:  # consecutive shards, about task_rows rows per task
        if groups[-1] and sum(int(x.get("rows", 0)) for x in groups[-1]) >= cfg.task_rows:
            groups.append([])
        groups[-1].append(s)
    size = cfg.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.num_cpus))
    size = min(size, len(groups))
    ref = ray.put(bundle)  # once; actors map it, nothing is re-read per shard
    items = [{"shards": json.dumps(g)} for g in groups]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_ShardWorker, fn_constructor_args=([ref], cfg), batch_size=1, num_cpus=cfg.num_cpus,
                        compute=ray.data.ActorPoolStrategy(size=size))
    t0, rows, n = time.perf_counter(), 0, 0
    for st in ds.iter_rows():
        n += 1
        rows += int(st["rows"])
        log.info("shard %d/%d %s: %d rows, %d candidates, %d removed, %d failed (%.0f rows/s)", n, len(todo),
                 st["shard"], st["rows"], st["candidate_rows"], st["removed"], st["failed"],
                 rows / max(time.perf_counter() - t0, 1e-9))
    return n


# ---------------------------------------------------------------- entry point

def run_dedup(cfg: DedupConfig) -> DedupResult:
    """Scan the corpus against the index and write all outputs (see module docstring)."""
    from vitray.dedup import outputs

    t0 = time.perf_counter()
    manifest = read_corpus_manifest(cfg)
    index = load_index(cfg.index, cfg.storage)
    bundle = make_bundle(cfg, index)
    ofs, oroot = storage.resolve(cfg.out, cfg.storage)
    storage.write_bytes_atomic(ofs, f"{oroot}/run_config.json",
                               json.dumps({"config": to_dict(cfg), "fingerprint": bundle["fingerprint"],
                                           "index_digest": index.digest}, indent=2).encode())
    shards = [s for s in manifest.get("shards", [])]
    ran = _scan(cfg, bundle, shards)
    summary = outputs.finish(cfg, index, manifest, bundle["fingerprint"], seconds=time.perf_counter() - t0)
    table = outputs.summary_table(summary)
    log.info("dedup summary:\n%s", table)
    return DedupResult(summary=summary, table=table, shards_run=ran)
