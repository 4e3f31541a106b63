"""Checkpoints: exact round trip, no unpickling, partial checkpoints never used, lineage, schedule."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from vitray.config import to_dict
from vitray.storage import resolve
from vitray.training import checkpoint as ckpt
from vitray.training.config import load_pretrain_config
from vitray.training.loop import build_optimizer, compute_loss
from vitray.training.schedule import WarmupDecaySchedule, lr_at
from vitray.training.vit import create_model


def _train(model, optimizer, schedule, cfg, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        schedule.apply()
        x = torch.randn(4, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        loss = compute_loss(model(x), {"label": y}, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.advance()


def _fresh(cfg):
    torch.manual_seed(0)
    model = create_model(cfg.model)
    opt = build_optimizer(model, cfg)
    sched = WarmupDecaySchedule(opt, peak_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                                total_steps=cfg.steps, decay=cfg.optim.decay)
    return model, opt, sched


def _save(tmp, cfg, model, opt, sched, step, lineage=None):
    files = ckpt.serialize(step=step, model=model.state_dict(), optimizer=opt.state_dict(),
                           scheduler=sched.state_dict(), reader={"epoch": 1, "sample_in_epoch": 32, "seed": 0},
                           config=to_dict(cfg), lineage=lineage or {"corpus": {}}, metrics={"loss": 2.0})
    local = os.path.join(tmp, f"local-{step}")
    ckpt.write_local(local, step, files)
    return local


def test_round_trip_is_exact_and_never_unpickles(tmp_path, monkeypatch):
    cfg = load_pretrain_config("tiny")
    model, opt, sched = _fresh(cfg)
    _train(model, opt, sched, cfg, 3, seed=1)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    local = _save(str(tmp_path), cfg, model, opt, sched, 3)
    run = str(tmp_path / "run")
    ckpt.upload(local, pafs.LocalFileSystem(), f"{run}/{ckpt.checkpoint_dir_name(3)}")
    expect_rand = (random.random(), np.random.rand(), torch.rand(3))

    # Only safetensors and JSON on disk, and loading works with every unpickler disabled.
    names = sorted(os.listdir(f"{run}/checkpoint-00000003"))
    assert names == ["COMMIT", "config.json", "lineage.json", "model.safetensors", "optimizer.safetensors",
                     "rng.safetensors", "state.json"]

    def refuse(*a, **k):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    state = ckpt.load(pafs.LocalFileSystem(), f"{run}/checkpoint-00000003")
    monkeypatch.undo()

    assert state.step == 3 and state.reader == {"epoch": 1, "sample_in_epoch": 32, "seed": 0}
    assert state.config == to_dict(cfg)
    ckpt.restore_rng(state.rng)
    got_rand = (random.random(), np.random.rand(), torch.rand(3))
    assert got_rand[0] == expect_rand[0] and got_rand[1] == expect_rand[1] and torch.equal(got_rand[2], expect_rand[2])

    # Continuing from the checkpoint matches continuing in memory bit for bit.
    model2, opt2, sched2 = _fresh(cfg)
    model2.load_state_dict(state.model)
    opt2.load_state_dict(state.optimizer)
    sched2.load_state_dict(state.scheduler)
    _train(model, opt, sched, cfg, 2, seed=2)
    _train(model2, opt2, sched2, cfg, 2, seed=2)
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), name


def test_partial_checkpoints_are_never_used(tmp_path, s3):
    cfg = load_pretrain_config("tiny")
    model, opt, sched = _fresh(cfg)
    for root, options in ((str(tmp_path / "run"), None), (s3.path("runs", "r1"), s3.options)):
        fs, run = resolve(root, options)
        for step in (2, 4, 6):
            local = _save(str(tmp_path), cfg, model, opt, sched, step)
            ckpt.upload(local, fs, f"{run}/{ckpt.checkpoint_dir_name(step)}")
        assert [s for s, _ in ckpt.list_checkpoints(fs, run)] == [2, 4, 6]
        assert ckpt.latest_committed(fs, run)[0] == 6
        # A writer killed before COMMIT (6), and a file that does not match its COMMIT (4).
        fs.delete_file(f"{run}/checkpoint-00000006/COMMIT")
        with fs.open_output_stream(f"{run}/checkpoint-00000004/model.safetensors") as f:
            f.write(b"truncated")
        with pytest.raises(ckpt.IncompleteCheckpointError, match="no COMMIT"):
            ckpt.load(fs, f"{run}/checkpoint-00000006")
        with pytest.raises(ckpt.IncompleteCheckpointError, match="model.safetensors does not match"):
            ckpt.load(fs, f"{run}/checkpoint-00000004")
        assert ckpt.latest_committed(fs, run) == (2, f"{run}/checkpoint-00000002")
        # Re-uploading over a partial directory replaces its leftovers.
        ckpt.upload(_save(str(tmp_path), cfg, model, opt, sched, 6), fs, f"{run}/checkpoint-00000006")
        assert ckpt.latest_committed(fs, run)[0] == 6


def test_lineage_names_corpus_and_eval_sets(tiny_corpus):
    lineage = ckpt.data_lineage(tiny_corpus.shards, [tiny_corpus.exclude], [tiny_corpus.dedup_index])
    assert lineage["clean_against"] == sorted(tiny_corpus.eval_sets)
    assert lineage["corpus"]["manifest_checksum"].startswith("sha256:")
    assert lineage["corpus"]["samples"] == 96 and lineage["corpus"]["shards"] == 2
    (index,) = lineage["dedup_indexes"]
    assert index["digest"].startswith("sha256:") and index["eval_sets"] == sorted(tiny_corpus.eval_sets)
    assert lineage["exclusions"][0]["checksum"].startswith("sha256:")
    json.dumps(lineage)  # goes into lineage.json verbatim


def test_schedule_warmup_then_decay():
    kw = dict(peak_lr=1.0, warmup_steps=4, total_steps=12)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0 and lr_at(12, **kw) == 0.0 and lr_at(8, **kw) == 0.5
    assert lr_at(8, decay="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(6, decay="cosine", **kw) > lr_at(6, decay="linear", **kw)
    assert lr_at(12, decay="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
