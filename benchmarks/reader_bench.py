"""Training-reader decode + augment throughput per core vs a straightforward PIL pipeline.

Both sides get the same photos and the same crop boxes (drawn from the header size
with the reader's per-sample generator), so the difference is how the work is done:

- baseline: torchvision's recipe written out in PIL/torch: ``Image.open().convert("RGB")``
  (full decode), crop, resize to 224 (bilinear), flip, PILToTensor; for float batches
  also ToTensor's scaling + Normalize per image;
- reader: :func:`vitray.pipeline.augment.decode_box` (JPEG decoded by libjpeg-turbo at
  the coarsest DCT scale keeping >= 224 px across the crop, a view of the box resized by
  torch's uint8 antialiased bilinear, uint8 out) and normalisation per batch of 64,
  exactly what the Ray Data tasks + collate do;
- reader, full decode: the same with reduced-scale decode off, to show what the
  reduced-scale decode itself buys on this corpus;
- reader in Pillow only: the reader's algorithm (header-first box, reduced-scale
  ``draft``, one ``resize(box=...)``, normalisation per batch) with Pillow's decoder and
  resize, to show what the decoder and the resize kernel buy.

Each is timed to uint8 (B, 3, S, S) batches and to normalised float batches. The
pretraining loop takes uint8 batches and normalises on its device after the copy
(``ReaderConfig(normalize=False)``), so the uint8 column is the comparison that counts
there; the float column is what a CPU-only consumer gets.

Throughput is images per CPU-second of this process (``time.process_time``), timed
image by image with the pipelines interleaved on each image, so other load on the
machine hits all sides alike; the best of a few rounds counts.

Optionally the reader end to end: shards in a temp dir, decoded by Ray Data tasks
on the local Ray runtime (2 CPUs), batches consumed here.

Run: ``python benchmarks/reader_bench.py`` (reads ../shared/data/photos.parquet).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from vitray.pipeline import augment, images

MEAN = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)


def baseline_one(data: bytes, i: int, size: int) -> torch.Tensor:
    """Full decode, then torchvision-style RandomResizedCrop + flip + PILToTensor: uint8 (3, S, S)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    rng = augment.sample_rng(0, 0, i)
    flip = rng.random() < 0.5
    left, top, w, h = augment.random_resized_crop_box(im.width, im.height, (0.08, 1.0), (3 / 4, 4 / 3), rng)
    im = im.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1).contiguous()


