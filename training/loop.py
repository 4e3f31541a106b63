"""The per-worker pretraining loop run by Ray Train (``train_loop_per_worker``).

How a worker starts, in order:

1. Build the model from ``cfg.model`` (same seed on every rank), wrap it for the
   strategy (DDP, or FSDP2 ``fully_shard`` per block), build AdamW + the schedule.
2. Resume: the newest *complete* checkpoint, i.e. ``ray.train.get_checkpoint()`` after
   verifying its COMMIT, or a newer committed one in the run directory (uploaded just
   before a worker died, before the controller took the report; it is then registered
   with Ray so keep-K covers it). Weights, optimizer, schedule, RNG and the reader's
   state come from it. Otherwise from scratch.
3. Build the reader *here*, from the checkpoint's reader state, so automatic retries
   and re-runs continue with exactly the samples an uninterrupted run would see next.

Each optimizer step consumes ``global_batch_size`` samples: ``grad_accum_steps``
micro-batches of ``micro_batch_size`` on each of the ``world_size`` ranks. Randomness is
reseeded per (seed, rank, step), so it does not depend on how many steps this process
has run, which with deterministic kernels and a fixed world size makes a resumed CPU
run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import tempfile
import time

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ray.data
import ray.train
import ray.train.torch
from vitray.config import from_dict, to_dict
from vitray.pipeline.augment import normalize
from vitray.training import checkpoint as ckpt
from vitray.training.config import PretrainConfig
from vitray.training.metrics import IntervalTimer, MetricsLogger, device_peak_flops
from vitray.training.schedule import WarmupDecaySchedule
from vitray.training.vit import create_model, model_flops_per_image

STATUS_DONE = "done"
STATUS_NONFINITE = "nonfinite"


# ---------------------------------------------------------------- model / optimizer

def wrap_model(model: torch.nn.Module, cfg: PretrainConfig, device: torch.device, world_size: int):
    """DDP or FSDP2 around a single-device model. Returns the wrapped module."""
    if cfg.strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if _use_bf16(cfg, device):
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for block in model.blocks:
            fully_shard(block, **kwargs)
        return fully_shard(model, **kwargs)
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices only, not biases, norms, class token or pos-embed."""
    no_decay_names = set()
    inner = getattr(model, "module", model)
    if hasattr(inner, "no_weight_decay"):
        no_decay_names = inner.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name.removeprefix("module.")
        (no_decay if p.ndim < 2 or short in no_decay_names else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the per-tensor loop is the deterministic reference path on CPU.
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             foreach=None if torch.cuda.is_available() else False)


