"""One corpus shard through dedup: hash search, verification, atomic per-shard results.

A shard task reads only ``schema.HASH_COLUMNS`` of its shard (no image bytes,
no decoding) and finds every (corpus row, eval image) pair whose pHash or dHash
is within the configured radius of any indexed view of the eval image, with the
exact multi-index search of ``search.HammingIndex``. Only the rows that have a
candidate are then read (their row groups' ``image`` column) and decoded, to a
thumbnail, and each pair is verified (``verify.Verifier``).

Results are written under ``OUT/_parts/``::

    shard-00000.rows.parquet    every row: sample_id, source, sha256, status (kept/removed/failed), reason
    shard-00000.pairs.parquet   every candidate pair: distances, scores, match, windows (+ previews near
                                the threshold, for the report)
    shard-00000.done.json       written last: counts, the run fingerprint and the shard checksum

A shard is complete only when its ``done.json`` exists with the current run's
fingerprint, so an interrupted run redoes exactly the shards without one, and a
finished shard is never recomputed (or is, when the index or settings changed).
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitray import storage
from vitray.dedup import augment
from vitray.dedup.verify import DEGENERATE, Verifier
from vitray.pipeline import hashes, images, schema


PARTS_DIR = "_parts"
CLEAN_DIR = "clean"
STATUS = ("kept", "removed", "failed")

PAIRS_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("source", pa.string()), ("eval_row", pa.int32()),
    ("phash_distance", pa.uint8()), ("dhash_distance", pa.uint8()), ("joint_distance", pa.uint8()),
    ("view", pa.string()),
    ("coarse", pa.float32()), ("score", pa.float32()), ("match", pa.bool_()), ("degenerate", pa.bool_()),
    ("eval_window", pa.string()), ("corpus_window", pa.string()), ("preview", pa.binary()),
])
ROWS_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("source", pa.string()), ("sha256", pa.string()), ("sha64", pa.uint64()),
    ("status", pa.string()), ("reason", pa.string()),
])


def part_paths(out_root: str, shard_name: str) -> dict[str, str]:
    stem = shard_name.rsplit(".parquet", 1)[0]
    base = f"{out_root}/{PARTS_DIR}/{stem}"
    return {"rows": f"{base}.rows.parquet", "pairs": f"{base}.pairs.parquet", "done": f"{base}.done.json"}


def read_done(fs, path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(fs, path))
    except (OSError, ValueError):
        return None


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# ---------------------------------------------------------------- candidates

def candidates(bundle: dict, phash: np.ndarray, dhash: np.ndarray, cfg: Any) -> dict[str, np.ndarray]:
    """Candidate (corpus row, eval image) pairs of a shard, closest first within each row.

    phash, dhash: (R,) uint64 corpus hashes. A (row, view) hit is any view within
    ``phash_radius`` on pHash or ``dhash_radius`` on dHash (exact multi-index
    search); for each hit both distances to that view are known. A pair (row,
    eval image) is a candidate when one of its hits has ``p + d <= joint_radius``
    or ``min(p, d) <= strong_radius``: two partly independent hashes agreeing is
    stronger evidence than either one within a loose radius. Returns arrays of
    length P: ``row``, ``eval_row``, ``p``, ``d`` (best over the image's views),
    ``joint`` (best ``p + d`` of one view), ``view`` (that view), plus
    ``truncated_row``: the row of each pair dropped by the per-row cap.
    """
    rows, views = [], []
    for kind, codes, radius in (("p", phash, cfg.phash_radius), ("d", dhash, cfg.dhash_radius)):
        if radius >= 0:
            q, t, _ = bundle[f"{kind}_index"].search(codes, radius)
            rows.append(q)
            views.append(t)
    q, t = np.concatenate(rows), np.concatenate(views)
    p = np.bitwise_count(phash[q] ^ bundle["view_phash"][t]).astype(np.int64)  # both distances to each hit view
    d = np.bitwise_count(dhash[q] ^ bundle["view_dhash"][t]).astype(np.int64)
    ok = (p + d <= cfg.joint_radius) | (np.minimum(p, d) <= cfg.strong_radius)
    q, t, p, d = q[ok], t[ok], p[ok], d[ok]
    key = q * bundle["n_eval"] + bundle["view_row"][t]
    order = np.lexsort((t, p + d, key))  # per (row, eval image): best joint distance first
    key, t, p, d = key[order], t[order], p[order], d[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    if len(starts):
        best_p, best_d = np.minimum.reduceat(p, starts), np.minimum.reduceat(d, starts)
    else:
        best_p = best_d = np.zeros(0, np.int64)
    joint, view, key = p[starts] + d[starts], bundle["view_id"][t[starts]].astype(np.int64), key[starts]
    row, eval_row = np.divmod(key, bundle["n_eval"])
    # Cap the eval images verified per corpus row (closest first): a pathological row
    # (e.g. one colliding with many near-identical eval images) must not stall the shard.
    order = np.lexsort((eval_row, joint, row))
    row, eval_row, best_p, best_d, joint, view = (x[order] for x in (row, eval_row, best_p, best_d, joint, view))
    rank = np.arange(len(row)) - np.searchsorted(row, row, side="left")
    keep = rank < cfg.max_candidates_per_row
    return {"row": row[keep], "eval_row": eval_row[keep], "p": best_p[keep], "d": best_d[keep],
            "joint": joint[keep], "view": view[keep], "truncated_row": row[~keep]}


# ---------------------------------------------------------------- corpus thumbnails

def _read_images(pf: pq.ParquetFile, rows: np.ndarray) -> list[bytes]:
    """Image bytes of the given (sorted, unique) rows, reading only their row groups."""
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    bounds = np.cumsum([0] + sizes)
    groups = np.unique(np.searchsorted(bounds, rows, side="right") - 1)
    col = pf.read_row_groups(list(groups), columns=["image"]).column("image")
    # position of each row inside the concatenation of the selected groups
    offset = np.cumsum([0] + [sizes[g] for g in groups])
    where = {g: offset[i] - bounds[g] for i, g in enumerate(groups)}
    gi = np.searchsorted(bounds, rows, side="right") - 1
    return [col[int(r + where[g])].as_py() for r, g in zip(rows, gi)]


def corpus_thumbnails(datas: list[bytes], size: int, max_pixels: int
                      ) -> tuple[np.ndarray, list[Any], list[str | None]]:
    """Decode candidate rows (canonical hash decode) -> ((U, S, S) uint8, images, error reasons)."""
    thumbs = np.zeros((len(datas), size, size), np.uint8)
    ims, errors = [], []
    for i, data in enumerate(datas):
        try:
            im = hashes.decode_for_hash(data, max_pixels).image
            thumbs[i] = augment.thumbnail(im, size)
            ims.append(im)
            errors.append(None)
        except images.ImageError as exc:
            ims.append(None)
            errors.append(exc.reason)
        except Exception as exc:  # never let one row sink the shard
            ims.append(None)
            errors.append(f"error: {type(exc).__name__}: {exc}")
    return thumbs, ims, errors


# ---------------------------------------------------------------- one shard

def _is_done(ofs, oroot: str, shard: dict, fingerprint: str) -> dict | None:
    done = read_done(ofs, part_paths(oroot, shard["name"])["done"])
    ok = done and done.get("fingerprint") == fingerprint and done.get("shard_checksum") == shard.get("checksum")
    return done if ok else None


def process_shards(shards: list[dict], bundle: dict, cfg: Any, verifier: Verifier) -> list[dict]:
    """Dedup a group of shards (manifest entries); returns the counts of each one's done.json.

    The hash search runs once over the group's rows together (the search is much
    faster per row on a large batch of queries than on a small shard's), then
    each shard is verified and written on its own, so results stay per shard.
    """
    t0 = time.perf_counter()
    cfs, croot = storage.resolve(cfg.corpus, cfg.storage)
    ofs, oroot = storage.resolve(cfg.out, cfg.storage)
    fingerprint = bundle["fingerprint"]
    results, todo = [], []
    for shard in shards:
        done = _is_done(ofs, oroot, shard, fingerprint)
        if done:
            results.append({**done, "resumed": True, "seconds": 0.0})
            continue
        stats = {"shard": shard["name"], "rows": int(shard.get("rows", 0)), "kept": 0, "removed": 0, "failed": 0,
                 "candidate_rows": 0, "candidate_pairs": 0, "verified_pairs": 0, "degenerate_pairs": 0,
                 "matched_pairs": 0, "truncated_pairs": 0, "fingerprint": fingerprint,
                 "shard_checksum": shard.get("checksum"), "error": None, "clean": None}
        try:
            f = cfs.open_input_file(f"{croot}/{shard['name']}")
            pf = pq.ParquetFile(f)
            table = pf.read(columns=schema.HASH_COLUMNS)
        except Exception as exc:  # an unreadable shard is recorded as failed rows, not a crashed job
            stats.update(failed=stats["rows"], error=f"unreadable shard: {type(exc).__name__}: {exc}")
            _write_parts(ofs, oroot, stats, ROWS_SCHEMA.empty_table(), PAIRS_SCHEMA.empty_table())
            results.append({**stats, "resumed": False, "seconds": 0.0})
            continue
        todo.append((shard, stats, f, pf, table))
    if not todo:
        return results
    offsets = np.cumsum([0] + [t[4].num_rows for t in todo])
    phash = np.concatenate([t[4].column("phash").to_numpy().astype(np.uint64) for t in todo])
    dhash = np.concatenate([t[4].column("dhash").to_numpy().astype(np.uint64) for t in todo])
    cand = candidates(bundle, phash, dhash, cfg)  # rows ascending: each shard's pairs are one slice
    cuts = np.searchsorted(cand["row"], offsets)
    for k, (shard, stats, f, pf, table) in enumerate(todo):
        sl = slice(cuts[k], cuts[k + 1])
        mine = {key: v[sl] for key, v in cand.items() if key != "truncated_row"}
        mine["row"] = mine["row"] - offsets[k]
        dropped = cand["truncated_row"]
        mine["truncated"] = int(((dropped >= offsets[k]) & (dropped < offsets[k + 1])).sum())
        try:
            rows_tbl, pairs_tbl = _dedup_table(table, pf, mine, bundle, cfg, verifier, stats)
            if cfg.write_clean:
                stats["clean"] = _write_clean(pf, rows_tbl, ofs, oroot, shard["name"])
        finally:
            f.close()
        _write_parts(ofs, oroot, stats, rows_tbl, pairs_tbl)
        results.append({**stats, "resumed": False, "seconds": time.perf_counter() - t0})
    return results


def _write_parts(ofs, oroot: str, stats: dict, rows_tbl: pa.Table, pairs_tbl: pa.Table) -> None:
    """Both result files, then the done marker that makes them count (each write atomic)."""
    paths = part_paths(oroot, stats["shard"])
    storage.write_bytes_atomic(ofs, paths["rows"], _parquet(rows_tbl))
    storage.write_bytes_atomic(ofs, paths["pairs"], _parquet(pairs_tbl))
    storage.write_bytes_atomic(ofs, paths["done"], json.dumps(stats, sort_keys=True).encode())


def _dedup_table(table: pa.Table, pf: pq.ParquetFile, cand: dict, bundle: dict, cfg: Any, verifier: Verifier,
                 stats: dict) -> tuple[pa.Table, pa.Table]:
    n = table.num_rows
    stats["rows"] = n
    status = np.zeros(n, np.int8)  # index into STATUS
    reason: list[str | None] = [None] * n
    sample_ids = table.column("sample_id").to_pylist()
    sources = table.column("source").to_pylist()
    urows, c_idx = np.unique(cand["row"], return_inverse=True)
    stats.update(candidate_rows=len(urows), candidate_pairs=len(cand["row"]), truncated_pairs=cand["truncated"])
    thumbs, ims, errors = corpus_thumbnails(_read_images(pf, urows), bundle["thumb_size"], cfg.max_pixels) \
        if len(urows) else (np.zeros((0, 1, 1), np.uint8), [], [])
    ok_row = np.array([e is None for e in errors], bool)
    for r, err in zip(urows, errors):
        if err is not None:
            status[r], reason[r] = 2, f"verification decode failed: {err}"
    live = ok_row[c_idx] if len(c_idx) else np.zeros(0, bool)
    scored = verifier.score_pairs(bundle["thumbs"], thumbs, cand["eval_row"][live], c_idx[live])
    p_count = len(cand["row"])
    score = np.full(p_count, np.nan, np.float32)
    coarse = np.full(p_count, np.nan, np.float32)
    match = np.zeros(p_count, bool)
    degenerate = np.zeros(p_count, bool)
    ewin = np.full(p_count, None, object)
    cwin = np.full(p_count, None, object)
    score[live], coarse[live], match[live], degenerate[live] = scored.score, scored.coarse, scored.match, scored.degenerate
    ewin[live], cwin[live] = scored.eval_window, scored.corpus_window
    removed_rows = np.unique(cand["row"][match])
    status[removed_rows] = 1
    for r in np.unique(cand["row"][live & degenerate & ~match]):
        if status[r] == 0 and reason[r] is None:
            reason[r] = DEGENERATE  # kept, but say why it was not verified
    thr, band = cfg.verify.threshold, cfg.borderline
    near = match | (np.abs(np.nan_to_num(score, nan=-9.0) - thr) <= band)
    previews = [augment.preview_png(ims[c_idx[k]], cfg.preview_side) if near[k] and ims[c_idx[k]] is not None
                else None for k in range(p_count)]
    rows_c = cand["row"]
    pairs_tbl = pa.table({
        "sample_id": [sample_ids[r] for r in rows_c], "source": [sources[r] for r in rows_c],
        "eval_row": cand["eval_row"].astype(np.int32), "phash_distance": cand["p"].astype(np.uint8),
        "dhash_distance": cand["d"].astype(np.uint8), "joint_distance": cand["joint"].astype(np.uint8),
        "view": [bundle["view_names"][v] for v in cand["view"]],
        "coarse": coarse, "score": score, "match": match, "degenerate": degenerate,
        "eval_window": list(ewin), "corpus_window": list(cwin), "preview": previews,
    }, schema=PAIRS_SCHEMA)
    sha = table.column("sha256").to_pylist()
    rows_tbl = pa.table({
        "sample_id": sample_ids, "source": sources, "sha256": sha,
        "sha64": np.array([int(s[:16], 16) for s in sha], np.uint64),
        "status": [STATUS[s] for s in status], "reason": reason,
    }, schema=ROWS_SCHEMA)
    stats.update(kept=int((status == 0).sum()), removed=int((status == 1).sum()), failed=int((status == 2).sum()),
                 verified_pairs=int(np.isfinite(score).sum()), degenerate_pairs=int(degenerate.sum()),
                 matched_pairs=int(match.sum()))
    return rows_tbl, pairs_tbl


def _write_clean(pf: pq.ParquetFile, rows_tbl: pa.Table, fs, root: str, name: str) -> dict:
    """The shard without its removed rows (same schema, same order)."""
    keep = np.asarray(rows_tbl.column("status").to_pylist(), dtype=object) != "removed"
    table = pf.read().filter(pa.array(keep))
    data = schema.parquet_bytes(table)
    storage.write_bytes_atomic(fs, f"{root}/{CLEAN_DIR}/{name}", data)
    return {"name": name, "rows": table.num_rows, "bytes": len(data), "checksum": schema.checksum(data)}
