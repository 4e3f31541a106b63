"""Ingest benchmarks on the real photos of ../shared/data/photos.parquet, measured side by side.

1. `vitray shard` throughput per core (2 Ray workers on 2 cores) vs a plain
   single-process loop doing the same per-image work (read, sha256, hash decode +
   pHash/dHash, optional re-encode, Parquet write), with the corpus served from a
   local directory and from an S3 server on loopback (moto, in a subprocess so it
   does not share the loop's GIL). Target: overhead = plain/core / shard/core - 1
   <= 25%, per round against the plain run just before it (this host's speed
   drifts by +-15% over tens of seconds), medians over the rounds; end to end and
   in steady state (Ray Data's fixed start-up apart). A "naive" loop (hash_bytes,
   then a full decode for the re-encode) shows what the reduced-scale decode saves.
2. The training reader's decode+augment comparison (``benchmarks/reader_bench.py``
   ``run(photos) -> str``), when that file exists.
3. Peak memory (RSS of the driver and every Ray process, sampled; object-store
   bytes used) of shard runs over corpora 1x and 3.5x the configured object store.

    .venv/bin/python benchmarks/ingest.py [--repeat 30] [--reencode-repeat 10] [--s3-repeat 5] [--reps 3]
        [--sources local,s3] [--max-sides none,256] [--target-mib 128] [--skip-reader] [--skip-memory]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitray.pipeline.shard import ShardResult

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"
# Fake credentials for the loopback S3 server only.
os.environ["AWS_ACCESS_KEY_ID"] = "bench-key"
os.environ["AWS_SECRET_ACCESS_KEY"] = "bench-secret"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)

import psutil  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "photos.parquet")
MiB = 1024 * 1024
WORKERS = 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- corpora

def load_photos() -> list[dict]:
    return pq.read_table(PHOTOS, columns=["filename", "label_name", "image"]).to_pylist()


def corpus_files(photos: list[dict], repeat: int) -> dict[str, bytes]:
    """ImageFolder layout, each photo ``repeat`` times under different names."""
    out = {}
    for k in range(repeat):
        for p in photos:
            label = p["label_name"].split(":")[0] if ":" in p["label_name"] else "other"
            out[f"{label}/{k}_{p['filename']}"] = p["image"]
    return out


def write_local(root: str, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return root


class MotoS3:
    """moto's S3 server on a loopback port, in its own process."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def upload(self, bucket: str, files: dict[str, bytes]) -> str:
        from concurrent.futures import ThreadPoolExecutor

        from vitray.storage import StorageOptions, boto3_client

        client = boto3_client(StorageOptions(endpoint_url=self.endpoint))
        client.create_bucket(Bucket=bucket)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=f"corpus/{kv[0]}", Body=kv[1]),
                          files.items()))
        return f"s3://{bucket}/corpus"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


# ---------------------------------------------------------------- (1) throughput

def plain_loop(src: str, dst: str, options, max_side: int | None, target_bytes: int, naive: bool = False,
               part: int = 0, parts: int = 1) -> int:
    """One process, no Ray: list, read, encode each image, write Parquet shards. Returns images written.

    ``part``/``parts``: handle every ``parts``-th file only (for the two-process reference).
    """
    import hashlib
    import io

    from PIL import Image

    from vitray import storage
    from vitray.pipeline import hashes, images, schema, shard_task

    fs, root = storage.resolve(src, options)
    dfs, droot = storage.resolve(dst, options)
    rows, size, n_shards, written = [], 0, 0, 0

    def flush():
        nonlocal rows, size, n_shards
        if rows:
            name = f"part{part}-{schema.shard_name(n_shards)}"
            storage.write_bytes_atomic(dfs, f"{droot}/{name}", schema.parquet_bytes(schema.table_from_rows(rows)))
            n_shards += 1
        rows, size = [], 0

    for i, info in enumerate(storage.list_files(fs, root)):
        if i % parts != part:
            continue
        data = storage.read_bytes(fs, info.path)
        source = storage.to_uri(fs, info.path)
        try:
            if naive:  # hash, then a separate full-resolution decode for the re-encode
                ph, dh = hashes.hash_bytes(data)
                fields = {"sha256": hashlib.sha256(data).hexdigest(), "phash": ph, "dhash": dh}
                d = images.decode(data)
                im, (w, h) = d.image, (d.width, d.height)
                if max_side and min(w, h) > max_side:
                    s = max_side / min(w, h)
                    im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
                    buf = io.BytesIO()
                    im.save(buf, "JPEG", quality=90)
                    data = buf.getvalue()
                fields.update(width=im.width, height=im.height, format="JPEG", image=data)
            else:
                fields = shard_task.encode_sample(data, images.DEFAULT_MAX_PIXELS, max_side, 90)
        except images.ImageError:
            continue
        rows.append({"sample_id": schema.sample_id(source), "source": source, "label": None, "labels": None,
                     **fields})
        size += info.size
        written += 1
        if size >= target_bytes:
            flush()
    flush()
    return written


