"""Shared fixtures: a real local Ray runtime and real S3-compatible and GCS servers on loopback.

Defined once here; test modules ask for ``ray_local``, ``s3`` (a fresh bucket on the
moto server), ``gcs`` (a fresh bucket on a GCS emulator), ``two_node_cluster`` and the
real-image fixtures.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid

# Everything below must be in the environment before Ray starts: workers inherit it.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Fake credentials for the loopback S3 server only; never real ones in tests.
os.environ["AWS_ACCESS_KEY_ID"] = "vitray-test-key"
os.environ["AWS_SECRET_ACCESS_KEY"] = "vitray-test-secret"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from vitray.storage import StorageOptions, gcs_filesystem, resolve, write_bytes_atomic  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
TEST_CPUS = 2
TEST_OBJECT_STORE = 512 * 1024**2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# gs:// goes to the loopback GCS emulator (started by the ``gcs_server`` fixture), anonymously;
# set at import, before any Ray runtime starts, so workers inherit it.
GCS_PORT = _free_port()
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{GCS_PORT}"


# ---------------------------------------------------------------- Ray

def start_local_ray(**kwargs):
    """Start (or reuse) the session's local Ray runtime."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh runtime, never one another process started on this machine.
        ray.init(address="local", num_cpus=TEST_CPUS, object_store_memory=TEST_OBJECT_STORE, include_dashboard=False,
                 log_to_driver=True, **kwargs)
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
    return ray


@pytest.fixture
def ray_local():
    """A real local Ray runtime (2 CPUs), shared across tests and restarted if a test shut it down."""
    yield start_local_ray()


@pytest.fixture
def two_node_cluster():
    """A real two-node Ray cluster (``ray.cluster_utils.Cluster``), one CPU per node.

    The session's single-node runtime is shut down first and restarted lazily by
    the next test that asks for ``ray_local``.
    """
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": TEST_OBJECT_STORE // 2})
    cluster.add_node(num_cpus=1, object_store_memory=TEST_OBJECT_STORE // 2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def pytest_sessionfinish(session, exitstatus):
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ---------------------------------------------------------------- S3

@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a loopback port for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@dataclasses.dataclass
class S3Bucket:
    """A fresh bucket on the loopback S3 server, with clients pointed at it."""

    endpoint: str
    bucket: str
    options: StorageOptions
    client: object  # boto3 S3 client

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"

    def path(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    @property
    def fs(self):
        return resolve(self.uri, self.options)[0]

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.path(key)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture
def s3(s3_server) -> S3Bucket:
    """A new empty bucket for one test."""
    from vitray.storage import boto3_client

    options = StorageOptions(endpoint_url=s3_server)
    client = boto3_client(options)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3Bucket(endpoint=s3_server, bucket=bucket, options=options, client=client)


# ---------------------------------------------------------------- GCS

@pytest.fixture(scope="session")
def gcs_server():
    """A GCS emulator (gcp-storage-emulator, in memory) on the port ``STORAGE_EMULATOR_HOST`` names.

    In its own process: pyarrow's GCS client holds the GIL in some calls (opening a
    random-access file), which deadlocks against a server thread in this process.
    """
    import subprocess
    import sys
    import time

    code = ("import threading; from gcp_storage_emulator.server import create_server; "
            f"create_server('127.0.0.1', {GCS_PORT}, in_memory=True).start(); threading.Event().wait()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", GCS_PORT), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("the GCS emulator exited at start")
                time.sleep(0.1)
        else:
            raise RuntimeError("the GCS emulator did not start")
        yield os.environ["STORAGE_EMULATOR_HOST"]
    finally:
        proc.terminate()
        proc.wait(10)


@dataclasses.dataclass
class GcsBucket:
    """A fresh bucket on the loopback GCS emulator (vitray reaches it through ``STORAGE_EMULATOR_HOST``)."""

    bucket: str

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}"

    def path(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def put(self, key: str, data: bytes) -> str:
        fs, path = resolve(self.path(key))
        write_bytes_atomic(fs, path, data)
        return self.path(key)


@pytest.fixture
def gcs(gcs_server) -> GcsBucket:
    """A new empty bucket for one test."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    gcs_filesystem(project_id="vitray-test").create_dir(bucket)  # creating a bucket needs a project
    return GcsBucket(bucket)


# ---------------------------------------------------------------- real images

def _shared(name: str) -> str:
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"shared data file {name} not found at {path}")
    return path


@pytest.fixture(scope="session")
def photos_table():
    """The 462 real photos (original encoded bytes) of ../shared/data/photos.parquet."""
    return pq.read_table(_shared("photos.parquet"))


@pytest.fixture(scope="session")
def cifar10_test_table():
    """CIFAR-10 test split (10,000 lossless WebP 32x32 images) in original order."""
    table = pq.read_table(_shared("cifar10.parquet"), filters=[("split", "=", "test")])
    return table.sort_by("index")


@pytest.fixture(scope="session")
def shared_data_dir():
    return SHARED_DATA
