"""`vitray dedup index`: eval sets -> a persisted near-duplicate index.

An index directory holds::

    eval.parquet       one row per eval image: set, eval_id, source, label, size, identity
                       pHash/dHash, detail (degenerate-image score), a (S, S) grey
                       thumbnail for verification and a small colour preview for reports
    views.parquet      one row per (eval image, view): eval_row, view, phash, dhash
    _failures.parquet  (set, source, reason) of eval images that could not be decoded
    _manifest.json     written last: sets (source, layout, counts, classes), hash and
                       view settings, the resolved config, file checksums and ``digest``,
                       a SHA-256 of the content that identifies this version of the index

The hashing runs as a Ray Data job, one task per unit of an eval set (see
``sources``), each image decoded once by the canonical hash decode and hashed
as every view of ``augment.views``.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitray import storage
from vitray.config import ConfigError, check, to_dict
from vitray.dedup import augment, sources, verify
from vitray.pipeline import hashes, images, schema
from vitray.storage import StorageOptions

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EVAL_FILE = "eval.parquet"
VIEWS_FILE = "views.parquet"
FAILURES_FILE = "_failures.parquet"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclasses.dataclass
class IndexConfig:
    """Settings of one `vitray dedup index` run (written into the manifest)."""

    evals: list[str] = dataclasses.field(default_factory=list)
    """Eval sets as ``NAME=SRC`` (SRC: a CIFAR pickle dir, a shard dir, or any source `vitray shard` reads)."""
    out: str = ""
    """Index directory URI (local path, s3://, gs://)."""
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)
    augment: augment.AugmentConfig = dataclasses.field(default_factory=augment.AugmentConfig)
    thumb_size: int = 32
    """Side of the stored greyscale verification thumbnails (the run compares at this size)."""
    preview_side: int = 64
    """Longer side of the colour previews shown in report.html."""
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    """Eval images with more pixels are recorded as failures (decompression bombs)."""
    concurrency: int | None = None
    """Most hashing tasks at once (default: as many as the cluster's CPUs allow)."""

    def __post_init__(self):
        check(bool(self.evals), "evals", "at least one NAME=SRC eval set is required")
        names = [e.split("=", 1)[0] for e in self.evals]
        for i, e in enumerate(self.evals):
            check("=" in e and e.split("=", 1)[1] != "", f"evals[{i}]", f"expected NAME=SRC, got {e!r}")
            check(bool(_NAME.match(names[i])), f"evals[{i}]",
                  f"set name {names[i]!r} must be 1-64 letters, digits, '_', '.', '-'")
        check(len(set(names)) == len(names), "evals", "set names must be unique")
        check(bool(self.out), "out", "an index directory URI is required")
        check(8 <= self.thumb_size <= 128, "thumb_size", "must be in 8..128")
        check(16 <= self.preview_side <= 256, "preview_side", "must be in 16..256")
        check(self.max_pixels >= 1, "max_pixels", "must be positive")
        check(self.concurrency is None or self.concurrency >= 1, "concurrency", "must be >= 1 or null")

    def sets(self) -> list[tuple[str, str]]:
        """(name, src) sorted by name, so the index does not depend on argument order."""
        return sorted(tuple(e.split("=", 1)) for e in self.evals)


@dataclasses.dataclass
class EvalIndex:
    """An index loaded for a run: N eval images, V views."""

    manifest: dict
    sets: list[str]
    set_code: np.ndarray  # (N,) int16 -> sets
    eval_id: np.ndarray  # (N,) object str
    source: np.ndarray  # (N,) object str
    label: np.ndarray  # (N,) int64, -1 = none
    detail: np.ndarray  # (N,) float32
    thumbs: np.ndarray  # (N, S, S) uint8
    view_row: np.ndarray  # (V,) int32 -> eval row
    view_id: np.ndarray  # (V,) int16 -> view_names
    view_phash: np.ndarray  # (V,) uint64
    view_dhash: np.ndarray  # (V,) uint64
    view_names: list[str]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]


# ---------------------------------------------------------------- worker side

_UNIT_SCHEMA = pa.schema([
    ("set", pa.string()), ("seq", pa.int64()), ("pos", pa.int64()), ("eval_id", pa.string()), ("source", pa.string()),
    ("label", pa.int64()), ("width", pa.int32()), ("height", pa.int32()), ("thumb", pa.binary()),
    ("preview", pa.binary()), ("view_phash", pa.binary()), ("view_dhash", pa.binary()), ("error", pa.string()),
])


