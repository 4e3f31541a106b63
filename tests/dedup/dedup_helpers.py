"""Helpers for the dedup tests: transformed copies, degenerate images, shard directories, image folders."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from vitray import storage
from vitray.pipeline import images, schema
from vitray.pipeline.shard_task import encode_sample

HOSTILE_NAMES = ['<script>alert(1)</script>.jpg', '"onerror=alert(2) x=".jpg', "a&b <i>.jpg"]


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def transforms() -> dict:
    """Named near-duplicate transforms: PIL RGB image -> encoded bytes."""
    def crop(f):
        def t(im):
            w, h = im.size
            cw, ch = round(w * f), round(h * f)
            return jpeg(im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)))
        return t

    def jitter(im):
        im = ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(1.2)).enhance(0.8)
        return jpeg(ImageEnhance.Color(im).enhance(1.4))

    return {
        "jpeg30": lambda im: jpeg(im, 30),
        "crop90": crop(0.9),
        "crop80": crop(0.8),
        "flip": lambda im: jpeg(ImageOps.mirror(im)),
        "gray": lambda im: jpeg(ImageOps.grayscale(im)),
        "jitter": jitter,
        "small": lambda im: png(im.resize((48, max(1, round(48 * im.height / im.width))), Image.Resampling.LANCZOS)),
    }


def degenerate_images() -> dict[str, bytes]:
    """Flat and smooth-gradient images: their hashes collide with each other."""
    yy, xx = np.mgrid[0:96, 0:128] / 96.0
    out = {}
    for v in (0, 128, 255):
        out[f"flat{v}"] = png(Image.new("RGB", (128, 96), (v, v, v)))
    out["hgrad"] = png(Image.fromarray((xx * 190).astype(np.uint8)).convert("RGB"))
    out["vgrad"] = png(Image.fromarray((yy * 255).astype(np.uint8)).convert("RGB"))
    out["vignette"] = png(Image.fromarray((255 * (1 - 1.5 * ((xx - 0.66) ** 2 + (yy - 0.5) ** 2))).clip(0, 255)
                                          .astype(np.uint8)))
    return out


def write_shards(uri: str, items: list[tuple[str, int | None, bytes]], rows_per_shard: int,
                 options: storage.StorageOptions | None = None, classes: list[str] | None = None,
                 source: str = "corpus") -> dict:
    """(source, label, bytes) rows -> a shard directory in the `vitray shard` layout; returns the manifest."""
    def tables():
        for k in range(0, len(items), rows_per_shard):
            # The rows `vitray shard` itself would write (original bytes kept).
            yield schema.table_from_rows([
                dict(sample_id=schema.sample_id(src), source=src, label=label, labels=None,
                     **encode_sample(data, images.DEFAULT_MAX_PIXELS, max_side=None, quality=90))
                for src, label, data in items[k:k + rows_per_shard]])

    return schema.write_shard_dir(uri, tables(), storage_options=options, source=source, classes=classes,
                                  row_group_rows=8, created="test")


def write_image_folder(root: str, named: dict[str, bytes]) -> None:
    """{relative path: bytes} -> files under root (ImageFolder when paths have a class folder)."""
    for rel, data in named.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