def _plain_part(args: tuple) -> tuple[int, float]:
    """(images written, CPU seconds) of one plain loop in a pool process."""
    t0 = time.process_time()
    n = plain_loop(*args)
    return n, time.process_time() - t0


def tree_cpu(exclude: set[int]) -> float:
    """User+system CPU seconds of this process and its descendants (Ray's processes), minus ``exclude``."""
    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        if p.pid in exclude:
            continue
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def shard_run(src: str, dst: str, options, max_side: int | None, target_bytes: int) -> ShardResult:
    from vitray.pipeline.shard import ShardConfig, run_shard

    cfg = ShardConfig(src=src, dst=dst, storage=options, max_side=max_side, target_shard_bytes=target_bytes,
                      concurrency=WORKERS, max_failure_fraction=1.0)
    return run_shard(cfg)


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def throughput(photos: list[dict], repeat: int, reencode_repeat: int, s3_repeat: int, reps: int, tmp: str,
               target_mib: int = 128, sources: tuple[str, ...] = ("local", "s3"),
               max_sides: tuple[int | None, ...] = (None, 256)) -> str:
    """Part (1): per cell (source x max_side), ``reps`` rounds of plain, shard, plain x2 (and naive), interleaved.

    Each round's shard run is paired with the plain run just before it, so a slow spell of the
    host moves both; the overheads reported are the medians of those paired ratios.
    """
    import multiprocessing

    import ray

    from vitray.storage import StorageOptions

    cells = [(src, ms, {"local": reencode_repeat if ms else repeat, "s3": s3_repeat}[src])
             for src in ("local", "s3") if src in sources for ms in max_sides]
    local_dirs = {n: write_local(os.path.join(tmp, f"corpus-{n}x"), corpus_files(photos, n))
                  for src, _, n in cells if src == "local"}
    s3 = MotoS3()
    pool = multiprocessing.get_context("spawn").Pool(WORKERS)
    try:
        s3_src = s3.upload("bench", corpus_files(photos, s3_repeat)) if "s3" in sources else None
        s3_opts = StorageOptions(endpoint_url=s3.endpoint)
        # address="local": a new runtime even if another Ray cluster runs on this host.
        ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        # Warm both sides' imports (the driver's and the plain pool's; Ray Data starts fresh worker
        # processes for every run, so their start-up stays in each shard run).
        warm = write_local(os.path.join(tmp, "warm"), corpus_files(photos[:8], 1))
        shard_run(warm, os.path.join(tmp, "warm-out"), StorageOptions(), None, 1)
        pool.map(_plain_part, [(warm, os.path.join(tmp, "warm-plain"), StorageOptions(), None, 1 << 30, False, i,
                                WORKERS) for i in range(WORKERS)])
        target = target_mib * MiB
        exclude = {s3.proc.pid} | {p.pid for p in pool._pool}  # not Ray's: moto, the plain-loop pool
        lines = [f"(1) shard throughput per core: {WORKERS} Ray workers on {psutil.cpu_count()} cores vs one plain "
                 f"process, {target_mib} MiB shards (the default is 128); {reps} interleaved rounds per row, medians "
                 f"(load average {os.getloadavg()[0]:.1f} at start)",
                 f"    {'':<30}|{'images/s per core (wall clock)':^32}|{'overhead vs plain':^29}|"
                 f"{'shard run':^15}|{'CPU time':^17}|",
                 f"    {'source max_side  corpus':<30}|{'plain':>7}{'x2':>7}{'shard':>9}{'steady':>9}|"
                 f"{'end-to-end':>11}{'steady':>9}{'x2':>8} |{'start-up':>9}{'tail':>6}|{'overhead':>10}{'naive':>7}|"]
        paired_lines = []
        for name, max_side, n_rep in cells:
            src, opts = (local_dirs[n_rep], StorageOptions()) if name == "local" else (s3_src, s3_opts)
            r: dict[str, list[float]] = {k: [] for k in ("plain", "plain2", "shard", "steady", "naive", "startup",
                                                          "tail", "e2e", "st", "x2", "cpu")}
            n_images = 0
            for rep in range(reps):
                rates = {}
                for kind in ("plain", "shard", "plain2") + (("naive",) if max_side else ()):
                    dst = os.path.join(tmp, f"out-{name}-{max_side}-{kind}-{rep}")
                    t0, c0 = time.perf_counter(), time.process_time()
                    if kind == "shard":
                        c0 = tree_cpu(exclude)
                        result = shard_run(src, dst, opts, max_side, target)
                        cpu = tree_cpu(exclude) - c0
                        n = result.counts["written"]
                        steady = result.read_now / result.work_seconds / WORKERS
                        r["steady"].append(steady)
                        r["startup"].append(result.startup_seconds)
                        r["tail"].append(result.tail_seconds)
                    elif kind == "plain2":
                        parts = pool.map(_plain_part, [(src, dst, opts, max_side, target, False, i, WORKERS)
                                                       for i in range(WORKERS)])
                        n, cpu = sum(p[0] for p in parts), sum(p[1] for p in parts)
                    else:
                        n = plain_loop(src, dst, opts, max_side, target, kind == "naive")
                        cpu = time.process_time() - c0
                    secs = time.perf_counter() - t0
                    rates[kind] = n / secs / (WORKERS if kind in ("shard", "plain2") else 1)
                    r[kind].append(rates[kind])
                    if kind == "plain":
                        plain_cpu = n / cpu
                    elif kind == "shard":
                        r["cpu"].append(100 * (plain_cpu / (n / cpu) - 1))
                    n_images = n
                    shutil.rmtree(dst, ignore_errors=True)
                    log(f"{name} max_side={max_side} {kind}: {n} images in {secs:.2f} s, {cpu:.2f} CPU-s "
                        f"({rates[kind]:.1f}/s/core; load {os.getloadavg()[0]:.1f})")
                r["e2e"].append(100 * (rates["plain"] / rates["shard"] - 1))
                r["st"].append(100 * (rates["plain"] / r["steady"][-1] - 1))
                r["x2"].append(100 * (rates["plain2"] / rates["shard"] - 1))
            m = {k: _median(v) for k, v in r.items()}
            naive = f"{m['naive']:>7.1f}" if max_side else f"{'-':>7}"
            head = f"    {name:<6}{str(max_side):>9}  {n_images:>6} {f'({n_rep}x)':<6}|"
            lines.append(f"{head}{m['plain']:>7.1f}{m['plain2']:>7.1f}{m['shard']:>9.1f}{m['steady']:>9.1f}|"
                         f"{m['e2e']:>10.1f}%{m['st']:>8.1f}%{m['x2']:>7.1f}% |{m['startup']:>8.1f}s{m['tail']:>5.1f}s|"
                         f"{m['cpu']:>9.1f}%{naive}|")
            fmt = lambda xs: " ".join(f"{x:.1f}%" for x in xs)  # noqa: E731
            paired_lines.append(f"{head} end-to-end {fmt(r['e2e'])}; steady {fmt(r['st'])}")
        lines += ["    overhead = plain / shard - 1 per core, per round against the plain run just before it; target <= 25%.",
                  "    end-to-end: the whole shard run (planning, Ray Data start-up, shard work, markers, manifest).",
                  "    steady: the images over the span from the first shard task's start to the last one's end",
                  "    (ShardResult.work_seconds). start-up = job submission to the first task: two fresh worker",
                  "    processes importing Ray Data (pandas included) and vitray, about 1.5 CPU-s each, a fixed",
                  "    cost per run. tail = how long the first worker to finish waited for the last task.",
                  "    x2 = the plain loop split over 2 processes (what 2 cores give without Ray); its overhead",
                  "    column compares the shard run with it. CPU time counts every Ray process (driver, GCS,",
                  "    raylet, workers) against the plain loop's. naive = plain loop with hash_bytes + a second",
                  "    full-resolution decode for the re-encode (img/s). s3 = moto on loopback (in its own process,",
                  "    sharing the cores; its CPU is excluded from CPU time).",
                  "    Paired overheads per round:"] + paired_lines
        return "\n".join(lines)
    finally:
        pool.terminate()
        ray.shutdown()
        s3.stop()