def baseline_normalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ToTensor (float, / 255) + Normalize, per image."""
    return x.float().div_(255).sub_(MEAN).div_(STD)


BASE = "baseline: full decode + RRC + flip (PIL)"
READER = "reader (reduced-scale decode)"
FULL = "reader, reduced-scale decode off"
PILLOW = "reader in Pillow only (draft + resize(box))"
FLOOR = "floor: the reader's decode alone, no resize"
BATCH = 64  # collate batch size: stacking and the reader's normalisation run per batch


def pillow_reader_one(data: bytes, spec: augment.AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """The reader's algorithm with Pillow's decoder and resize (uint8 (3, S, S); flip as a view)."""
    im = Image.open(io.BytesIO(data))
    W, H = im.size
    flip = rng.random() < spec.hflip
    left, top, w, h = augment.random_resized_crop_box(W, H, spec.crop_scale, spec.crop_ratio, rng)
    s = images.draft_scale(w, h, spec.image_size)
    if s > 1 and im.format == "JPEG":
        im.draft("RGB", (max(1, W // s), max(1, H // s)))
    rgb = im.convert("RGB")
    fx, fy = rgb.width / W, rgb.height / H
    out = np.asarray(rgb.resize((spec.image_size,) * 2, Image.Resampling.BILINEAR,
                                box=(left * fx, top * fy, (left + w) * fx, (top + h) * fy)))
    out = out.transpose(2, 0, 1)  # the batch layout (the copy happens on assignment)
    return out[:, :, ::-1] if flip else out


def decode_floor_one(data: bytes, spec: augment.AugmentSpec, rng: np.random.Generator) -> None:
    """What no variant of the reader can skip: decoding at the scale its crop allows (decode_box minus the resize)."""
    augment.decode_source(data, spec, rng)


def measure(photos: list[bytes], size: int, rounds: int) -> dict[str, tuple[float, float]]:
    """{pipeline: (CPU-seconds for uint8 batches, CPU-seconds for normalised float batches)}
    over all photos, best round; measured image by image, pipelines interleaved.

    Timing the pipelines on the same image back to back (in rotating order) lets load
    from other processes hit all of them alike. Normalisation is timed separately on the
    same outputs: per image for the baseline (ToTensor + Normalize), per batch for the
    reader's collate (or on the GPU, where the pretraining loop does it).
    """
    spec = augment.AugmentSpec(size, train=True)
    full = augment.AugmentSpec(size, train=True, reduced_decode=False)
    names = [BASE, READER, FULL, PILLOW, FLOOR]
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        decode = dict.fromkeys(names, 0.0)  # per image: up to a uint8 (3, S, S) sample
        u8 = dict.fromkeys(names, 0.0)  # + the uint8 collate
        norm = dict.fromkeys(names, 0.0)  # + normalisation and the float collate
        out = {name: np.empty((len(photos), 3, size, size), dtype=np.uint8) for name in (READER, FULL, PILLOW)}
        base_u8, base_f = [], []
        for i, data in enumerate(photos):
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                rng = augment.sample_rng(0, 0, i)
                t0 = time.process_time()
                if name == BASE:
                    base_u8.append(baseline_one(data, i, size))
                elif name == FLOOR:
                    decode_floor_one(data, spec, rng)
                elif name == PILLOW:
                    out[name][i] = pillow_reader_one(data, spec, rng)
                else:
                    out[name][i] = augment.decode_box(data, spec if name == READER else full, rng)
                decode[name] += time.process_time() - t0
            t0 = time.process_time()
            base_f.append(baseline_normalize(base_u8[-1]))
            norm[BASE] += time.process_time() - t0
        for k in range(0, len(photos), BATCH):  # the collates
            t0 = time.process_time()
            torch.stack(base_u8[k:k + BATCH])
            u8[BASE] += time.process_time() - t0
            t0 = time.process_time()
            torch.stack(base_f[k:k + BATCH])
            norm[BASE] += time.process_time() - t0
            for name in out:
                t0 = time.process_time()
                torch.from_numpy(np.array(out[name][k:k + BATCH]))  # BatchCollate(normalize=False) copies
                u8[name] += time.process_time() - t0
                t0 = time.process_time()
                augment.normalize(out[name][k:k + BATCH])  # BatchCollate(normalize=True)
                norm[name] += time.process_time() - t0
        for name in names:
            got = (decode[name] + u8[name], decode[name] + norm[name])
            old = best.get(name, got)
            best[name] = (min(old[0], got[0]), min(old[1], got[1]))
    return best


def drafted_fraction(photos: list[bytes], size: int) -> float:
    """Fraction of photos decoded at reduced scale (JPEG and a crop >= 2x the output)."""
    n = 0
    for i, data in enumerate(photos):
        im = Image.open(io.BytesIO(data))
        rng = augment.sample_rng(0, 0, i)
        rng.random()
        _, _, w, h = augment.random_resized_crop_box(*im.size, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        n += im.format == "JPEG" and images.draft_scale(w, h, size) > 1
    return n / len(photos)


def end_to_end(photos: list[bytes], size: int = 224, batch_size: int = 32) -> str:
    """Photos -> shards in a temp dir -> ShardReader (Ray Data tasks) -> batches here."""
    import ray

    from vitray.pipeline import hashes, schema
    from vitray.pipeline.reader import ReaderConfig, ShardReader

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = []
            for i, data in enumerate(photos):
                im = Image.open(io.BytesIO(data))
                ph, dh = hashes.hash_bytes(data)
                rows.append({"sample_id": schema.sample_id(f"photo/{i}"), "source": f"photo/{i}", "label": i % 10,
                             "labels": None, "width": im.width, "height": im.height, "format": im.format or "",
                             "sha256": "", "phash": ph, "dhash": dh, "image": data})
            schema.write_shard_dir(tmp, (schema.table_from_rows(rows[k:k + 128]) for k in range(0, len(rows), 128)),
                                   source="bench")
            rd = ShardReader(ReaderConfig(shards=tmp, image_size=size, task_samples=64))
            lines = []
            for epoch in range(2):  # epoch 0 includes worker start-up
                t0, n = time.perf_counter(), 0
                for batch in rd.iter_batches(batch_size):
                    n += len(batch["sample_id"])
                dt = time.perf_counter() - t0
                lines.append(f"  reader via Ray Data, epoch {epoch}: {n} images in {dt:.2f} s = {n / dt:.1f} images/s "
                             f"(wall, {int(ray.cluster_resources().get('CPU', 0))} CPUs{', incl. worker start-up' if epoch == 0 else ''})")
            return "\n".join(lines)
    finally:
        if started:
            ray.shutdown()


def run(photos: list[bytes], *, rounds: int = 2, end_to_end_ray: bool = True) -> str:
    """Measure and return a printable report (see the module docstring)."""
    torch.set_num_threads(1)  # per core: the batched normalisation must not borrow other cores
    lines = [f"training reader decode+augment, {len(photos)} photos, per core (images per CPU-second, best of "
             f"{rounds}); uint8 out = up to uint8 (B, 3, S, S) batches; normalised = float batches, "
             f"normalised on the host (per image in the baseline, per batch of {BATCH} in the reader)"]
    for size in (224, 128):
        cpu = measure(photos, size, rounds)
        base_u8, base_f = cpu[BASE]
        lines.append(f" output {size}x{size}: {drafted_fraction(photos, size):.0%} of photos decoded at reduced scale")
        lines.append(f"  {'':48s} {'uint8 out':>17s} {'normalised':>19s}")
        for name, (u8, f) in cpu.items():
            if name == FLOOR:
                lines.append(f"  {name:48s} {len(photos) / u8:7.1f} img/s x{base_u8 / u8:.2f}")
            else:
                lines.append(f"  {name:48s} {len(photos) / u8:7.1f} img/s x{base_u8 / u8:.2f}"
                             f"   {len(photos) / f:7.1f} img/s x{base_f / f:.2f}")
        label = "target >= 1.5x" if size == 224 else "lower-resolution pretraining, for comparison"
        r_u8, r_f = cpu[READER]
        lines.append(f"  ratio reader / baseline at {size} ({label}): {base_u8 / r_u8:.2f}x uint8 out "
                     f"(the pretraining loop: it normalises on its device), {base_f / r_f:.2f}x normalised on "
                     f"the host; ceiling (baseline / floor, uint8): {base_u8 / cpu[FLOOR][0]:.2f}x")
    if end_to_end_ray:
        lines.append(end_to_end(photos))
    return "\n".join(lines)


if __name__ == "__main__":
    import pyarrow.parquet as pq

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(os.path.dirname(root), "shared", "data", "photos.parquet")
    if not os.path.exists(path):
        sys.exit(f"photos not found at {path}")
    print(run(pq.read_table(path, columns=["image"]).column("image").to_pylist()))
