"""Detection quality of `vitray dedup`: CIFAR-10 development pairs and a photo robustness table.

Part ``dev`` (``../shared/data/cifair10-test-test-pairs.csv``: pairs of CIFAR-10 *test*
images that people judged near-duplicates, Barz & Denzler 2020):

- index = all 10,000 test images; corpus A = the same 10,000 test images (a pair
  (TestID, TrainID) is found when corpus image TrainID is matched to eval image
  TestID; self matches are ignored), corpus B = the 50,000 CIFAR-10 train images,
  the realistic corpus for the flag rate;
- for several thresholds: recall of judgment-1 (and -2) pairs, the fraction of
  corpus images flagged (A: index restricted to the TestIDs, and with the full
  index; B: train images flagged), the train images flagged only by eval images
  of a *different class* (distinct by construction: a lower bound on false
  flags), and the resulting test-set contamination rate;
- the baseline: plain pHash (one hash per image, no augmentation, no verification).

Part ``photos`` (``../shared/data/photos.parquet``, 462 distinct real photos): index =
every other photo; corpus = each transform applied to all 462 photos. Per transform:
recall (the transformed copy of an indexed photo matched to it), wrong-pair matches,
and false matches among the transformed copies of the photos NOT in the index.

Thresholds are not fitted to the development pairs: the verification threshold
is set from distinct images (see the cross-class column and the photos table),
and the tables show several values around it.

Usage: .venv/bin/python benchmarks/dedup_quality.py [--part dev|photos|all] [--work DIR]
Artifacts (shards, indexes, runs) are cached under --work; delete it to rebuild.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance, ImageOps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")

from vitray import storage  # noqa: E402
from vitray.dedup import scan  # noqa: E402
from vitray.dedup.index import IndexConfig, build_index, load_index  # noqa: E402
from vitray.dedup.run import DedupConfig, run_dedup  # noqa: E402
from vitray.dedup.verify import VerifyConfig  # noqa: E402
from vitray.pipeline import hashes, images, schema  # noqa: E402
from vitray.pipeline.shard_task import encode_sample  # noqa: E402

THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.90)
# The runs are made with looser settings than the defaults (a wider joint radius, a lower gate), so
# the tables can show tighter settings (the defaults among them) by filtering the verified pairs.
LOOSE = dict(joint_radius=32, verify=VerifyConfig(coarse_gate=0.6))
DEFAULT = DedupConfig(corpus="x", index="x", out="x")


# ---------------------------------------------------------------- corpora as shard directories

def write_shard_dir(uri: str, items: list[tuple[str, int | None, bytes]], rows_per_shard: int = 2000,
                    source: str = "") -> None:
    """(source, label, encoded bytes) -> a shard directory exactly as `vitray shard` lays it out."""
    fs, root = storage.resolve(uri)
    if storage.exists(fs, f"{root}/{schema.MANIFEST_NAME}"):
        return

    def tables():
        for k in range(0, len(items), rows_per_shard):
            # The rows `vitray shard` itself would write (original bytes kept).
            yield schema.table_from_rows([
                dict(sample_id=schema.sample_id(src), source=src, label=label, labels=None,
                     **encode_sample(data, images.DEFAULT_MAX_PIXELS, max_side=None, quality=90))
                for src, label, data in items[k:k + rows_per_shard]])

    schema.write_shard_dir(uri, tables(), source=source, created="benchmark")


def all_pairs(out: str) -> dict[str, np.ndarray]:
    """Every verified candidate pair of a run, as arrays."""
    fs, root = storage.resolve(out)
    tables = [pq.read_table(i.path, columns=["source", "eval_row", "phash_distance", "dhash_distance",
                                              "joint_distance", "coarse", "score"])
              for i in storage.list_files(fs, f"{root}/{scan.PARTS_DIR}") if i.path.endswith(".pairs.parquet")]
    import pyarrow as pa

    t = pa.concat_tables(tables)
    return {"source": np.asarray(t.column("source").to_pylist(), dtype=object),
            "eval_row": t.column("eval_row").to_numpy(),
            "p": t.column("phash_distance").to_numpy().astype(int), "d": t.column("dhash_distance").to_numpy().astype(int),
            "joint": t.column("joint_distance").to_numpy().astype(int),
            "coarse": np.nan_to_num(t.column("coarse").to_numpy(zero_copy_only=False), nan=-9),
            "score": np.nan_to_num(t.column("score").to_numpy(zero_copy_only=False), nan=-9)}


def run(corpus: str, index: str, out: str) -> None:
    if not os.path.exists(os.path.join(out, "summary.json")):
        run_dedup(DedupConfig(corpus=corpus, index=index, out=out, **LOOSE))


# ---------------------------------------------------------------- part 1: CIFAR-10 development pairs

def _dev(work: str) -> None:
    table = pq.read_table(os.path.join(SHARED, "cifar10.parquet"))
    split = np.asarray(table.column("split").to_pylist())
    idx = table.column("index").to_numpy()
    label = table.column("label").to_numpy().astype(np.int64)
    data = table.column("image").to_pylist()
    sets = {}
    for name in ("test", "train"):
        rows = np.flatnonzero(split == name)
        rows = rows[np.argsort(idx[rows])]
        sets[name] = {"label": label[rows], "items": [(f"cifar10/{name}/{i:05d}.webp", int(label[r]), data[r])
                                                      for i, r in enumerate(rows)]}
    t0 = time.perf_counter()
    for name in ("test", "train"):
        write_shard_dir(f"{work}/shards-{name}", sets[name]["items"], source=f"cifar10/{name}")
    print(f"shards ready ({time.perf_counter() - t0:.0f}s)")
    t0 = time.perf_counter()
    if not os.path.exists(f"{work}/index-test/_manifest.json"):
        build_index(IndexConfig(evals=[f"cifar10-test={work}/shards-test"], out=f"{work}/index-test"))
    index = load_index(f"{work}/index-test")
    print(f"index ready: {len(index.eval_id)} images x {len(index.view_names)} views ({time.perf_counter() - t0:.0f}s)")
    eval_num = np.array([int(e.split(".")[0]) for e in index.eval_id])  # eval row -> test index
    t0 = time.perf_counter()
    run(f"{work}/shards-test", f"{work}/index-test", f"{work}/run-test")
    run(f"{work}/shards-train", f"{work}/index-test", f"{work}/run-train")
    print(f"runs done ({time.perf_counter() - t0:.0f}s)")

    with open(os.path.join(SHARED, "cifair10-test-test-pairs.csv")) as f:
        dev = [(int(r["TestID"]), int(r["TrainID"]), int(r["Judgment"])) for r in csv.DictReader(f)]
    judg = np.array([j for _, _, j in dev])
    test_ids = {a for a, _, _ in dev}
    A = all_pairs(f"{work}/run-test")
    A_c = np.array([int(s.rsplit("/", 1)[1].split(".")[0]) for s in A["source"]])
    A_e = eval_num[A["eval_row"]]
    B = all_pairs(f"{work}/run-train")
    B_c = np.array([int(s.rsplit("/", 1)[1].split(".")[0]) for s in B["source"]])
    B_e = eval_num[B["eval_row"]]
    tl, rl = sets["test"]["label"], sets["train"]["label"]

    def keep(P, joint: int, thr: float, gate: float = DEFAULT.verify.coarse_gate) -> np.ndarray:
        cand = (P["joint"] <= joint) | (np.minimum(P["p"], P["d"]) <= DEFAULT.strong_radius)
        return cand & (P["coarse"] >= gate) & (P["score"] >= thr)

    def row(name: str, joint: int, thr: float) -> None:
        okA = keep(A, joint, thr) & (A_c != A_e)
        found = set(zip(A_e[okA].tolist(), A_c[okA].tolist()))
        hit = np.array([(a, b) in found for a, b, _ in dev])
        in_ids = np.isin(A_e, list(test_ids))
        okB = keep(B, joint, thr)
        flagged_b = np.unique(B_c[okB])
        same = np.unique(B_c[okB & (tl[B_e] == rl[B_c])])
        print(f"{name:<46} {hit[judg == 1].mean():>9.2f} {hit[judg == 2].mean():>9.2f} "
              f"{100 * len(np.unique(A_c[okA & in_ids])) / 10000:>15.2f}% {100 * len(np.unique(A_c[okA])) / 10000:>11.2f}% "
              f"{100 * len(flagged_b) / 50000:>6.2f}% {100 * len(np.setdiff1d(flagged_b, same)) / 50000:>12.3f}% "
              f"{100 * len(np.unique(B_e[okB])) / 10000:>11.2f}%")

    print("\nCIFAR-10 development set: 30 judgment-1 and 9 judgment-2 pairs (cifair10-test-test-pairs.csv)")
    print("A = corpus: 10k test images (self matches ignored) | B = corpus: 50k train images; index: 10k test images")
    print(f"candidates: pHash or dHash <= {DEFAULT.phash_radius} from one of {len(index.view_names)} views, and "
          f"pHash + dHash (same view) <= J or either <= {DEFAULT.strong_radius}; verification gate "
          f"{DEFAULT.verify.coarse_gate}")
    print(f"{'method':<46} {'recall j1':>9} {'recall j2':>9} {'A flag (TestIDs)':>16} {'A flag (all)':>12} "
          f"{'B flag':>7} {'B cross-class':>13} {'test contam.':>12}")
    J = DEFAULT.joint_radius
    for thr in THRESHOLDS:
        row(f"views, J={J}, verify >= {thr:.2f}" + (" (default)" if thr == DEFAULT.verify.threshold else ""), J, thr)
    for joint in (24, 26, 28, 32):
        row(f"views, J={joint}, verify >= {DEFAULT.verify.threshold:.2f}", joint, DEFAULT.verify.threshold)
    row(f"views, J={J}, no verification", J, -8.0)
    # Baseline: one pHash per image, Hamming radius, no views, no verification.
    tp = pq.read_table(f"{work}/shards-test", columns=["source", "phash"]).sort_by("source").column("phash").to_numpy()
    trp = pq.read_table(f"{work}/shards-train", columns=["phash"]).column("phash").to_numpy()
    dist_tt = hashes.hamming(tp[:, None], tp[None, :])  # (10k, 10k) uint8
    np.fill_diagonal(dist_tt, 255)
    dev_d = np.array([dist_tt[a, b] for a, b, _ in dev])
    ids = np.array(sorted(test_ids))
    for radius in (4, 6, 8, 10):
        flag_ids = np.mean((dist_tt[ids] <= radius).any(axis=0))
        flag_all = np.mean((dist_tt <= radius).any(axis=0))
        flag_b = sum(int((hashes.hamming(trp[i:i + 2000, None], tp[None, :]) <= radius).any(axis=1).sum())
                     for i in range(0, len(trp), 2000)) / len(trp)
        print(f"{f'plain pHash, radius {radius}':<46} {np.mean(dev_d[judg == 1] <= radius):>9.2f} "
              f"{np.mean(dev_d[judg == 2] <= radius):>9.2f} {100 * flag_ids:>15.2f}% {100 * flag_all:>11.2f}% "
              f"{100 * flag_b:>6.2f}%")
    _unlisted(work, sets["test"], A_e, A_c, keep(A, DEFAULT.joint_radius, DEFAULT.verify.threshold), A["score"], dev)


def _unlisted(work: str, test: dict, A_e: np.ndarray, A_c: np.ndarray, ok: np.ndarray, score: np.ndarray,
              dev: list) -> None:
    """The test-test pairs flagged at the defaults that the development list does not contain.

    The list is not exhaustive (it holds one judged neighbour per image), so the flag
    rate counts real copies it lacks as well as false matches. This writes contact
    sheets of *all* of those pairs, numbered in order of verification score, so a
    person can judge which they are (and the share of the flag rate that is real).
    """
    from PIL import ImageDraw

    listed = {frozenset((a, b)) for a, b, _ in dev}
    best: dict[tuple[int, int], float] = {}
    for e, c, v in zip(A_e[ok].tolist(), A_c[ok].tolist(), score[ok].tolist()):
        if e != c:
            pair = (min(e, c), max(e, c))
            best[pair] = max(best.get(pair, -9.0), v)
    unlisted = sorted((p for p in best if frozenset(p) not in listed), key=lambda p: (best[p], p))
    labels = test["label"]
    cross = sum(labels[a] != labels[b] for a, b in unlisted)
    cols, cell, per = 6, 96, 42
    paths = []
    for first in range(0, len(unlisted), per):
        chunk = unlisted[first:first + per]
        sheet = Image.new("RGB", (cols * (2 * cell + 14), -(-len(chunk) // cols) * (cell + 14)), "white")
        draw = ImageDraw.Draw(sheet)
        for k, (a, b) in enumerate(chunk):
            x, y = (k % cols) * (2 * cell + 14), (k // cols) * (cell + 14)
            for j, i in enumerate((a, b)):
                im = Image.open(io.BytesIO(test["items"][i][2])).convert("RGB").resize((cell, cell),
                                                                                      Image.Resampling.NEAREST)
                sheet.paste(im, (x + j * (cell + 2), y))
            draw.text((x, y + cell), f"{first + k}: {a}-{b} {best[(a, b)]:.2f}", fill="black")
        paths.append(os.path.join(work, f"unlisted-pairs-{first // per}.png"))
        sheet.save(paths[-1])
    with open(os.path.join(work, "unlisted-pairs.json"), "w") as f:
        json.dump([{"n": n, "pair": list(p), "score": best[p]} for n, p in enumerate(unlisted)], f, indent=1)
    print(f"\nA at the defaults: {len(best)} test-test pairs flagged, {len(best) - len(unlisted)} of them in the "
          f"development list; {len(unlisted)} not listed ({cross} of those across classes). All unlisted pairs, "
          f"numbered by score, for judging by eye: {', '.join(paths)} (+ unlisted-pairs.json)")


# ---------------------------------------------------------------- part 2: photo robustness

def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _transforms() -> dict:
    def resize32(im):
        s = 32 / max(im.size)
        return _png(im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.LANCZOS))

    def crop(f):
        def t(im):
            w, h = im.size
            cw, ch = round(w * f), round(h * f)
            return _jpeg(im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)))
        return t

    def pad(im):
        w, h = im.size
        return _jpeg(ImageOps.expand(im, border=(round(0.1 * w), round(0.1 * h)), fill=(0, 0, 0)))

    def jitter(im):
        im = ImageEnhance.Brightness(im).enhance(1.2)
        im = ImageEnhance.Contrast(im).enhance(0.8)
        im = ImageEnhance.Color(im).enhance(1.4)
        hsv = np.asarray(im.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + 8) % 256  # hue shift ~11 degrees
        return _jpeg(Image.fromarray(hsv, "HSV").convert("RGB"))

    return {
        "resize 32px": resize32, "JPEG q30": lambda im: _jpeg(im, 30), "crop 90%": crop(0.9), "crop 80%": crop(0.8),
        "pad 10%": pad, "flip": lambda im: _jpeg(ImageOps.mirror(im)),
        "rotate 5deg": lambda im: _jpeg(im.rotate(5, resample=Image.Resampling.BICUBIC)),
        "colour jitter": jitter, "grayscale": lambda im: _jpeg(ImageOps.grayscale(im)),
    }


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _photos(work: str) -> None:
    table = pq.read_table(os.path.join(SHARED, "photos.parquet"), columns=["id", "filename", "image"])
    datas = table.column("image").to_pylist()
    names = table.column("filename").to_pylist()
    # photos.parquet itself holds near-duplicates: the same chessboard in grey and RGB, and the
    # two views of a stereo pair. Matches between those are right, not false.
    same = {("chessboard_GRAY.png", "chessboard_RGB.png"), ("motorcycle_left.png", "motorcycle_right.png")}
    known = {(i, j) for i in range(len(names)) for j in range(len(names))
             if (names[i], names[j]) in same or (names[j], names[i]) in same}
    n = len(datas)
    indexed = np.arange(n) % 2 == 0
    write_shard_dir(f"{work}/photos-eval", [(f"photos/{i:04d}", None, datas[i]) for i in range(n) if indexed[i]],
                    source="photos")
    if not os.path.exists(f"{work}/photos-index/_manifest.json"):
        build_index(IndexConfig(evals=[f"photos={work}/photos-eval"], out=f"{work}/photos-index"))
    index = load_index(f"{work}/photos-index")
    eval_num = np.array([int(e) for e in index.eval_id])
    tfs = _transforms()
    items = []
    for i, data in enumerate(datas):
        im = images.decode(data).image  # full resolution, EXIF-rotated RGB
        for name, fn in tfs.items():
            items.append((f"{name}/{i:04d}", None, fn(im)))
    write_shard_dir(f"{work}/photos-corpus", items, rows_per_shard=500, source="")
    out = f"{work}/photos-run"
    run(f"{work}/photos-corpus", f"{work}/photos-index", out)
    P = all_pairs(out)
    tname = np.array([s.split("/")[0] for s in P["source"]])
    cnum = np.array([int(s.split("/")[1]) for s in P["source"]])
    enum = eval_num[P["eval_row"]]
    print(f"\nRobustness on {n} real photos: index = {indexed.sum()} photos; corpus = each transform of all {n}")
    print("recall: transformed copy of an indexed photo matched to it; false: copies of the "
          f"{n - indexed.sum()} photos not in the index that matched anything, or a copy matched to another photo "
          "(matches between the known duplicates inside photos.parquet, chessboard grey/RGB and a stereo pair, "
          "are not counted as false)")
    cand = (P["joint"] <= DEFAULT.joint_radius) | (np.minimum(P["p"], P["d"]) <= DEFAULT.strong_radius)
    for thr in (0.75, 0.80, 0.85):
        ok = cand & (P["coarse"] >= DEFAULT.verify.coarse_gate) & (P["score"] >= thr)
        print(f"\nverification threshold {thr:.2f}")
        print(f"{'transform':<16} {'recall':>7} {'cand. recall':>12} {'false (distinct)':>16} {'wrong pair':>10}")
        for name in tfs:
            m = tname == name
            right = m & (cnum == enum)
            cand_rec = len(np.unique(cnum[right & cand])) / indexed.sum()
            rec = len(np.unique(cnum[right & ok])) / indexed.sum()
            dup = np.array([(a, b) in known for a, b in zip(cnum, enum)], bool)
            false_distinct = len(np.unique(cnum[m & ok & ~indexed[cnum] & ~dup]))
            wrong = int(np.sum(m & ok & (cnum != enum) & indexed[cnum] & ~dup))
            print(f"{name:<16} {rec:>7.3f} {cand_rec:>12.3f} {false_distinct:>9d} / {n - indexed.sum():<4d} {wrong:>10d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=("dev", "photos", "all"))
    ap.add_argument("--work", default="/tmp/vitray-dedup-quality")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=int(os.environ.get("BENCH_CPUS", "2")), include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    os.makedirs(args.work, exist_ok=True)
    if args.part in ("dev", "all"):
        _dev(args.work)
    if args.part in ("photos", "all"):
        _photos(args.work)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
