"""Index-side augmentation: each eval image is hashed as several views, the corpus as one.

Near-duplicates in the wild are crops, small translations, flips and re-framings
of the same shot. A perceptual hash moves a lot under those, so the index stores
the hashes of views of every eval image that undo them: the image itself, crops
at a few scales on a grid of positions (the corpus image is a crop or a shifted
crop of the eval image), reflect-padded zoom-outs (the eval image is a crop of
the corpus image), and the horizontal mirror of each. Eval sets are small, so
~84 views each is cheap, and the corpus side keeps one pHash/dHash per image,
computed once by ``vitray shard``.

Every view is hashed through ``pipeline.hashes.hash_images`` (greyscale, LANCZOS
to 32x32 / 9x8), on the image decoded by ``hashes.decode_for_hash``: the same
canonical path as the corpus, so the identity view's hashes equal
``hashes.hash_bytes`` of the eval image exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from vitray.config import check
from vitray.pipeline import hashes


@dataclasses.dataclass
class AugmentConfig:
    """Which views of each eval image the index hashes."""

    crop_scales: tuple[float, ...] = (0.95, 0.9, 0.8, 0.7)
    """Crop side as a fraction of the image side (both axes)."""
    crop_grid: int = 3
    """Crop positions per axis (3 -> 9 positions from top-left to bottom-right)."""
    zoom_out: tuple[float, ...] = (0.9,)
    """The image scaled to this fraction of a reflect-padded canvas (eval = crop of corpus)."""
    letterbox: tuple[float, ...] = (0.9, 0.8)
    """The image centred at this fraction of a black and of a white canvas (padded copies)."""
    rotate: tuple[float, ...] = (5.0,)
    """The image rotated by +- these degrees (black corners, as most tools leave them)."""
    flip: bool = True
    """Also index the horizontal mirror of every view."""

    def __post_init__(self):
        self.crop_scales = tuple(float(s) for s in self.crop_scales)
        self.zoom_out = tuple(float(s) for s in self.zoom_out)
        self.letterbox = tuple(float(s) for s in self.letterbox)
        self.rotate = tuple(float(a) for a in self.rotate)
        check(all(0.3 <= s < 1.0 for s in self.crop_scales), "crop_scales", "each must be in [0.3, 1)")
        check(all(0.5 <= s < 1.0 for s in self.zoom_out), "zoom_out", "each must be in [0.5, 1)")
        check(all(0.5 <= s < 1.0 for s in self.letterbox), "letterbox", "each must be in [0.5, 1)")
        check(all(0.0 < a <= 30.0 for a in self.rotate), "rotate", "each must be in (0, 30] degrees")
        check(1 <= self.crop_grid <= 7, "crop_grid", "must be in 1..7")


@dataclasses.dataclass(frozen=True)
class View:
    """One geometric view: ``kind`` identity | crop | zoom | black | white | rotate, fraction ``scale``
    (degrees for rotate), position (u, v) in [0, 1]."""

    kind: str
    scale: float
    u: float
    v: float
    flip: bool

    @property
    def name(self) -> str:
        base = "id" if self.kind == "identity" else f"{self.kind}{self.scale:g}@{self.u:g},{self.v:g}"
        return base + ("+flip" if self.flip else "")


def views(cfg: AugmentConfig) -> list[View]:
    """The views in index order; view 0 is the identity (the eval image as is)."""
    grid = [0.5] if cfg.crop_grid == 1 else [round(float(x), 3) for x in np.linspace(0.0, 1.0, cfg.crop_grid)]
    corners = [(0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
    geometric = [View("identity", 1.0, 0.5, 0.5, False)]
    geometric += [View("crop", s, u, v, False) for s in cfg.crop_scales for v in grid for u in grid]
    geometric += [View("zoom", s, u, v, False) for s in cfg.zoom_out for u, v in corners]
    geometric += [View(fill, s, 0.5, 0.5, False) for s in cfg.letterbox for fill in ("black", "white")]
    geometric += [View("rotate", a, 0.5, 0.5, False) for r in cfg.rotate for a in (r, -r)]
    if not cfg.flip:
        return geometric
    return geometric + [dataclasses.replace(g, flip=True) for g in geometric]


def render(gray: Image.Image, view: View) -> Image.Image:
    """Apply ``view`` to a greyscale (mode L) image; the result is hashed as is."""
    im = gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view.flip else gray
    w, h = im.size
    if view.kind == "crop":
        cw, ch = max(1, round(w * view.scale)), max(1, round(h * view.scale))
        x0, y0 = round((w - cw) * view.u), round((h - ch) * view.v)
        return im.crop((x0, y0, x0 + cw, y0 + ch))
    if view.kind == "zoom":
        pw, ph = round(w / view.scale) - w, round(h / view.scale) - h
        left, top = round(pw * view.u), round(ph * view.v)
        a = np.asarray(im)
        # reflect padding keeps the low frequencies pHash looks at plausible; a flat
        # border would add an edge no real re-framing has
        mode = "reflect" if min(w, h) > max(pw, ph) else "edge"
        return Image.fromarray(np.pad(a, ((top, ph - top), (left, pw - left)), mode=mode))
    if view.kind in ("black", "white"):
        pw, ph = round(w / view.scale) - w, round(h / view.scale) - h
        canvas = Image.new("L", (w + pw, h + ph), 0 if view.kind == "black" else 255)
        canvas.paste(im, (pw // 2, ph // 2))
        return canvas
    if view.kind == "rotate":
        return im.rotate(view.scale, resample=Image.Resampling.BICUBIC)
    return im


def hash_views(gray: Image.Image, view_list: list[View]) -> tuple[np.ndarray, np.ndarray]:
    """(pHash, dHash) of every view of a greyscale image: two (V,) uint64 arrays.

    The same inputs ``hashes.hash_images`` builds (LANCZOS to 32x32 and 9x8 of the
    greyscale image; its ``convert("L")`` is the identity on mode L), without the
    per-view copy.
    """
    rendered = [render(gray, v) for v in view_list]
    g32 = np.stack([np.asarray(r.resize((hashes.PHASH_SIZE, hashes.PHASH_SIZE), Image.Resampling.LANCZOS))
                    for r in rendered])
    g98 = np.stack([np.asarray(r.resize((9, 8), Image.Resampling.LANCZOS)) for r in rendered])
    return hashes.phash_batch(g32), hashes.dhash_batch(g98)


def thumbnail(im: Image.Image, size: int) -> np.ndarray:
    """Greyscale (size, size) uint8 thumbnail used by verification (aspect squashed, like the hashes)."""
    return np.asarray(im.convert("L").resize((size, size), Image.Resampling.LANCZOS))


def preview_png(im: Image.Image, side: int = 64) -> bytes:
    """Small colour PNG for the audit report (longer side = ``side``)."""
    import io

    w, h = im.size
    scale = side / max(w, h)
    small = im.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                     Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()
