"""Training-time reader: Parquet shards -> per-rank batches, decoded in Ray Data tasks.

Usage inside a Ray Train worker (or any process attached to Ray)::

    reader = ShardReader(ReaderConfig(shards="s3://bucket/shards", exclude=["s3://.../exclude.txt"]))
    reader.load_state_dict(ckpt["reader"])          # resume, optional
    for batch in reader.iter_batches(batch_size, rank, world_size):  # rest of the current epoch
        ...  # batch["image"]: float32 (B, 3, S, S); batch["label"]: int64 (B,)
        ckpt["reader"] = reader.state_dict()        # counts the batch just yielded

How it works. The sample order of an epoch is a pure function of (seed, epoch,
shard list) (:mod:`vitray.pipeline.order`). For one (epoch, rank), the reader
lists the positions that rank consumes from the current ``sample_in_epoch`` on,
cuts them into chunks of at most ``task_samples`` inside one shuffle window, and
builds ``ray.data.from_items(chunks).map_batches(decode_chunk)``: each task reads
only its rows' row groups (``sample_id``, ``label``, ``labels``, ``image``
columns), decodes at reduced JPEG scale and augments (:mod:`vitray.pipeline.augment`),
with randomness keyed by (seed, epoch, position). ``preserve_order`` keeps the
output in epoch order. Tasks emit uint8 images (4x less object-store traffic than
float32); the consumer normalises each batch with one vectorised op.

Resume state is ``{"epoch", "sample_in_epoch", "seed"}`` (mosaicml/streaming):
a resumed reader lists positions from ``sample_in_epoch``, so skipped samples are
never read or decoded.

Exclusions (dedup's output) are sample ids in text files (one per line) or Parquet
files with a ``sample_id`` column; excluded rows are left out of every order
without rewriting shards. ``num_excluded`` counts matched rows and
``num_exclusions_not_found`` the listed ids that no shard holds.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from vitray.config import check
from vitray.pipeline import augment, images
from vitray.pipeline.decode_task import TaskPlan, decode_chunk, encode_chunk
from vitray.pipeline.order import EpochOrder, Layout, chunk_positions, rank_positions, step_end
from vitray.pipeline.schema import load_manifest
from vitray.storage import StorageOptions, join, read_bytes, resolve, scheme_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReaderConfig:
    """Where the shards are, what to leave out, and how to turn rows into batches."""

    shards: str
    """Shard directory URI (s3://, gs:// or local) holding ``_manifest.json``."""
    exclude: list[str] = dataclasses.field(default_factory=list)
    """Exclusion-file URIs: text (one sample_id per line) or Parquet with a ``sample_id`` column."""
    image_size: int = 224
    """Output side S: images are (3, S, S)."""
    train: bool = True
    """Train: shuffle, RandomResizedCrop + flip, drop the last partial global batch. Eval: resize + centre crop."""
    seed: int = 0
    """Seeds the order and the augmentation."""
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)
    shuffle: bool | None = None
    """Shuffle the order; None = shuffle iff ``train``."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range (fraction of the image)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    hflip: float = 0.5
    """Horizontal-flip probability (train)."""
    crop_pct: float = 0.875
    """Eval centre-crop fraction of the resized shorter side."""
    mean: tuple[float, float, float] = augment.IMAGENET_MEAN
    std: tuple[float, float, float] = augment.IMAGENET_STD
    normalize: bool = True
    """True: "image" is float32, normalised with ``mean``/``std`` on the host. False: it stays
    uint8 and the consumer normalises it after the copy to its device
    (``augment.normalize(x.to(device), mean, std)``, as the pretraining loop does): a quarter
    of the bytes to copy and no float work on the host CPUs, which decode."""
    pin_memory: bool = True
    """Put the batch tensors in page-locked memory when the consuming process has CUDA (ignored
    without it), so that ``.to(device, non_blocking=True)`` is an asynchronous copy that overlaps
    the training step instead of a synchronous one through a staging buffer. Pinning happens in
    Ray Data's collate threads, not in the training step."""
    multi_label: bool = False
    """Also yield "targets": float (B, num_classes) multi-hot from the ``labels`` column."""
    num_classes: int | None = None
    """Required with ``multi_label``."""
    block_rows: int = 256
    """Rows per shuffle block; set to the shards' Parquet row-group size (256 in ``vitray shard``)."""
    window_blocks: int = 16
    """Blocks whose rows are shuffled together; a batch mixes up to this many row groups."""
    task_samples: int = 512
    """Most samples one Ray Data task decodes."""
    num_cpus_per_task: float = 1.0
    """CPUs reserved by each decode task."""
    max_tasks: int | None = None
    """Most decode tasks running at once per (epoch, rank) dataset; None = as many as CPUs allow."""
    prefetch_batches: int = 2
    """Batches Ray Data prepares ahead of the consumer."""
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    """Decompression-bomb limit for decoding."""

    def __post_init__(self):
        check(bool(self.shards), "shards", "must name a shard directory")
        check(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale", f"need 0 < lo <= hi <= 1, got {self.crop_scale}")
        check(0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio", f"need 0 < lo <= hi, got {self.crop_ratio}")
        check(0.0 <= self.hflip <= 1.0, "hflip", f"must be a probability, got {self.hflip}")
        check(0 < self.crop_pct <= 1, "crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        check(len(self.mean) == 3 and len(self.std) == 3, "mean", "mean and std need 3 values (RGB)")
        check(all(s > 0 for s in self.std), "std", f"must be positive, got {self.std}")
        check(not self.multi_label or (self.num_classes or 0) > 0, "num_classes", "required (> 0) with multi_label")
        check(self.block_rows > 0, "block_rows", f"must be positive, got {self.block_rows}")
        check(self.window_blocks > 0, "window_blocks", f"must be positive, got {self.window_blocks}")
        check(self.task_samples > 0, "task_samples", f"must be positive, got {self.task_samples}")
        check(self.num_cpus_per_task > 0, "num_cpus_per_task", "must be positive")
        check(self.max_tasks is None or self.max_tasks > 0, "max_tasks", "must be positive or None")

    @property
    def shuffled(self) -> bool:
        return self.train if self.shuffle is None else self.shuffle


class BatchCollate(NumpyBatchCollateFn):
    """Decoded uint8 numpy batch -> training batch.

    {"image": float32 (B, 3, S, S) normalised (uint8 if not ``normalize``), "label": int64 (B,),
    "sample_id": list[str]} (+ "targets": float32 (B, C) when multi-label; + "position": (B,)
    int64 if ``keep_position``).
    """

    def __init__(self, mean, std, multi_label: bool, keep_position: bool = False, normalize: bool = True,
                 pin_memory: bool = False):
        self.mean, self.std, self.multi_label, self.keep_position = tuple(mean), tuple(std), multi_label, keep_position
        self.normalize = normalize
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinning needs a CUDA context

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        image = (augment.normalize(batch["image"], self.mean, self.std) if self.normalize
                 else torch.from_numpy(np.array(batch["image"])))  # copy: Ray hands out read-only views
        out = {
            "image": image,  # (B, 3, S, S)
            "label": torch.from_numpy(np.array(batch["label"], dtype=np.int64)),  # (B,) copy: Ray hands out read-only views
            "sample_id": [str(s) for s in batch["sample_id"]],
        }
        if self.multi_label:
            out["targets"] = torch.from_numpy(np.array(batch["targets"], dtype=np.float32))  # (B, C)
        if self.pin_memory:
            out.update({k: v.pin_memory() for k, v in out.items() if isinstance(v, torch.Tensor)})
        if self.keep_position:
            out["position"] = np.asarray(batch["position"], dtype=np.int64)
        return out


def read_exclusions(uri: str, storage: StorageOptions) -> list[str]:
    """Sample ids listed in one exclusion file (text, one per line, ``#`` comments; or Parquet)."""
    fs, path = resolve(uri, storage)
    data = read_bytes(fs, path)
    if data[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(data))
        if "sample_id" not in table.column_names:
            raise ValueError(f"{uri}: Parquet exclusion file has no 'sample_id' column (has {table.column_names})")
        return [s for s in table.column("sample_id").to_pylist() if s]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{uri}: exclusion file is neither Parquet nor UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class ShardReader:
    """Epoch-ordered, resumable, per-rank batches over a shard directory. See the module docstring."""

    def __init__(self, cfg: ReaderConfig):
        self.cfg = cfg
        self.manifest = load_manifest(cfg.shards, cfg.storage)
        entries = self.manifest["shards"]
        # Tasks run in other processes (other cwd): local paths must be absolute.
        base = resolve(cfg.shards)[1] if scheme_of(cfg.shards) == "file" else cfg.shards
        self.shard_uris = tuple(join(base, e["name"]) for e in entries)
        self.classes: list[str] | None = self.manifest.get("classes")
        excluded, self.num_excluded, self.num_exclusions_not_found = self._find_excluded()
        self.layout = Layout([e["rows"] for e in entries], excluded, cfg.block_rows)
        self.num_samples = self.layout.num_samples
        self._plan = TaskPlan(
            shard_uris=self.shard_uris, shard_rows=tuple(e["rows"] for e in entries),
            shard_checksums=tuple(e.get("checksum", "") for e in entries), storage=cfg.storage,
            spec=augment.AugmentSpec(cfg.image_size, cfg.train, tuple(cfg.crop_scale), tuple(cfg.crop_ratio),
                                     cfg.hflip, cfg.crop_pct, cfg.max_pixels),
            seed=cfg.seed, epoch=0, multi_label=cfg.multi_label, num_classes=cfg.num_classes)
        self._seed = cfg.seed
        self._epoch = 0
        self._sample_in_epoch = 0
        self._order: EpochOrder | None = None
        # numpy batch of dataset() -> training batch; also a collate_fn for iter_torch_batches.
        self.collate = BatchCollate(cfg.mean, cfg.std, cfg.multi_label, normalize=cfg.normalize,
                                    pin_memory=cfg.pin_memory)

    # ------------------------------------------------------------ exclusions

    def _find_excluded(self) -> tuple[list[np.ndarray], int, int]:
        """Per-shard excluded row indices, rows matched, listed ids not found in any shard."""
        wanted = sorted({sid for uri in self.cfg.exclude for sid in read_exclusions(uri, self.cfg.storage)})
        if not wanted:
            return [np.zeros(0, np.int64) for _ in self.manifest["shards"]], 0, 0
        value_set = pa.array(wanted, pa.string())

        fs, root = resolve(self.cfg.shards, self.cfg.storage)

        def scan(entry: dict) -> tuple[np.ndarray, pa.Array]:
            ids = pq.read_table(root + "/" + entry["name"], columns=["sample_id"], filesystem=fs).column("sample_id")
            mask = pc.is_in(ids, value_set=value_set)
            return np.flatnonzero(mask.to_numpy(zero_copy_only=False)), pc.filter(ids, mask)

        # Only the sample_id column is read; I/O-bound, so threads overlap the requests.
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(scan, self.manifest["shards"]))
        excluded = [rows.astype(np.int64) for rows, _ in results]
        found = {s for _, ids in results for s in ids.to_pylist()}
        num_excluded = int(sum(len(r) for r in excluded))
        not_found = len(wanted) - len(found)
        if not_found:
            log.warning("%d of %d excluded sample ids are not in %s (excluded %d rows)",
                        not_found, len(wanted), self.cfg.shards, num_excluded)
        return excluded, num_excluded, not_found

    # ------------------------------------------------------------ order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global row ids of epoch ``epoch`` in order, (num_samples,) int64.

        A global row id is ``shard offset + row``, shards in manifest order.
        """
        return self._epoch_order(epoch).global_ids()

    def _epoch_order(self, epoch: int) -> EpochOrder:
        if self._order is None or self._order.epoch != epoch or self._order.seed != self._seed:
            self._order = EpochOrder(self.layout, self._seed, epoch, self.cfg.shuffled, self.cfg.window_blocks)
        return self._order

    # ------------------------------------------------------------ Ray Data

    def dataset(self, epoch: int, start: int = 0, stop: int | None = None, rank: int = 0, world_size: int = 1,
                batch_size: int | None = None):
        """The ``ray.data.Dataset`` of what rank ``rank`` consumes of positions ``[start, stop)``.

        Rows: {"image": uint8 (3, S, S), "label": int64, "sample_id": str, "position": int64
        (+ "targets": uint8 (C,))}, in epoch order. ``ds.iter_torch_batches(batch_size=...,
        collate_fn=reader.collate)`` gives the batches :meth:`iter_batches` yields.
        ``batch_size`` (per rank) defines the global steps when ``world_size > 1``.
        """
        order = self._epoch_order(epoch)
        stop = len(order) if stop is None else stop
        if not 0 <= start <= stop <= len(order):
            raise ValueError(f"need 0 <= start <= stop <= {len(order)}, got start={start}, stop={stop}")
        if world_size > 1 and batch_size is None:
            raise ValueError("batch_size is needed to split global steps between ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        positions = rank_positions(start, stop, batch_size or max(1, stop - start), rank, world_size)
        return self._dataset(order, positions)

    def _dataset(self, order: EpochOrder, positions: np.ndarray):
        import ray.data

        items = []
        for chunk in chunk_positions(order, positions, self.cfg.task_samples):
            shards, rows = self.layout.locate(order.global_ids(chunk))
            items.append(encode_chunk(chunk, shards, rows))
        if not items:
            raise ValueError("no samples in the requested range")
        plan = dataclasses.replace(self._plan, seed=self._seed, epoch=order.epoch)
        ds = ray.data.from_items(items, override_num_blocks=len(items))  # one chunk per block -> per task
        ds = ds.map_batches(decode_chunk, batch_size=1, batch_format="numpy", fn_kwargs={"plan": plan},
                            num_cpus=self.cfg.num_cpus_per_task, concurrency=self.cfg.max_tasks)
        # The dataset carries its own copy of the DataContext: this affects only it.
        ds.context.execution_options.preserve_order = True
        return ds

    # ------------------------------------------------------------ iteration + state

    def iter_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        """Yield this rank's batches for the rest of the current epoch, then move to the next epoch.

        Each global step consumes ``batch_size * world_size`` consecutive samples of the
        epoch order; this rank gets its contiguous slice. Train mode drops the last partial
        global step. The state advances before each batch is handed out, so a
        ``state_dict()`` taken while holding a batch resumes after it.
        """
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size/rank/world_size: {batch_size}/{rank}/{world_size}")
        G = batch_size * world_size
        epoch, start = self._epoch, self._sample_in_epoch
        order = self._epoch_order(epoch)
        end = step_end(len(order), start, G, drop_last=self.cfg.train)
        positions = rank_positions(start, end, batch_size, rank, world_size)
        if len(positions):
            ds = self._dataset(order, positions)
            done = 0
            collate = BatchCollate(self.cfg.mean, self.cfg.std, self.cfg.multi_label, keep_position=True,
                                   normalize=self.cfg.normalize, pin_memory=self.cfg.pin_memory)
            # Collation (normalisation) runs in Ray's prefetch threads, overlapping the training step.
            for batch in ds.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=False,
                                               prefetch_batches=self.cfg.prefetch_batches):
                position = batch.pop("position")
                n = len(position)
                if not np.array_equal(position, positions[done:done + n]):
                    raise RuntimeError("Ray Data returned samples out of epoch order (preserve_order not honoured)")
                done += n
                self._sample_in_epoch = min(self._sample_in_epoch + G, end)
                if self._sample_in_epoch >= end:
                    self._next_epoch()
                yield batch
        if self._epoch == epoch:  # nothing (more) for this rank in this epoch
            self._next_epoch()

    def _next_epoch(self) -> None:
        self._epoch += 1
        self._sample_in_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless the reader is already inside it.

        Calling ``set_epoch(e)`` at the top of every epoch is therefore safe after a resume
        into the middle of epoch ``e``.
        """
        if epoch != self._epoch:
            self._epoch, self._sample_in_epoch = epoch, 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict:
        """``{"epoch", "sample_in_epoch", "seed"}``: samples of ``epoch`` consumed so far, over all ranks."""
        return {"epoch": self._epoch, "sample_in_epoch": self._sample_in_epoch, "seed": self._seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken. The state's seed wins over the config's."""
        epoch, sample, seed = int(state["epoch"]), int(state["sample_in_epoch"]), int(state["seed"])
        if not 0 <= sample <= self.num_samples:
            raise ValueError(f"sample_in_epoch {sample} outside [0, {self.num_samples}]: different shards or exclusions?")
        if seed != self.cfg.seed:
            log.warning("resuming with the checkpoint's seed %d instead of the config's %d", seed, self.cfg.seed)
        self._epoch, self._sample_in_epoch, self._seed = epoch, sample, seed

