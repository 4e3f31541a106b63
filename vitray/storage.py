"""Object storage addressed by URI: ``s3://bucket/key``, ``gs://bucket/key`` or a local path.

Every stage reads and writes through :func:`resolve`, which returns a pyarrow
filesystem plus the path inside it (no scheme, as pyarrow and Ray Train's
``RunConfig(storage_filesystem=...)`` expect). Paths stay ``str`` throughout: a
``pathlib.Path`` would mangle ``s3://``.

Credentials are never taken as arguments, stored in configs, logged or pickled
by us: they come from the standard AWS/GCP chains (environment variables,
config files, instance metadata). Only the endpoint of an S3-compatible store
(MinIO, Ceph, the test server) is configuration, via ``StorageOptions`` or the
``AWS_ENDPOINT_URL`` environment variable. For ``gs://``, a GCS emulator is named
the way Google's client libraries expect, by ``STORAGE_EMULATOR_HOST`` (then no
credentials are used).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import uuid
from typing import Iterator

import pyarrow.fs as pafs

from vitray.config import check


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Holds no secrets, so it may be logged and saved."""

    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. ``http://127.0.0.1:9000``. Default: AWS_ENDPOINT_URL or AWS."""
    region: str | None = None
    """S3 region. Default: AWS_DEFAULT_REGION / AWS_REGION, else ``us-east-1``."""

    def __post_init__(self):
        if self.endpoint_url is not None:
            check(self.endpoint_url.startswith(("http://", "https://")), "endpoint_url",
                  f"must start with http:// or https://, got {self.endpoint_url!r}")

    @property
    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    @property
    def resolved_region(self) -> str:
        return self.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def scheme_of(uri: str) -> str:
    """``"s3"``, ``"gs"`` or ``"file"``."""
    if "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme in ("s3", "s3a"):
            return "s3"
        if scheme in ("gs", "gcs"):
            return "gs"
        if scheme == "file":
            return "file"
        raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r} (use s3://, gs:// or a local path)")
    return "file"


def s3_filesystem(options: StorageOptions) -> pafs.S3FileSystem:
    kwargs = {"region": options.resolved_region}
    endpoint = options.resolved_endpoint
    if endpoint:
        scheme, host = endpoint.split("://", 1)
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        # S3-compatible stores (MinIO, moto) address buckets by path, not virtual host.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def gcs_filesystem(**kwargs) -> pafs.GcsFileSystem:
    """GCS with Google's default credentials, or the emulator named by ``STORAGE_EMULATOR_HOST`` (anonymous)."""
    emulator = os.environ.get(GCS_EMULATOR_ENV)
    if emulator:
        scheme, host = (emulator if "://" in emulator else "http://" + emulator).split("://", 1)
        kwargs.update(anonymous=True, endpoint_override=host.rstrip("/"), scheme=scheme)
    return pafs.GcsFileSystem(**kwargs)


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a URI; ``path`` has no scheme."""
    options = options or StorageOptions()
    scheme = scheme_of(uri)
    if scheme == "s3":
        return s3_filesystem(options), uri.split("://", 1)[1].rstrip("/")
    if scheme == "gs":
        return gcs_filesystem(), uri.split("://", 1)[1].rstrip("/")
    path = uri.split("://", 1)[1] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def absolute(uri: str) -> str:
    """``uri`` with a local path made absolute (``~`` expanded) against this process's working
    directory; object-store URIs unchanged. For paths handed to processes that run elsewhere
    (Ray Train workers start in their own directory)."""
    if scheme_of(uri) == "file" and not uri.startswith("file://"):
        return os.path.abspath(os.path.expanduser(uri))
    return uri


def join(uri: str, *parts: str) -> str:
    """Join URI components with ``/`` (never the OS separator, never Path)."""
    if scheme_of(uri) == "file" and not uri.startswith("file://"):
        return os.path.join(uri, *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of :func:`resolve` for display and provenance."""
    if isinstance(fs, pafs.S3FileSystem):
        return "s3://" + path
    if isinstance(fs, pafs.GcsFileSystem):
        return "gs://" + path
    return path


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole object.

    S3/GCS objects become visible only when the upload completes; on a local
    filesystem we write a temporary sibling and rename it into place.
    """
    parent = posixpath.dirname(path) if not isinstance(fs, pafs.LocalFileSystem) else os.path.dirname(path)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def list_files(fs: pafs.FileSystem, path: str, recursive: bool = True) -> Iterator[pafs.FileInfo]:
    """Files under ``path`` (sorted by path), skipping hidden names and temporaries."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path):].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")) or ".tmp-" in info.base_name:
            continue
        yield info


def boto3_client(options: StorageOptions | None = None):
    """A boto3 S3 client for bucket operations, pointed at the configured endpoint."""
    import boto3

    options = options or StorageOptions()
    return boto3.client("s3", endpoint_url=options.resolved_endpoint, region_name=options.resolved_region)
