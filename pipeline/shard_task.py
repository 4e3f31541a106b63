"""The worker side of `vitray shard`: one planned task -> one Parquet shard + a marker.

A task reads its units in source order, turns each sample into a shard row
(:func:`encode_sample`), writes ``shard-NNNNN.parquet`` atomically, then a small
completion marker ``_state/shard-NNNNN.json`` holding the task digest, row count,
size, checksum and the task's failures. Only the marker proves a shard complete,
and only if the shard's bytes still match its checksum, so a half-written or
damaged shard is redone on the next run. Tasks return a few integers: nothing
large crosses the object store, which keeps memory bounded however big the
corpus is.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from typing import Any

import pyarrow.fs as pafs
from PIL import Image

from vitray import storage
from vitray.pipeline import hashes, images, schema, sources

log = logging.getLogger(__name__)

STATE_DIR = "_state"
_LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")
"""Sources in these formats are re-encoded as JPEG; everything else as (lossless) PNG."""


def marker_path(dst_root: str, index: int) -> str:
    return f"{dst_root}/{STATE_DIR}/{schema.shard_name(index).replace('.parquet', '.json')}"


def shard_path(dst_root: str, index: int) -> str:
    return f"{dst_root}/{schema.shard_name(index)}"


# ---------------------------------------------------------------- one sample

def encode_sample(data: bytes, max_pixels: int, max_side: int | None, quality: int) -> dict:
    """Shard-row fields of one encoded image; raises ``images.ImageError`` for bad input.

    sha256 / phash / dhash describe the original bytes (phash and dhash exactly as
    ``hashes.hash_bytes(data)``), while ``image``, ``width``, ``height`` and
    ``format`` describe the stored image: the original bytes, or, when
    ``max_side`` is set and the shorter displayed side exceeds it, a re-encode
    with the shorter side equal to ``max_side``.
    """
    sha = hashlib.sha256(data).hexdigest()
    hd = hashes.decode_for_hash(data, max_pixels)  # the canonical hash decode (reduced-scale JPEG)
    ph, dh = hashes.hash_images([hd.image])
    row = {"sha256": sha, "phash": int(ph[0]), "dhash": int(dh[0]),
           "width": hd.width, "height": hd.height, "format": hd.format, "image": data}
    short = min(hd.width, hd.height)
    if max_side is None or short <= max_side:
        return row
    # Decode once more at the DCT scale that still covers max_side, unless the hash
    # decode already ran at that scale (non-JPEGs, or small JPEGs): then reuse it.
    w, h = hd.width, hd.height
    same_scale = hd.format != "JPEG" or (
        images.draft_scale(w, h, hashes.HASH_DECODE_SIDE) == images.draft_scale(w, h, max_side))
    im = hd.image if same_scale else images.decode(data, max_pixels=max_pixels, draft_size=max_side).image
    scale = max_side / short
    size = (max(1, round(hd.width * scale)), max(1, round(hd.height * scale)))
    if hd.width <= hd.height:
        size = (max_side, size[1])
    else:
        size = (size[0], max_side)
    im = im.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    fmt = "JPEG" if hd.format in _LOSSY_FORMATS else "PNG"
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=quality)
    else:
        im.save(buf, "PNG", compress_level=6)
    row.update(width=size[0], height=size[1], format=fmt, image=buf.getvalue())
    return row


# ---------------------------------------------------------------- markers

def read_marker(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(fs, path))
    except (OSError, ValueError):
        return None


def marker_is_valid(fs: pafs.FileSystem, dst_root: str, task: dict, marker: dict | None) -> bool:
    """True when ``marker`` belongs to this task and its shard's bytes match the checksum."""
    if not marker or marker.get("digest") != task["digest"]:
        return False
    if marker["rows"] == 0:
        return True
    path = shard_path(dst_root, task["index"])
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File or info.size != marker["bytes"]:
        return False
    try:
        return schema.checksum(storage.read_bytes(fs, path)) == marker["checksum"]
    except OSError:
        return False


# ---------------------------------------------------------------- one task

def _stats(marker: dict, resumed: bool, started: float) -> dict:
    """What a task returns to the driver; ``started``/``ended`` are wall-clock times (``time.time()``)."""
    return {"index": marker["index"], "name": marker["name"] or "", "rows": marker["rows"],
            "bytes": marker["bytes"], "read": marker["read"], "failed": len(marker["failures"]),
            "resumed": resumed, "started": started, "ended": time.time()}


def process_task(task: dict, cfg: Any) -> dict:
    """Run one planned task (skip it if a valid marker exists); returns small stats.

    ``cfg`` is the ``ShardConfig``. Idempotent: a re-run after an interruption
    either finds a valid marker or rewrites the shard byte for byte.
    """
    started = time.time()
    dst_fs, dst_root = storage.resolve(cfg.dst, cfg.storage)
    index = task["index"]
    mpath = marker_path(dst_root, index)
    marker = read_marker(dst_fs, mpath)
    if marker_is_valid(dst_fs, dst_root, task, marker):
        return _stats(marker, True, started)
    if marker is not None:  # stale: must not vouch for the shard we are about to rewrite
        dst_fs.delete_file(mpath)

    src_fs, _ = storage.resolve(cfg.src, cfg.storage)
    rows: list[dict] = []
    failures: list[list[str]] = []
    read = 0
    for sample in sources.read_units(src_fs, task["units"], task.get("classes"),
                                     cfg.image_column, cfg.io_threads):
        read += 1
        if sample.error is not None:
            failures.append([sample.source, sample.error])
            continue
        try:
            fields = encode_sample(sample.data, cfg.max_pixels, cfg.max_side, cfg.reencode_quality)
        except images.ImageError as exc:
            failures.append([sample.source, exc.reason])
            continue
        except Exception as exc:  # a bug or an exotic decoder error must not sink the corpus
            failures.append([sample.source, f"error: {type(exc).__name__}: {exc}"])
            continue
        rows.append({"sample_id": schema.sample_id(sample.source), "source": sample.source,
                     "label": sample.label, "labels": sample.labels, **fields})
    if read != len(rows) + len(failures):
        raise RuntimeError(f"task {index}: read {read} != written {len(rows)} + failed {len(failures)}")

    n_rows = len(rows)
    spath = shard_path(dst_root, index)
    name, size, digest = None, 0, None
    if n_rows:
        data = schema.parquet_bytes(schema.table_from_rows(rows))
        del rows  # the encoded shard is all we keep
        name, size, digest = schema.shard_name(index), len(data), schema.checksum(data)
        storage.write_bytes_atomic(dst_fs, spath, data)
    elif storage.exists(dst_fs, spath):  # left by an older plan; this task has no rows
        dst_fs.delete_file(spath)
    marker = {"index": index, "digest": task["digest"], "name": name, "rows": n_rows, "bytes": size,
              "checksum": digest, "read": read, "failures": failures}
    storage.write_bytes_atomic(dst_fs, mpath, json.dumps(marker).encode())
    log.debug("task %d: %d read, %d written, %d failed", index, read, n_rows, len(failures))
    return _stats(marker, False, started)
