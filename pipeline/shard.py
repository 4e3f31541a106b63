"""`vitray shard SRC DST`: an image corpus in object storage -> Parquet shards.

How a run goes:

1. **Plan** (driver, :func:`plan_shards`): list the source in sorted order into
   units (``sources.list_source``), group consecutive units into tasks of about
   ``target_shard_bytes`` (at least 16 tasks for a small input, the last tenth
   of a large one in finer tasks, so the workers finish together:
   :func:`task_target`, :func:`fine_tail`); task ``i`` writes
   ``shard-0000i.parquet``. The plan is a pure function of the listing and the
   config, so a re-run plans the same tasks.
2. **Execute** (Ray Data streaming job, :func:`run_shard`): a fixed pool of
   long-lived workers (Ray Data actors, one per ``num_cpus``) runs the plan
   tasks; each (``shard_task.process_task``) reads, decodes, hashes, optionally
   re-encodes, writes its shard atomically plus a completion marker, and returns
   a few integers. Memory is bounded by ``concurrency x`` one shard, whatever the
   corpus size; nothing large goes through the object store. Actors rather than
   Ray tasks because a shard task lasts a fraction of a second to a few seconds:
   measured on 2 CPUs, task scheduling latency (0.2-0.5 s per task) left one of
   the two workers idle most of the time; an actor has its next task queued.
3. **Finish** (driver): merge the markers' failures into ``_failures.parquet``,
   drop shards left by an older plan, and write ``_manifest.json`` last.

Resume = run again: tasks whose marker is valid (same task digest, shard bytes
match the checksum) are skipped; a second complete run changes no file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from vitray import storage
from vitray.storage import StorageOptions
from vitray.config import ConfigError, check, to_dict
from vitray.pipeline import images, schema, shard_task, sources

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PROCESS_VERSION = 1
"""Bump when the row encoding changes, so old markers stop vouching for old shards."""


class ShardError(Exception):
    """The run cannot proceed (bad source, Ray job failure); the message says what to do."""


def _canonical(uri: str) -> str:
    uri = uri.rstrip("/")
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


@dataclasses.dataclass
class ShardConfig:
    """Resolved settings of one `vitray shard` run (written into the manifest)."""

    src: str = ""
    """Source URI: s3://bucket/prefix, gs://bucket/prefix or a local path (directory or one file)."""
    dst: str = ""
    """Destination URI of the shard directory."""
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)
    """How to reach object storage (endpoint of an S3-compatible store); holds no credentials."""
    source_format: str = "auto"
    """images | webdataset | parquet | auto (all .tar -> webdataset, all .parquet -> parquet, else images)."""
    target_shard_bytes: int = 128 * MiB
    """Planned input bytes per shard (a tar is never split, so its shard may be larger). So that every worker
    has work to the end, an input of fewer than 16 such shards is cut into 16 (of at least 4 MiB:
    ``task_target``), and the last tenth of a large input goes into shards of 1/8 (``fine_tail``)."""
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    """Images with more pixels are recorded as decompression bombs, not decoded."""
    max_side: int | None = None
    """Cap on the shorter displayed side of stored images (re-encoded); None keeps the original bytes."""
    reencode_quality: int = 90
    """JPEG quality of re-encoded images (PNG sources are re-encoded losslessly)."""
    max_failure_fraction: float = 0.01
    """The run reports failure (non-zero exit) when failed / read exceeds this."""
    label_source: str = "auto"
    """Image files: folder | mapping | none | auto (mapping if ``labels`` is set, else folder if every
    file is in a folder under ``src``, else none)."""
    labels: str | None = None
    """URI of a CSV/JSONL mapping ``path -> label`` or ``labels`` (paths relative to ``src``)."""
    image_column: str = "image"
    """Parquet sources: the column holding encoded image bytes."""
    label_column: str | None = None
    """Parquet sources: the label column (default: ``label`` if present)."""
    num_cpus: float = 1.0
    """CPUs reserved per shard task."""
    concurrency: int | None = None
    """Shard workers (Ray Data actors) to run (default: as many as the cluster's free CPUs allow)."""
    wait_for_workers_s: float = 0.0
    """0: start as soon as one worker is up, the rest join as they start (fastest). > 0: start only
    once every worker is up, failing after this many seconds (e.g. to make sure every node takes part).
    After such a failure Ray Data leaves the started workers holding their CPUs until the driver exits."""
    io_threads: int = 8
    """Object reads in flight per task (hides object-store latency)."""

    def __post_init__(self):
        check(bool(self.src), "src", "a source URI is required")
        check(bool(self.dst), "dst", "a destination URI is required")
        for field in ("src", "dst"):
            try:
                storage.scheme_of(getattr(self, field))
            except ValueError as exc:
                raise ConfigError(field, str(exc)) from None
        src, dst = _canonical(self.src), _canonical(self.dst)
        check(dst != src and not dst.startswith(src + "/"), "dst", "must not be the source or inside it")
        check(self.source_format in ("auto",) + sources.KINDS, "source_format",
              f"must be one of auto, {', '.join(sources.KINDS)}")
        check(self.label_source in sources.LABEL_SOURCES, "label_source",
              f"must be one of {', '.join(sources.LABEL_SOURCES)}")
        check(self.target_shard_bytes >= 1, "target_shard_bytes", "must be positive")
        check(self.max_pixels >= 1, "max_pixels", "must be positive")
        check(self.max_side is None or self.max_side >= 8, "max_side", "must be >= 8 or null")
        check(1 <= self.reencode_quality <= 100, "reencode_quality", "must be in 1..100")
        check(0.0 <= self.max_failure_fraction <= 1.0, "max_failure_fraction", "must be in [0, 1]")
        check(bool(self.image_column), "image_column", "must be a column name")
        check(self.num_cpus > 0, "num_cpus", "must be positive")
        check(self.concurrency is None or self.concurrency >= 1, "concurrency", "must be >= 1 or null")
        check(self.io_threads >= 1, "io_threads", "must be >= 1")
        check(self.wait_for_workers_s >= 0, "wait_for_workers_s", "must be >= 0")


