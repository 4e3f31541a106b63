"""The shard-directory writer for data that is already hashed (fixtures, benchmarks, imports)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vitray import storage
from vitray.pipeline import schema


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"sample_id": schema.sample_id(f"x/{i}"), "source": f"x/{i}", "label": i % 3, "labels": None,
             "width": 4, "height": 4, "format": "PNG", "sha256": f"{i:064x}", "phash": i, "dhash": 2 ** 63 + i,
             "image": b"img%d" % i} for i in range(start, start + n)]


def test_write_shard_dir_matches_its_manifest_locally_and_on_s3(tmp_path, s3):
    for uri, options in ((str(tmp_path / "shards"), None), (s3.uri + "/shards", s3.options)):
        tables = (schema.table_from_rows(_rows(n, start)) for n, start in ((5, 0), (3, 5)))
        manifest = schema.write_shard_dir(uri, tables, storage_options=options, source="unit", classes=["a", "b", "c"],
                                          row_group_rows=2)
        fs, root = storage.resolve(uri, options)
        on_disk = json.loads(storage.read_bytes(fs, f"{root}/{schema.MANIFEST_NAME}"))
        assert on_disk == manifest
        assert manifest["counts"] == {"read": 8, "written": 8, "failed": 0}
        assert manifest["classes"] == ["a", "b", "c"] and manifest["source"] == "unit"
        assert [s["rows"] for s in manifest["shards"]] == [5, 3]
        ids = []
        for entry in manifest["shards"]:
            blob = storage.read_bytes(fs, f"{root}/{entry['name']}")
            assert schema.checksum(blob) == entry["checksum"] and len(blob) == entry["bytes"]
            table = pq.read_table(pa.BufferReader(blob))
            assert table.schema.equals(schema.SHARD_SCHEMA)
            assert pq.ParquetFile(pa.BufferReader(blob)).metadata.num_row_groups == -(-entry["rows"] // 2)
            ids += table.column("sample_id").to_pylist()
        assert ids == [r["sample_id"] for r in _rows(8)]


def test_write_shard_dir_rejects_a_table_without_the_shard_schema(tmp_path):
    with pytest.raises(ValueError, match="SHARD_SCHEMA"):
        schema.write_shard_dir(str(tmp_path / "bad"), [pa.table({"sample_id": ["a"]})], source="unit")
    assert not (tmp_path / "bad" / schema.MANIFEST_NAME).exists()