def _use_bf16(cfg: PretrainConfig, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def compute_loss(logits: torch.Tensor, batch: dict, cfg: PretrainConfig) -> torch.Tensor:
    """logits: (B, C). Softmax CE over ``label`` (-1 = unlabelled, ignored), or sigmoid BCE
    summed over classes and averaged over images (big_vision's sigmoid_xent)."""
    logits = logits.float()
    if cfg.loss == "softmax":
        labels = batch["label"]  # (B,)
        valid = (labels >= 0).sum().clamp(min=1)
        return F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / valid
    if "targets" in batch:
        targets = batch["targets"].to(logits.dtype)  # (B, C) multi-hot
    else:
        labels = batch["label"]
        targets = F.one_hot(labels.clamp(min=0), logits.shape[-1]).to(logits.dtype)
        targets = targets * (labels >= 0).unsqueeze(1)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


# ---------------------------------------------------------------- data

def build_reader(cfg: PretrainConfig):
    from vitray.pipeline.reader import ReaderConfig, ShardReader

    # uint8 batches: forward_backward normalises them on the training device.
    options = {"normalize": False, **cfg.data.reader}
    rc = ReaderConfig(shards=cfg.data.shards, exclude=list(cfg.data.exclude), image_size=cfg.model.img_size,
                      train=True, seed=cfg.seed, storage=cfg.data.storage, multi_label=cfg.data.multi_label,
                      num_classes=cfg.model.num_classes if cfg.data.multi_label else None, **options)
    return ShardReader(rc)


def endless_batches(reader, micro_batch: int, rank: int, world_size: int):
    """Micro-batches across epochs. ``iter_batches`` yields the rest of the current epoch and
    moves the reader's state on to the next one itself, so we just call it again."""
    if reader.num_samples < micro_batch * world_size:
        raise RuntimeError(f"the corpus has {reader.num_samples} samples after exclusions, fewer than one "
                           f"micro-step of {micro_batch} x {world_size} workers")
    while True:
        yield from reader.iter_batches(micro_batch, rank=rank, world_size=world_size)


# ---------------------------------------------------------------- resume

def _seed_step(seed: int, rank: int, step: int) -> None:
    """Reseed every generator from (seed, rank, step): randomness independent of history."""
    s = ((seed * 1_000_003 + rank) * 1_000_003 + step) % (2**63 - 1)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def load_resume_checkpoint(fs: pafs.FileSystem, run_path: str) -> tuple[ckpt.TrainState, str, bool] | None:
    """``(state, path, registered)`` of the newest complete checkpoint of the run, or None.

    Usually that is Ray's registered one (``ray.train.get_checkpoint()``). A newer one
    with a valid COMMIT exists when a worker died right after uploading it, before the
    controller took the report: it is complete, so we resume from it (``registered`` is
    then False and the caller hands it to Ray, so that keep-K retention covers it). A
    directory whose files do not match its COMMIT is skipped.
    """
    registered = ray.train.get_checkpoint()
    registered_name = os.path.basename(registered.path) if registered is not None else None
    for step, path in reversed(ckpt.list_checkpoints(fs, run_path)):
        if not ckpt.has_commit(fs, path):
            continue
        try:
            state = ckpt.load(fs, path)  # verifies every file against COMMIT
        except ckpt.IncompleteCheckpointError as exc:
            print(f"[vitray] skipping checkpoint: {exc}", flush=True)
            continue
        return state, path, os.path.basename(path) == registered_name
    return None


def adopt_checkpoint(fs: pafs.FileSystem, path: str, step: int, metrics: dict) -> None:
    """Register an already-persisted checkpoint with Ray Train (all ranks call this)."""
    from ray.train import CheckpointUploadMode

    rank = ray.train.get_context().get_world_rank()
    report = {"step": step, "status": "running",
              **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    ray.train.report(report, checkpoint=ray.train.Checkpoint(path=path, filesystem=fs) if rank == 0 else None,
                     checkpoint_dir_name=os.path.basename(path), checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _count_nodes(world: int) -> int:
    """Number of distinct Ray nodes the workers run on (by node id: several nodes may share an IP)."""
    node_id = ray.get_runtime_context().get_node_id()
    if world == 1:
        return 1
    ids: list = [None] * world
    dist.all_gather_object(ids, node_id)
    return len(set(ids))


def _fault(fault: dict, action: str, step: int, rank: int) -> bool:
    """Test-only fault injection (``VITRAY_TEST_FAULT``, see pretrain.py); fires once per marker."""
    if fault.get("action") != action or fault.get("step") != step or fault.get("rank", 0) != rank:
        return False
    marker = fault.get("marker")
    if marker:
        if os.path.exists(marker):
            return False
        with open(marker, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": step, "rank": rank}))
    return True


# ---------------------------------------------------------------- the loop

def train_loop_per_worker(loop_config: dict) -> dict:
    """Train until ``cfg.steps``; returns (rank 0's is ``Result.return_value``) the final
    ``{"step", "status": "done" | "nonfinite", ...}``."""
    cfg: PretrainConfig = from_dict(PretrainConfig, loop_config["config"])
    lineage: dict = loop_config["lineage"]
    fault: dict = loop_config.get("fault") or {}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    # The reader starts one Ray Data dataset per epoch; their progress bars would bury ours.
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    store = ctx.get_storage()
    fs, run_path = store.storage_filesystem, store.experiment_fs_path

    # 1. model, optimizer, schedule (identical init on every rank)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model).to(device)
    core = wrap_model(model, cfg, device, world)
    optimizer = build_optimizer(core, cfg)
    schedule = WarmupDecaySchedule(optimizer, peak_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                                   total_steps=cfg.steps, decay=cfg.optim.decay,
                                   min_lr_ratio=cfg.optim.min_lr_ratio)

    # 2. resume own checkpoint > from scratch
    reader = build_reader(cfg)
    step = 0
    resume = load_resume_checkpoint(fs, run_path)
    if resume is not None:
        state, path, registered = resume
        _load_train_state(core, optimizer, state)
        schedule.load_state_dict(state.scheduler)
        reader.load_state_dict(state.reader)
        ckpt.restore_rng(state.rng)
        step = state.step
        if not registered:
            adopt_checkpoint(fs, path, step, state.metrics)
        del state  # the full state dicts are now inside the model and optimizer
    train_model = torch.compile(core) if cfg.compile else core

    log = MetricsLogger(_log_dir(fs, run_path), start_step=step, total_steps=cfg.steps,
                        enabled=rank == 0)
    nodes = _count_nodes(world)
    if rank == 0:
        log.event("resume" if resume else "start", step=step, world_size=world, nodes=nodes, device=str(device),
                  checkpoint=resume[1] if resume else None, samples=reader.num_samples,
                  clean_against=lineage.get("clean_against"))
    if step >= cfg.steps:
        log.close()
        return {"step": step, "status": STATUS_DONE}

    batches = endless_batches(reader, cfg.micro_batch_size, rank, world)
    flops = model_flops_per_image(cfg.model, training=True)
    peak = device_peak_flops(device)
    timer = IntervalTimer()

    while step < cfg.steps:
        _seed_step(cfg.seed, rank, step)
        lr = schedule.apply()
        poison = _fault(fault, "nan", step + 1, rank)
        out = forward_backward(train_model, core, lambda: next(batches), cfg, device, world, poison=poison,
                               mean_std=(reader.cfg.mean, reader.cfg.std))
        loss_value, grad_norm = out.loss, out.grad_norm
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            # Every rank sees the same all-reduced values, so all stop here together; the
            # weights are not updated and no checkpoint is written past the last good one.
            log.event("nonfinite", step=step + 1, loss=loss_value, grad_norm=grad_norm, lr=lr)
            log.close()
            return {"step": step + 1, "status": STATUS_NONFINITE, "loss": loss_value,
                    "grad_norm": grad_norm, "lr": lr}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.advance()
        step += 1
        timer.add_step(loss_value, cfg.global_batch_size, out.data_wait)

        metrics = None
        if step % cfg.run.log_interval == 0 or step == cfg.steps:
            metrics = {"lr": lr, "grad_norm": grad_norm, **timer.summary(flops, peak and peak * world)}
            log.log(step, metrics)
            timer.reset()
        if step % cfg.checkpoint.every == 0 or step == cfg.steps:
            t0 = time.perf_counter()
            save_checkpoint(core, optimizer, schedule, reader, cfg, lineage, step, world,
                            {"loss": loss_value, "lr": lr, **(metrics or {})}, log, fs, run_path)
            timer.exclude(time.perf_counter() - t0)  # checkpoint time is not step time
        if _fault(fault, "kill", step, rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if _fault(fault, "pause", step, rank):
            time.sleep(float(fault.get("seconds", 600)))
    log.close()
    return {"step": step, "status": STATUS_DONE, "loss": loss_value}


@dataclasses.dataclass
class StepOutput:
    loss: float
    """Mean loss over the global batch (all-reduced)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    data_wait: float
    """Seconds spent waiting for batches."""


def forward_backward(train_model, core, next_batch, cfg: PretrainConfig, device: torch.device, world: int,
                     poison: bool = False, mean_std: tuple | None = None) -> StepOutput:
    """Accumulate gradients over ``cfg.grad_accum_steps`` micro-batches, all-reduce them
    (on the last one only), clip. The caller steps the optimizer if the result is finite.

    ``train_model`` is what runs forward (maybe compiled); ``core`` the DDP/FSDP module.
    uint8 images are normalised on ``device`` with ``mean_std`` = (mean, std).
    """
    accum = cfg.grad_accum_steps
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if _use_bf16(cfg, device) and cfg.strategy != "fsdp2" else contextlib.nullcontext())
    data_wait = 0.0
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        t0 = time.perf_counter()
        batch = next_batch()
        data_wait += time.perf_counter() - t0
        images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W)
        if images.dtype == torch.uint8:
            images = normalize(images, *mean_std)
        targets = {k: batch[k].to(device, non_blocking=True) for k in ("label", "targets") if k in batch}
        with _grad_sync(core, enabled=micro == accum - 1), autocast:
            logits = train_model(images)  # (B, num_classes)
            loss = compute_loss(logits, targets, cfg) / accum
        if poison:
            loss = loss * float("nan")
        loss.backward()
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    params = [p for p in core.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: DTensor
    return StepOutput(loss=loss_sum.item() / world, grad_norm=float(grad_norm), data_wait=data_wait)


@contextlib.contextmanager
def _grad_sync(model, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _load_train_state(core, optimizer, state: ckpt.TrainState) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    opts = _state_dict_options()
    set_model_state_dict(core, state.model, options=opts)
    set_optimizer_state_dict(core, optimizer, state.optimizer, options=opts)


def save_checkpoint(core, optimizer, schedule, reader, cfg, lineage, step, world, metrics, log, fs, run_path):
    """Gather full state (a collective under FSDP2), write it on rank 0, report it to Ray Train."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _state_dict_options(cpu_offload=True)  # rank 0 receives the full state, others {}
    model_sd = get_model_state_dict(core, options=opts)
    optim_sd = get_optimizer_state_dict(core, optimizer, options=opts)
    rank = ray.train.get_context().get_world_rank()
    name = ckpt.checkpoint_dir_name(step)
    report = {"step": step, "status": STATUS_DONE if step == cfg.steps else "running",
              **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    if rank != 0:
        ray.train.report(report, checkpoint_dir_name=name)
        return
    files = ckpt.serialize(step=step, model=model_sd, optimizer=optim_sd, scheduler=schedule.state_dict(),
                           reader=reader.state_dict(), config=to_dict(cfg), lineage=lineage,
                           metrics=metrics, world_size=world)
    log.flush()
    with tempfile.TemporaryDirectory(prefix="vitray-ckpt-") as tmp:
        ckpt.write_local(tmp, step, files)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name,
                         checkpoint_upload_fn=_upload_fn(log))
    log.event("checkpoint", step=step, path=f"{run_path}/{name}")


def _upload_fn(log: MetricsLogger):
    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        store = ray.train.get_context().get_storage()
        dest = f"{store.experiment_fs_path}/{dir_name}"
        ckpt.upload(checkpoint.path, store.storage_filesystem, dest)
        _sync_logs(log, store.storage_filesystem, store.experiment_fs_path)
        return ray.train.Checkpoint(path=dest, filesystem=store.storage_filesystem)

    return upload


# ---------------------------------------------------------------- logs next to the run

def _log_dir(fs: pafs.FileSystem, run_path: str) -> str:
    """Local directory for metrics: the run's own ``logs/`` on local storage, else a cache
    directory seeded from the run's uploaded logs (so resumed runs append to them)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return os.path.join(run_path, "logs")
    local = os.path.join(tempfile.gettempdir(), "vitray-logs", run_path.replace("/", "__"))
    remote = f"{run_path}/logs"
    if not os.path.exists(os.path.join(local, "metrics.jsonl")) and \
            fs.get_file_info(remote).type == pafs.FileType.Directory:
        pafs.copy_files(remote, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def _sync_logs(log: MetricsLogger, fs: pafs.FileSystem, run_path: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem) or not log.enabled:
        return
    log.flush()
    pafs.copy_files(log.log_dir, f"{run_path}/logs", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
