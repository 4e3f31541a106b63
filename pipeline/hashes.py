"""Perceptual hashes as ``uint64`` arrays, vectorised over batches.

The pHash is imagehash's algorithm exactly (bit-identical to ``imagehash.phash``
given the same 32x32 greyscale input, tested): a 2-D DCT-II of the 32x32 LANCZOS
thumbnail, the top-left 8x8 coefficients compared with their median. The dHash
compares horizontally adjacent pixels of a 9x8 thumbnail (``imagehash.dhash``).
Bit order follows imagehash's hex form: the first coefficient is the most
significant bit, so ``int(str(imagehash.phash(im)), 16) == phash``.

Every consumer (``vitray shard`` for the corpus, ``vitray dedup index`` for eval
sets) hashes encoded bytes through :func:`hash_bytes`/:func:`hash_images`, so both
sides share one decode path; the reduced-scale JPEG decode used here may move a
hash by a bit or two relative to imagehash's full decode, identically on both sides.
"""

from __future__ import annotations

import numpy as np
import scipy.fftpack
from PIL import Image

from vitray.pipeline import images

PHASH_SIZE = 32
"""Side of the greyscale thumbnail the pHash DCT runs on (hash_size 8 x highfreq_factor 4)."""
HASH_DECODE_SIDE = 128
"""JPEGs are decoded at the smallest DCT scale keeping both sides >= this, before hashing."""


def hash_inputs(im: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails the hashes are computed from.

    Returns ``(gray32, gray9x8)``: uint8 arrays of shape (32, 32) and (8, 9),
    produced exactly as imagehash does (``convert("L")`` then LANCZOS resize).
    """
    gray = im.convert("L")
    g32 = np.asarray(gray.resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.LANCZOS))
    g98 = np.asarray(gray.resize((9, 8), Image.Resampling.LANCZOS))
    return g32, g98


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """(B, 64) bool, first bit most significant -> (B,) uint64."""
    packed = np.packbits(bits.astype(np.uint8), axis=1)  # (B, 8) big-endian bit order
    return packed.view(">u8").reshape(-1).astype(np.uint64)


def phash_batch(gray32: np.ndarray) -> np.ndarray:
    """pHash of a batch of 32x32 greyscale thumbnails.

    gray32: (B, 32, 32) uint8. Returns (B,) uint64.
    """
    gray32 = np.asarray(gray32)
    if gray32.ndim != 3 or gray32.shape[1:] != (PHASH_SIZE, PHASH_SIZE):
        raise ValueError(f"gray32 must have shape (B, 32, 32), got {gray32.shape}")
    # Same transforms in the same order as imagehash (columns, then rows), so the
    # float results are identical; only the 8 low-frequency rows go through the second.
    cols = scipy.fftpack.dct(gray32, axis=1)[:, :8, :]  # (B, 8, 32)
    low = scipy.fftpack.dct(cols, axis=2)[:, :, :8]  # (B, 8, 8)
    med = np.median(low.reshape(len(low), 64), axis=1)
    return _pack_bits(low.reshape(len(low), 64) > med[:, None])


def dhash_batch(gray9x8: np.ndarray) -> np.ndarray:
    """dHash of a batch of 9-wide, 8-high thumbnails: (B, 8, 9) uint8 -> (B,) uint64."""
    g = np.asarray(gray9x8)
    if g.ndim != 3 or g.shape[1:] != (8, 9):
        raise ValueError(f"gray9x8 must have shape (B, 8, 9), got {g.shape}")
    return _pack_bits((g[:, :, 1:] > g[:, :, :-1]).reshape(len(g), 64))


def hash_images(ims: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """(phash, dhash) uint64 arrays for decoded images."""
    if not ims:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    g32, g98 = zip(*(hash_inputs(im) for im in ims))
    return phash_batch(np.stack(g32)), dhash_batch(np.stack(g98))


def decode_for_hash(data: bytes, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> images.Decoded:
    """The canonical decode that hashes are computed from (reduced-scale for big JPEGs)."""
    return images.decode(data, max_pixels=max_pixels, draft_size=HASH_DECODE_SIDE)


def hash_bytes(data: bytes, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(phash, dhash) of encoded image bytes; raises ``images.ImageError`` for bad input."""
    ph, dh = hash_images([decode_for_hash(data, max_pixels).image])
    return int(ph[0]), int(dh[0])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between broadcastable uint64 arrays."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def to_hex(h: int) -> str:
    """imagehash's string form of a 64-bit hash."""
    return f"{int(h):016x}"
