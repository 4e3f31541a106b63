"""Dedup fixtures: real photos, a CIFAR-10 python-pickle layout."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def photo_set(photos_table):
    """24 real photos (decoded RGB, original bytes): the first 12 are 'eval', the other 12 distinct corpus photos."""
    fmt = photos_table.column("format").to_pylist()
    w = photos_table.column("width").to_numpy()
    datas = photos_table.column("image").to_pylist()
    chosen = [i for i in range(len(datas)) if fmt[i] == "JPEG" and 200 <= w[i] <= 640][:24]
    ims = [Image.open(io.BytesIO(datas[i])).convert("RGB") for i in chosen]
    return {"bytes": [datas[i] for i in chosen], "images": ims}


@pytest.fixture(scope="session")
def cifar_pickles(tmp_path_factory, cifar10_test_table):
    """A CIFAR-10 python layout (cifar-10-batches-py) holding the first 120 test images."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    n = 120
    datas = cifar10_test_table.column("image").to_pylist()[:n]
    x = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas])  # (N, 32, 32, 3)
    labels = cifar10_test_table.column("label").to_pylist()[:n]
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": labels,
             b"data": x.transpose(0, 3, 1, 2).reshape(n, -1), b"filenames": [b"f%d.png" % i for i in range(n)]}
    with open(root / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return {"dir": str(root), "pixels": x, "labels": labels, "bytes": datas}
