"""`vitray dedup index` + `vitray dedup run` end to end on real photos (local Ray, local disk and S3)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from dedup_helpers import HOSTILE_NAMES, degenerate_images, transforms, write_image_folder, write_shards

from vitray import cli
from vitray.dedup import scan
from vitray.dedup.run import DedupConfig, run_dedup

N_EVAL = 8


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, photo_set):
    """An eval ImageFolder (8 photos, hostile file names, one flat image) and a corpus holding
    7 transformed copies of each eval photo, 12 distinct photos + crops of them, degenerate
    images and one exact duplicate, in 5 shards."""
    root = tmp_path_factory.mktemp("dedup")
    folder = str(root / "val")
    names = [f"{'cat' if i % 2 else 'dog'}/{HOSTILE_NAMES[i] if i < len(HOSTILE_NAMES) else f'img{i}.jpg'}"
             for i in range(N_EVAL)]
    named = {n: photo_set["bytes"][i] for i, n in enumerate(names)}
    named["dog/flat.png"] = degenerate_images()["flat128"]
    write_image_folder(folder, named)
    items, expect = [], {}
    tfs = transforms()
    for i in range(N_EVAL):
        for t, fn in tfs.items():
            src = f"s3://web/{t}/{i}.jpg" if (i, t) != (0, "flip") else "s3://web/<script>alert(1)</script>.jpg"
            items.append((src, None, fn(photo_set["images"][i])))
            expect[src] = names[i]
    distinct = []
    for j in range(12, 24):
        distinct += [(f"s3://web/distinct/{j}.jpg", None, photo_set["bytes"][j]),
                     (f"s3://web/distinct/{j}-crop.jpg", None, tfs["crop90"](photo_set["images"][j]))]
    degenerate = [(f"s3://web/degenerate/{k}.png", None, d) for k, d in degenerate_images().items()]
    exact = [("s3://web/copy-of-distinct-12.jpg", None, photo_set["bytes"][12])]
    rng = np.random.default_rng(0)
    all_items = items + distinct + degenerate + exact
    all_items = [all_items[k] for k in rng.permutation(len(all_items))]
    corpus = str(root / "corpus")
    write_shards(corpus, all_items, rows_per_shard=20, classes=None)
    index, out = str(root / "index"), str(root / "out")
    assert cli.main(["dedup", "index", "--eval", f"val={folder}", "--out", index]) == 0
    assert cli.main(["dedup", "run", corpus, "--index", index, "--out", out, "--write-clean"]) == 0
    return {"corpus": corpus, "index": index, "out": out, "expect": expect, "n": len(all_items),
            "distinct": [s for s, _, _ in distinct], "degenerate": [s for s, _, _ in degenerate]}


def _summary(out: str) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_transformed_copies_removed_distinct_kept_counts_reconcile(scenario, ray_local):
    s = _summary(scenario["out"])
    c = s["counts"]
    assert c["rows"] == scenario["n"] == c["kept"] + c["removed"] + c["failed"]
    assert c["failed"] == 0
    removed = pq.read_table(os.path.join(scenario["out"], "removed.parquet")).to_pylist()
    got = {r["source"]: r["eval_id"] for r in removed}
    assert got == scenario["expect"]  # every copy found, matched to its own original, nothing else
    assert c["removed"] == len(scenario["expect"])
    with open(os.path.join(scenario["out"], "exclude.txt")) as f:
        excluded = f.read().splitlines()
    assert excluded == sorted({r["sample_id"] for r in removed})
    for r in removed:
        assert r["eval_set"] == "val" and r["hash_kind"] in ("phash", "dhash")
        assert r["distance"] == min(r["phash_distance"], r["dhash_distance"]) <= 12
        assert r["joint_distance"] <= 26 or r["distance"] <= 8
        assert r["score"] >= s["settings"]["threshold"]
    val = s["sets"]["val"]
    assert (val["eval_images"], val["degenerate_skipped"], val["contaminated"]) == (N_EVAL + 1, 1, N_EVAL)
    assert val["contamination_rate"] == pytest.approx(N_EVAL / (N_EVAL + 1))


def test_exact_duplicates_flagged_and_degenerate_recorded(scenario, ray_local):
    exact = pq.read_table(os.path.join(scenario["out"], "exact_duplicates.parquet")).to_pylist()
    assert sorted(r["source"] for r in exact) == ["s3://web/copy-of-distinct-12.jpg", "s3://web/distinct/12.jpg"]
    assert sum(r["keep"] for r in exact) == 1 and {r["group_size"] for r in exact} == {2}
    s = _summary(scenario["out"])
    assert (s["counts"]["exact_duplicate_groups"], s["counts"]["exact_duplicate_rows"]) == (1, 1)
    # flat images collide with the flat eval image by hash, but that one is not searched at all;
    # nothing degenerate is ever removed
    removed = set(pq.read_table(os.path.join(scenario["out"], "removed.parquet")).column("source").to_pylist())
    assert not removed & set(scenario["degenerate"]) and not removed & set(scenario["distinct"])


def test_clean_shards_drop_removed_rows(scenario, ray_local):
    clean = os.path.join(scenario["out"], scan.CLEAN_DIR)
    with open(os.path.join(clean, "_manifest.json")) as f:
        manifest = json.load(f)
    sids = set(pq.read_table(clean, columns=["sample_id"]).column("sample_id").to_pylist())
    with open(os.path.join(scenario["out"], "exclude.txt")) as f:
        excluded = set(f.read().splitlines())
    assert len(sids) == manifest["counts"]["written"] == scenario["n"] - len(excluded)
    assert not sids & excluded


def test_report_escapes_every_string_from_the_data(scenario, ray_local):
    with open(os.path.join(scenario["out"], "report.html"), encoding="utf-8") as f:
        page = f.read()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the eval file name and the corpus source
    assert '"onerror' not in page and "&quot;onerror=alert(2) x=&quot;.jpg" in page
    assert "a&b" not in page and "a&amp;b &lt;i&gt;.jpg" in page
    assert "Content-Security-Policy" in page and page.count('src="data:image/png;base64,') >= 2 * N_EVAL


def test_resumed_run_equals_uninterrupted(scenario, tmp_path, ray_local):
    out = str(tmp_path / "resumed")
    shutil.copytree(scenario["out"], out)
    parts = os.path.join(out, scan.PARTS_DIR)
    # interrupt: two shards lost their results, one of them left a half-written file; outputs gone
    for name in ("shard-00001", "shard-00003"):
        os.remove(os.path.join(parts, f"{name}.done.json"))
    with open(os.path.join(parts, "shard-00003.pairs.parquet"), "r+b") as f:
        f.truncate(100)
    os.remove(os.path.join(parts, "shard-00001.rows.parquet"))
    for name in ("exclude.txt", "removed.parquet", "report.html", "summary.json"):
        os.remove(os.path.join(out, name))
    cfg = DedupConfig(corpus=scenario["corpus"], index=scenario["index"], out=out, write_clean=True)
    result = run_dedup(cfg)
    assert result.shards_run == 2
    _assert_same_outputs(scenario["out"], out)
    again = run_dedup(cfg)  # idempotent: nothing left to do, same files
    assert again.shards_run == 0
    _assert_same_outputs(scenario["out"], out)


def _assert_same_outputs(a: str, b: str) -> None:
    for name in ("exclude.txt", "report.html", "removed.parquet", "exact_duplicates.parquet", "clean/shard-00002.parquet"):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    sa, sb = _summary(a), _summary(b)
    for s in (sa, sb):
        for k in ("created", "seconds", "config"):
            s.pop(k)
    assert sa == sb


def test_s3_storage_end_to_end(s3, photo_set, ray_local):
    for i in range(3):
        s3.put(f"eval/cls/{i}.jpg", photo_set["bytes"][i])
    tfs = transforms()
    items = [(f"s3://web/{t}/{i}.jpg", None, tfs[t](photo_set["images"][i])) for i in range(3) for t in ("crop80", "gray")]
    items += [(f"s3://web/d/{j}.jpg", None, photo_set["bytes"][j]) for j in range(12, 16)]
    write_shards(s3.path("corpus"), items, rows_per_shard=5, options=s3.options)
    endpoint = ["--endpoint-url", s3.endpoint]
    assert cli.main(["dedup", "index", "--eval", f"web-val={s3.path('eval')}", "--out", s3.path("index"),
                     "--set", "preview_side=48", *endpoint]) == 0
    assert cli.main(["dedup", "run", s3.path("corpus"), "--index", s3.path("index"), "--out", s3.path("out"),
                     *endpoint]) == 0
    keys = s3.keys("out/")
    assert {"out/exclude.txt", "out/removed.parquet", "out/summary.json", "out/report.html"} <= set(keys)
    summary = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="out/summary.json")["Body"].read())
    assert summary["counts"]["removed"] == 6 and summary["sets"]["web-val"]["contaminated"] == 3
    excluded = s3.client.get_object(Bucket=s3.bucket, Key="out/exclude.txt")["Body"].read().decode().split()
    assert len(excluded) == 6


def test_cli_errors_are_clear(tmp_path, capsys):
    code = cli.main(["dedup", "run", str(tmp_path / "no-corpus"), "--index", str(tmp_path / "i"),
                     "--out", str(tmp_path / "o")])
    assert code == 2 and "corpus" in capsys.readouterr().err
    code = cli.main(["dedup", "run", "c", "--index", "i", "--out", "o", "--set", "phash_radius=40"])
    assert code == 2 and "phash_radius" in capsys.readouterr().err

