"""Golden hashes: our vectorised pHash/dHash against imagehash on real images."""

import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from vitray.pipeline import hashes, images


def _imagehash_int(h) -> int:
    return int(str(h), 16)


def test_phash_dhash_bit_identical_to_imagehash(photos_table, cifar10_test_table):
    datas = photos_table.column("image").to_pylist()[:120] + cifar10_test_table.column("image").to_pylist()[:500]
    ims = []
    for data in datas:
        im = Image.open(io.BytesIO(data))
        im.load()
        ims.append(im.convert("RGB"))
    ph, dh = hashes.hash_images(ims)
    assert ph.dtype == np.uint64 and ph.shape == (len(ims),)
    expected_p = np.array([_imagehash_int(imagehash.phash(im)) for im in ims], dtype=np.uint64)
    expected_d = np.array([_imagehash_int(imagehash.dhash(im)) for im in ims], dtype=np.uint64)
    np.testing.assert_array_equal(ph, expected_p)
    np.testing.assert_array_equal(dh, expected_d)


@pytest.mark.parametrize("value", [0, 127, 255])
def test_flat_images_match_imagehash(value):
    im = Image.new("RGB", (40, 30), (value,) * 3)
    ph, dh = hashes.hash_images([im])
    assert int(ph[0]) == _imagehash_int(imagehash.phash(im))
    assert int(dh[0]) == _imagehash_int(imagehash.dhash(im))


def test_reduced_scale_decode_stays_within_a_few_bits(photos_table):
    """hash_bytes decodes big JPEGs at reduced scale: close to, not always equal to, a full decode."""
    datas = [d for d, f in zip(photos_table.column("image").to_pylist(), photos_table.column("format").to_pylist())
             if f == "JPEG"][:60]
    dists = []
    for data in datas:
        fast, _ = hashes.hash_bytes(data)
        im = Image.open(io.BytesIO(data))
        full = _imagehash_int(imagehash.phash(im.convert("RGB")))
        dists.append(int(hashes.hamming(np.uint64(fast), np.uint64(full))))
    assert np.median(dists) <= 2 and max(dists) <= 8, dists


def test_hamming_is_popcount_of_xor():
    a = np.array([0, 0xFFFFFFFFFFFFFFFF, 0b1011], dtype=np.uint64)
    b = np.array([0, 0, 0b0001], dtype=np.uint64)
    assert hashes.hamming(a, b).tolist() == [0, 64, 2]


def test_libjpeg_turbo_decode_is_pillows_decode_so_hashes_do_not_move(photos_table):
    """images.decode takes plain RGB JPEGs through simplejpeg; the pixels (and so every stored
    hash) are those of Pillow's decoder, at full and at the hash's reduced scale."""
    checked = 0
    for data in photos_table.column("image").to_pylist()[:60]:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG" or im.mode != "RGB" or images.orientation(im) in images.ROTATED_ORIENTATIONS:
            continue
        for draft in (None, hashes.HASH_DECODE_SIDE):
            fast = images.decode(data, draft_size=draft).image
            slow = Image.open(io.BytesIO(data))
            if draft:
                slow.draft("RGB", (draft, draft))
            slow = slow.convert("RGB")
            assert fast.size == slow.size and np.array_equal(np.asarray(fast), np.asarray(slow))
        checked += 1
    assert checked >= 30


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """``jpeg`` with an APP1 segment holding ``payload`` right after SOI."""
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def _tiff_orientation(value: int, order: str) -> bytes:
    bo = "little" if order == "II" else "big"
    entry = (0x0112).to_bytes(2, bo) + (3).to_bytes(2, bo) + (1).to_bytes(4, bo) + value.to_bytes(2, bo) + b"\0\0"
    other = (0x010F).to_bytes(2, bo) + (2).to_bytes(2, bo) + (4).to_bytes(4, bo) + b"abc\0"  # Make, inline
    return (b"Exif\0\0" + order.encode() + (42).to_bytes(2, bo) + (8).to_bytes(4, bo) + (2).to_bytes(2, bo)
            + other + entry + (0).to_bytes(4, bo))


def test_jpeg_info_reads_what_pillow_reads(photos_table):
    """The reader's header fast path: size and EXIF orientation as Pillow sees them."""
    datas = photos_table.column("image").to_pylist()
    n = 0
    for data in datas:
        info = images.jpeg_info(data)
        im = Image.open(io.BytesIO(data))
        if info is None:
            assert im.format != "JPEG" or im.mode != "RGB" or data[:2] != b"\xff\xd8"
            continue
        assert info == (im.width, im.height, images.orientation(im))
        n += 1
    assert n >= 400
    base = datas[next(i for i, d in enumerate(datas) if images.jpeg_info(d))]
    for order in ("II", "MM"):
        for value in (1, 3, 6, 8):
            data = _with_app1(base, _tiff_orientation(value, order))
            assert images.jpeg_info(data)[2] == value == images.orientation(Image.open(io.BytesIO(data))), order
    xmp = _with_app1(base, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>")  # an APP1 that is not EXIF
    assert images.jpeg_info(_with_app1(xmp, _tiff_orientation(6, "II")))[2] == 6
    xmp6 = _with_app1(base, b'http://ns.adobe.com/xap/1.0/\0<rdf:Description tiff:Orientation="6"/>')
    assert images.jpeg_info(xmp6)[2] == 6 == images.orientation(Image.open(io.BytesIO(xmp6)))  # Pillow reads XMP too
    assert images.jpeg_info(b"") is None and images.jpeg_info(b"\xff\xd8\xff") is None
    assert images.jpeg_info(_with_app1(base, b"Exif\0\0II*\0\xff\xff\xff\x7f")) is None  # unsure: Pillow decides
    grey = io.BytesIO()
    Image.open(io.BytesIO(base)).convert("L").save(grey, "JPEG")
    assert images.jpeg_info(grey.getvalue()) is None  # greyscale and CMYK go through Pillow


def test_fast_jpeg_path_keeps_the_bomb_limit_and_mpo_format(photos_table):
    data = next(d for d in photos_table.column("image").to_pylist() if images.jpeg_info(d))
    w, h, _ = images.jpeg_info(data)
    with pytest.raises(images.ImageError, match="decompression bomb"):
        images.decode(data, max_pixels=w * h - 1)
    from vitray.pipeline import augment

    with pytest.raises(images.ImageError, match="decompression bomb"):
        augment.decode_box(data, augment.AugmentSpec(32, train=False, max_pixels=w * h - 1), None)
    assert images.decode(data, max_pixels=w * h).width == w
    im = Image.open(io.BytesIO(data)).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "MPO", save_all=True, append_images=[im.rotate(90)])
    assert images.jpeg_info(buf.getvalue()) is None  # multi-picture: Pillow's path, which names it MPO
    assert images.decode(buf.getvalue()).format == "MPO"
