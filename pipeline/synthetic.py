"""Procedurally drawn labelled images for the demo and for tests (no downloads needed).

:func:`make_demo_corpus` writes an ImageFolder tree ``<dst>/<class>/<class>_0000.jpg``
of coloured shapes on textured backgrounds; the class is the shape kind.
:func:`make_demo_eval_set` writes a small "test set" in the same layout: fresh
drawings, plus a few transformed copies (crop, flip, JPEG recompression) of
corpus images, listed in ``<dst>/_duplicates.csv`` so that the dedup stage has
real near-duplicates to find and the demo can score it. Everything is a pure
function of the seed (one random stream per image, so changing ``per_class``
keeps the images already drawn).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from vitray import storage as vstorage

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond")
TRANSFORMS = ("crop", "flip", "jpeg")
DUPLICATES_NAME = "_duplicates.csv"


@dataclasses.dataclass
class DemoSet:
    uri: str
    classes: list[str]
    files: list[str]
    """Paths relative to ``uri``, in sorted order."""
    duplicates: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    """(eval path, corpus path, transform) for the planted near-duplicates (eval sets only)."""


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field with stripes and noise: (size, size, 3) uint8.

    The field (a bicubic upsampling of a 4x4 grid of random colours) makes the
    low frequencies, and so the perceptual hashes, of unrelated images differ.
    """
    grid = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(grid, "RGB").resize((size, size), Image.Resampling.BICUBIC), np.float64)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)  # (H, W) each
    period = rng.uniform(4, 12)
    stripes = 14 * np.sin(2 * math.pi * (xx * np.sin(angle) - yy * np.cos(angle)) * size / period)
    img = img + stripes[..., None] + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list[tuple]:
    """Vertices of a regular n-gon (or a star when ``inner`` is the inner radius ratio)."""
    pts = []
    steps = 2 * n if inner else n
    for k in range(steps):
        rr = r * (inner if inner and k % 2 else 1.0)
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape_image(shape: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB image: a ``shape`` in a random colour, place, size and rotation on a texture."""
    im = Image.fromarray(_background(rng, size), "RGB")
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    rot = rng.uniform(0, 2 * math.pi)
    fill = tuple(int(v) for v in rng.uniform(0, 255, 3))
    outline = tuple(255 - v for v in fill)
    width = max(1, size // 32)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.35)))
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r, 4, rot), fill=fill, outline=outline, width=width)
    elif shape == "diamond":
        d.polygon(_polygon(cx, cy, r, 4, math.pi / 4, None), fill=fill, outline=outline, width=width)
        d.polygon(_polygon(cx, cy, r * 0.45, 4, math.pi / 4, None), fill=outline)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, rot), fill=fill, outline=outline, width=width)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, r, 6, rot), fill=fill, outline=outline, width=width)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=fill, outline=outline, width=width)
    elif shape == "cross":
        arm = r * 0.32
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * arm, dx * arm
            d.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                       (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    return im


def _encode(im: Image.Image, fmt: str, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _classes(n: int) -> list[str]:
    if not 1 <= n <= len(SHAPES):
        raise ValueError(f"classes must be in 1..{len(SHAPES)}, got {n}")
    return list(SHAPES[:n])


def make_demo_corpus(dst: str, storage: vstorage.StorageOptions | None = None, classes: int = 4,
                     per_class: int = 64, size: int = 64, seed: int = 0) -> DemoSet:
    """Write ``classes * per_class`` images (every 4th a PNG, the rest JPEG) as an ImageFolder tree."""
    fs, root = vstorage.resolve(dst, storage)
    names = _classes(classes)
    files = []
    for c, name in enumerate(names):
        for i in range(per_class):
            rng = np.random.default_rng([seed, 0, c, i])
            im = draw_shape_image(name, rng, size)
            fmt, ext = ("PNG", "png") if i % 4 == 3 else ("JPEG", "jpg")
            rel = f"{name}/{name}_{i:04d}.{ext}"
            vstorage.write_bytes_atomic(fs, f"{root}/{rel}", _encode(im, fmt))
            files.append(rel)
    return DemoSet(dst, sorted(names), sorted(files))  # sorted: the ImageFolder label order


def _transform(im: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A near-duplicate of ``im``: (image, output format)."""
    w, h = im.size
    if kind == "crop":
        f = rng.uniform(0.94, 0.97)
        cw, ch = int(w * f), int(h * f)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC), "JPEG"
    if kind == "flip":
        return ImageOps.mirror(im), "PNG"
    if kind == "jpeg":
        return Image.open(io.BytesIO(_encode(im, "JPEG", quality=int(rng.integers(30, 50))))).convert("RGB"), "JPEG"
    raise ValueError(f"unknown transform {kind!r}")


