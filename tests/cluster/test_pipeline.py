"""The whole pipeline (`vitray demo` / `vitray run`): every stage on real local services, then a resume."""

import json
import os

import pyarrow.parquet as pq
import pytest

from vitray import config
from vitray.cli import main
from vitray.cluster.demo import demo_config, run_demo
from vitray.cluster.pipeline import PipelineConfig, stage_configs
from vitray.config import ConfigError


def test_bad_stage_config_fails_before_any_stage_runs(tmp_path):
    cfg = demo_config(str(tmp_path / "out"))
    bad = config.from_dict(PipelineConfig, config.merge(config.to_dict(cfg), {"pretrain": {"model": {"num_heads": 5}}}))
    with pytest.raises(ConfigError, match=r"^pretrain\.model\.num_heads"):
        stage_configs(bad)
    bad = config.from_dict(PipelineConfig, config.merge(config.to_dict(cfg), {"shard": {"max_side": 2}}))
    with pytest.raises(ConfigError, match=r"^shard\.max_side"):
        stage_configs(bad)
    assert not os.path.exists(tmp_path / "out" / "work")
    # The CLI reports the same error by field and exits 2.
    path = tmp_path / "pipeline.yaml"
    path.write_text(config.dump_yaml(bad))
    assert main(["run", str(path)]) == 2


def test_demo_runs_every_stage_and_resumes(ray_local, tmp_path, capsys):
    out = str(tmp_path / "demo")
    result = run_demo(out, steps=4)
    p = result.pipeline
    assert p.shard.counts == {"read": 256, "written": 256, "failed": 0}
    summary = p.dedup.result.summary
    assert result.planted == 6 and result.planted_found == 6
    removed = pq.read_table(os.path.join(out, "work", "dedup", "run", "removed.parquet"))
    excluded = open(os.path.join(out, "work", "dedup", "run", "exclude.txt")).read().split()
    assert sorted(set(removed.column("sample_id").to_pylist())) == sorted(excluded)
    assert p.pretrain.step == 4
    assert p.pretrain.lineage["clean_against"] == ["demo-test"]
    ckpt = p.pretrain.checkpoint
    lineage = json.load(open(os.path.join(ckpt, "lineage.json")))
    index_manifest = json.load(open(os.path.join(out, "work", "dedup", "index", "_manifest.json")))
    assert lineage["clean_against"] == ["demo-test"]
    assert [d["digest"] for d in lineage["dedup_indexes"]] == [index_manifest["digest"]]
    assert json.dumps(summary)  # plain data

    # Re-running the same command resumes every stage: nothing is recomputed.
    again = run_demo(out, steps=4)
    assert again.pipeline.shard.shards_run == 0
    assert again.pipeline.dedup.result.shards_run == 0
    assert again.pipeline.pretrain.step == 4 and again.pipeline.pretrain.checkpoint == ckpt
