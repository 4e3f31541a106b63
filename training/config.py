"""Typed configuration of a pretraining run, with named recipes and their tiny twins.

A run is fully described by :class:`PretrainConfig`; ``vitray pretrain`` resolves it as
recipe <- YAML file <- ``--set a.b=c`` overrides (see :mod:`vitray.config`). Everything
that can be checked without starting a worker is checked here, in ``__post_init__``, so
a bad config fails before Ray starts, with an error that names the field:

    >>> load_pretrain_config("tiny", overrides={"model": {"patch_size": 5}})
    ConfigError: model.patch_size: 5 does not divide img_size 32

Recipes (``RECIPES``) follow big_vision's habit: every production recipe has a tiny
twin that tests and the demo run, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from vitray.config import ConfigError, check, from_dict, load, merge, to_dict
from vitray.storage import StorageOptions
from vitray.training.vit import ViTConfig


@dataclasses.dataclass
class DataConfig:
    """Where training samples come from: a shard directory minus dedup's exclusions."""

    shards: str = ""
    """URI of a shard directory written by ``vitray shard`` (holds ``_manifest.json``)."""
    exclude: list[str] = dataclasses.field(default_factory=list)
    """Exclusion files (dedup's ``exclude.txt`` or Parquet with ``sample_id``) applied by the reader."""
    dedup_indexes: list[str] = dataclasses.field(default_factory=list)
    """Manifests of the dedup indexes the exclusions came from (recorded in checkpoint lineage)."""
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)
    """Endpoint of the object store holding the shards (no credentials)."""
    multi_label: bool = False
    """Train on the ``labels`` list column (multi-hot targets) instead of ``label``."""
    reader: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra :class:`vitray.pipeline.reader.ReaderConfig` fields (augmentation, task sizes, ...)."""

    def __post_init__(self):
        from vitray.pipeline.reader import ReaderConfig

        known = {f.name for f in dataclasses.fields(ReaderConfig)}
        for key in self.reader:
            check(key in known, f"reader.{key}", f"unknown ReaderConfig field (known: {', '.join(sorted(known))})")
            check(key not in ("shards", "exclude", "image_size", "train", "seed", "storage", "multi_label",
                              "num_classes"), f"reader.{key}",
                  "is set by the pretraining config itself (data.* / model.img_size / seed)")


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warmup then linear or cosine decay (ViT paper settings by default)."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay; applied to matrices only (not biases, norms, tokens, pos-embeds)."""
    warmup_steps: int = 10_000
    decay: str = "linear"
    """``linear`` | ``cosine`` | ``constant`` after warmup."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of ``lr``."""
    clip_norm: float = 1.0
    """Global gradient-norm clip; 0 disables."""

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.decay in ("linear", "cosine", "constant"), "decay",
              f"must be linear, cosine or constant, got {self.decay!r}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.clip_norm >= 0, "clip_norm", "must be >= 0 (0 disables clipping)")


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 1000
    """Save every N optimizer steps (and always at the last step)."""
    keep: int = 3
    """Keep the newest K complete checkpoints in the run directory."""

    def __post_init__(self):
        check(self.every >= 1, "every", "must be >= 1")
        check(self.keep >= 1, "keep", "must be >= 1")


@dataclasses.dataclass
class ScalingConfig:
    """How many Ray Train workers and what each one reserves."""

    num_workers: int = 1
    use_gpu: bool = False
    """One GPU per worker (NCCL); otherwise CPU workers (gloo)."""
    resources_per_worker: dict[str, float] | None = None
    """e.g. ``{"CPU": 0.5}``: leave CPUs for the reader's Ray Data tasks on small machines."""
    max_failures: int = 3
    """Automatic restarts of the worker group after a worker/node failure (-1: unlimited)."""
    placement_strategy: str = "PACK"
    """Ray placement of the workers: PACK (fewest nodes), SPREAD, STRICT_PACK or STRICT_SPREAD."""

    def __post_init__(self):
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.max_failures >= -1, "max_failures", "must be >= -1")
        check(self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), "placement_strategy",
              f"must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.placement_strategy!r}")


@dataclasses.dataclass
class RunConfig:
    """Where the run lives. Re-running with the same name and storage resumes it."""

    name: str = ""
    """Run name; the run directory is ``<storage_path>/<name>``. Empty: a timestamped name."""
    storage_path: str = "~/vitray-runs"
    """Local path or ``s3://bucket/prefix`` / ``gs://``: checkpoints and logs go here."""
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)
    log_interval: int = 10
    """Write metrics (JSONL, TensorBoard, console) every N steps."""

    def __post_init__(self):
        check("/" not in self.name and not self.name.startswith("."), "name",
              f"must be a plain directory name, got {self.name!r}")
        check(self.log_interval >= 1, "log_interval", "must be >= 1")


