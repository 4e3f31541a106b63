"""The eval index: view hashes on the canonical path, eval-set readers, provenance and digest."""

import io
import json
import os
import pickle

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup_helpers import HOSTILE_NAMES, jpeg, write_image_folder, write_shards
from vitray.config import ConfigError
from vitray.dedup import augment, sources
from vitray.dedup.index import IndexConfig, build_index, load_index
from vitray.pipeline import hashes

SMALL_VIEWS = augment.AugmentConfig(crop_scales=(0.9, 0.8), crop_grid=2, zoom_out=(0.9,))


def test_identity_view_is_the_corpus_hash(photo_set, cifar10_test_table):
    """View 0 hashes exactly as `vitray shard` hashes a corpus image (hashes.hash_bytes)."""
    view_list = augment.views(augment.AugmentConfig())
    assert view_list[0].name == "id" and len(view_list) == 96
    datas = photo_set["bytes"][:6] + cifar10_test_table.column("image").to_pylist()[:6]
    for data in datas:
        gray = hashes.decode_for_hash(data).image.convert("L")
        ph, dh = augment.hash_views(gray, view_list)
        assert (int(ph[0]), int(dh[0])) == hashes.hash_bytes(data)
        # every view goes through the same hash inputs as hashes.hash_images (bit-identical)
        ref_p, ref_d = hashes.hash_images([augment.render(gray, v) for v in view_list[::9]])
        np.testing.assert_array_equal(ph[::9], ref_p)
        np.testing.assert_array_equal(dh[::9], ref_d)


def test_views_undo_crops_and_flips(photo_set):
    """A cropped / mirrored copy is much closer to some indexed view than to the plain hash."""
    view_list = augment.views(augment.AugmentConfig())
    gains = []
    for im in photo_set["images"][:8]:
        gray = hashes.decode_for_hash(jpeg(im)).image.convert("L")
        ph, _ = augment.hash_views(gray, view_list)
        w, h = im.size
        for copy in (im.crop((0, 0, round(0.8 * w), round(0.8 * h))), im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
            cp, _ = hashes.hash_bytes(jpeg(copy))
            d = hashes.hamming(ph, np.uint64(cp))
            gains.append((int(d[0]), int(d.min())))
    plain, best = np.array(gains).T
    assert np.median(best) <= 6 < np.median(plain), gains


def test_cifar_pickles_index(cifar_pickles, tmp_path, ray_local):
    out = str(tmp_path / "index")
    cfg = IndexConfig(evals=[f"cifar10={cifar_pickles['dir']}"], out=out, augment=SMALL_VIEWS)
    manifest = build_index(cfg)
    s = manifest["sets"]["cifar10"]
    assert (s["read"], s["indexed"], s["failed"], s["layout"]) == (120, 120, 0, "cifar")
    assert s["classes"][:2] == ["airplane", "automobile"]
    assert manifest["counts"]["views"] == 120 * len(manifest["views"])
    index = load_index(out)
    assert index.eval_id[:2].tolist() == ["test_batch:0", "test_batch:1"]
    assert index.label.tolist() == cifar_pickles["labels"]
    # the pickle's pixels hash like the original lossless WebP (same pixels, same canonical decode)
    want = [hashes.hash_bytes(d)[0] for d in cifar_pickles["bytes"]]
    first = index.view_phash.reshape(120, -1)[:, 0]
    assert first.tolist() == want
    # golden: for 32x32 images the canonical decode is a full decode, so imagehash agrees exactly
    assert int(first[5]) == int(str(imagehash.phash(Image.fromarray(cifar_pickles["pixels"][5]))), 16)
    # a rebuild is identical (content digest), whatever the order of --eval arguments
    other = str(tmp_path / "index2")
    m2 = build_index(IndexConfig(evals=[f"cifar10={cifar_pickles['dir']}/test_batch"], out=other, augment=SMALL_VIEWS))
    assert m2["digest"] == manifest["digest"]


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        sources.load_cifar_pickle(pickle.dumps({b"data": Evil()}))


def test_image_folder_hostile_names_failures_and_shard_dirs(photo_set, tmp_path, ray_local):
    folder = str(tmp_path / "imagenet-val")
    named = {f"cat/{HOSTILE_NAMES[0]}": photo_set["bytes"][0], f"dog/{HOSTILE_NAMES[1]}": photo_set["bytes"][1],
             "dog/ok.jpg": photo_set["bytes"][2], "dog/truncated.jpg": photo_set["bytes"][3][:300]}
    write_image_folder(folder, named)
    shards = str(tmp_path / "shards")
    write_shards(shards, [(f"s3://bucket/eval/{i}.jpg", i, d) for i, d in enumerate(photo_set["bytes"][4:7])], 2,
                 source="s3://bucket/eval")
    out = str(tmp_path / "index")
    manifest = build_index(IndexConfig(evals=[f"val={folder}", f"held-out={shards}"], out=out, augment=SMALL_VIEWS))
    val, held = manifest["sets"]["val"], manifest["sets"]["held-out"]
    assert (val["read"], val["indexed"], val["failed"]) == (4, 3, 1)
    assert val["classes"] == ["cat", "dog"]
    assert (held["read"], held["indexed"], held["layout"]) == (3, 3, "shards")
    index = load_index(out)
    ids = set(index.eval_id.tolist())
    assert f"cat/{HOSTILE_NAMES[0]}" in ids and "2.jpg" in ids
    failures = pq.read_table(os.path.join(out, "_failures.parquet")).to_pylist()
    assert len(failures) == 1 and failures[0]["source"].endswith("truncated.jpg")
    assert failures[0]["reason"].startswith("corrupt")
    with open(os.path.join(out, "_manifest.json")) as f:
        on_disk = json.load(f)
    assert on_disk["digest"].startswith("sha256:") and on_disk["files"]["eval.parquet"]["checksum"]


def test_a_manifest_of_another_kind_is_not_read_as_shards(tmp_path):
    from vitray.storage import StorageOptions

    other = tmp_path / "an-index"
    other.mkdir()
    (other / "_manifest.json").write_text(json.dumps({"kind": "vitray-dedup-index"}))
    with pytest.raises(sources.EvalSourceError, match="kind is 'vitray-dedup-index', expected 'vitray-shards'"):
        sources.plan_eval_set("test", str(other), StorageOptions(), str(tmp_path / "out"))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="evals"):
        IndexConfig(evals=["no-equals-sign"], out="/tmp/x")
    with pytest.raises(ConfigError, match="evals"):
        IndexConfig(evals=["a=/x", "a=/y"], out="/tmp/x")
    with pytest.raises(ConfigError, match="crop_scales"):
        augment.AugmentConfig(crop_scales=(1.5,))


def test_cifar100_layout_reads_fine_labels(tmp_path, cifar_pickles):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    x = cifar_pickles["pixels"][:5]
    batch = {b"filenames": [b"a.png"] * 5, b"fine_labels": [7, 3, 99, 0, 12], b"coarse_labels": [1, 2, 3, 4, 5],
             b"data": x.transpose(0, 3, 1, 2).reshape(5, -1)}
    with open(root / "test", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f, protocol=2)
    plan = sources.plan_eval_set("c100", str(root), None, str(tmp_path / "idx"))
    assert plan.kind == "cifar" and len(plan.classes) == 100 and plan.classes[7] == "c7"
    recs = [r for u in plan.units for r in sources.read_unit(u, None, str(root))]
    assert [r.label for r in recs] == [7, 3, 99, 0, 12] and recs[2].eval_id == "test:2"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(recs[1].data))), x[1])
