"""The shard format: the contract between ``vitray shard``, dedup and the training reader.

A shard directory holds::

    shard-00000.parquet ...      one Parquet file per planned task (rows in source order)
    _manifest.json               written last: counts, schema version, config, per-shard rows + checksums
    _failures.parquet            (source, reason) for every input that could not be sharded
    _state/                      per-shard completion markers used for resume (internal)

Row columns (see ``SHARD_SCHEMA``): a stable ``sample_id`` derived from the source
location, the source URI, labels, displayed width/height, the encoded format, the
SHA-256 of the original bytes, 64-bit pHash/dHash as unsigned integers (computed
once here so dedup never decodes the corpus), and the (optionally re-encoded) image
bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from vitray import storage

SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"
FAILURES_NAME = "_failures.parquet"

SHARD_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("label", pa.int64(), nullable=True),
    pa.field("labels", pa.list_(pa.int64()), nullable=True),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("format", pa.string(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("phash", pa.uint64(), nullable=False),
    pa.field("dhash", pa.uint64(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
])

FAILURE_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
])

# Columns a consumer that never decodes (dedup's hash stage) reads.
HASH_COLUMNS = ["sample_id", "source", "sha256", "phash", "dhash", "width", "height"]


def sample_id(source: str) -> str:
    """Stable id of a sample: a function of its source location only (32 hex chars).

    ``source`` is the canonical location string, e.g. ``s3://bucket/a/b.jpg``,
    ``s3://bucket/shard.tar#key.jpg`` or ``/data/x.parquet#row=12``.
    """
    return hashlib.blake2b(source.encode("utf-8"), digest_size=16).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def table_from_rows(rows: list[dict]) -> pa.Table:
    """Rows (dicts with the SHARD_SCHEMA columns) -> a table with the exact schema."""
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def parquet_bytes(table: pa.Table, row_group_rows: int = 256) -> bytes:
    """Serialise a shard table. Small row groups let the reader fetch rows selectively."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_rows, compression="zstd",
                   # image bytes are already compressed; dictionary-encoding them wastes time
                   use_dictionary=["source", "format"])
    return buf.getvalue()


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dumps_manifest(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def load_manifest(shards: str, storage_options: storage.StorageOptions | None = None) -> dict:
    """The manifest of the shard directory ``shards``, validated (kind and schema version).

    Raises FileNotFoundError for a missing or incomplete directory and ValueError for
    a manifest of another kind or schema version.
    """
    fs, root = storage.resolve(shards, storage_options)
    try:
        data = storage.read_bytes(fs, root + "/" + MANIFEST_NAME)
    except FileNotFoundError:
        raise FileNotFoundError(f"{shards}: no {MANIFEST_NAME}; the shard directory is missing or incomplete "
                                "(`vitray shard` writes the manifest last)") from None
    return parse_manifest(data, f"{shards}/{MANIFEST_NAME}")


def parse_manifest(data: bytes, where: str) -> dict:
    """A shard manifest's bytes -> dict; ValueError (naming ``where``) unless it is JSON of
    kind 'vitray-shards' at the supported schema version."""
    try:
        manifest = json.loads(data)
    except ValueError:
        raise ValueError(f"{where}: not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "vitray-shards":
        kind = manifest.get("kind") if isinstance(manifest, dict) else None
        raise ValueError(f"{where}: kind is {kind!r}, expected 'vitray-shards'")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{where}: schema_version {manifest.get('schema_version')} is not "
                         f"the supported {SCHEMA_VERSION}")
    return manifest


def shard_dir_files(tables: Iterable[pa.Table], *, source: str, classes: list[str] | None = None,
                    row_group_rows: int = 256, created: str = "") -> Iterator[tuple[str, bytes]]:
    """(file name, bytes) of a complete shard directory holding ``tables``, one shard each, manifest last.

    For writers other than ``vitray shard`` (pre-hashed data, fixtures, benchmarks):
    the tables must already have ``SHARD_SCHEMA``. The manifest carries the keys
    ``vitray shard`` writes, with an empty run config and no failures. Tables are
    consumed one at a time, so a generator of tables keeps memory bounded.
    """
    entries, rows = [], 0
    for i, table in enumerate(tables):
        if table.schema != SHARD_SCHEMA:
            raise ValueError(f"shard {i} does not have SHARD_SCHEMA: {table.schema}")
        blob = parquet_bytes(table, row_group_rows=row_group_rows)
        entries.append({"name": shard_name(i), "rows": table.num_rows, "bytes": len(blob), "checksum": checksum(blob)})
        rows += table.num_rows
        yield shard_name(i), blob
    manifest = {"kind": "vitray-shards", "schema_version": SCHEMA_VERSION, "created": created, "source": source,
                "config": {}, "counts": {"read": rows, "written": rows, "failed": 0}, "classes": classes,
                "shards": entries, "failures": FAILURES_NAME}
    yield MANIFEST_NAME, dumps_manifest(manifest)


def write_shard_dir(uri: str, tables: Iterable[pa.Table], *, storage_options: storage.StorageOptions | None = None,
                    **manifest_fields) -> dict:
    """Write :func:`shard_dir_files` under ``uri`` (manifest last, each file atomically); returns the manifest."""
    fs, root = storage.resolve(uri, storage_options)
    for name, blob in shard_dir_files(tables, **manifest_fields):
        storage.write_bytes_atomic(fs, f"{root}/{name}", blob)
    return json.loads(blob)  # the last file written is the manifest
