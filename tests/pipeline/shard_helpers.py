"""Helpers for the shard tests: stores, real odd/bad inputs, tars, Parquet, snapshots."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vitray import storage
from vitray.storage import StorageOptions


@dataclasses.dataclass
class Store:
    """A place to put a corpus: a local directory or a bucket on the loopback S3 or GCS server."""

    kind: str
    root: str
    """URI of the store's root (a local path, s3://bucket or gs://bucket)."""
    options: StorageOptions

    def uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts) if self.kind == "local" else "/".join([self.root, *parts])

    @property
    def fs(self):
        return storage.resolve(self.root, self.options)[0]

    def put(self, rel: str, data: bytes) -> str:
        fs, path = storage.resolve(self.uri(rel), self.options)
        storage.write_bytes_atomic(fs, path, data)
        return self.uri(rel)

    def put_tree(self, prefix: str, files: dict[str, bytes]) -> str:
        for rel, data in files.items():
            self.put(f"{prefix}/{rel}", data)
        return self.uri(prefix)

    def delete(self, rel: str) -> None:
        fs, path = storage.resolve(self.uri(rel), self.options)
        fs.delete_file(path)

    def source_of(self, rel: str) -> str:
        """The canonical source string `vitray shard` records for ``rel``."""
        fs, path = storage.resolve(self.uri(rel), self.options)
        return storage.to_uri(fs, path)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


BOMB_LIMIT = 6_000_000
"""max_pixels used with ODD_AND_BAD: above every test photo, below the bomb."""


def make_tar(members: list[tuple[str, bytes | None]]) -> bytes:
    """A tar of ``(name, data)`` members, names kept verbatim (``data=None``: a symlink)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parquet_file(columns: dict, row_group_size: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, row_group_size=row_group_size)
    return buf.getvalue()


def read_shards(dst: str, options: StorageOptions) -> pa.Table:
    """All rows of a shard directory in manifest order."""
    fs, root = storage.resolve(dst, options)
    manifest = json.loads(storage.read_bytes(fs, f"{root}/_manifest.json"))
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(fs, f"{root}/{s['name']}"))) for s in manifest["shards"]]
    return pa.concat_tables(tables) if tables else None


def snapshot(root: str) -> dict[str, tuple[int, bytes]]:
    """rel path -> (mtime_ns, bytes) of every file under a local directory."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns, f.read())
    return out
