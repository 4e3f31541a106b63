"""Speed of `vitray dedup`, each comparison measured side by side in this one run.

1. pHash throughput per core on the real JPEGs of ../shared/data/photos.parquet:
   the canonical path (``hashes.hash_bytes``: reduced-scale JPEG decode, vectorised
   DCT, and it computes the dHash too) vs a loop of ``imagehash.phash(Image.open(...))``.
2. Search: all pairs within Hamming distance 10 between 1M corpus hashes and 100k
   index hashes (realistic: biased bits, near-duplicate families, planted near pairs):
   ``search.HammingIndex`` vs ``faiss.IndexBinaryFlat.range_search`` on one core
   (``faiss.omp_set_num_threads(1)``); the pair sets must be identical. Plus the
   memory of an index over 1M hashes.
3. End to end: ``vitray dedup run`` over 1M synthetic shard rows (real hash columns,
   tiny dummy image bytes) against a synthetic 100k-view index on a 2-CPU local Ray:
   rows/s, and its ratio to the single-process search of the same hashes.

Usage: .venv/bin/python benchmarks/dedup.py [--corpus 1000000] [--index 100000] [--work DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")

from vitray import storage  # noqa: E402
from vitray.dedup import index as dindex  # noqa: E402
from vitray.dedup.search import HammingIndex  # noqa: E402
from vitray.pipeline import hashes, schema  # noqa: E402


# ---------------------------------------------------------------- 1. pHash throughput

def bench_phash() -> None:
    import imagehash
    import simplejpeg
    from PIL import Image

    t = pq.read_table(os.path.join(SHARED, "photos.parquet"), columns=["format", "image"])
    datas = [d for d, f in zip(t.column("image").to_pylist(), t.column("format").to_pylist()) if f == "JPEG"]
    mpix = np.array([np.prod(Image.open(io.BytesIO(d)).size) / 1e6 for d in datas])

    def reference(ds):
        return [int(str(imagehash.phash(Image.open(io.BytesIO(d)))), 16) for d in ds]

    def ours(ds):  # decode each (reduced-scale JPEG decode), then one vectorised DCT per batch of 64
        return np.concatenate([hashes.hash_images([hashes.decode_for_hash(d).image for d in ds[lo:lo + 64]])[0]
                               for lo in range(0, len(ds), 64)])

    def decode_floor(ds):  # the least any pHash of the bytes must do: libjpeg's cheapest decode, nothing else
        for d in ds:  # libjpeg-turbo via simplejpeg: luma only, DC coefficients only (1/8 scale)
            h, w, _, _ = simplejpeg.decode_jpeg_header(d)
            simplejpeg.decode_jpeg(d, "GRAY", min_height=-(-h // 8), min_width=-(-w // 8))

    print(f"pHash of real JPEGs from photos.parquet, CPU time of one process (images/s per core):")
    print(f"  {'JPEGs':<28} {'n':>4} {'Mpixel':>7} {'imagehash loop':>15} {'vitray (pHash+dHash)':>21} {'ratio':>6}"
          f" | {'decode floor':>12} {'ceiling':>7}")
    for name, sel in (("all", mpix > 0), ("< 0.5 Mpixel (ImageNet size)", mpix < 0.5), (">= 0.5 Mpixel", mpix >= 0.5)):
        ds = [d for d, keep in zip(datas, sel) if keep]
        t0 = time.process_time()
        ref = reference(ds)
        t_ref = time.process_time() - t0
        t0 = time.process_time()
        ph = ours(ds)
        t_ours = time.process_time() - t0
        t0 = time.process_time()
        decode_floor(ds)
        t_floor = time.process_time() - t0
        print(f"  {name:<28} {len(ds):>4} {mpix[sel].mean():>7.2f} {len(ds) / t_ref:>15.1f} {len(ds) / t_ours:>21.1f} "
              f"{t_ref / t_ours:>5.1f}x | {len(ds) / t_floor:>12.1f} {t_ref / t_floor:>6.1f}x")
        if name == "all":
            dist = hashes.hamming(ph, np.array(ref, np.uint64))
    print(f"  distance to imagehash's full-decode pHash: median {np.median(dist):.0f}, 95th pct "
          f"{np.percentile(dist, 95):.0f} bits (the same 32x32 input gives the identical hash: tested)")
    print("  decode floor: libjpeg-turbo's greyscale decode at 1/8 DCT scale and nothing else (faster than Pillow's"
          " draft). It still has to")
    print("  entropy-decode every coefficient, so no pHash of these bytes can beat it on one core; ceiling = the")
    print("  imagehash loop's time / the floor's, the most any hashing path could reach on these JPEGs.")


# ---------------------------------------------------------------- 2. search

def realistic_hashes(n_corpus: int, n_index: int, seed: int = 0, words: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Perceptual-hash-like codes: per-bit bias like pHash (one near-constant DC bit), 20% of the
    corpus in near-duplicate families (0-8 flipped bits), 10% of the index planted near corpus items.

    Returns (corpus, index) of shape (N,) uint64, or (N, words) for several hashes per image
    (a near pair is then near in every hash, as a real near-duplicate is).
    """
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.4, 0.6, 64 * words)
    p[63::64] = 0.995

    def fresh(n):
        bits = (rng.random((n, 64 * words)) < p).astype(np.uint8)
        return np.packbits(bits, axis=1, bitorder="little").view("<u8").reshape(n, words).astype(np.uint64)

    def variants(base, n, max_flips):
        out = base[rng.integers(0, len(base), n)].copy()
        for w in range(words):
            k = rng.integers(0, max_flips + 1, n)
            for f in range(max_flips):
                m = k > f
                out[m, w] ^= np.uint64(1) << rng.integers(0, 64, m.sum()).astype(np.uint64)
        return out

    families = fresh(max(1, n_corpus // 20))
    corpus = np.concatenate([fresh(n_corpus - n_corpus // 5), variants(families, n_corpus // 5, 8)])
    index = np.concatenate([fresh(n_index - n_index // 5), variants(corpus, n_index // 10, 8),
                            variants(families, n_index // 10, 8)])
    corpus = corpus[rng.permutation(len(corpus))]
    return (corpus[:, 0], index[:, 0]) if words == 1 else (corpus, index)


def bench_search(n_corpus: int, n_index: int, radius: int = 10) -> float:
    import faiss

    faiss.omp_set_num_threads(1)
    corpus, index = realistic_hashes(n_corpus, n_index)
    t0 = time.perf_counter()
    table = HammingIndex(corpus)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    qi, ti, d = table.search(index, radius)
    t_ours = time.perf_counter() - t0
    codes = lambda h: np.ascontiguousarray(h, dtype="<u8").view(np.uint8).reshape(-1, 8)  # noqa: E731
    flat = faiss.IndexBinaryFlat(64)
    flat.add(codes(corpus))
    t0 = time.perf_counter()
    lims, fd, fi = flat.range_search(codes(index), radius + 1)  # faiss: distance < radius + 1
    t_faiss = time.perf_counter() - t0
    fq = np.repeat(np.arange(n_index), np.diff(lims).astype(np.int64))
    ours = set(zip(qi.tolist(), ti.tolist(), d.tolist()))
    theirs = set(zip(fq.tolist(), fi.astype(np.int64).tolist(), fd.astype(np.int64).tolist()))
    # the other direction, as `dedup run` uses it: the table over the index, the corpus streams through
    t0 = time.perf_counter()
    rev = HammingIndex(index)
    rq, rt, _ = rev.search(corpus, radius)
    t_rev = time.perf_counter() - t0
    same_rev = set(zip(rt.tolist(), rq.tolist())) == set(zip(qi.tolist(), ti.tolist()))
    print(f"\nsearch: all pairs within Hamming distance {radius}, {n_corpus:,} corpus x {n_index:,} index hashes, "
          f"one core")
    print(f"  faiss.IndexBinaryFlat.range_search     : {t_faiss:8.2f} s   {len(theirs):,} pairs")
    print(f"  vitray HammingIndex (over the corpus)  : {t_ours:8.2f} s   {len(ours):,} pairs   "
          f"identical: {ours == theirs}   ratio {t_faiss / t_ours:.1f}x   (build {t_build:.2f} s)")
    print(f"  vitray HammingIndex (over the index)   : {t_rev:8.2f} s   identical: {same_rev}   "
          f"ratio {t_faiss / t_rev:.1f}x (incl. build)")
    print(f"  memory of the index over {n_corpus:,} hashes: {table.nbytes / 1e6:.1f} MB")
    return t_rev


# ---------------------------------------------------------------- 3. end to end

_DUMMY = None


def _dummy_png() -> bytes:
    global _DUMMY
    if _DUMMY is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (90, 120, 150)).save(buf, "PNG")
        _DUMMY = buf.getvalue()
    return _DUMMY


def write_synthetic_corpus(root: str, phash: np.ndarray, dhash: np.ndarray, rows_per_shard: int) -> None:
    """Shard directory with real hash columns and a tiny dummy image per row."""
    img = _dummy_png()

    def tables():
        for lo in range(0, len(phash), rows_per_shard):
            n = min(rows_per_shard, len(phash) - lo)
            sources = [f"synthetic/{lo + i:08d}.png" for i in range(n)]
            yield pa.table({
                "sample_id": [schema.sample_id(s) for s in sources], "source": sources,
                "label": pa.nulls(n, pa.int64()), "labels": pa.nulls(n, pa.list_(pa.int64())),
                "width": np.full(n, 8, np.int32), "height": np.full(n, 8, np.int32), "format": ["PNG"] * n,
                "sha256": [f"{lo + i:064x}" for i in range(n)], "phash": phash[lo:lo + n], "dhash": dhash[lo:lo + n],
                "image": pa.array([img] * n, pa.binary()),
            }, schema=schema.SHARD_SCHEMA)

    schema.write_shard_dir(root, tables(), source="synthetic", row_group_rows=1024, created="benchmark")


def write_synthetic_index(root: str, view_p: np.ndarray, view_d: np.ndarray, views_per_image: int) -> None:
    """An index directory with the given view hashes (noise thumbnails), laid out as `dedup index` writes it."""
    n = len(view_p) // views_per_image
    rng = np.random.default_rng(1)
    thumbs = rng.integers(0, 256, (n, 32, 32), dtype=np.uint8)
    ev = pa.table({"set": ["synthetic"] * n, "eval_id": [f"{i}" for i in range(n)],
                   "source": [f"eval/{i}" for i in range(n)], "label": pa.nulls(n, pa.int64()),
                   "width": np.full(n, 32, np.int32), "height": np.full(n, 32, np.int32),
                   "phash": view_p[::views_per_image], "dhash": view_d[::views_per_image],
                   "detail": np.full(n, 50.0, np.float32), "thumb": [t.tobytes() for t in thumbs],
                   "preview": pa.array([b""] * n, pa.binary())})
    vw = pa.table({"eval_row": np.repeat(np.arange(n, dtype=np.int32), views_per_image),
                   "view": np.tile(np.arange(views_per_image, dtype=np.int16), n), "phash": view_p, "dhash": view_d})
    os.makedirs(root, exist_ok=True)
    pq.write_table(ev, f"{root}/{dindex.EVAL_FILE}")
    pq.write_table(vw, f"{root}/{dindex.VIEWS_FILE}")
    manifest = {"kind": "vitray-dedup-index", "schema_version": dindex.SCHEMA_VERSION, "sets": {
        "synthetic": {"src": "synthetic", "layout": "synthetic", "read": n, "indexed": n, "failed": 0, "classes": None}},
        "views": [f"v{i}" for i in range(views_per_image)], "thumb_size": 32,
        "digest": f"sha256:synthetic-{len(view_p)}"}
    with open(f"{root}/{schema.MANIFEST_NAME}", "w") as f:
        json.dump(manifest, f)


def bench_end_to_end(n_corpus: int, n_index: int, work: str, cpus: int) -> None:
    import ray

    from vitray.dedup.run import DedupConfig, run_dedup

    corpus, index = realistic_hashes(n_corpus, n_index, seed=2, words=2)  # (pHash, dHash) per image
    corpus_p, corpus_d = np.ascontiguousarray(corpus[:, 0]), np.ascontiguousarray(corpus[:, 1])
    index_p, index_d = np.ascontiguousarray(index[:, 0]), np.ascontiguousarray(index[:, 1])
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    write_synthetic_corpus(f"{work}/corpus", corpus_p, corpus_d, rows_per_shard=25_000)
    write_synthetic_index(f"{work}/index", index_p, index_d, views_per_image=10)
    print(f"\nend to end: wrote {n_corpus:,} synthetic shard rows + a {n_index:,}-view index "
          f"({time.perf_counter() - t0:.0f} s)")
    # single process reference: the candidate stage of one shard task, over all corpus hashes at once
    from vitray.dedup import scan

    cfg = DedupConfig(corpus="x", index="x", out="x")
    t0 = time.perf_counter()
    bundle = {"p_index": HammingIndex(index_p), "d_index": HammingIndex(index_d), "view_phash": index_p,
              "view_dhash": index_d, "view_row": np.arange(len(index_p)) // 10, "view_id": np.arange(len(index_p)) % 10,
              "n_eval": len(index_p) // 10}
    n_cand = len(scan.candidates(bundle, corpus_p, corpus_d, cfg)["row"])
    t_single = time.perf_counter() - t0
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    out = f"{work}/out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = run_dedup(DedupConfig(corpus=f"{work}/corpus", index=f"{work}/index", out=out))
    t_run = time.perf_counter() - t0
    c = result.summary["counts"]
    ray.shutdown()
    print(f"  single-process candidate search (pHash + dHash)  : {n_corpus / t_single:10,.0f} rows/s "
          f"({n_cand:,} candidate pairs)")
    print(f"  vitray dedup run, {cpus} CPUs, whole job           : {n_corpus / t_run:10,.0f} rows/s "
          f"({t_run:.1f} s; {c['candidate_rows']:,} candidate rows verified, {c['removed']} removed, "
          f"rows = kept + removed + failed: {c['rows'] == c['kept'] + c['removed'] + c['failed']})")
    print(f"  ratio run / single-process search: {t_single / t_run:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=int, default=1_000_000)
    ap.add_argument("--index", type=int, default=100_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--work", default="/tmp/vitray-dedup-bench")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: phash,search,e2e")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    skip = set(filter(None, args.skip.split(",")))
    if "phash" not in skip:
        bench_phash()
    if "search" not in skip:
        bench_search(args.corpus, args.index)
    if "e2e" not in skip:
        bench_end_to_end(args.corpus, args.index, args.work, args.cpus)


if __name__ == "__main__":
    main()
