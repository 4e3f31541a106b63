"""Shard directories for the reader tests, built with the schema helpers (not `vitray shard`).

Rows carry real image bytes (CIFAR-10 WebP, real photos) and real hashes, written
as Parquet shards with small row groups plus a ``_manifest.json`` in the
documented format, so the reader is tested against the contract only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io

import numpy as np
from PIL import Image

from vitray.pipeline import hashes, schema
from vitray.storage import StorageOptions


@dataclasses.dataclass
class Item:
    source: str
    image: bytes
    label: int | None
    labels: list[int] | None = None


@dataclasses.dataclass
class ShardSet:
    uri: str
    storage: StorageOptions
    sample_ids: list[str]
    """All rows' sample ids in global-row-id order (manifest shard order, then row)."""
    items: list[Item]

    def ids_of(self, global_ids) -> list[str]:
        return [self.sample_ids[int(g)] for g in global_ids]


@functools.lru_cache(maxsize=None)
def _hashes(data: bytes) -> tuple[int, int]:
    return hashes.hash_bytes(data)


def row_of(item: Item, image: bytes | None = None) -> dict:
    """A SHARD_SCHEMA row; ``image`` replaces the stored bytes (hashes stay the original's)."""
    im = Image.open(io.BytesIO(item.image))
    ph, dh = _hashes(item.image)
    return {"sample_id": schema.sample_id(item.source), "source": item.source, "label": item.label,
            "labels": item.labels, "width": im.width, "height": im.height, "format": im.format,
            "sha256": hashlib.sha256(item.image).hexdigest(), "phash": ph, "dhash": dh,
            "image": item.image if image is None else image}


def write_shards(uri: str, items: list[Item], shard_rows: list[int], *, storage: StorageOptions | None = None,
                 row_group_rows: int = 8, classes: list[str] | None = None,
                 replace_image: dict[int, bytes] | None = None) -> ShardSet:
    """Write ``items`` as shards of ``shard_rows`` rows each, manifest last.

    replace_image: global row id -> bytes to store instead (e.g. corrupt bytes).
    """
    storage = storage or StorageOptions()
    assert sum(shard_rows) == len(items)
    replace_image = replace_image or {}
    rows = [row_of(it, replace_image.get(k)) for k, it in enumerate(items)]
    bounds = np.cumsum([0, *shard_rows])
    schema.write_shard_dir(uri, (schema.table_from_rows(rows[a:b]) for a, b in zip(bounds[:-1], bounds[1:])),
                           storage_options=storage, source="test-items", classes=classes,
                           row_group_rows=row_group_rows, created="2024-01-01T00:00:00")
    return ShardSet(uri, storage, [schema.sample_id(it.source) for it in items], items)


def cifar_items(table, n: int, start: int = 0) -> list[Item]:
    """``n`` CIFAR-10 test images as items with their real labels."""
    imgs = table.column("image").to_pylist()[start:start + n]
    labels = table.column("label").to_pylist()[start:start + n]
    return [Item(f"cifar10/test/{start + i}.webp", b, int(l)) for i, (b, l) in enumerate(zip(imgs, labels))]


def photo_items(table, n: int, min_side: int = 0) -> list[Item]:
    """Up to ``n`` real photos with both sides >= ``min_side``; label = row index mod 10."""
    out = []
    for i, (b, w, h) in enumerate(zip(table.column("image").to_pylist(), table.column("width").to_pylist(),
                                      table.column("height").to_pylist())):
        if min(w, h) >= min_side:
            out.append(Item(f"photos/{i}", b, i % 10))
        if len(out) == n:
            break
    return out


def unnormalize(images, mean, std) -> np.ndarray:
    """float (B, 3, H, W) normalised -> uint8-scale float (B, H, W, 3)."""
    x = images.numpy() * np.array(std, np.float32)[None, :, None, None] + np.array(mean, np.float32)[None, :, None, None]
    return (x * 255.0).transpose(0, 2, 3, 1)
