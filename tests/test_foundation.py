"""The shared mechanisms every stage stands on: configs, storage URIs, the test services."""

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vitray import config
from vitray.config import ConfigError, check
from vitray.storage import StorageOptions, join, resolve, write_bytes_atomic, read_bytes, exists, list_files


@dataclasses.dataclass
class Inner:
    depth: int = 2
    name: str = "x"

    def __post_init__(self):
        check(self.depth > 0, "depth", "must be positive")


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    lr: float = 1e-3
    tags: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = None


def test_config_round_trip_and_overrides(tmp_path):
    cfg = config.load(Outer, base=Outer(), overrides=config.parse_overrides(["inner.depth=4", "lr=0.5", "tags=a,b"]))
    assert cfg.inner.depth == 4 and cfg.lr == 0.5 and cfg.tags == ["a", "b"]
    path = tmp_path / "c.yaml"
    path.write_text(config.dump_yaml(cfg))
    assert config.load(Outer, path=str(path)) == cfg


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^inner\.depth: must be positive"):
        config.from_dict(Outer, {"inner": {"depth": 0}})
    with pytest.raises(ConfigError, match=r"^inner\.dpeth: unknown field"):
        config.from_dict(Outer, {"inner": {"dpeth": 3}})
    with pytest.raises(ConfigError, match=r"^lr: expected a number"):
        config.from_dict(Outer, {"lr": "fast"})
    with pytest.raises(ConfigError, match=r"^limit: cannot interpret"):
        config.from_dict(Outer, {"limit": "many"})


def test_storage_options_reject_bad_endpoint():
    with pytest.raises(ConfigError, match="endpoint_url"):
        StorageOptions(endpoint_url="127.0.0.1:9000")


def test_local_and_s3_storage_round_trip(tmp_path, s3):
    for root, options in ((str(tmp_path), None), (s3.uri, s3.options)):
        uri = join(root, "a", "b.bin")
        fs, path = resolve(uri, options)
        assert "://" not in path
        write_bytes_atomic(fs, path, b"hello")
        assert exists(fs, path) and read_bytes(fs, path) == b"hello"
        listed = [i.path for i in list_files(*resolve(root, options))]
        assert listed == [path]
    assert s3.keys() == ["a/b.bin"]


def test_ray_workers_reach_the_s3_server(ray_local, s3):
    """Workers inherit the S3 credentials (set before ray.init) and read through pyarrow."""
    import ray

    fs = s3.fs
    with fs.open_output_stream(f"{s3.bucket}/t.parquet") as f:
        pq.write_table(pa.table({"x": [1, 2, 3]}), f)

    @ray.remote(num_cpus=0.5)
    def total(uri, options):
        fs, path = resolve(uri, options)
        return sum(pq.read_table(path, filesystem=fs).column("x").to_pylist())

    assert ray.get(total.remote(s3.path("t.parquet"), s3.options)) == 6
