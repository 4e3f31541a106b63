"""Pipeline fixtures: a store (local dir, S3 or GCS bucket) and real odd/bad image files.

Bad inputs are built from real photos (truncated bytes, CMYK conversion, EXIF
orientation, ...), never mocked. Plain helpers live in ``shard_helpers``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shard_helpers import Store, encode
from vitray.storage import StorageOptions


@pytest.fixture(params=["local", "s3", "gs"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store("local", str(tmp_path / "store"), StorageOptions())
    if request.param == "gs":
        return Store("gs", request.getfixturevalue("gcs").uri, StorageOptions())
    s3 = request.getfixturevalue("s3")
    return Store("s3", s3.uri, s3.options)


@pytest.fixture
def local_store(tmp_path) -> Store:
    return Store("local", str(tmp_path / "store"), StorageOptions())


@pytest.fixture(scope="session")
def photos(photos_table) -> list[dict]:
    """24 small real photos (<= 1 Mpixel; JPEG, PNG, greyscale) with their ImageNet label names."""
    rows = photos_table.drop_columns(["licence_note"]).to_pylist()
    small = [r for r in rows if r["width"] * r["height"] <= 1_000_000 and r["format"] in ("JPEG", "PNG")]
    jpeg = [r for r in small if r["format"] == "JPEG"][:20]
    png = [r for r in small if r["format"] == "PNG"][:4]
    return jpeg + png


@pytest.fixture(scope="session")
def odd_and_bad(photos) -> dict[str, tuple[bytes, object]]:
    """name -> (bytes, expected): ``(width, height)`` as displayed when it must be written,
    or the failure reason prefix (``"corrupt"``, ...) when it must be recorded as failed."""
    photo = photos[0]["image"]
    im = Image.open(io.BytesIO(photo)).convert("RGB")
    w, h = im.size
    g16 = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    frames = [im.resize((80, 60)), im.resize((80, 60)).transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    png = encode(im, "PNG")
    return {
        "cmyk.jpg": (encode(im.convert("CMYK"), "JPEG"), (w, h)),
        "gray16.png": (encode(Image.frombytes("I;16", (64, 48), g16.astype("<u2").tobytes()), "PNG"), (64, 48)),
        "palette_alpha.png": (encode(im.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0), (w, h)),
        "exif_rotated.jpg": (encode(im, "JPEG", exif=exif), (h, w)),
        "animated.gif": (gif.getvalue(), (80, 60)),
        "truncated.jpg": (photo[: len(photo) // 2], "corrupt"),
        "truncated.png": (png[: len(png) // 2], "corrupt"),
        "zero.jpg": (b"", "empty"),
        "notes.txt": (b"not an image, just text\n", "not an image"),
        "bomb.png": (encode(Image.new("L", (5000, 5000)), "PNG"), "decompression bomb"),
    }