def make_demo_eval_set(dst: str, corpus: str, storage: vstorage.StorageOptions | None = None,
                       per_class: int = 16, duplicates: int = 6, size: int = 64, seed: int = 0) -> DemoSet:
    """A labelled test set for ``corpus`` (same classes): fresh drawings + planted near-duplicates.

    ``duplicates`` corpus images (chosen from the seed) are transformed (cycling
    through crop, flip, jpeg) and stored among the fresh images of their class
    under ordinary names; ``<dst>/_duplicates.csv`` lists them
    (``eval_path, corpus_path, transform``; paths relative to the two roots).
    Measured at size 64: JPEG recompressions stay within ~4 pHash bits of their
    original, 3-6% crops within ~4-16, mirror images ~32 (pHash does not catch
    a flip unless mirrored hashes are compared), while fresh eval images are
    >= ~12 bits from every corpus image.
    """
    cfs, croot = vstorage.resolve(corpus, storage)
    corpus_files = [i.path[len(croot):].lstrip("/") for i in vstorage.list_files(cfs, croot)]
    names = sorted({p.split("/", 1)[0] for p in corpus_files if "/" in p})
    if not names:
        raise ValueError(f"{corpus} holds no ImageFolder classes")
    fs, root = vstorage.resolve(dst, storage)
    rng = np.random.default_rng([seed, 2])
    picks = sorted(rng.choice(len(corpus_files), size=min(duplicates, len(corpus_files)), replace=False).tolist())
    planted: dict[str, list[tuple[str, str]]] = {}
    for k, idx in enumerate(picks):
        src = corpus_files[idx]
        planted.setdefault(src.split("/", 1)[0], []).append((src, TRANSFORMS[k % len(TRANSFORMS)]))
    files, dups = [], []
    for c, name in enumerate(names):
        items: list[tuple[Image.Image, str, tuple[str, str] | None]] = []
        for i in range(per_class):
            im = draw_shape_image(name, np.random.default_rng([seed, 1, c, i]), size)
            items.append((im, "JPEG", None))
        for j, (src, kind) in enumerate(planted.get(name, [])):
            im = Image.open(io.BytesIO(vstorage.read_bytes(cfs, f"{croot}/{src}"))).convert("RGB")
            dup, fmt = _transform(im, kind, np.random.default_rng([seed, 3, c, j]))
            pos = int(np.random.default_rng([seed, 4, c, j]).integers(0, len(items) + 1))
            items.insert(pos, (dup, fmt, (src, kind)))
        for i, (im, fmt, origin) in enumerate(items):
            rel = f"{name}/{name}_test_{i:04d}.{'png' if fmt == 'PNG' else 'jpg'}"
            vstorage.write_bytes_atomic(fs, f"{root}/{rel}", _encode(im, fmt))
            files.append(rel)
            if origin:
                dups.append((rel, origin[0], origin[1]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["eval_path", "corpus_path", "transform"])
    writer.writerows(dups)
    vstorage.write_bytes_atomic(fs, f"{root}/{DUPLICATES_NAME}", buf.getvalue().encode())
    return DemoSet(dst, names, sorted(files), dups)


