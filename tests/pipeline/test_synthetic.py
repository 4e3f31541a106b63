"""The demo's generated corpus and eval set: deterministic, labelled, with planted near-duplicates."""

from __future__ import annotations

import csv
import os

import numpy as np

from vitray.pipeline import hashes, synthetic


def _read(root: str, rel: str) -> bytes:
    with open(os.path.join(root, rel), "rb") as f:
        return f.read()


def test_corpus_is_a_deterministic_image_folder(tmp_path):
    a = synthetic.make_demo_corpus(str(tmp_path / "a"), classes=3, per_class=8, size=48, seed=5)
    b = synthetic.make_demo_corpus(str(tmp_path / "b"), classes=3, per_class=8, size=48, seed=5)
    c = synthetic.make_demo_corpus(str(tmp_path / "c"), classes=3, per_class=8, size=48, seed=6)
    assert a.classes == ["circle", "square", "triangle"] and len(a.files) == 24  # sorted names
    assert sorted(os.listdir(tmp_path / "a")) == a.classes
    assert sum(f.endswith(".png") for f in a.files) == 6  # every 4th image is a PNG
    assert all(_read(a.uri, f) == _read(b.uri, f) for f in a.files)
    assert sum(_read(a.uri, f) == _read(c.uri, f) for f in a.files) == 0


def test_eval_set_plants_listed_near_duplicates(tmp_path):
    corpus = synthetic.make_demo_corpus(str(tmp_path / "corpus"), classes=4, per_class=24, size=64)
    ev = synthetic.make_demo_eval_set(str(tmp_path / "eval"), corpus.uri, per_class=6, duplicates=9, size=64)
    assert ev.classes == corpus.classes and len(ev.files) == 4 * 6 + 9
    with open(tmp_path / "eval" / synthetic.DUPLICATES_NAME) as f:
        rows = list(csv.DictReader(f))
    assert [(r["eval_path"], r["corpus_path"], r["transform"]) for r in rows] == ev.duplicates
    assert sorted(r["transform"] for r in rows) == ["crop"] * 3 + ["flip"] * 3 + ["jpeg"] * 3
    ph = {f: hashes.hash_bytes(_read(ev.uri, f))[0] for f in ev.files}
    corpus_ph = np.array([hashes.hash_bytes(_read(corpus.uri, f))[0] for f in corpus.files], np.uint64)
    planted = {e: (c, t) for e, c, t in ev.duplicates}
    for e, (c, t) in planted.items():
        assert e.split("/")[0] == c.split("/")[0]  # a duplicate keeps its class
        d = int(hashes.hamming(np.uint64(ph[e]), np.uint64(hashes.hash_bytes(_read(corpus.uri, c))[0])))
        if t == "jpeg":
            assert d <= 6, (e, c, d)
    fresh = [int(hashes.hamming(np.uint64(h), corpus_ph).min()) for f, h in ph.items() if f not in planted]
    assert min(fresh) > 6  # nothing unplanted looks like a recompressed corpus image
