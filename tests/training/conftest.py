"""Training fixtures: small shard directories of real CIFAR-10 images, and tiny configs.

The shards are written with the shard-format helpers (``table_from_rows`` +
``shard_dir_files``) rather than by running ``vitray shard``, so
training tests do not pay for a sharding job. 96 images in two shards, 8 of them
excluded through an exclusion file: with the tiny recipe's 16-image global batch an
epoch is 5 steps, so an 8-step run crosses an epoch boundary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest

from vitray.pipeline.hashes import hash_bytes
from vitray.pipeline.schema import sample_id, shard_dir_files, table_from_rows

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
NUM_IMAGES = 96
NUM_SHARDS = 2
NUM_EXCLUDED = 8
EVAL_SETS = ["cifar10-test", "cifair10-test"]


@dataclasses.dataclass
class TinyCorpus:
    """A shard directory plus the dedup outputs that apply to it (all local paths)."""

    shards: str
    exclude: str
    dedup_index: str
    files: dict[str, bytes]  # relative path -> bytes, for copying to other stores
    sample_ids: list[str]
    excluded: list[str]
    eval_sets: list[str] = dataclasses.field(default_factory=lambda: list(EVAL_SETS))

    def upload(self, s3, prefix: str) -> "TinyCorpus":
        """Copy this corpus to ``s3://<bucket>/<prefix>``; returns the S3-addressed twin."""
        for rel, data in self.files.items():
            s3.put(f"{prefix}/{rel}", data)
        return dataclasses.replace(self, shards=s3.path(prefix, "shards"),
                                   exclude=s3.path(prefix, "dedup", "exclude.txt"),
                                   dedup_index=s3.path(prefix, "dedup", "index.json"))


def build_corpus_files(cifar_table) -> tuple[dict[str, bytes], list[str], list[str]]:
    rows = []
    table = cifar_table.slice(0, NUM_IMAGES).to_pylist()
    for rec in table:
        data = rec["image"]
        source = f"cifar10.parquet#test/{rec['index']}"
        ph, dh = hash_bytes(data)
        rows.append({"sample_id": sample_id(source), "source": source, "label": int(rec["label"]),
                     "labels": None, "width": 32, "height": 32, "format": "WEBP",
                     "sha256": hashlib.sha256(data).hexdigest(), "phash": ph, "dhash": dh, "image": data})
    per = NUM_IMAGES // NUM_SHARDS
    tables = (table_from_rows(rows[i * per:(i + 1) * per]) for i in range(NUM_SHARDS))
    files = {f"shards/{name}": blob for name, blob in shard_dir_files(
        tables, source="cifar10.parquet", classes=CIFAR_CLASSES, created="2024-01-01T00:00:00Z")}
    ids = [r["sample_id"] for r in rows]
    excluded = ids[3::NUM_IMAGES // NUM_EXCLUDED][:NUM_EXCLUDED]
    files["dedup/exclude.txt"] = ("\n".join(excluded) + "\n").encode()
    files["dedup/index.json"] = json.dumps({
        "kind": "vitray-dedup-index", "created": "2024-01-01T00:00:00Z",
        "eval_sets": [{"name": n, "images": 10_000} for n in EVAL_SETS]}).encode()
    return files, ids, excluded


@pytest.fixture(scope="session")
def tiny_corpus(cifar10_test_table, tmp_path_factory) -> TinyCorpus:
    root = str(tmp_path_factory.mktemp("tiny-corpus"))
    files, ids, excluded = build_corpus_files(cifar10_test_table)
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return TinyCorpus(shards=os.path.join(root, "shards"), exclude=os.path.join(root, "dedup", "exclude.txt"),
                      dedup_index=os.path.join(root, "dedup", "index.json"), files=files,
                      sample_ids=ids, excluded=excluded)


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(corpus, storage_path, name, **overrides) -> PretrainConfig`` (the tiny recipe)."""
    from vitray.config import merge
    from vitray.training.config import load_pretrain_config

    def make(corpus: TinyCorpus, storage_path: str, name: str, **overrides):
        base = {"data": {"shards": corpus.shards, "exclude": [corpus.exclude],
                         "dedup_indexes": [corpus.dedup_index]},
                "run": {"name": name, "storage_path": storage_path}}
        return load_pretrain_config("tiny", overrides=merge(base, overrides))

    return make