@dataclasses.dataclass
class ShardPlan:
    """Tasks of a run. ``tasks[i]`` = {"index", "units", "classes", "digest"}."""

    kind: str
    classes: list[str] | None
    tasks: list[dict]
    digest: str
    """Digest of all task digests: identifies the planned output."""


@dataclasses.dataclass
class ShardResult:
    counts: dict
    """{"read", "written", "failed"}; read == written + failed."""
    manifest: dict
    failure_kinds: dict
    """Failures grouped by reason kind (the text before the first colon) -> count."""
    shards_run: int
    """Shards (re)computed by this run; the others had valid markers."""
    shards_resumed: int
    nodes: int
    """Distinct Ray nodes that ran shard tasks."""
    seconds: float
    """Wall time of the whole run (plan, Ray start-up, shard work, finish)."""
    max_failure_fraction: float
    work_seconds: float = 0.0
    """Wall time from the first shard task's start to the last one's end (tasks run by this run only):
    the steady-state part of ``seconds``, which ``read / work_seconds`` turns into a throughput."""
    read_now: int = 0
    """Inputs read by the tasks this run ran (the rest were verified from their markers)."""
    workers: int = 0
    """Distinct shard workers (Ray Data actors) that ran tasks."""
    startup_seconds: float = 0.0
    """Wall time from submitting the Ray Data job to the first shard task's start (worker processes
    starting and importing Ray Data and vitray): a fixed cost per run, whatever the corpus size."""
    tail_seconds: float = 0.0
    """How long the first worker to run out of tasks stood idle before the last task ended (the tail
    that ``fine_tail``'s smaller last tasks keep short)."""

    @property
    def failure_fraction(self) -> float:
        return self.counts["failed"] / self.counts["read"] if self.counts["read"] else 0.0

    @property
    def ok(self) -> bool:
        return self.failure_fraction <= self.max_failure_fraction

    def summary(self) -> str:
        """A small table for people (the CLI prints it)."""
        c, m = self.counts, self.manifest
        shard_bytes = sum(s["bytes"] for s in m["shards"])
        lines = [
            f"vitray shard: {m['source']} -> {m['config']['dst']}",
            f"  {'shards':<12}{len(m['shards']):>10,}   ({self.shards_run} run now, "
            f"{self.shards_resumed} already complete; {self.nodes} node(s))",
            f"  {'read':<12}{c['read']:>10,}",
            f"  {'written':<12}{c['written']:>10,}   ({shard_bytes / MiB:,.1f} MiB of shards)",
            f"  {'failed':<12}{c['failed']:>10,}   ({100 * self.failure_fraction:.2f}%, "
            f"limit {100 * self.max_failure_fraction:.2f}%)",
        ]
        lines += [f"    {kind:<20}{n:>6,}" for kind, n in sorted(self.failure_kinds.items(), key=lambda kv: -kv[1])]
        lines.append(f"  {'classes':<12}{len(m['classes']) if m['classes'] else '-':>10}")
        rate = c["read"] / self.seconds if self.seconds > 0 else 0.0
        lines.append(f"  {'time':<12}{self.seconds:>10.1f} s ({rate:,.0f} inputs/s)")
        if self.shards_run and self.work_seconds > 0:
            lines.append(f"  {'':<12}{self.work_seconds:>10.1f} s of shard work ({self.read_now / self.work_seconds:,.0f} "
                         f"inputs/s over {self.workers} worker(s)) after {self.startup_seconds:.1f} s of start-up; "
                         f"{self.tail_seconds:.1f} s tail")
        return "\n".join(lines)