def _hash_unit(batch: dict, cfg: IndexConfig) -> pa.Table:
    """Ray Data UDF: one unit -> one row per eval image (hashes of all views, thumbnail, preview)."""
    view_list = augment.views(cfg.augment)
    out: dict[str, list] = {k: [] for k in ("set", "seq", "pos", "eval_id", "source", "label", "width", "height",
                                            "thumb", "preview", "view_phash", "view_dhash", "error")}
    for set_name, src, seq, unit_json in zip(batch["set"], batch["src"], batch["seq"], batch["unit"]):
        for pos, rec in enumerate(sources.read_unit(json.loads(unit_json), cfg.storage, src)):
            row = dict(set=set_name, seq=int(seq), pos=pos, eval_id=rec.eval_id, source=rec.source, label=rec.label,
                       width=0, height=0, thumb=b"", preview=b"", view_phash=b"", view_dhash=b"", error=rec.error)
            if rec.error is None:
                try:
                    dec = hashes.decode_for_hash(rec.data, cfg.max_pixels)
                    gray = dec.image.convert("L")
                    ph, dh = augment.hash_views(gray, view_list)
                    row.update(width=dec.width, height=dec.height, view_phash=ph.tobytes(), view_dhash=dh.tobytes(),
                               thumb=augment.thumbnail(dec.image, cfg.thumb_size).tobytes(),
                               preview=augment.preview_png(dec.image, cfg.preview_side))
                except images.ImageError as exc:
                    row["error"] = exc.reason
                except Exception as exc:  # an exotic decoder error must not sink the index
                    row["error"] = f"error: {type(exc).__name__}: {exc}"
            for k, v in row.items():
                out[k].append(v)
    return pa.table(out, schema=_UNIT_SCHEMA)


# ---------------------------------------------------------------- driver side

def _ensure_ray():
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    return ray


