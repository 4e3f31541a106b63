"""Eval-set readers for ``vitray dedup index``: where the eval images come from.

An eval set is read into **units** (small JSON-able dicts, planned by the driver)
that a Ray task turns into :class:`EvalImage` records, in source order:

- a **vitray shard directory** (has ``_manifest.json``): one unit per shard;
  ``eval_id`` is the row's source relative to the directory's source.
- **CIFAR-10 / CIFAR-100 python pickles**: the ``cifar-10-batches-py`` /
  ``cifar-100-python`` directory (its ``test_batch`` / ``test`` file) or one
  batch file; ``eval_id`` is ``<file>:<index>``, labels and class names from the
  pickles. Pixels are re-encoded losslessly (PNG) so they take the canonical
  decode path like every other image. The pickles are read with an unpickler
  that only builds dicts, lists, strings and numpy arrays: a pickle is code, and
  a downloaded one must not get to run any.
- **anything ``vitray shard`` reads** (image files under a prefix with
  ImageFolder labels from the first folder, WebDataset tars, Parquet with an
  image column; local, s3://, gs://): listed and read by
  ``vitray.pipeline.sources`` (no copy is made); ``eval_id`` is the path
  relative to SRC (``tar#key`` / ``file#row=N`` for tars and Parquet).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import Iterator

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from vitray import storage
from vitray.pipeline import schema
from vitray.storage import StorageOptions

CIFAR_TEST_FILES = ("test_batch", "test")
"""The test split's file in the CIFAR-10 / CIFAR-100 python layouts."""
CIFAR_META_FILES = {"test_batch": ("batches.meta", b"label_names"), "test": ("meta", b"fine_label_names")}
_UNIT_FILES = 256
"""Image files per index task."""
_UNIT_CIFAR_ROWS = 2000


class EvalSourceError(Exception):
    """An eval set cannot be read as a whole (nothing there, unknown layout)."""


@dataclasses.dataclass
class EvalImage:
    eval_id: str
    source: str
    label: int | None
    data: bytes | None
    error: str | None = None


@dataclasses.dataclass
class EvalPlan:
    kind: str
    """shards | cifar | files (everything vitray shard reads)."""
    units: list[dict]
    classes: list[str] | None


# ---------------------------------------------------------------- CIFAR pickles

class _SafeUnpickler(pickle.Unpickler):
    """Builds only numpy arrays / dtypes (plus the built-in containers pickle makes itself)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")


def load_cifar_pickle(data: bytes) -> dict:
    """A CIFAR batch file -> dict with ``bytes`` keys (``b'data'``, ``b'labels'``/``b'fine_labels'``...)."""
    obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    if not isinstance(obj, dict):
        raise EvalSourceError("not a CIFAR batch (expected a dict)")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _cifar_file(fs, root: str) -> tuple[str, str | None]:
    """(batch file, meta file or None) for a CIFAR directory or a batch file path."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        base = root.rsplit("/", 1)[-1]
        meta_name = CIFAR_META_FILES.get(base, ("batches.meta", None))[0]
        meta = root.rsplit("/", 1)[0] + "/" + meta_name if "/" in root else meta_name
        return root, meta if storage.exists(fs, meta) else None
    for name in CIFAR_TEST_FILES:
        path = f"{root}/{name}"
        if storage.exists(fs, path):
            meta = f"{root}/{CIFAR_META_FILES[name][0]}"
            return path, meta if storage.exists(fs, meta) else None
    raise EvalSourceError(f"{root}: no CIFAR test_batch / test file")


def _is_cifar(fs, root: str) -> bool:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        name = root.rsplit("/", 1)[-1]
        return name in CIFAR_TEST_FILES or name.startswith("data_batch_") or name == "train"
    return any(storage.exists(fs, f"{root}/{n}") for n in CIFAR_TEST_FILES) and (
        storage.exists(fs, f"{root}/batches.meta") or storage.exists(fs, f"{root}/meta"))


def _plan_cifar(fs, root: str) -> EvalPlan:
    path, meta = _cifar_file(fs, root)
    batch = load_cifar_pickle(storage.read_bytes(fs, path))
    n = len(batch[b"data"])
    classes = None
    if meta:
        m = load_cifar_pickle(storage.read_bytes(fs, meta))
        key = b"fine_label_names" if b"fine_label_names" in m else b"label_names"
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in m.get(key, [])] or None
    units = [{"kind": "cifar", "path": path, "start": s, "stop": min(n, s + _UNIT_CIFAR_ROWS)}
             for s in range(0, n, _UNIT_CIFAR_ROWS)]
    return EvalPlan("cifar", units, classes)


