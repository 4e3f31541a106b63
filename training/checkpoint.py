"""Pretraining checkpoints: safetensors + JSON only, committed atomically, with lineage.

A checkpoint is a directory ``<run>/checkpoint-<step:08d>/`` holding::

    model.safetensors       full (unsharded) fp32 weights, timm-style names
    optimizer.safetensors   AdamW moments and step counts, keys "state/<param fqn>/<name>"
    rng.safetensors         torch CPU (and CUDA) generator states of rank 0
    state.json              step, scheduler, reader state, optimizer param groups,
                            python/numpy RNG states, the metrics at this step
    config.json             the resolved PretrainConfig
    lineage.json            corpus manifest (uri + checksum), exclusion files, dedup index
                            versions (digest + eval-set names): what this model is clean against
    COMMIT                  written last: step + size and sha256 of every file above

Loading never unpickles: tensors come from safetensors, everything else from JSON. A
directory without a ``COMMIT`` whose checksums match is incomplete and never used, so a
writer killed half-way (or an object store that lists half an upload) cannot corrupt a
resume. Which checkpoints to keep is Ray Train's ``CheckpointConfig(num_to_keep)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import time

import numpy as np
import pyarrow.fs as pafs
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vitray import storage
from vitray.pipeline.schema import MANIFEST_NAME, checksum, parse_manifest

FORMAT = "vitray-checkpoint"
FORMAT_VERSION = 1
COMMIT_NAME = "COMMIT"
DIR_RE = re.compile(r"^checkpoint-(\d{8})$")


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint directory lacks its COMMIT marker or a file does not match it."""


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


@dataclasses.dataclass
class TrainState:
    """Everything a resume needs, as loaded from a checkpoint (tensors on CPU)."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict  # torch optimizer state_dict layout; state keyed like when saved
    scheduler: dict
    reader: dict
    rng: dict
    config: dict
    lineage: dict
    metrics: dict
    world_size: int


# ---------------------------------------------------------------- RNG

def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of the python, numpy and torch generator states."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    js = {"python": [version, list(mt), gauss],
          "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return js, tensors


def restore_rng(rng: dict) -> None:
    version, mt, gauss = rng["python"]
    random.setstate((version, tuple(mt), gauss))
    n = rng["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- (de)serialisation

def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _split_optimizer(optim_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (tensors, JSON). Keys may be param indices or FQNs."""
    tensors, extra, key_types = {}, {}, {}
    for key, per_param in optim_state["state"].items():
        key_types[str(key)] = "int" if isinstance(key, int) else "str"
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{key}/{name}"] = _cpu(value)
            else:
                extra.setdefault(str(key), {})[name] = value
    groups = json.loads(json.dumps(optim_state["param_groups"]))  # tuples -> lists
    return tensors, {"param_groups": groups, "key_types": key_types, "extra_state": extra}


def _join_optimizer(tensors: dict[str, torch.Tensor], js: dict) -> dict:
    state: dict = {}
    for flat, value in tensors.items():
        key, name = flat[len("state/"):].rsplit("/", 1)
        state.setdefault(key, {})[name] = value
    for key, extra in js.get("extra_state", {}).items():
        state.setdefault(key, {}).update(extra)
    typed = {(int(k) if js["key_types"].get(k) == "int" else k): v for k, v in state.items()}
    groups = []
    for g in js["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": typed, "param_groups": groups}


