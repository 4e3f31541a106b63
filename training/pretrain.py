"""The pretraining driver: validate, then run :mod:`vitray.training.loop` on Ray Train.

How a run starts (big_vision's order): resume this run's own latest complete
checkpoint > from scratch. "This run" is ``<run.storage_path>/<run.name>``: re-running
the same command after any interruption continues it (Ray Train V2 keeps the list of
reported checkpoints in the run directory and hands the latest to the workers via
``ray.train.get_checkpoint()``), and worker or node failures are retried in place up
to ``scaling.max_failures`` times.

Everything checkable without a worker is checked first, so a bad config, a missing
corpus or a resume against a different corpus fails before Ray starts anything, with a
:class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from vitray import storage
from vitray.config import ConfigError, check, dump_yaml, to_dict
from vitray.pipeline.schema import load_manifest
from vitray.training import checkpoint as ckpt
from vitray.training.config import PretrainConfig

log = logging.getLogger(__name__)

FAULT_ENV = "VITRAY_TEST_FAULT"
"""Test-only fault injection, a JSON object passed to every worker, e.g.
``{"action": "kill", "rank": 1, "step": 5, "marker": "/tmp/once"}`` (SIGKILL that worker
after step 5), ``"pause"`` (sleep after the step, ``"seconds"``) or ``"nan"`` (poison the
loss at that step). With ``marker`` it fires only while the marker file does not exist."""


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss or gradient norm became NaN/inf."""


@dataclasses.dataclass
class PretrainResult:
    run_uri: str
    """``<storage_path>/<name>``: checkpoints, logs, config."""
    step: int
    checkpoint: str | None
    """URI of the final checkpoint."""
    metrics: dict
    lineage: dict


def data_lineage_checked(cfg: PretrainConfig) -> dict:
    """Corpus/exclusion/dedup lineage, raising ConfigError naming the field that cannot be read."""
    d = cfg.data
    check(bool(d.shards), "data.shards", "is required (a shard directory written by `vitray shard`)")
    try:
        load_manifest(d.shards, d.storage)  # complete, a shard directory, a schema the reader knows
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError("data.shards", str(exc)) from None
    for i, uri in enumerate(d.exclude):
        fs, path = storage.resolve(uri, d.storage)
        check(storage.exists(fs, path), f"data.exclude[{i}]", f"{uri} does not exist")
    for i, uri in enumerate(d.dedup_indexes):
        fs, path = storage.resolve(uri, d.storage)
        check(storage.exists(fs, path), f"data.dedup_indexes[{i}]", f"{uri} does not exist")
        try:
            json.loads(storage.read_bytes(fs, path))
        except ValueError:
            raise ConfigError(f"data.dedup_indexes[{i}]", f"{uri} is not a JSON index manifest") from None
    lineage = ckpt.data_lineage(d.shards, list(d.exclude), list(d.dedup_indexes), d.storage)
    classes = lineage["corpus"]["classes"]
    if classes and cfg.loss == "softmax":
        check(cfg.model.num_classes >= len(classes), "model.num_classes",
              f"the corpus has {len(classes)} classes, the model head only {cfg.model.num_classes}")
    return lineage


def check_resume(cfg: PretrainConfig, lineage: dict, fs, run_path: str) -> int:
    """Step of the checkpoint a re-run would resume from (0 if none); refuse mismatches.

    Resuming must see the same samples: a different corpus or exclusion list would make
    the reader's saved position meaningless, so that needs a new run name.
    """
    # COMMIT present is enough here; the workers verify every checksum when they load it.
    latest = [(step, path) for step, path in ckpt.list_checkpoints(fs, run_path) if ckpt.has_commit(fs, path)]
    if not latest:
        return 0
    step, path = latest[-1]
    saved = json.loads(storage.read_bytes(fs, f"{path}/lineage.json"))
    check(saved["corpus"]["manifest_checksum"] == lineage["corpus"]["manifest_checksum"], "run.name",
          f"run {cfg.run.name!r} was trained on a different corpus ({saved['corpus']['uri']}); "
          "use a new run name")
    check([e["checksum"] for e in saved["exclusions"]] == [e["checksum"] for e in lineage["exclusions"]],
          "data.exclude", f"run {cfg.run.name!r} was trained with different exclusion files; use a new run name")
    state = json.loads(storage.read_bytes(fs, f"{path}/state.json"))
    if state.get("world_size") != cfg.scaling.num_workers:
        log.warning("resuming step %d with %d workers (saved with %s): the data order is the same, "
                    "but results are no longer bit-identical to an uninterrupted run",
                    step, cfg.scaling.num_workers, state.get("world_size"))
    check(step <= cfg.steps, "steps", f"run {cfg.run.name!r} is already at step {step}, past steps={cfg.steps}")
    return step


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Pretrain (or resume) ``cfg.run.name`` on Ray Train; returns the final checkpoint."""
    if not cfg.run.name:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(
            cfg.run, name=time.strftime("pretrain-%Y%m%d-%H%M%S")))
    cfg = with_absolute_data_paths(cfg)
    lineage = data_lineage_checked(cfg)
    fs, base = storage.resolve(cfg.run.storage_path, cfg.run.storage)
    run_path = f"{base}/{cfg.run.name}"
    run_uri = storage.to_uri(fs, run_path)
    start = check_resume(cfg, lineage, fs, run_path)
    fault = json.loads(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vitray.training.loop import STATUS_NONFINITE, train_loop_per_worker

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS or a local runtime
    storage.write_bytes_atomic(fs, f"{run_path}/config.yaml", dump_yaml(cfg).encode())
    log.info("pretrain %s: %s, step %d/%d, %d x %s workers, clean against %s", cfg.run.name, run_uri, start,
             cfg.steps, cfg.scaling.num_workers, "GPU" if cfg.scaling.use_gpu else "CPU",
             lineage["clean_against"] or "no eval sets")
    local = scheme_is_local(cfg.run.storage_path)
    s = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "lineage": lineage, "fault": fault},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=s.resources_per_worker,
                                     placement_strategy=s.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=base,
            # pyarrow fs + scheme-less path for object stores (this is how the endpoint reaches Ray)
            storage_filesystem=None if local else fs,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
    )
    result = trainer.fit()
    metrics = dict(result.return_value or {})  # rank 0's return value: {"step", "status", ...}
    final = storage.to_uri(fs, result.checkpoint.path) if result.checkpoint else None
    if metrics.get("status") == STATUS_NONFINITE:
        raise NonFiniteLossError(
            f"non-finite loss at step {metrics['step']} (loss={metrics.get('loss')}, "
            f"grad_norm={metrics.get('grad_norm')}, lr={metrics.get('lr')}); training stopped without "
            f"updating the weights. Last good checkpoint: {final or 'none'}")
    return PretrainResult(run_uri=run_uri, step=int(metrics.get("step", start)), checkpoint=final,
                          metrics=metrics, lineage=lineage)


def with_absolute_data_paths(cfg: PretrainConfig) -> PretrainConfig:
    """Local data paths made absolute here, in the driver: Ray Train workers run in a
    directory of their own, where a relative ``data.shards`` would name nothing."""
    d = cfg.data
    data = dataclasses.replace(d, shards=storage.absolute(d.shards) if d.shards else d.shards,
                               exclude=[storage.absolute(u) for u in d.exclude],
                               dedup_indexes=[storage.absolute(u) for u in d.dedup_indexes])
    return dataclasses.replace(cfg, data=data)


def scheme_is_local(uri: str) -> bool:
    return storage.scheme_of(uri) == "file"