# ---------------------------------------------------------------- plan

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


TAIL_FRACTION = 0.1
"""The last tenth of a large input is planned in finer tasks (see :func:`fine_tail`)."""
TAIL_DIVISOR = 8
"""Tail tasks target ``target_shard_bytes / TAIL_DIVISOR``."""
MIN_TASK_BYTES = 4 * MiB
"""Neither :func:`task_target` nor :func:`fine_tail` plans tasks smaller than this (per-task overhead would
dominate)."""
MIN_TASKS = 16
"""Inputs of less than ``MIN_TASKS`` full tasks are cut into this many (see :func:`task_target`)."""


def task_target(total_bytes: int, target_bytes: int) -> int:
    """The task size a run plans: ``target_bytes``, or less for an input of fewer than ``MIN_TASKS`` of them.

    With the default 128 MiB, a 277 MiB input would make 3 tasks, and a 2-worker run would
    take two task times, one worker idle through the second (measured: 18-19 s of a 27 s
    run). Cut into ``MIN_TASKS`` tasks (never under ``MIN_TASK_BYTES``), every worker of a
    small cluster has work to the end. Depends on the input's size and the config only,
    so a re-run, on any cluster, plans the same tasks.
    """
    return min(target_bytes, max(-(-total_bytes // MIN_TASKS), MIN_TASK_BYTES))


def fine_tail(total_bytes: int, target_bytes: int) -> tuple[int | None, int | None]:
    """``(fine_bytes, fine_from)`` for :func:`partition`: where the input's tail starts and its task size.

    Workers take tasks as they free up, biggest first, so the run ends when the last
    task does. Equal-byte tasks do not take equal time (formats and pixel counts
    differ), and with tasks of the full target one worker could run alone for a
    whole task at the end: measured at 30x the photos with the default 128 MiB
    (14 tasks on 2 workers), one worker idled for 2.4-4.3 s of a 25 s run. Small
    tasks last even that out. The tail is the last ``TAIL_FRACTION`` of the bytes,
    at least two full tasks, cut into tasks of ``target / TAIL_DIVISOR``. Inputs of
    at most 4 full tasks, or whose tail tasks would be under ``MIN_TASK_BYTES``,
    keep one size. A pure function of the listing's size and the target, so a re-run
    (on any cluster) plans the same tasks.
    """
    fine = target_bytes // TAIL_DIVISOR
    if fine < MIN_TASK_BYTES or total_bytes <= 4 * target_bytes:
        return None, None
    tail = max(int(total_bytes * TAIL_FRACTION), 2 * target_bytes)
    return fine, total_bytes - tail


def partition(units: list[dict], target_bytes: int, fine_bytes: int | None = None,
              fine_from: int | None = None) -> list[list[dict]]:
    """Consecutive groups of units, each closed once adding the next unit would pass its target.

    The target is ``target_bytes``, or ``fine_bytes`` for the units that start at or
    after byte offset ``fine_from`` (a group never spans both). A unit larger than
    its target (a tar, a Parquet row range) is a group of its own.
    """
    groups: list[list[dict]] = []
    current: list[dict] = []
    size = offset = 0
    fine_now = False
    for unit in units:
        fine = fine_bytes is not None and fine_from is not None and offset >= fine_from
        limit = fine_bytes if fine else target_bytes
        if current and (size + unit["size"] > limit or fine != fine_now):
            groups.append(current)
            current, size = [], 0
        current.append(unit)
        size += unit["size"]
        offset += unit["size"]
        fine_now = fine
    if current:
        groups.append(current)
    return groups


def plan_shards(cfg: ShardConfig) -> ShardPlan:
    """List the source and partition it into shard tasks (deterministic)."""
    try:
        listing = sources.list_source(cfg)
    except sources.SourceError as exc:
        raise ShardError(str(exc)) from None
    # What decides a task's output bytes besides its units (execution knobs are left out).
    processing = {"version": PROCESS_VERSION, "max_pixels": cfg.max_pixels, "max_side": cfg.max_side,
                  "quality": cfg.reencode_quality, "image_column": cfg.image_column}
    task_classes = listing.classes if listing.kind == "parquet" else None
    tasks = []
    total = sum(u["size"] for u in listing.units)
    target = task_target(total, cfg.target_shard_bytes)
    groups = partition(listing.units, target, *fine_tail(total, target))
    for i, units in enumerate(groups):
        task = {"index": i, "units": units, "classes": task_classes}
        task["digest"] = _digest({**task, "processing": processing})
        tasks.append(task)
    plan_digest = _digest([t["digest"] for t in tasks])
    log.info("planned %d shard tasks over %d %s inputs (%.1f MiB) from %s", len(tasks), len(listing.units),
             listing.kind, total / MiB, cfg.src)
    return ShardPlan(listing.kind, listing.classes, tasks, plan_digest)


# ---------------------------------------------------------------- execute

def _ensure_ray():
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=os.environ.get("RAY_ADDRESS"))  # attach to a cluster if one is named
    return ray


class _ShardWorker:
    """Ray Data UDF, one per actor: a batch of one JSON-encoded plan task -> one row of stats."""

    def __init__(self, cfg: ShardConfig):
        import ray

        self.cfg = cfg
        self.node = ray.get_runtime_context().get_node_id()
        self.worker = ray.get_runtime_context().get_worker_id()

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {}
        for task_json in batch["task"]:
            stats = {**shard_task.process_task(json.loads(task_json), self.cfg), "node": self.node,
                     "worker": self.worker}
            for k, v in stats.items():
                out.setdefault(k, []).append(v)
        return out


def _pool_size(cfg: ShardConfig, n_tasks: int) -> int:
    """Workers to start: ``concurrency``, else what the free CPUs fit now; never more than tasks."""
    import ray

    size = cfg.concurrency or int(ray.available_resources().get("CPU", 0.0) // cfg.num_cpus)
    return max(1, min(size, n_tasks))


def _execute(cfg: ShardConfig, plan: ShardPlan) -> list[dict]:
    """Run the plan's tasks as a Ray Data streaming job; log progress per completed shard."""
    ray = _ensure_ray()
    import ray.data

    # Biggest tasks first: the order shards are computed in does not change them, and this
    # keeps one straggler from running alone at the end.
    order = sorted(plan.tasks, key=lambda t: (-sum(u["size"] for u in t["units"]), t["index"]))
    items = [{"task": json.dumps(t)} for t in order]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # batch_size=1: one plan task per actor call, so a failure or retry redoes one shard only.
    # Two tasks in flight per actor: the next one is queued while the current one runs.
    pool = ray.data.ActorPoolStrategy(size=_pool_size(cfg, len(items)), max_tasks_in_flight_per_actor=2)
    ds = ds.map_batches(_ShardWorker, batch_size=1, fn_constructor_kwargs={"cfg": cfg}, num_cpus=cfg.num_cpus,
                        compute=pool)
    if cfg.wait_for_workers_s > 0:  # the dataset carries its own copy of the DataContext: only this job
        ds.context.wait_for_min_actors_s = cfg.wait_for_workers_s
    done: list[dict] = []
    totals = Counter()
    t0 = time.perf_counter()
    try:
        for row in ds.iter_rows():
            stats = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            done.append(stats)
            totals.update(read=stats["read"], written=stats["rows"], failed=stats["failed"])
            elapsed = time.perf_counter() - t0
            log.info("shard %d/%d %s %s: %d rows, %d failed | total read %d, written %d, failed %d "
                     "(%.0f inputs/s)", len(done), len(plan.tasks), stats["name"] or f"#{stats['index']} (empty)",
                     "verified" if stats["resumed"] else "written", stats["rows"], stats["failed"],
                     totals["read"], totals["written"], totals["failed"], totals["read"] / max(elapsed, 1e-9))
    except ray.exceptions.GetTimeoutError as exc:
        raise ShardError(f"{pool.min_size} shard workers did not all start within {cfg.wait_for_workers_s:g} s "
                         f"({exc}); set concurrency to what the cluster can run") from exc
    except Exception as exc:
        raise ShardError(f"the shard job failed ({type(exc).__name__}: {exc}); completed shards are kept, "
                         f"re-run the same command to finish the rest") from exc
    missing = sorted(set(range(len(plan.tasks))) - {s["index"] for s in done})
    if missing:
        raise ShardError(f"shard tasks {missing[:10]} returned no result; re-run to finish them")
    return sorted(done, key=lambda s: s["index"])


# ---------------------------------------------------------------- finish

def _write_if_changed(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    try:
        if storage.read_bytes(fs, path) == data:
            return
    except OSError:
        pass
    storage.write_bytes_atomic(fs, path, data)


def _remove_stale(fs: pafs.FileSystem, root: str, plan: ShardPlan, live: set[int]) -> None:
    """Delete shards/markers of an older plan and our own leftover temporaries."""
    selector = pafs.FileSelector(root, recursive=False, allow_not_found=True)
    state = pafs.FileSelector(f"{root}/{shard_task.STATE_DIR}", recursive=False, allow_not_found=True)
    for info in fs.get_file_info(selector) + fs.get_file_info(state):
        m = re.fullmatch(r"shard-(\d+)\.(parquet|json)(\.tmp-[0-9a-f]+)?", info.base_name)
        if not m or info.type != pafs.FileType.File:
            continue
        index, ext, tmp = int(m.group(1)), m.group(2), m.group(3)
        stale = tmp or (ext == "parquet" and index not in live) or (ext == "json" and index >= len(plan.tasks))
        if stale:
            log.info("removing stale %s", info.path)
            fs.delete_file(info.path)


def _timing(submitted: float, ran: list[dict]) -> dict:
    """ShardResult's steady-state fields from the stats of the tasks this run ran."""
    if not ran:
        return {}
    first, last = min(s["started"] for s in ran), max(s["ended"] for s in ran)
    worker_last: dict[str, float] = {}
    for s in ran:
        worker_last[s["worker"]] = max(worker_last.get(s["worker"], 0.0), s["ended"])
    return {"work_seconds": max(last - first, 0.0), "startup_seconds": max(first - submitted, 0.0),
            "read_now": sum(s["read"] for s in ran), "workers": len(worker_last),
            "tail_seconds": last - min(worker_last.values())}


def run_shard(cfg: ShardConfig, plan: ShardPlan | None = None) -> ShardResult:
    """Plan (unless given), run and finish a shard job; see the module docstring.

    Starts a local Ray runtime, or attaches to ``RAY_ADDRESS``, if Ray is not
    initialised. Raises :class:`ShardError` when the source is unusable or the
    job fails; a high failure fraction is reported through ``ShardResult.ok``.
    """
    t0 = time.perf_counter()
    plan = plan or plan_shards(cfg)
    fs, root = storage.resolve(cfg.dst, cfg.storage)
    manifest_path = f"{root}/{schema.MANIFEST_NAME}"
    old = shard_task.read_marker(fs, manifest_path)
    if old is not None and old.get("plan_digest") != plan.digest:
        fs.delete_file(manifest_path)  # the directory is incomplete until the new manifest lands

    submitted = time.time()
    stats = _execute(cfg, plan)

    markers = list(sources.ordered_prefetch(
        range(len(plan.tasks)), lambda i: shard_task.read_marker(fs, shard_task.marker_path(root, i)),
        cfg.io_threads))
    lost = [i for i, m in enumerate(markers) if m is None]
    if lost:
        raise ShardError(f"completion markers of shards {lost[:10]} vanished during the run; re-run to redo them")
    failures = [f for m in markers for f in m["failures"]]
    counts = {"read": sum(m["read"] for m in markers), "written": sum(m["rows"] for m in markers),
              "failed": len(failures)}
    if counts["read"] != counts["written"] + counts["failed"]:
        raise ShardError(f"counts do not reconcile: {counts}")
    table = pa.Table.from_pylist([{"source": s, "reason": r} for s, r in failures], schema=schema.FAILURE_SCHEMA)
    _write_if_changed(fs, f"{root}/{schema.FAILURES_NAME}", schema.parquet_bytes(table))
    live = {m["index"] for m in markers if m["rows"]}
    _remove_stale(fs, root, plan, live)

    manifest = {
        "kind": "vitray-shards", "schema_version": schema.SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": storage.to_uri(*storage.resolve(cfg.src, cfg.storage)),
        "config": to_dict(cfg), "counts": counts, "classes": plan.classes,
        "shards": [{"name": m["name"], "rows": m["rows"], "bytes": m["bytes"], "checksum": m["checksum"]}
                   for m in markers if m["rows"]],
        "failures": schema.FAILURES_NAME, "plan_digest": plan.digest,
    }
    old = shard_task.read_marker(fs, manifest_path)
    if old is not None and {**old, "created": None} == {**manifest, "created": None}:
        manifest = old  # nothing changed: leave the file (and its timestamp) alone
    else:
        storage.write_bytes_atomic(fs, manifest_path, schema.dumps_manifest(manifest))
    kinds = Counter(reason.split(":", 1)[0] for _, reason in failures)
    result = ShardResult(counts=counts, manifest=manifest, failure_kinds=dict(kinds),
                         shards_run=sum(not s["resumed"] for s in stats),
                         shards_resumed=sum(bool(s["resumed"]) for s in stats),
                         nodes=len({s["node"] for s in stats}),
                         seconds=time.perf_counter() - t0, max_failure_fraction=cfg.max_failure_fraction,
                         **_timing(submitted, [s for s in stats if not s["resumed"]]))
    log.info("done: %d read, %d written, %d failed; manifest %s", counts["read"], counts["written"],
             counts["failed"], storage.join(cfg.dst, schema.MANIFEST_NAME))
    return result
