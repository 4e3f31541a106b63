"""`vitray pretrain` on a real Ray runtime: exact resume after a driver SIGKILL and (on two
nodes, checkpoints on S3) after a worker SIGKILL; metrics, non-finite loss, bad configs.

One uninterrupted tiny run (2 CPU workers, 8 steps of 16 real CIFAR images, checkpoints
every 2 steps, an epoch boundary at step 6) is the reference every interrupted run must
match bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load as st_load

from vitray.config import ConfigError, to_dict
from vitray.storage import resolve
from vitray.training import checkpoint as ckpt
from vitray.training.metrics import read_jsonl
from vitray.training.pretrain import FAULT_ENV, NonFiniteLossError, run_pretrain
from vitray.training.schedule import lr_at

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_REFERENCE: dict = {}


def final_tensors(run_uri: str, options=None) -> dict[str, torch.Tensor]:
    """Weights and optimizer tensors of the run's final (newest complete) checkpoint."""
    fs, path = resolve(run_uri, options)
    step, ck = ckpt.latest_committed(fs, path)
    files = ckpt.read_files(fs, ck)
    out = {f"model/{k}": v for k, v in st_load(files["model.safetensors"]).items()}
    out.update({f"optim/{k}": v for k, v in st_load(files["optimizer.safetensors"]).items()})
    return out


def assert_bit_identical(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def events(run_dir: str, kind: str) -> list[dict]:
    return [r for r in read_jsonl(os.path.join(run_dir, "logs", "metrics.jsonl")) if r.get("event") == kind]


@pytest.fixture
def reference(ray_local, tiny_corpus, tiny_config, tmp_path_factory):
    """The uninterrupted run (computed once per session)."""
    if not _REFERENCE:
        storage = str(tmp_path_factory.mktemp("runs"))
        cfg = tiny_config(tiny_corpus, storage, "reference")
        result = run_pretrain(cfg)
        _REFERENCE.update(cfg=cfg, result=result, tensors=final_tensors(result.run_uri), storage=storage)
    return _REFERENCE


def test_reference_run_checkpoints_metrics_lineage(reference, tiny_corpus):
    cfg, result = reference["cfg"], reference["result"]
    run = result.run_uri
    assert result.step == 8 and result.metrics["status"] == "done"
    assert result.checkpoint == f"{run}/checkpoint-00000008"
    fs = pafs.LocalFileSystem()
    # Keep the last K=2 checkpoints, each complete.
    assert ckpt.list_checkpoints(fs, run) == [(6, f"{run}/checkpoint-00000006"), (8, f"{run}/checkpoint-00000008")]
    state = ckpt.load(fs, result.checkpoint)
    assert state.step == 8 and state.world_size == 2
    # 88 samples after 8 exclusions; 8 steps x 16 = 128 = one epoch + 40 samples.
    assert state.reader == {"epoch": 1, "sample_in_epoch": 40, "seed": 0}
    assert state.scheduler["step_count"] == 8
    assert state.config == to_dict(cfg)
    assert state.lineage["clean_against"] == sorted(tiny_corpus.eval_sets)
    assert state.lineage["exclusions"][0]["uri"] == tiny_corpus.exclude
    assert all(torch.isfinite(t).all() for t in state.model.values())
    assert os.path.exists(os.path.join(run, "config.yaml"))

    # Metrics every step (log_interval 1): JSONL records + TensorBoard events.
    records = [r for r in read_jsonl(os.path.join(run, "logs", "metrics.jsonl")) if "event" not in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["step_time_s"] > 0
        assert 0 <= r["data_wait_frac"] <= 1 and "mfu" not in r  # no known peak on CPU
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, peak_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                                              total_steps=cfg.steps, decay=cfg.optim.decay))
    assert records[0]["loss"] == pytest.approx(math.log(10), abs=1e-3)  # zero-initialised head
    assert records[-1]["loss"] < records[0]["loss"]
    assert [e["step"] for e in events(run, "checkpoint")] == [2, 4, 6, 8]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run, "logs", "tb")))


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def test_driver_sigkill_then_rerun_resumes_bit_identical(reference, tiny_corpus, tmp_path):
    """`vitray pretrain` killed with SIGKILL mid-run; the same command run again finishes the run."""
    storage = str(tmp_path / "runs")
    marker = str(tmp_path / "paused")
    cmd = [os.path.join(os.path.dirname(sys.executable), "vitray"), "pretrain", "--recipe", "tiny",
           "--shards", tiny_corpus.shards, "--exclude", tiny_corpus.exclude, "--dedup-index",
           tiny_corpus.dedup_index, "--run-name", "driver-kill", "--storage", storage]
    # A fresh local Ray runtime per driver, as on a laptop; the first attempt pauses after step 4.
    env = dict(os.environ, RAY_ADDRESS="local",
               **{FAULT_ENV: json.dumps({"action": "pause", "rank": 0, "step": 4, "marker": marker})})
    log1 = open(tmp_path / "attempt1.log", "w")
    driver = subprocess.Popen(cmd, env=env, stdout=log1, stderr=subprocess.STDOUT, cwd=REPO)
    leaked: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while not os.path.exists(marker):
            assert driver.poll() is None, open(tmp_path / "attempt1.log").read()[-3000:]
            assert time.time() < deadline, "the first attempt never reached step 4"
            time.sleep(0.5)
        run = os.path.join(storage, "driver-kill")
        assert ckpt.latest_committed(pafs.LocalFileSystem(), run)[0] == 4
        leaked = _descendants(driver.pid)  # its Ray runtime: GCS, raylet, workers
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        _kill_all(leaked + ([psutil.Process(driver.pid)] if driver.poll() is None else []))
        log1.close()

    second = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "reached step 8" in second.stdout
    assert [e["step"] for e in events(run, "resume")] == [4]
    assert_bit_identical(final_tensors(run), reference["tensors"])


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(ray_local, tiny_corpus, tiny_config, tmp_path,
                                                             monkeypatch):
    # FSDP2 here (DDP elsewhere): sharded params, full-state checkpoint gather on CPU/gloo.
    monkeypatch.setenv(FAULT_ENV, json.dumps({"action": "nan", "rank": 0, "step": 3}))
    cfg = tiny_config(tiny_corpus, str(tmp_path / "runs"), "nan", steps=4, strategy="fsdp2")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*checkpoint-00000002"):
        run_pretrain(cfg)
    run = str(tmp_path / "runs" / "nan")
    fs = pafs.LocalFileSystem()
    assert [s for s, _ in ckpt.list_checkpoints(fs, run)] == [2]
    state = ckpt.load(fs, f"{run}/checkpoint-00000002")
    assert all(torch.isfinite(t).all() for t in state.model.values())
    assert set(state.model) == set(reference_keys(cfg))
    assert [e["step"] for e in events(run, "nonfinite")] == [3]


