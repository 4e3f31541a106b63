"""`vitray shard` end to end on a real Ray runtime, local paths and the loopback S3 server."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from shard_helpers import BOMB_LIMIT, make_tar, parquet_file, read_shards, snapshot
from vitray import storage
from vitray.pipeline import hashes, schema, shard, shard_task


def _failures(dst: str, options) -> dict[str, str]:
    fs, root = storage.resolve(dst, options)
    table = pq.read_table(io.BytesIO(storage.read_bytes(fs, f"{root}/_failures.parquet")))
    assert table.schema == schema.FAILURE_SCHEMA
    return dict(zip(table.column("source").to_pylist(), table.column("reason").to_pylist()))


def _manifest(dst: str, options) -> dict:
    fs, root = storage.resolve(dst, options)
    return json.loads(storage.read_bytes(fs, f"{root}/_manifest.json"))


def _check_rows(table, originals: dict[str, bytes], max_pixels: int):
    """Every row: sample_id from its source, sha256/phash/dhash of the original bytes."""
    assert table.schema == schema.SHARD_SCHEMA
    for row in table.to_pylist():
        data = originals[row["source"]]
        assert row["sample_id"] == schema.sample_id(row["source"])
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert (row["phash"], row["dhash"]) == hashes.hash_bytes(data, max_pixels)


def test_image_folder_with_odd_and_bad_inputs(ray_local, store, photos, odd_and_bad):
    files = {f"{'cat' if i % 2 else 'dog'}/{p['filename']}": p["image"] for i, p in enumerate(photos[:12])}
    files.update({f"odd/{name}": data for name, (data, _) in odd_and_bad.items()})
    files["cat/vanishes.jpg"] = photos[12]["image"]
    src = store.put_tree("corpus", files)
    dst = store.uri("shards")
    cfg = shard.ShardConfig(src=src, dst=dst, storage=store.options, target_shard_bytes=400_000,
                            max_pixels=BOMB_LIMIT, max_failure_fraction=1.0)
    plan = shard.plan_shards(cfg)
    assert len(plan.tasks) >= 3
    store.delete("corpus/cat/vanishes.jpg")  # listed, then gone before it is read: an unreadable object
    result = shard.run_shard(cfg, plan)

    c = result.counts
    assert c["read"] == len(files) and c["read"] == c["written"] + c["failed"]
    failures = _failures(dst, store.options)
    expected_fail = {store.source_of(f"corpus/odd/{n}"): exp for n, (_, exp) in odd_and_bad.items()
                     if isinstance(exp, str)}
    expected_fail[store.source_of("corpus/cat/vanishes.jpg")] = "unreadable"
    assert set(failures) == set(expected_fail)
    for source, prefix in expected_fail.items():
        assert failures[source].startswith(prefix + ":"), (source, failures[source])
    assert c["failed"] == len(expected_fail) and result.ok

    manifest = _manifest(dst, store.options)
    assert manifest["kind"] == "vitray-shards" and manifest["counts"] == c
    assert manifest["classes"] == ["cat", "dog", "odd"]
    assert manifest["config"]["max_pixels"] == BOMB_LIMIT and manifest["failures"] == "_failures.parquet"
    fs, root = storage.resolve(dst, store.options)
    for entry in manifest["shards"]:
        data = storage.read_bytes(fs, f"{root}/{entry['name']}")
        assert (len(data), schema.checksum(data)) == (entry["bytes"], entry["checksum"])
        assert pq.read_metadata(io.BytesIO(data)).num_rows == entry["rows"]

    table = read_shards(dst, store.options)
    originals = {store.source_of(f"corpus/{rel}"): data for rel, data in files.items()}
    _check_rows(table, originals, BOMB_LIMIT)
    sources_in_order = table.column("source").to_pylist()
    assert sources_in_order == sorted(sources_in_order)  # listing order, kept within and across shards
    rows = {r["source"]: r for r in table.to_pylist()}
    for name, (data, expected) in odd_and_bad.items():
        if isinstance(expected, tuple):  # handled: written, width/height as displayed
            row = rows[store.source_of(f"corpus/odd/{name}")]
            assert (row["width"], row["height"]) == expected and row["label"] == 2 and row["image"] == data
    assert {rows[store.source_of(f"corpus/{rel}")]["label"] for rel in files if rel.startswith("cat/")
            and store.source_of(f"corpus/{rel}") in rows} == {0}


def test_webdataset_tars(ray_local, store, photos):
    tar_a = make_tar([("a0.jpg", photos[0]["image"]), ("a0.cls", b"1"), ("../evil.jpg", photos[1]["image"]),
                      ("a1.png", photos[20]["image"]), ("a1.json", b'{"label": 2}'), ("/abs.jpg", photos[2]["image"]),
                      ("a2.jpg", b"\xff\xd8 corrupt")])
    tar_b = make_tar([(f"b{i}.jpg", photos[3 + i]["image"]) for i in range(5)])
    store.put("wds/shard-a.tar", tar_a)
    store.put("wds/shard-b.tar", tar_b)
    dst = store.uri("out")
    cfg = shard.ShardConfig(src=store.uri("wds"), dst=dst, storage=store.options, target_shard_bytes=1,
                            max_failure_fraction=0.5)
    result = shard.run_shard(cfg)
    assert result.counts == {"read": 10, "written": 7, "failed": 3} and result.ok
    a, b = store.source_of("wds/shard-a.tar"), store.source_of("wds/shard-b.tar")
    failures = _failures(dst, store.options)
    assert set(failures) == {f"{a}#../evil.jpg", f"{a}#/abs.jpg", f"{a}#a2.jpg"}
    assert failures[f"{a}#../evil.jpg"].startswith("unsafe path")
    assert failures[f"{a}#a2.jpg"].startswith(("corrupt", "not an image"))
    table = read_shards(dst, store.options)
    assert table.column("source").to_pylist() == [f"{a}#a0.jpg", f"{a}#a1.png"] + [f"{b}#b{i}.jpg" for i in range(5)]
    assert table.column("label").to_pylist() == [1, 2] + [None] * 5
    assert [s["name"] for s in result.manifest["shards"]] == ["shard-00000.parquet", "shard-00001.parquet"]
    originals = {f"{a}#a0.jpg": photos[0]["image"], f"{a}#a1.png": photos[20]["image"],
                 **{f"{b}#b{i}.jpg": photos[3 + i]["image"] for i in range(5)}}
    _check_rows(table, originals, shard.ShardConfig.max_pixels)
    if store.kind == "local":  # nothing was extracted next to the tars
        assert sorted(os.listdir(store.uri("wds"))) == ["shard-a.tar", "shard-b.tar"]


def test_parquet_source_with_reencoding(ray_local, store, photos):
    rows = photos[:14]
    images = [p["image"] for p in rows] + [b"", None]
    names = [p["label_name"].split(":")[1] for p in rows] + ["x", "y"]
    store.put("pq/data.parquet", parquet_file({"jpeg": images, "name": names}, row_group_size=4))
    dst = store.uri("out")
    cfg = shard.ShardConfig(src=store.uri("pq"), dst=dst, storage=store.options, image_column="jpeg",
                            label_column="name", max_side=96, target_shard_bytes=500_000,
                            max_failure_fraction=0.2)
    result = shard.run_shard(cfg)
    assert result.counts == {"read": 16, "written": 14, "failed": 2}
    src = store.source_of("pq/data.parquet")
    assert _failures(dst, store.options) == {f"{src}#row=14": "empty: zero-byte object",
                                             f"{src}#row=15": "empty: null image value"}
    table = read_shards(dst, store.options)
    assert len(result.manifest["shards"]) >= 2
    assert table.column("source").to_pylist() == [f"{src}#row={i}" for i in range(14)]
    classes = result.manifest["classes"]
    assert classes == sorted(set(names))
    assert [classes[k] for k in table.column("label").to_pylist()] == names[:14]
    _check_rows(table, {f"{src}#row={i}": d for i, d in enumerate(images)}, shard.ShardConfig.max_pixels)
    assert all(min(w, h) == 96 for w, h in zip(table.column("width").to_pylist(), table.column("height").to_pylist()))


def _damage(root: str):
    """Simulate an interrupted run: lost, corrupted and half-written shards, no manifest."""
    os.remove(f"{root}/shard-00001.parquet")
    os.remove(f"{root}/_state/shard-00001.json")
    with open(f"{root}/shard-00002.parquet", "r+b") as f:  # same size, different bytes: checksum catches it
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(f"{root}/shard-00003.parquet", "r+b") as f:  # half-written, marker still claims complete
        f.truncate(os.path.getsize(f"{root}/shard-00003.parquet") // 2)
    with open(f"{root}/shard-00004.parquet.tmp-0123abcd", "wb") as f:  # a crashed atomic write
        f.write(b"partial")
    os.remove(f"{root}/shard-00004.parquet")  # and the shard it never produced (marker is left)
    os.remove(f"{root}/_manifest.json")


def test_resume_is_byte_identical_and_a_second_run_changes_nothing(ray_local, local_store, photos, odd_and_bad):
    files = {f"c{i % 3}/{p['filename']}": p["image"] for i, p in enumerate(photos[:18])}
    files["c0/truncated.jpg"] = odd_and_bad["truncated.jpg"][0]
    src = local_store.put_tree("corpus", files)
    kw = dict(src=src, target_shard_bytes=300_000, max_failure_fraction=0.1, max_side=128)
    reference = local_store.uri("reference")
    shard.run_shard(shard.ShardConfig(dst=reference, **kw))
    dst = local_store.uri("resumed")
    cfg = shard.ShardConfig(dst=dst, **kw)
    first = shard.run_shard(cfg)
    assert len(first.manifest["shards"]) >= 5
    # the steady-state timing covers every input of a fresh run, inside the run's wall time
    assert first.read_now == first.counts["read"] == 19 and first.workers >= 1
    assert 0 < first.work_seconds and first.work_seconds + first.startup_seconds <= first.seconds
    assert 0 <= first.tail_seconds <= first.work_seconds and "s tail" in first.summary()
    assert "of shard work" in first.summary()
    _damage(dst)
    resumed = shard.run_shard(cfg)
    assert resumed.shards_run == 4 and resumed.shards_resumed == len(first.manifest["shards"]) - 4
    assert 0 < resumed.read_now < resumed.counts["read"]  # only the redone shards' inputs
    ref, got = snapshot(reference), snapshot(dst)
    assert sorted(ref) == sorted(got) and not any(".tmp-" in k for k in got)
    for name in ref:
        if name != "_manifest.json":
            assert ref[name][1] == got[name][1], name
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created", "config")}  # noqa: E731
    assert strip(_manifest(reference, cfg.storage)) == strip(_manifest(dst, cfg.storage))
    # a complete directory: the next run verifies every shard and writes nothing
    again = shard.run_shard(cfg)
    assert again.shards_run == 0 and snapshot(dst) == got
    assert again.read_now == 0 and again.work_seconds == 0 and "of shard work" not in again.summary()


def test_changed_plan_replaces_stale_shards(ray_local, local_store, photos):
    src = local_store.put_tree("corpus", {f"{i:02d}.jpg": p["image"] for i, p in enumerate(photos[:8])})
    dst = local_store.uri("out")
    shard.run_shard(shard.ShardConfig(src=src, dst=dst, target_shard_bytes=200_000))
    many = len(os.listdir(dst))
    result = shard.run_shard(shard.ShardConfig(src=src, dst=dst, target_shard_bytes=10**9))
    assert [s["name"] for s in result.manifest["shards"]] == ["shard-00000.parquet"]
    assert sorted(os.listdir(dst)) == ["_failures.parquet", "_manifest.json", "_state", "shard-00000.parquet"]
    assert os.listdir(f"{dst}/_state") == ["shard-00000.json"] and many > 4
    assert read_shards(dst, storage.StorageOptions()).num_rows == 8


def test_cli_exit_status_follows_the_failure_fraction(ray_local, local_store, photos, odd_and_bad, capsys, tmp_path):
    from vitray.cli import main

    files = {f"{i}.jpg": p["image"] for i, p in enumerate(photos[:3])}
    files.update({"bad1.jpg": odd_and_bad["truncated.jpg"][0], "bad2.txt": b"text"})
    src = local_store.put_tree("corpus", files)
    dst = local_store.uri("out")
    assert main(["shard", src, dst, "--max-failure-fraction", "0.3", "--target-shard-mb", "0.2"]) == 1
    err = capsys.readouterr()
    assert "2 of 5 inputs failed (40.00%), above the limit of 30.00%" in err.err
    assert "read" in err.out and "failed" in err.out  # the summary table
    cfg_file = tmp_path / "shard.yaml"
    cfg_file.write_text(yaml.safe_dump({"max_failure_fraction": 0.1, "target_shard_bytes": 200_000}))
    assert main(["shard", src, dst, "--config", str(cfg_file), "--set", "max_failure_fraction=0.5"]) == 0
    assert _manifest(dst, storage.StorageOptions())["config"]["max_failure_fraction"] == 0.5
    assert main(["shard", src, dst, "--set", "max_side=3"]) == 2
    assert "max_side" in capsys.readouterr().err
    assert main(["shard", local_store.uri("missing"), dst]) == 1
    assert "no input files" in capsys.readouterr().err


# Last in the file: the two-node fixture shuts the shared single-node runtime down.
def test_two_node_cluster_writes_the_same_shards(two_node_cluster, local_store, photos):
    files = {f"k{i % 2}/{p['filename']}": p["image"] for i, p in enumerate(photos[:16])}
    src = local_store.put_tree("corpus", files)
    kw = dict(src=src, target_shard_bytes=250_000)
    ref_cfg = shard.ShardConfig(dst=local_store.uri("direct"), **kw)
    plan = shard.plan_shards(ref_cfg)
    assert len(plan.tasks) >= 4
    for task in plan.tasks:  # the same tasks run in this process, without Ray
        shard_task.process_task(task, ref_cfg)
    # Every worker up before the first task: these tasks take milliseconds, so otherwise the worker
    # that starts first can finish them all before the other node's worker is up.
    result = shard.run_shard(shard.ShardConfig(dst=local_store.uri("cluster"), wait_for_workers_s=120, **kw))
    assert result.nodes == 2
    assert result.counts == {"read": 16, "written": 16, "failed": 0}
    for entry in result.manifest["shards"]:
        with open(f"{local_store.uri('direct')}/{entry['name']}", "rb") as f:
            assert schema.checksum(f.read()) == entry["checksum"], entry["name"]
