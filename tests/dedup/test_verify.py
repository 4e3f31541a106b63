"""Verification on real photos: transformed copies pass, distinct photos and degenerate images do not."""

import numpy as np
from dedup_helpers import degenerate_images, transforms

from vitray.dedup.augment import thumbnail
from vitray.dedup.verify import Verifier, VerifyConfig, detail
from vitray.pipeline import hashes


def _thumbs(datas: list[bytes], size: int = 32) -> np.ndarray:
    return np.stack([thumbnail(hashes.decode_for_hash(d).image, size) for d in datas])


def test_transformed_copies_verify_and_distinct_photos_do_not(photo_set):
    ims, originals = photo_set["images"][:12], photo_set["bytes"][:12]
    eval_t = _thumbs(originals)
    tfs = transforms()
    copies = [fn(im) for im in ims for fn in tfs.values()]  # (12 * T,)
    corpus_t = _thumbs(copies)
    v = Verifier(VerifyConfig())
    e_idx = np.repeat(np.arange(12), len(tfs))
    res = v.score_pairs(eval_t, corpus_t, e_idx, np.arange(len(copies)))
    per_transform = res.match.reshape(12, len(tfs)).mean(axis=0)
    assert dict(zip(tfs, per_transform.round(2))) == {k: 1.0 for k in tfs}, dict(zip(tfs, per_transform))
    # every pair of distinct photos (12 eval x 12 others, and transformed copies of the others)
    others = photo_set["bytes"][12:24]
    other_copies = [tfs["crop90"](im) for im in photo_set["images"][12:24]]
    corpus_d = _thumbs(others + other_copies)
    ee, cc = np.meshgrid(np.arange(12), np.arange(len(corpus_d)), indexing="ij")
    res = v.score_pairs(eval_t, corpus_d, ee.ravel(), cc.ravel())
    assert not res.match.any(), np.nanmax(res.score)
    assert np.nanmax(res.score, initial=-1) < VerifyConfig().threshold - 0.15


def test_degenerate_images_never_match():
    deg = degenerate_images()
    thumbs = _thumbs(list(deg.values()))
    assert (detail(thumbs) < VerifyConfig().min_detail).all(), dict(zip(deg, detail(thumbs)))
    n = len(deg)
    ee, cc = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    res = Verifier(VerifyConfig()).score_pairs(thumbs, thumbs, ee.ravel(), cc.ravel())
    # identical flat images would correlate perfectly; they are reported as degenerate instead
    assert res.degenerate.all() and not res.match.any()
    # and their hashes do collide, which is why the check exists
    ph = np.array([hashes.hash_bytes(d)[0] for d in deg.values()], np.uint64)
    assert (hashes.hamming(ph[:3, None], ph[None, :3]) <= 1).all()


def test_real_photos_are_not_degenerate(photo_set, cifar10_test_table):
    datas = photo_set["bytes"] + cifar10_test_table.column("image").to_pylist()[:500]
    assert detail(_thumbs(datas)).min() > 1.5 * VerifyConfig().min_detail