def _content_digest(eval_tbl: pa.Table, views_tbl: pa.Table, view_names: list[str], thumb_size: int) -> str:
    """SHA-256 over what a run depends on, in a canonical byte form (not Parquet's encoding)."""
    h = hashlib.sha256()
    h.update(json.dumps({"views": view_names, "thumb_size": thumb_size, "schema_version": SCHEMA_VERSION}).encode())
    for col in ("set", "eval_id", "source"):
        for v in eval_tbl.column(col).to_pylist():
            h.update(v.encode() + b"\0")
    h.update(np.asarray(eval_tbl.column("label").fill_null(-1), np.int64).tobytes())
    for v in eval_tbl.column("thumb").to_pylist():
        h.update(v)
    for col in ("eval_row", "view", "phash", "dhash"):
        h.update(views_tbl.column(col).to_numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _is_null(col: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _parquet(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def build_index(cfg: IndexConfig) -> dict:
    """Hash every eval image (and its views) and write the index; returns the manifest."""
    t0 = time.perf_counter()
    ray = _ensure_ray()
    import ray.data

    view_list = augment.views(cfg.augment)
    plans, items = {}, []
    for name, src in cfg.sets():
        try:
            plans[name] = sources.plan_eval_set(name, src, cfg.storage, cfg.out)
        except sources.EvalSourceError as exc:
            raise ConfigError("evals", str(exc)) from None
        for unit in plans[name].units:
            items.append({"set": name, "src": src, "seq": len(items), "unit": json.dumps(unit)})
    log.info("indexing %d eval sets (%d tasks), %d views per image", len(plans), len(items), len(view_list))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_hash_unit, batch_size=1, fn_kwargs={"cfg": cfg},
                        compute=ray.data.TaskPoolStrategy(size=cfg.concurrency))
    rows = ds.to_arrow_refs()
    table = pa.concat_tables(ray.get(rows)) if rows else None
    if table is None or table.num_rows == 0:
        raise ConfigError("evals", "the eval sets hold no images")
    table = table.sort_by([("seq", "ascending"), ("pos", "ascending")])  # source order, whatever ran first

    ok = _is_null(table.column("error"))
    good, bad = table.filter(ok), table.filter(np.logical_not(ok))
    n, s = good.num_rows, cfg.thumb_size
    thumbs = np.frombuffer(b"".join(good.column("thumb").to_pylist()), np.uint8).reshape(n, s, s)
    vp = np.frombuffer(b"".join(good.column("view_phash").to_pylist()), np.uint64).reshape(n, len(view_list))
    vd = np.frombuffer(b"".join(good.column("view_dhash").to_pylist()), np.uint64).reshape(n, len(view_list))
    eval_tbl = pa.table({
        "set": good.column("set"), "eval_id": good.column("eval_id"), "source": good.column("source"),
        "label": pa.array(good.column("label").to_pylist(), pa.int64()),
        "width": pa.array(good.column("width").to_pylist(), pa.int32()),
        "height": pa.array(good.column("height").to_pylist(), pa.int32()),
        "phash": pa.array(vp[:, 0]), "dhash": pa.array(vd[:, 0]),  # view 0 = identity = the shard hashes
        "detail": pa.array(verify.detail(thumbs).astype(np.float32)),
        "thumb": good.column("thumb"), "preview": good.column("preview"),
    })
    views_tbl = pa.table({
        "eval_row": pa.array(np.repeat(np.arange(n, dtype=np.int32), len(view_list))),
        "view": pa.array(np.tile(np.arange(len(view_list), dtype=np.int16), n)),
        "phash": pa.array(vp.reshape(-1)), "dhash": pa.array(vd.reshape(-1)),
    })
    failures = pa.table({"set": bad.column("set"), "source": bad.column("source"),
                         "reason": bad.column("error")})

    sets = {}
    set_col = np.asarray(table.column("set").to_pylist(), dtype=object)
    ok_np = np.asarray(ok)
    for name, src in cfg.sets():
        mine = set_col == name
        sets[name] = {"src": src, "layout": plans[name].kind, "read": int(mine.sum()),
                      "indexed": int((mine & ok_np).sum()), "failed": int((mine & ~ok_np).sum()),
                      "classes": plans[name].classes}
    files = {}
    fs, root = storage.resolve(cfg.out, cfg.storage)
    blobs = {EVAL_FILE: _parquet(eval_tbl), VIEWS_FILE: _parquet(views_tbl), FAILURES_FILE: _parquet(failures)}
    for fname, data in blobs.items():
        storage.write_bytes_atomic(fs, f"{root}/{fname}", data)
        files[fname] = {"bytes": len(data), "checksum": schema.checksum(data)}
    manifest = {
        "kind": "vitray-dedup-index", "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(cfg), "sets": sets,
        "counts": {"read": table.num_rows, "indexed": n, "failed": bad.num_rows, "views": views_tbl.num_rows},
        "hash": {"phash": "imagehash.phash (8x8 DCT of 32x32 LANCZOS grey, bit-identical)",
                 "dhash": "imagehash.dhash (9x8 LANCZOS grey)",
                 "decode": f"pipeline.hashes.decode_for_hash (JPEG draft >= {hashes.HASH_DECODE_SIDE} px)",
                 "bits": 64},
        "views": [v.name for v in view_list], "thumb_size": s, "files": files,
        "digest": _content_digest(eval_tbl, views_tbl, [v.name for v in view_list], s),
    }
    storage.write_bytes_atomic(fs, f"{root}/{schema.MANIFEST_NAME}", json.dumps(manifest, indent=2).encode())
    log.info("index %s: %d eval images (%d failed), %d views, digest %s (%.1fs)", cfg.out, n, bad.num_rows,
             views_tbl.num_rows, manifest["digest"][:19], time.perf_counter() - t0)
    return manifest


def load_index(uri: str, options: StorageOptions | None = None) -> EvalIndex:
    """Read an index for a run (previews are left on disk: only reports need them)."""
    fs, root = storage.resolve(uri, options)
    try:
        manifest = json.loads(storage.read_bytes(fs, f"{root}/{schema.MANIFEST_NAME}"))
    except OSError:
        raise ConfigError("index", f"{uri} is not a complete dedup index (no {schema.MANIFEST_NAME}; "
                                   f"run `vitray dedup index` first)") from None
    check(manifest.get("kind") == "vitray-dedup-index", "index", f"{uri} is not a dedup index")
    check(manifest.get("schema_version") == SCHEMA_VERSION, "index",
          f"{uri} has schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
    with fs.open_input_file(f"{root}/{EVAL_FILE}") as f:
        ev = pq.read_table(f, columns=["set", "eval_id", "source", "label", "detail", "thumb"])
    with fs.open_input_file(f"{root}/{VIEWS_FILE}") as f:
        vw = pq.read_table(f)
    names = sorted(manifest["sets"])
    code = {name: i for i, name in enumerate(names)}
    n, s = ev.num_rows, manifest["thumb_size"]
    return EvalIndex(
        manifest=manifest, sets=names,
        set_code=np.array([code[x] for x in ev.column("set").to_pylist()], np.int16),
        eval_id=np.array(ev.column("eval_id").to_pylist(), dtype=object),
        source=np.array(ev.column("source").to_pylist(), dtype=object),
        label=np.asarray(ev.column("label").fill_null(-1).to_numpy(), np.int64),
        detail=ev.column("detail").to_numpy().astype(np.float32),
        thumbs=np.frombuffer(b"".join(ev.column("thumb").to_pylist()), np.uint8).reshape(n, s, s),
        view_row=vw.column("eval_row").to_numpy(), view_id=vw.column("view").to_numpy(),
        view_phash=vw.column("phash").to_numpy(), view_dhash=vw.column("dhash").to_numpy(),
        view_names=list(manifest["views"]),
    )


def load_previews(uri: str, options: StorageOptions | None, rows: np.ndarray) -> dict[int, bytes]:
    """Colour previews of the given eval rows (for the report)."""
    fs, root = storage.resolve(uri, options)
    with fs.open_input_file(f"{root}/{EVAL_FILE}") as f:
        col = pq.read_table(f, columns=["preview"]).column("preview")
    return {int(r): col[int(r)].as_py() for r in np.unique(rows)}