@dataclasses.dataclass
class PretrainConfig:
    model: ViTConfig = dataclasses.field(default_factory=lambda: ViTConfig(variant="B/16"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    global_batch_size: int = 4096
    """Samples per optimizer step, independent of the worker count."""
    micro_batch_size: int = 64
    """Samples per worker per forward/backward; accumulation makes up the rest."""
    steps: int = 100_000
    """Total optimizer steps."""
    loss: str = "softmax"
    """``softmax`` cross-entropy, or ``sigmoid`` binary cross-entropy (multi-label corpora)."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on GPU, fp32 on CPU) | ``bf16`` | ``fp32``."""
    compile: bool = False
    """``torch.compile`` the model."""
    strategy: str = "ddp"
    """``ddp`` (replicated weights) | ``fsdp2`` (``fully_shard`` per block, for models that do not fit)."""
    deterministic: bool = True
    """``torch.use_deterministic_algorithms``; on CPU a resumed run is then bit-identical."""
    seed: int = 0
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self):
        # Patch vs image size, heads vs width and unknown variants are ViTConfig's own
        # checks; from_dict prefixes them, so they surface as model.patch_size etc.
        check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        per_step = self.scaling.num_workers * self.micro_batch_size
        check(self.global_batch_size >= 1 and self.global_batch_size % per_step == 0, "global_batch_size",
              f"must be a multiple of scaling.num_workers x micro_batch_size "
              f"({self.scaling.num_workers} x {self.micro_batch_size} = {per_step}), got {self.global_batch_size}")
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.loss in ("softmax", "sigmoid"), "loss", f"must be softmax or sigmoid, got {self.loss!r}")
        check(not (self.data.multi_label and self.loss == "softmax"), "loss",
              "data.multi_label needs loss=sigmoid (softmax cross-entropy takes one label per image)")
        check(self.precision in ("auto", "bf16", "fp32"), "precision",
              f"must be auto, bf16 or fp32, got {self.precision!r}")
        check(self.strategy in ("ddp", "fsdp2"), "strategy", f"must be ddp or fsdp2, got {self.strategy!r}")
        check(self.optim.warmup_steps <= self.steps, "optim.warmup_steps",
              f"must be <= steps ({self.steps}), got {self.optim.warmup_steps}")

    @property
    def grad_accum_steps(self) -> int:
        """Micro-steps per optimizer step on each worker."""
        return self.global_batch_size // (self.scaling.num_workers * self.micro_batch_size)


# ---------------------------------------------------------------- recipes

def vit_b16_i21k() -> PretrainConfig:
    """ViT-B/16 on ImageNet-21k as in the paper: batch 4096, AdamW(0.9, 0.999), wd 0.1,
    10k warmup steps then linear decay, ~90 epochs (14.2M images / 4096 ~ 3.5k steps/epoch)."""
    return PretrainConfig(
        model=ViTConfig(variant="B/16", img_size=224, num_classes=21843, head="pretrain"),
        optim=OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=10_000, decay="linear"),
        global_batch_size=4096, micro_batch_size=128, steps=312_000,
        precision="auto", compile=True, deterministic=False,
        checkpoint=CheckpointConfig(every=2000, keep=3),
        scaling=ScalingConfig(num_workers=32, use_gpu=True),
        run=RunConfig(name="vit-b16-i21k", log_interval=50),
    )


def vit_b16_i1k() -> PretrainConfig:
    """ViT-B/16 from scratch on ImageNet-1k (paper Table 3: 300 epochs, lr 3e-3, cosine is common)."""
    cfg = vit_b16_i21k()
    return dataclasses.replace(
        cfg, model=ViTConfig(variant="B/16", img_size=224, num_classes=1000, head="pretrain"),
        optim=OptimConfig(lr=3e-3, weight_decay=0.1, warmup_steps=10_000, decay="cosine"),
        steps=94_000, run=RunConfig(name="vit-b16-i1k", log_interval=50))


def tiny() -> PretrainConfig:
    """The tiny twin of the recipes: a 2-block ViT on 32x32 images, 2 CPU workers, seconds per run."""
    return PretrainConfig(
        model=ViTConfig(variant="Ti/16", depth=2, embed_dim=32, num_heads=2, patch_size=8,
                        img_size=32, num_classes=10, head="pretrain"),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, decay="cosine"),
        data=DataConfig(reader={"num_cpus_per_task": 0.5}),  # fits beside 2 x 0.5-CPU workers
        global_batch_size=16, micro_batch_size=4, steps=8,
        precision="fp32", compile=False, deterministic=True, seed=0,
        checkpoint=CheckpointConfig(every=2, keep=2),
        scaling=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}, max_failures=2),
        run=RunConfig(name="tiny", storage_path="~/vitray-runs", log_interval=1),
    )


RECIPES: dict[str, Callable[[], PretrainConfig]] = {
    "vit-b16-i21k": vit_b16_i21k,
    "vit-b16-i1k": vit_b16_i1k,
    "tiny": tiny,
}


def load_pretrain_config(recipe: str | None = "tiny", path: str | None = None,
                         overrides: dict | None = None) -> PretrainConfig:
    """Resolve recipe <- YAML at ``path`` <- ``overrides`` (nested dict) into a validated config."""
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError("recipe", f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
    base = RECIPES[recipe]() if recipe else None
    if base is None:
        return load(PretrainConfig, path=path, overrides=overrides)
    user: dict = {}
    if path:
        import yaml

        with open(path) as f:
            user = merge(user, yaml.safe_load(f) or {})
    if overrides:
        user = merge(user, overrides)
    data = to_dict(base)
    new_variant = (user.get("model") or {}).get("variant")
    if new_variant is not None and new_variant != base.model.variant:
        # The recipe's width/depth/heads/patch came from its own variant; a new variant
        # must fill them again, so drop every field ViTConfig derives (default None).
        derived = {f.name for f in dataclasses.fields(ViTConfig) if f.default is None}
        data["model"] = {k: v for k, v in data["model"].items() if k not in derived}
    return from_dict(PretrainConfig, merge(data, user))
