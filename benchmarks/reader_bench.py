"""Training-reader decode + augment throughput per core vs a straightforward PIL pipeline.

Both sides get the same photos and the same crop boxes (drawn from the header size
with the reader's per-sample generator), so the difference is how the work is done:

- baseline: torchvision's recipe written out in PIL/torch: ``Image.open().convert("RGB")``
  (full decode), crop, resize to 224 (bilinear), flip, ToTensor, Normalize per image;
- reader: :func:`vitray.pipeline.augment.decode_box` (JPEG decoded at the coarsest DCT
  scale keeping >= 224 px across the crop, one resize of the box, uint8 out) and one
  batched normalisation, exactly what the Ray Data tasks + collate do;
- reader, full decode: the same with reduced-scale decode off, to show what the
  reduced-scale decode itself buys on this corpus.

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

from vitray.pipeline import augment

MEAN = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)


def baseline_one(data: bytes, i: int, size: int) -> torch.Tensor:
    """Full decode, then torchvision-style RandomResizedCrop + flip + ToTensor + Normalize. (3, S, S)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    rng = augment.sample_rng(0, 0, i)
    flip = rng.random() < 0.5
    left, top, w, h = augment.random_resized_crop_box(im.width, im.height, (0.08, 1.0), (3 / 4, 4 / 3), rng)
    im = im.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
    return x.sub_(MEAN).div_(STD)  # Normalize


FLOOR = "floor: the reader's decode alone, no resize"


def decode_floor_one(data: bytes, spec: augment.AugmentSpec, rng: np.random.Generator) -> None:
    """What no variant of the reader can skip: decoding at the scale its crop allows (decode_box up to load())."""
    im = Image.open(io.BytesIO(data))
    rng.random()
    _, _, w, h = augment.random_resized_crop_box(im.width, im.height, spec.crop_scale, spec.crop_ratio, rng)
    s = augment.draft_scale(min(w, h), spec.image_size)
    if s > 1 and im.format == "JPEG":
        im.draft("RGB" if im.mode in ("RGB", "YCbCr") else im.mode, (max(1, im.width // s), max(1, im.height // s)))
    im.load()


def measure(photos: list[bytes], size: int, rounds: int) -> dict[str, float]:
    """CPU-seconds per pipeline over all photos (best round), measured image by image, interleaved.

    Timing the three pipelines on the same image back to back (in rotating order)
    lets load from other processes hit all of them alike.
    """
    specs = {"reader (reduced-scale decode)": augment.AugmentSpec(size, train=True),
             "reader, reduced-scale decode off": augment.AugmentSpec(size, train=True, reduced_decode=False)}
    names = ["baseline (full decode + torchvision-style RRC)", *specs, FLOOR]
    best = {name: float("inf") for name in names}
    for _ in range(rounds):
        cpu = dict.fromkeys(names, 0.0)
        out = {name: np.empty((len(photos), size, size, 3), dtype=np.uint8) for name in specs}
        base_out = []
        for i, data in enumerate(photos):
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                t0 = time.process_time()
                if name in specs:
                    out[name][i] = augment.decode_box(data, specs[name], augment.sample_rng(0, 0, i))
                elif name == FLOOR:
                    decode_floor_one(data, specs["reader (reduced-scale decode)"], augment.sample_rng(0, 0, i))
                else:
                    base_out.append(baseline_one(data, i, size))
                cpu[name] += time.process_time() - t0
        t0 = time.process_time()
        torch.stack(base_out)  # the baseline's collate
        cpu[names[0]] += time.process_time() - t0
        for name in specs:  # the reader's collate: one batched normalisation
            t0 = time.process_time()
            augment.normalize(np.ascontiguousarray(out[name].transpose(0, 3, 1, 2)))
            cpu[name] += time.process_time() - t0
        best = {name: min(best[name], cpu[name]) for name in names}
    return best


def drafted_fraction(photos: list[bytes], size: int) -> float:
    """Fraction of photos decoded at reduced scale (JPEG and a crop >= 2x the output)."""
    n = 0
    for i, data in enumerate(photos):
        im = Image.open(io.BytesIO(data))
        rng = augment.sample_rng(0, 0, i)
        rng.random()
        _, _, w, h = augment.random_resized_crop_box(*im.size, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        n += im.format == "JPEG" and augment.draft_scale(min(w, h), size) > 1
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
    lines = [f"training reader decode+augment, {len(photos)} photos, per core (images per CPU-second, best of {rounds})"]
    for size in (224, 128):
        cpu = measure(photos, size, rounds)
        base = next(iter(cpu.values()))
        lines.append(f" output {size}x{size}: {drafted_fraction(photos, size):.0%} of photos decoded at reduced scale")
        for name, seconds in cpu.items():
            lines.append(f"  {name:48s} {len(photos) / seconds:7.1f} img/s  x{base / seconds:.2f}")
        label = "target >= 1.5x" if size == 224 else "lower-resolution pretraining, for comparison"
        lines.append(f"  ratio reader / baseline at {size}: {base / cpu['reader (reduced-scale decode)']:.2f}x ({label}); "
                     f"ceiling (baseline / floor): {base / cpu[FLOOR]:.2f}x")
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