def serialize(*, step: int, model: dict[str, torch.Tensor], optimizer: dict, scheduler: dict,
              reader: dict, config: dict, lineage: dict, metrics: dict | None = None,
              world_size: int = 1) -> dict[str, bytes]:
    """All checkpoint files (name -> bytes) except COMMIT."""
    optim_tensors, optim_js = _split_optimizer(optimizer)
    rng_js, rng_tensors = capture_rng()
    state = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "world_size": world_size,
             "scheduler": scheduler, "reader": reader, "optimizer": optim_js, "rng": rng_js,
             "metrics": {k: (v if isinstance(v, (int, str, bool)) or (isinstance(v, float) and np.isfinite(v))
                             else str(v)) for k, v in (metrics or {}).items()}}
    meta = {"format": FORMAT, "step": str(step)}
    return {
        "model.safetensors": st_save({k: _cpu(v) for k, v in model.items()}, metadata=meta),
        "optimizer.safetensors": st_save(optim_tensors, metadata=meta),
        "rng.safetensors": st_save(rng_tensors, metadata=meta),
        "state.json": json.dumps(state, indent=1).encode(),
        "config.json": json.dumps(config, indent=1, sort_keys=True).encode(),
        "lineage.json": json.dumps(lineage, indent=1, sort_keys=True).encode(),
    }


def commit_record(step: int, files: dict[str, bytes]) -> bytes:
    return json.dumps({
        "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                  for name, data in sorted(files.items())},
    }, indent=1).encode()