def test_relative_local_paths_reach_the_train_workers(ray_local, tiny_corpus, tiny_config, tmp_path, monkeypatch):
    """`vitray demo --out demo-out` style: relative paths, resolved in the driver's directory,
    not in the Ray Train workers' own one."""
    root = os.path.dirname(tiny_corpus.shards)
    monkeypatch.chdir(os.path.dirname(root))
    rel = os.path.basename(root)
    cfg = tiny_config(tiny_corpus, str(tmp_path / "runs"), "relative", steps=2)
    cfg.data.shards = f"{rel}/shards"
    cfg.data.exclude = [f"{rel}/dedup/exclude.txt"]
    cfg.data.dedup_indexes = [f"{rel}/dedup/index.json"]
    result = run_pretrain(cfg)
    assert result.step == 2 and result.checkpoint
    assert result.lineage["corpus"]["uri"] == tiny_corpus.shards  # recorded absolute


def _download(s3, key: str) -> str:
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), os.path.basename(key))
    with open(path, "wb") as f:
        f.write(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    return path


def reference_keys(cfg) -> list[str]:
    from vitray.training.vit import create_model

    return list(create_model(cfg.model).state_dict())


@pytest.mark.parametrize("override, field", [
    ({"model": {"patch_size": 5}}, "model.patch_size"),
    ({"model": {"num_heads": 3}}, "model.num_heads"),
    ({"model": {"variant": "Q/16"}}, "model.variant"),
    ({"global_batch_size": 12}, "global_batch_size"),
    ({"scaling": {"num_workers": 3}}, "global_batch_size"),
    ({"model": {"num_classes": 5}}, "model.num_classes"),
    ({"data": {"shards": "/nonexistent/shards"}}, "data.shards"),
    ({"data": {"reader": {"crop": 1}}}, "data.reader.crop"),
])
def test_bad_config_fails_before_any_worker_naming_the_field(override, field, tiny_corpus, tiny_config, tmp_path,
                                                             capsys):
    from vitray.cli import main
    from vitray.config import merge

    with pytest.raises(ConfigError) as info:
        run_pretrain(tiny_config(tiny_corpus, str(tmp_path), "bad", **override))
    assert info.value.field == field
    assert not os.path.exists(tmp_path / "bad"), "the run started before the config was rejected"
    # The CLI says the same and exits 2.
    flat = [f"{k}={json.dumps(v)}" for k, v in _flatten(merge(
        {"data": {"shards": tiny_corpus.shards}, "run": {"storage_path": str(tmp_path)}}, override)).items()]
    assert main(["pretrain", "--run-name", "bad", *sum((["--set", f] for f in flat), [])]) == 2
    assert f"invalid config: {field}:" in capsys.readouterr().err


def test_a_directory_that_is_not_a_shard_directory_is_refused(tiny_corpus, tiny_config, tmp_path):
    other = tmp_path / "an-index"
    other.mkdir()
    (other / "_manifest.json").write_text(json.dumps({"kind": "vitray-dedup-index"}))
    with pytest.raises(ConfigError, match="kind is 'vitray-dedup-index'") as info:
        run_pretrain(tiny_config(tiny_corpus, str(tmp_path), "bad", data={"shards": str(other)}))
    assert info.value.field == "data.shards"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_resume_refuses_a_different_corpus(reference, tiny_corpus, tiny_config, tmp_path):
    other = tmp_path / "exclude.txt"
    other.write_text(tiny_corpus.excluded[0] + "\n")
    cfg = tiny_config(tiny_corpus, reference["storage"], "reference", data={"exclude": [str(other)]})
    with pytest.raises(ConfigError, match="data.exclude: .*different exclusion files"):
        run_pretrain(cfg)


def test_two_nodes_s3_worker_sigkill_is_retried_and_resumes_bit_identical(reference, tiny_corpus, tiny_config, s3,
                                                                         two_node_cluster, tmp_path, monkeypatch):
    """Shards and run storage on the S3 server, one worker on each of two Ray nodes; the rank-1
    worker process is SIGKILLed after step 5. FailureConfig restarts the worker group, which
    resumes from the step-4 checkpoint on S3 and must end bit-identical to the reference."""
    marker = str(tmp_path / "killed")
    monkeypatch.setenv(FAULT_ENV, json.dumps({"action": "kill", "rank": 1, "step": 5, "marker": marker}))
    corpus = tiny_corpus.upload(s3, "corpus")
    cfg = tiny_config(corpus, s3.path("runs"), "two-node",
                      data={"storage": {"endpoint_url": s3.endpoint}},
                      run={"storage": {"endpoint_url": s3.endpoint}},
                      scaling={"resources_per_worker": {"CPU": 0.5}, "placement_strategy": "STRICT_SPREAD"})
    result = run_pretrain(cfg)
    assert os.path.exists(marker), "the fault did not fire"
    assert result.step == 8 and result.run_uri == s3.path("runs", "two-node")
    keys = s3.keys("runs/two-node/")
    assert {k.split("/")[2] for k in keys if "/checkpoint-" in k} == {"checkpoint-00000006", "checkpoint-00000008"}
    assert "runs/two-node/checkpoint-00000008/COMMIT" in keys
    log = read_jsonl(_download(s3, "runs/two-node/logs/metrics.jsonl"))
    starts = [(r["event"], r["step"], r["nodes"]) for r in log if r.get("event") in ("start", "resume")]
    assert starts == [("start", 0, 2), ("resume", 4, 2)]
    assert [r["step"] for r in log if "event" not in r] == list(range(1, 9))  # the redone step 5 once
    # Same samples, same arithmetic: identical to the uninterrupted single-node local-disk run.
    assert_bit_identical(final_tensors(result.run_uri, s3.options), reference["tensors"])
