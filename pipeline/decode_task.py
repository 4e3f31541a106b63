"""The Ray Data task of the training reader: fetch some rows of some shards, decode, augment.

One task gets one *chunk*: the positions (in epoch order) of up to ``task_samples``
samples that one rank consumes, all from one shuffle window, with their (shard,
row) addresses. It reads only the row groups holding those rows and only the
columns it needs, decodes + augments each sample in chunk order, and yields
uint8 batches. Nothing outside the chunk is read or decoded, which is what makes
a resumed reader's skip free.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitray.pipeline import augment, images
from vitray.storage import StorageOptions, resolve, scheme_of

READ_COLUMNS = ["sample_id", "label", "labels", "image"]


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    """Everything a task needs besides its chunk; pickled once per dataset."""

    shard_uris: tuple[str, ...]
    shard_rows: tuple[int, ...]
    """Rows per shard as the manifest says; a shard that disagrees is an error."""
    shard_checksums: tuple[str, ...]
    storage: StorageOptions
    spec: augment.AugmentSpec
    seed: int
    epoch: int
    multi_label: bool = False
    num_classes: int | None = None
    out_rows: int = 32
    """Rows per yielded batch (bounds a task's output buffer)."""


def encode_chunk(positions: np.ndarray, shards: np.ndarray, rows: np.ndarray) -> dict:
    """A chunk as one ``from_items`` row (compact bytes columns)."""
    return {"positions": positions.astype(np.int64).tobytes(),
            "shards": shards.astype(np.int64).tobytes(),
            "rows": rows.astype(np.int64).tobytes()}


_FILESYSTEMS: dict = {}
_METADATA: collections.OrderedDict = collections.OrderedDict()  # (uri, checksum) -> FileMetaData, LRU


def _open(plan: TaskPlan, shard: int):
    """(filesystem, path) of a shard; filesystems are cached per worker process."""
    uri = plan.shard_uris[shard]
    scheme = scheme_of(uri)
    if scheme == "file":
        fs, path = resolve(uri)
    else:
        key = (scheme, plan.storage)
        if key not in _FILESYSTEMS:  # an S3 client per shard open would dominate small reads
            _FILESYSTEMS[key] = resolve(uri, plan.storage)[0]
        fs, path = _FILESYSTEMS[key], uri.split("://", 1)[1]
    return fs, path


def read_shard_rows(plan: TaskPlan, shard: int, rows: np.ndarray) -> pa.Table:
    """Rows ``rows`` (any order) of one shard, reading only the row groups that hold them.

    Footers are cached per worker process, keyed by the manifest checksum so a
    rewritten shard is never read with a stale footer.
    """
    fs, path = _open(plan, shard)
    key = (plan.shard_uris[shard], plan.shard_checksums[shard])
    meta = _METADATA.get(key)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, metadata=meta)
        if meta is None:
            if pf.metadata.num_rows != plan.shard_rows[shard]:
                raise RuntimeError(f"{plan.shard_uris[shard]}: has {pf.metadata.num_rows} rows but the manifest "
                                   f"says {plan.shard_rows[shard]}; the shard changed after the manifest was written")
            _METADATA[key] = pf.metadata
            while len(_METADATA) > 256:
                _METADATA.popitem(last=False)
        else:
            _METADATA.move_to_end(key)
        rg_rows = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)], np.int64)
        rg_start = np.concatenate([[0], np.cumsum(rg_rows)])  # (G+1,)
        rg = np.searchsorted(rg_start, rows, side="right") - 1  # row group of each row
        needed = np.unique(rg)
        table = pf.read_row_groups(needed.tolist(), columns=READ_COLUMNS)
    # Row r of row group g sits at (rows of the needed groups before g) + (r - start of g).
    before = np.concatenate([[0], np.cumsum(rg_rows[needed])])[np.searchsorted(needed, rg)]
    return table.take(pa.array(before + rows - rg_start[rg]))


def fetch_rows(plan: TaskPlan, shards: np.ndarray, rows: np.ndarray) -> pa.Table:
    """Rows ``(shards[i], rows[i])`` as one table in the given order."""
    parts, where = [], []
    for s in np.unique(shards):
        sel = np.flatnonzero(shards == s)
        parts.append(read_shard_rows(plan, int(s), rows[sel]))
        where.append(sel)
    table = pa.concat_tables(parts)
    inverse = np.empty(len(shards), dtype=np.int64)
    inverse[np.concatenate(where)] = np.arange(len(shards))
    return table.take(pa.array(inverse))  # back to chunk order


def _targets(plan: TaskPlan, label: list, labels: list, sample_ids: list) -> np.ndarray:
    """Multi-hot (n, num_classes) uint8 from ``labels`` (or ``label`` where ``labels`` is null)."""
    C = plan.num_classes
    out = np.zeros((len(label), C), dtype=np.uint8)
    for i, (one, many) in enumerate(zip(label, labels)):
        idx = many if many is not None else ([] if one is None else [one])
        for k in idx:
            if not 0 <= k < C:
                raise ValueError(f"sample {sample_ids[i]}: label {k} outside [0, num_classes={C})")
            out[i, k] = 1
    return out


def decode_chunk(batch: dict[str, np.ndarray], *, plan: TaskPlan) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: one chunk row in, batches of decoded samples out (chunk order).

    Yields {"image": uint8 (n, 3, S, S), "label": int64 (n,) (-1 = none), "sample_id": (n,) str,
    "position": int64 (n,) epoch positions} (+ "targets": uint8 (n, C) when multi-label).
    """
    for k in range(len(batch["positions"])):
        positions = np.frombuffer(batch["positions"][k], dtype=np.int64)
        shards = np.frombuffer(batch["shards"][k], dtype=np.int64)
        rows = np.frombuffer(batch["rows"][k], dtype=np.int64)
        table = fetch_rows(plan, shards, rows)
        sample_ids = table.column("sample_id").to_pylist()
        label = table.column("label").to_pylist()
        labels = table.column("labels").to_pylist()
        data = table.column("image")
        for lo in range(0, len(positions), plan.out_rows):
            hi = min(lo + plan.out_rows, len(positions))
            out = np.empty((hi - lo, 3, plan.spec.image_size, plan.spec.image_size), dtype=np.uint8)  # (n, 3, S, S)
            for i in range(lo, hi):
                rng = augment.sample_rng(plan.seed, plan.epoch, int(positions[i])) if plan.spec.train else None
                try:
                    out[i - lo] = augment.decode_box(data[i].as_py(), plan.spec, rng)
                except images.ImageError as exc:
                    raise RuntimeError(f"sample {sample_ids[i]} ({plan.shard_uris[shards[i]]} row {rows[i]}) "
                                       f"cannot be decoded: {exc.reason}") from None
            result = {
                "image": out,  # (n, 3, S, S)
                "label": np.array([-1 if v is None else v for v in label[lo:hi]], dtype=np.int64),
                "sample_id": np.array(sample_ids[lo:hi], dtype=object),
                "position": positions[lo:hi].copy(),
            }
            if plan.multi_label:
                result["targets"] = _targets(plan, label[lo:hi], labels[lo:hi], sample_ids[lo:hi])
            yield result