def write_local(directory: str, step: int, files: dict[str, bytes]) -> None:
    """Write a complete checkpoint (files, then COMMIT) into a local directory."""
    os.makedirs(directory, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    with open(os.path.join(directory, COMMIT_NAME), "wb") as f:
        f.write(commit_record(step, files))


def upload(local_dir: str, fs: pafs.FileSystem, dest: str) -> None:
    """Copy a committed local checkpoint to ``(fs, dest)``: stale files go first, COMMIT last.

    Each object is written atomically (rename locally, single PUT on S3), and COMMIT
    only after all others, so any reader that sees COMMIT sees the complete set.
    """
    if storage.exists(fs, dest):
        fs.delete_dir_contents(dest, missing_dir_ok=True)  # a killed earlier attempt's leftovers
    fs.create_dir(dest, recursive=True)
    names = sorted(os.listdir(local_dir))
    if COMMIT_NAME not in names:
        raise IncompleteCheckpointError(f"{local_dir} has no {COMMIT_NAME}; refusing to upload it")
    for name in [n for n in names if n != COMMIT_NAME] + [COMMIT_NAME]:
        with open(os.path.join(local_dir, name), "rb") as f:
            storage.write_bytes_atomic(fs, f"{dest}/{name}", f.read())


def read_files(fs: pafs.FileSystem, path: str) -> dict[str, bytes]:
    """The checkpoint's files after verifying them against COMMIT (else IncompleteCheckpointError)."""
    commit_path = f"{path}/{COMMIT_NAME}"
    if not storage.exists(fs, commit_path):
        raise IncompleteCheckpointError(f"{path}: no {COMMIT_NAME} marker (partially written checkpoint)")
    record = json.loads(storage.read_bytes(fs, commit_path))
    files = {}
    for name, expect in record["files"].items():
        try:
            data = storage.read_bytes(fs, f"{path}/{name}")
        except (FileNotFoundError, OSError) as exc:
            raise IncompleteCheckpointError(f"{path}: {name} missing ({exc})") from None
        if len(data) != expect["bytes"] or hashlib.sha256(data).hexdigest() != expect["sha256"]:
            raise IncompleteCheckpointError(f"{path}: {name} does not match its {COMMIT_NAME} checksum")
        files[name] = data
    return files


def deserialize(files: dict[str, bytes]) -> TrainState:
    state = json.loads(files["state.json"])
    if state.get("format") != FORMAT or state.get("version") != FORMAT_VERSION:
        raise IncompleteCheckpointError(f"not a {FORMAT} v{FORMAT_VERSION} checkpoint")
    rng = dict(state["rng"])
    rng.update(st_load(files["rng.safetensors"]))
    return TrainState(
        step=int(state["step"]),
        model=st_load(files["model.safetensors"]),
        optimizer=_join_optimizer(st_load(files["optimizer.safetensors"]), state["optimizer"]),
        scheduler=state["scheduler"], reader=state["reader"], rng=rng,
        config=json.loads(files["config.json"]), lineage=json.loads(files["lineage.json"]),
        metrics=state.get("metrics", {}), world_size=int(state.get("world_size", 1)),
    )


def load(fs: pafs.FileSystem, path: str) -> TrainState:
    """Load and verify the checkpoint at ``(fs, path)``."""
    return deserialize(read_files(fs, path))


def load_uri(uri: str, options: storage.StorageOptions | None = None) -> TrainState:
    fs, path = storage.resolve(uri, options)
    return load(fs, path)


def is_committed(fs: pafs.FileSystem, path: str) -> bool:
    try:
        read_files(fs, path)
        return True
    except IncompleteCheckpointError:
        return False


def list_checkpoints(fs: pafs.FileSystem, run_path: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every checkpoint directory under the run, committed or not, by step."""
    infos = fs.get_file_info(pafs.FileSelector(run_path, recursive=False, allow_not_found=True))
    out = []
    for info in infos:
        m = DIR_RE.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            out.append((int(m.group(1)), info.path))
    return sorted(out)


def has_commit(fs: pafs.FileSystem, path: str) -> bool:
    """Cheap check (no checksums): the COMMIT marker exists."""
    return storage.exists(fs, f"{path}/{COMMIT_NAME}")


def latest_committed(fs: pafs.FileSystem, run_path: str, before: int | None = None) -> tuple[int, str] | None:
    """Newest complete checkpoint (optionally with step < ``before``), or None."""
    for step, path in reversed(list_checkpoints(fs, run_path)):
        if (before is None or step < before) and is_committed(fs, path):
            return step, path
    return None


# ---------------------------------------------------------------- lineage

def _eval_set_names(manifest: dict) -> list[str]:
    """Eval-set names of a dedup index manifest (``eval_sets``: names or {"name": ...} records)."""
    sets = manifest.get("eval_sets") or manifest.get("sets") or []
    if isinstance(sets, dict):
        return sorted(sets)
    return sorted(s["name"] if isinstance(s, dict) else str(s) for s in sets)


def data_lineage(shards: str, exclude: list[str], dedup_indexes: list[str],
                 options: storage.StorageOptions | None = None) -> dict:
    """What the training data is: corpus manifest, exclusions, dedup index versions.

    ``clean_against`` lists the eval sets whose near-duplicates the applied exclusions
    removed, so any checkpoint can say which evaluations it is valid for.
    """
    manifest_uri = storage.join(shards, MANIFEST_NAME)
    fs, path = storage.resolve(manifest_uri, options)
    raw = storage.read_bytes(fs, path)
    manifest = parse_manifest(raw, manifest_uri)  # the one shard-manifest check (kind, schema version)
    out = {
        "corpus": {"uri": shards, "manifest_checksum": checksum(raw),
                   "samples": manifest.get("counts", {}).get("written"),
                   "shards": len(manifest.get("shards", [])), "classes": manifest.get("classes")},
        "exclusions": [],
        "dedup_indexes": [],
    }
    for uri in exclude:
        fs, path = storage.resolve(uri, options)
        out["exclusions"].append({"uri": uri, "checksum": checksum(storage.read_bytes(fs, path))})
    clean: set[str] = set()
    for uri in dedup_indexes:
        fs, path = storage.resolve(uri, options)
        raw = storage.read_bytes(fs, path)
        index = json.loads(raw)
        names = _eval_set_names(index)
        clean.update(names)
        # The index's own content digest identifies its version (same images, views and hash
        # settings -> same digest); the manifest file's checksum pins the exact file read.
        out["dedup_indexes"].append({"uri": uri, "digest": index.get("digest") or checksum(raw),
                                     "manifest_checksum": checksum(raw), "eval_sets": names,
                                     "version": index.get("version") or index.get("created")})
    out["clean_against"] = sorted(clean)
    return out
