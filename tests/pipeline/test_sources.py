"""Source listing and reading (no Ray): image folders, label mappings, WebDataset tars, Parquet."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from shard_helpers import BOMB_LIMIT, make_tar, parquet_file
from vitray.pipeline import hashes, images, schema, shard, shard_task, sources


def _cfg(src, store, **kw):
    return shard.ShardConfig(src=src, dst=store.uri("out"), storage=store.options, **kw)


def _samples(store, listing, cfg):
    return list(sources.read_units(store.fs, listing.units, listing.classes, cfg.image_column, io_threads=4))


def test_image_folder_labels_from_folder_names(store, photos):
    files = {"dog/b.jpg": photos[0]["image"], "cat/x/a.jpg": photos[1]["image"], "ant/c.png": photos[20]["image"]}
    src = store.put_tree("corpus", files)
    cfg = _cfg(src, store)
    listing = sources.list_source(cfg)
    assert listing.kind == "images" and listing.classes == ["ant", "cat", "dog"]
    # sorted listing order; ImageFolder label = first folder under the prefix
    assert [store.source_of(f"corpus/{r}") for r in ("ant/c.png", "cat/x/a.jpg", "dog/b.jpg")] == \
        [s.source for s in _samples(store, listing, cfg)]
    assert [u["label"] for u in listing.units] == [0, 1, 2]
    got = _samples(store, listing, cfg)
    assert got[2].data == files["dog/b.jpg"] and got[2].label == 2 and got[2].error is None


def test_flat_folder_has_no_labels_and_empty_source_is_an_error(local_store, photos):
    src = local_store.put_tree("flat", {"a.jpg": photos[0]["image"], "b.jpg": photos[1]["image"]})
    listing = sources.list_source(_cfg(src, local_store))
    assert listing.classes is None and [u["label"] for u in listing.units] == [None, None]
    with pytest.raises(sources.SourceError, match="no input files"):
        sources.list_source(_cfg(local_store.uri("nothing-here"), local_store))


@pytest.mark.parametrize("fmt", ["csv", "csv-noheader", "csv-multi", "jsonl"])
def test_label_mappings(local_store, photos, fmt):
    files = {f"img{i}.jpg": photos[i]["image"] for i in range(4)}
    src = local_store.put_tree("c", files)
    if fmt == "csv":
        text = "path,label\nimg0.jpg,zebra\n./img1.jpg,ant\nimg2.jpg,zebra\n"
        expect = [(1, None), (0, None), (1, None), (None, None)]
        classes = ["ant", "zebra"]
    elif fmt == "csv-noheader":
        text, classes = "img0.jpg,3\nimg3.jpg,-1\nimg1.jpg,0\n", None
        expect = [(3, None), (0, None), (None, None), (None, None)]
    elif fmt == "csv-multi":
        text = "path,labels\nimg0.jpg,a;b\nimg1.jpg,c\nimg2.jpg,\n"
        expect, classes = [(None, [0, 1]), (None, [2]), (None, []), (None, None)], ["a", "b", "c"]
    else:
        lines = [{"path": "img0.jpg", "label": 7}, {"path": src + "/img1.jpg", "labels": [1, 4]},
                 {"path": "img3.jpg", "label": None}]
        text = "\n".join(json.dumps(x) for x in lines)
        expect, classes = [(7, None), (None, [1, 4]), (None, None), (None, None)], None
    labels = local_store.put(f"labels.{'jsonl' if fmt == 'jsonl' else 'csv'}", text.encode())
    listing = sources.list_source(_cfg(src, local_store, labels=labels))
    assert listing.classes == classes
    assert [(u["label"], u["labels"]) for u in listing.units] == expect


def test_mapping_file_inside_the_source_is_not_a_sample(local_store, photos):
    src = local_store.put_tree("c", {"a.jpg": photos[0]["image"], "labels.csv": b"a.jpg,1\n"})
    listing = sources.list_source(_cfg(src, local_store, labels=src + "/labels.csv"))
    assert [(u["path"].rsplit("/", 1)[-1], u["label"]) for u in listing.units] == [("a.jpg", 1)]


def test_webdataset_tar_members(local_store, photos):
    jpg, png = photos[0]["image"], photos[20]["image"]
    tar = make_tar([
        ("s0.jpg", jpg), ("s0.cls", b"5\n"),
        ("s1.png", png), ("s1.json", json.dumps({"label": 3}).encode()),
        ("s2.jpg", jpg), ("s2.json", json.dumps({"labels": [1, 2]}).encode()),
        ("s3.txt", b"caption only"),
        ("../evil.jpg", jpg),
        ("/abs.jpg", jpg),
        ("link.jpg", None),
        ("dir/s4.seg.png", png), ("dir/s4.cls", b"cat"),
        ("s5.webp", jpg),
    ])
    src = local_store.put("wds/a.tar", tar)
    cfg = _cfg(local_store.uri("wds"), local_store)
    listing = sources.list_source(cfg)
    assert listing.kind == "webdataset" and listing.classes is None
    got = [(s.source.split("#", 1)[1], s.label, s.labels, (s.error or "").split(":")[0], s.data is not None)
           for s in _samples(local_store, listing, cfg)]
    assert got == [
        ("s0.jpg", 5, None, "", True),
        ("s1.png", 3, None, "", True),
        ("s2.jpg", None, [1, 2], "", True),
        ("s3", None, None, "not an image", False),
        ("../evil.jpg", None, None, "unsafe path", False),
        ("/abs.jpg", None, None, "unsafe path", False),
        ("link.jpg", None, None, "unsafe member", False),
        ("dir/s4.seg.png", None, None, "bad label", False),
        ("s5.webp", None, None, "", True),
    ]
    assert all(s.source.startswith(src + "#") for s in _samples(local_store, listing, cfg))


def test_truncated_tar_keeps_what_was_read_and_records_the_rest(local_store, photos):
    tar = make_tar([(f"k{i}.jpg", photos[i]["image"]) for i in range(4)])
    local_store.put("wds/t.tar", tar[: len(tar) * 3 // 5])
    cfg = _cfg(local_store.uri("wds"), local_store)
    got = _samples(local_store, sources.list_source(cfg), cfg)
    ok = [s for s in got if s.error is None]
    assert len(ok) >= 1 and all(s.data == photos[i]["image"] for i, s in enumerate(ok))
    assert got[-1].error.startswith("unreadable: tar stream failed")


def test_parquet_row_ranges_cover_every_row_once(local_store, photos):
    n = 11
    data = [p["image"] for p in photos[:n]]
    data[4] = None  # a null image cell is a recorded failure, not a crash
    names = ["b", "a", None, "b", "c", "a", "a", "c", "b", "a", "c"]
    local_store.put("pq/part-0.parquet", parquet_file({"img": data, "cls": names}, row_group_size=3))
    local_store.put("pq/part-1.parquet", parquet_file(
        {"img": [{"bytes": photos[0]["image"], "path": "x.jpg"}], "cls": ["d"]}, row_group_size=3))
    cfg = _cfg(local_store.uri("pq"), local_store, image_column="img", label_column="cls",
               target_shard_bytes=300_000)
    listing = sources.list_source(cfg)
    assert listing.kind == "parquet" and listing.classes == ["a", "b", "c", "d"]
    assert len([u for u in listing.units if u["path"].endswith("part-0.parquet")]) > 2  # split by bytes
    got = _samples(local_store, listing, cfg)
    assert [s.source.rsplit("/", 1)[1] for s in got] == \
        [f"part-0.parquet#row={i}" for i in range(n)] + ["part-1.parquet#row=0"]
    assert [s.label for s in got] == [1, 0, None, 1, None, 0, 0, 2, 1, 0, 2, 3]
    assert got[4].error == "empty: null image value"
    assert got[11].data == photos[0]["image"]  # Hugging Face {"bytes", "path"} struct cells
    with pytest.raises(sources.SourceError, match="no image column"):
        sources.list_source(_cfg(local_store.uri("pq"), local_store))


def test_partition_is_deterministic_and_respects_the_target():
    units = [{"size": s} for s in (5, 5, 5, 20, 1, 1, 9)]
    groups = shard.partition(units, 10)
    assert [[u["size"] for u in g] for g in groups] == [[5, 5], [5], [20], [1, 1], [9]]
    assert shard.partition(units, 10) == groups


def test_small_inputs_are_cut_into_enough_tasks():
    MiB = shard.MiB
    assert shard.task_target(277 * MiB, 128 * MiB) == -(-277 * MiB // 16)  # 3 tasks would leave a worker idle
    assert shard.task_target(16 * 128 * MiB, 128 * MiB) == 128 * MiB  # enough tasks: the target
    assert shard.task_target(3 * MiB, 128 * MiB) == 4 * MiB  # never under the floor: one task
    assert shard.task_target(10 * MiB, 300_000) == 300_000  # a target under the floor is kept


def test_large_inputs_end_in_finer_tasks():
    MiB = shard.MiB
    # Small inputs, or tail tasks under the floor: one task size, as before.
    assert shard.fine_tail(4 * 128 * MiB, 128 * MiB) == (None, None)
    assert shard.fine_tail(100 * 16 * MiB, 16 * MiB) == (None, None)
    # The tail is the last tenth, but at least two full tasks, in tasks of 1/8.
    assert shard.fine_tail(100 * 128 * MiB, 128 * MiB) == (16 * MiB, 90 * 128 * MiB)
    assert shard.fine_tail(10 * 128 * MiB, 128 * MiB) == (16 * MiB, 8 * 128 * MiB)

    units = [{"size": 1} for _ in range(100)]
    groups = shard.partition(units, 10, 2, 81)  # the tail starts mid-group: that group closes there
    assert [len(g) for g in groups] == [10] * 8 + [1] + [2] * 9 + [1]
    assert sum(groups, []) == units  # every unit once, in order
    # A unit bigger than its target is a task of its own, in either part.
    big = [{"size": 5}, {"size": 30}, {"size": 5}, {"size": 5}, {"size": 9}, {"size": 1}]
    assert [[u["size"] for u in g] for g in shard.partition(big, 20, 6, 40)] == [[5], [30], [5], [5], [9], [1]]


def test_plan_of_a_large_input_ends_in_finer_tasks(local_store, photos, monkeypatch):
    monkeypatch.setattr(shard, "MIN_TASK_BYTES", 1)  # the real floor is 4 MiB: too big for a test corpus
    monkeypatch.setattr(shard, "MIN_TASKS", 1)  # 12 tasks of the target, not 16 smaller ones
    files = {f"c{i % 3}/{i:03d}.jpg": photos[i % len(photos)]["image"] for i in range(120)}
    src = local_store.put_tree("corpus", files)
    total = sum(map(len, files.values()))
    target = total // 12
    plan = shard.plan_shards(_cfg(src, local_store, target_shard_bytes=target))
    fine, fine_from = shard.fine_tail(total, target)
    assert (fine, fine_from) == (target // 8, total - 2 * target)  # a tenth is under two full tasks
    # Every file once, in listing order; tasks of the full target up to the tail, of 1/8 in it (a photo
    # bigger than that is a task of its own); a task is in the tail when its first file starts there.
    assert [u for t in plan.tasks for u in t["units"]] == sources.list_source(_cfg(src, local_store)).units
    offset, tail = 0, []
    for t in plan.tasks:
        size = sum(u["size"] for u in t["units"])
        in_tail = offset >= fine_from
        assert in_tail or offset + size - t["units"][-1]["size"] < fine_from  # its files start before the tail
        assert size <= (fine if in_tail else target) or len(t["units"]) == 1
        tail.append(in_tail)
        offset += size
    assert tail == sorted(tail) and 8 <= sum(tail) <= 20 and 9 <= len(tail) - sum(tail) <= 13



def test_encode_sample_hashes_equal_hash_bytes(photos, odd_and_bad):
    """The stored pHash/dHash are exactly hashes.hash_bytes(original), with or without re-encoding."""
    inputs = [p["image"] for p in photos] + [b for b, exp in odd_and_bad.values() if isinstance(exp, tuple)]
    for max_side in (None, 64, 200):
        for data in inputs:
            row = shard_task.encode_sample(data, BOMB_LIMIT, max_side, 90)
            assert (row["phash"], row["dhash"]) == hashes.hash_bytes(data, BOMB_LIMIT)
            assert row["sha256"] == hashlib.sha256(data).hexdigest()
            stored = images.decode(row["image"])
            assert (stored.width, stored.height) == (row["width"], row["height"]) and stored.format == row["format"]
            original = images.decode(data)
            if max_side is None or min(original.width, original.height) <= max_side:
                assert row["image"] == data
            else:
                assert min(row["width"], row["height"]) == max_side
                assert abs(row["width"] / row["height"] - original.width / original.height) < 0.02
    table = schema.table_from_rows([{"sample_id": "x", "source": "y", "label": None, "labels": None, **row}])
    assert table.schema == schema.SHARD_SCHEMA


def test_encode_sample_rejects_bad_inputs_with_reasons(odd_and_bad):
    for name, (data, expected) in odd_and_bad.items():
        if isinstance(expected, tuple):
            assert (shard_task.encode_sample(data, BOMB_LIMIT, None, 90)["width"],
                    shard_task.encode_sample(data, BOMB_LIMIT, None, 90)["height"]) == expected, name
        else:
            with pytest.raises(images.ImageError) as exc:
                shard_task.encode_sample(data, BOMB_LIMIT, None, 90)
            assert exc.value.reason.startswith(expected), (name, exc.value.reason)


def test_reencoded_png_sources_stay_lossless(photos):
    png = next(p["image"] for p in photos if p["format"] == "PNG")
    row = shard_task.encode_sample(png, BOMB_LIMIT, 64, 90)
    assert row["format"] == "PNG" and Image.open(io.BytesIO(row["image"])).format == "PNG"
    assert isinstance(pa.scalar(row["phash"], pa.uint64()).as_py(), int)


def test_mixed_sources_need_an_explicit_format(local_store, photos):
    src = local_store.put_tree("m", {"a.jpg": photos[0]["image"], "b.tar": make_tar([("k.jpg", photos[1]["image"])]),
                                     "README": b"notes"})
    with pytest.raises(sources.SourceError, match="mixes 1 image files, 1 tars"):
        sources.list_source(_cfg(src, local_store))
    cfg = _cfg(src, local_store, source_format="webdataset")
    got = _samples(local_store, sources.list_source(cfg), cfg)
    # every listed file is read as a tar; the ones that are not tars fail with a reason, none is dropped
    assert [(s.source.rsplit("/", 1)[1], s.error is None) for s in got] == \
        [("README", False), ("a.jpg", False), ("b.tar#k.jpg", True)]