def _read_cifar(fs, unit: dict) -> Iterator[EvalImage]:
    batch = load_cifar_pickle(storage.read_bytes(fs, unit["path"]))
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, H, W, C)
    labels = batch.get(b"fine_labels", batch.get(b"labels"))
    name = unit["path"].rsplit("/", 1)[-1]
    uri = storage.to_uri(fs, unit["path"])
    for i in range(unit["start"], unit["stop"]):
        buf = io.BytesIO()
        Image.fromarray(data[i]).save(buf, "PNG", compress_level=1)
        yield EvalImage(f"{name}:{i}", f"{uri}#index={i}", int(labels[i]) if labels is not None else None,
                        buf.getvalue())


# ---------------------------------------------------------------- shard directories

def _plan_shards(fs, root: str) -> EvalPlan:
    try:
        manifest = schema.parse_manifest(storage.read_bytes(fs, f"{root}/{schema.MANIFEST_NAME}"),
                                         storage.to_uri(fs, f"{root}/{schema.MANIFEST_NAME}"))
    except ValueError as exc:
        raise EvalSourceError(str(exc)) from None
    units = [{"kind": "shard", "path": f"{root}/{s['name']}", "prefix": manifest.get("source") or ""}
             for s in manifest.get("shards", []) if s.get("rows")]
    return EvalPlan("shards", units, manifest.get("classes"))


def _read_shard(fs, unit: dict) -> Iterator[EvalImage]:
    with fs.open_input_file(unit["path"]) as f:
        table = pq.read_table(f, columns=["source", "label", "image"])
    prefix = unit["prefix"].rstrip("/") + "/" if unit["prefix"] else None
    for src, label, data in zip(*(table.column(c).to_pylist() for c in ("source", "label", "image"))):
        eid = src[len(prefix):] if prefix and src.startswith(prefix) else src
        yield EvalImage(eid, src, label, data)


# ---------------------------------------------------------------- whatever `vitray shard` reads

def _plan_files(name: str, src: str, options: StorageOptions, out: str) -> EvalPlan:
    from vitray.pipeline import sources as shard_sources
    from vitray.pipeline.shard import ShardConfig

    # ShardConfig is the documented description of a source; dst is never written to.
    cfg = ShardConfig(src=src, dst=storage.join(out, "_unused", name), storage=options)
    try:
        listing = shard_sources.list_source(cfg)
    except shard_sources.SourceError as exc:
        raise EvalSourceError(str(exc)) from None
    units: list[dict] = []
    group: list[dict] = []
    for u in listing.units:
        if u["kind"] == "file":
            group.append(u)
            if len(group) == _UNIT_FILES:
                units.append({"kind": "files", "units": group, "src": src})
                group = []
            continue
        if group:
            units.append({"kind": "files", "units": group, "src": src})
            group = []
        units.append({"kind": "files", "units": [u], "src": src})
    if group:
        units.append({"kind": "files", "units": group, "src": src})
    for u in units:
        u["classes"] = listing.classes
    return EvalPlan(listing.kind, units, listing.classes)


def _read_files(fs, unit: dict) -> Iterator[EvalImage]:
    from vitray.pipeline import sources as shard_sources

    src = unit["src"].rstrip("/")
    canonical = src if "://" in src else storage.resolve(src)[1]
    for s in shard_sources.read_units(fs, unit["units"], unit["classes"]):
        eid = s.source[len(canonical) + 1:] if s.source.startswith(canonical + "/") else s.source.rsplit("/", 1)[-1]
        yield EvalImage(eid, s.source, s.label, s.data, s.error)


# ---------------------------------------------------------------- entry points

def plan_eval_set(name: str, src: str, options: StorageOptions, out: str) -> EvalPlan:
    """Decide how to read ``src`` and split it into units (driver side)."""
    fs, root = storage.resolve(src, options)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise EvalSourceError(f"eval set {name!r}: {src} does not exist")
    if storage.exists(fs, f"{root}/{schema.MANIFEST_NAME}"):
        plan = _plan_shards(fs, root)
    elif _is_cifar(fs, root):
        plan = _plan_cifar(fs, root)
    else:
        plan = _plan_files(name, src, options, out)
    if not plan.units:
        raise EvalSourceError(f"eval set {name!r}: no images found in {src}")
    return plan


def read_unit(unit: dict, options: StorageOptions, src: str) -> Iterator[EvalImage]:
    """Records of one unit, in source order (worker side); bad images carry ``error``."""
    fs, _ = storage.resolve(src, options)
    if unit["kind"] == "cifar":
        yield from _read_cifar(fs, unit)
    elif unit["kind"] == "shard":
        yield from _read_shard(fs, unit)
    else:
        yield from _read_files(fs, unit)
