"""``vitray demo``: the whole pipeline on embedded defaults, in a few minutes on a laptop.

Generates a small labelled corpus and a "test set" with planted near-duplicates of
corpus images (:mod:`vitray.pipeline.synthetic`), then runs :func:`run_pipeline`
with the tiny recipe twins on a local Ray runtime, using a local directory as the
object store. It is the same code path as a production ``vitray run``; only the
sizes differ. Re-running resumes every stage.
"""

from __future__ import annotations

import csv
import dataclasses
import io

from vitray import storage
from vitray.cluster.pipeline import EvalSet, PipelineConfig, PipelineResult, run_pipeline
from vitray.pipeline import synthetic


@dataclasses.dataclass
class DemoResult:
    pipeline: PipelineResult
    planted: int
    """Near-duplicates planted in the demo test set."""
    planted_found: int
    """Of those, how many corpus originals the dedup stage excluded."""
    config: PipelineConfig


def demo_config(out: str, steps: int = 30) -> PipelineConfig:
    """The demo's pipeline: 4 classes x 64 images, a 4 x 16 test set, the tiny ViT for ``steps`` steps."""
    return PipelineConfig(
        corpus=storage.join(out, "data", "corpus"),
        workdir=storage.join(out, "work"),
        eval_sets=[EvalSet(name="demo-test", src=storage.join(out, "data", "test"))],
        shard={"target_shard_bytes": 256 * 1024, "max_failure_fraction": 0.0},
        pretrain_recipe="tiny",
        pretrain={"run": {"name": "demo"}, "model": {"num_classes": 4}, "steps": steps,
                  "checkpoint": {"every": 10, "keep": 2}, "optim": {"warmup_steps": max(1, steps // 5)}},
    )


def _generate(out: str) -> None:
    """Write the demo corpus and test set once (a rerun keeps the files, so stages resume)."""
    fs, root = storage.resolve(out)
    done = f"{root}/data/_generated"
    if storage.exists(fs, done):
        return
    corpus = synthetic.make_demo_corpus(storage.join(out, "data", "corpus"), classes=4, per_class=64, size=64)
    synthetic.make_demo_eval_set(storage.join(out, "data", "test"), corpus.uri, per_class=16, duplicates=6, size=64)
    storage.write_bytes_atomic(fs, done, b"ok\n")


def run_demo(out: str, steps: int = 30) -> DemoResult:
    _generate(out)
    cfg = demo_config(out, steps)
    result = run_pipeline(cfg)
    fs, root = storage.resolve(out)
    planted = list(csv.DictReader(io.StringIO(storage.read_bytes(
        fs, f"{root}/data/test/{synthetic.DUPLICATES_NAME}").decode())))
    removed = set(result.dedup.removed_sources) if result.dedup is not None else set()
    corpus_root = storage.resolve(cfg.corpus)[1]
    found = sum(1 for p in planted if f"{corpus_root}/{p['corpus_path']}" in removed)
    return DemoResult(pipeline=result, planted=len(planted), planted_found=found, config=cfg)