# ---------------------------------------------------------------- (3) memory

class MemorySampler(threading.Thread):
    """Peak summed RSS of this process and all its descendants (Ray's GCS, raylet, workers)."""

    def __init__(self, interval: float = 0.1):
        import ray

        super().__init__(daemon=True)
        self.gcs_address = ray.get_runtime_context().gcs_address
        self.interval, self.peak_rss, self.peak_store = interval, 0, 0
        self.peak_proc, self.peak_name = 0, ""
        self.store_error = None
        self._stop_event = threading.Event()

    def run(self):
        me = psutil.Process()
        state, tick = None, 0
        while not self._stop_event.is_set():
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peak_proc:
                    self.peak_proc, self.peak_name = rss, "driver" if p.pid == me.pid else p.name()
            self.peak_rss = max(self.peak_rss, total)
            if tick % 5 == 0:
                try:
                    from ray._private import internal_api

                    state = state or internal_api.get_state_from_address(self.gcs_address)
                    reply = internal_api.get_memory_info_reply(state)
                    self.peak_store = max(self.peak_store, reply.store_stats.object_store_bytes_used)
                except Exception as exc:  # private API: report, don't die
                    self.store_error = repr(exc)
            tick += 1
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()


def memory(tmp: str, store_mb: int = 100) -> str:
    """Shard runs over corpora ~1x and ~3.3x the object store; peak RSS and object-store use."""
    import gc

    import pyarrow as pa
    import ray

    from vitray.pipeline.shard import ShardConfig, run_shard
    from vitray.storage import StorageOptions

    # Write the corpora first and drop the photos, so the driver's RSS is a shard driver's.
    photos = load_photos()
    photo_mb = sum(len(p["image"]) for p in photos) / MiB
    corpora = []
    for repeat in (2, 6):
        files = corpus_files(photos, repeat)
        corpora.append((write_local(os.path.join(tmp, f"mem-{repeat}"), files), len(files), repeat * photo_mb))
    del photos, files
    gc.collect()
    pa.default_memory_pool().release_unused()

    ray.init(address="local", num_cpus=WORKERS, object_store_memory=store_mb * MiB, include_dashboard=False,
             log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    lines = [f"(3) peak memory of shard runs, object store {store_mb} MiB, {WORKERS} workers, 16 MiB shards, "
             f"max_side=256",
             f"    {'corpus':<26}{'x store':>8}  {'peak RSS all procs':>19}  {'largest process':>22}  "
             f"{'object store used':>18}  {'time':>7}"]
    try:
        for src, n, mb in corpora:
            sampler = MemorySampler()
            sampler.start()
            t0 = time.perf_counter()
            cfg = ShardConfig(src=src, dst=src + "-out", storage=StorageOptions(), max_side=256,
                              target_shard_bytes=16 * MiB, max_failure_fraction=1.0)
            result = run_shard(cfg)
            secs = time.perf_counter() - t0
            sampler.stop()
            assert result.counts["read"] == n
            store = (f"{sampler.peak_store / MiB:.1f} MiB" if sampler.store_error is None or sampler.peak_store
                     else "n/a")
            largest = f"{sampler.peak_proc / MiB:.0f} MiB ({sampler.peak_name})"
            lines.append(f"    {f'{n} images, {mb:.0f} MiB':<26}{mb / store_mb:>7.1f}x  "
                         f"{sampler.peak_rss / MiB:>15.0f} MiB  {largest:>22}  {store:>18}  {secs:>6.1f}s")
        lines.append("    RSS counts shared pages in every process mapping them (an over-estimate); bounded = flat as "
                     "the corpus grows")
        return "\n".join(lines)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30,
                    help="local corpus, original bytes kept = the 462 photos this many times (part 1)")
    ap.add_argument("--reencode-repeat", type=int, default=10, help="local corpus of the re-encode rows")
    ap.add_argument("--s3-repeat", type=int, default=5, help="the S3 corpus (moto is slow and holds it in memory)")
    ap.add_argument("--target-mib", type=int, default=128, help="shard size of part 1, MiB (vitray's default)")
    ap.add_argument("--sources", default="local,s3", help="part 1 sources: local, s3 or both")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds per row (medians are reported)")
    ap.add_argument("--max-sides", default="none,256",
                    help="part 1 re-encode settings: none (keep the bytes) and/or a shorter-side cap")
    ap.add_argument("--skip-reader", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vitray-ingest-")
    if args.memory_only:
        try:
            print(memory(tmp), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    photos = load_photos()
    sections = []
    try:
        max_sides = tuple(None if v.strip().lower() == "none" else int(v) for v in args.max_sides.split(","))
        sections.append(throughput(photos, args.repeat, args.reencode_repeat, args.s3_repeat, args.reps, tmp,
                                   args.target_mib, tuple(args.sources.split(",")), max_sides))
        print(sections[-1], flush=True)
        sys.path.insert(0, HERE)
        if args.skip_reader:
            sections.append("(2) training reader: skipped (--skip-reader)")
        elif os.path.exists(os.path.join(HERE, "reader_bench.py")):
            import reader_bench

            sections.append("(2) training reader\n" + reader_bench.run([p["image"] for p in photos]))
        else:
            sections.append("(2) training reader: benchmarks/reader_bench.py not found; skipped")
        print(sections[-1], flush=True)
        if not args.skip_memory:
            # A fresh process, so the driver's RSS is a shard driver's, not this script's (torch, photos).
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-only"], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            sections.append(out.rstrip())
            print(sections[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
