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
