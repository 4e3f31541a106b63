"""The training reader on real shards: batches, order, augmentation, exclusions, resume, S3, Ray actors.

Shards are written here with the schema helpers (reader_fixtures), with real CIFAR-10
images and real photos; decoding runs in real Ray Data tasks on the local runtime.
"""

from __future__ import annotations

import collections
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from reader_fixtures import ShardSet, cifar_items, photo_items, unnormalize, write_shards
from vitray.config import ConfigError
from vitray.pipeline import augment, images
from vitray.pipeline.order import rank_positions
from vitray.pipeline.reader import BatchCollate, ReaderConfig, ShardReader

SHARD_ROWS = [23, 17, 30, 12, 18]  # 100 rows, uneven on purpose
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cifar10_test_table) -> ShardSet:
    items = cifar_items(cifar10_test_table, sum(SHARD_ROWS))
    return write_shards(str(tmp_path_factory.mktemp("reader") / "shards"), items, SHARD_ROWS, classes=CLASSES)


def config(ss: ShardSet, **kw) -> ReaderConfig:
    """Tiny reader: 32 px, blocks of one 8-row row group, windows of 3 blocks."""
    base = dict(shards=ss.uri, storage=ss.storage, image_size=32, block_rows=8, window_blocks=3, task_samples=16)
    base.update(kw)
    return ReaderConfig(**base)


def epoch_batches(reader: ShardReader, batch_size: int, rank: int = 0, world_size: int = 1, limit: int | None = None):
    out = []
    for batch in reader.iter_batches(batch_size, rank, world_size):
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def ids_of(batches) -> list[str]:
    return [s for b in batches for s in b["sample_id"]]


def write_exclusions(tmp_path, ss: ShardSet) -> tuple[list[str], list[str]]:
    """A text and a Parquet exclusion file: 7 distinct known ids (one listed twice) + 2 unknown."""
    known = [ss.sample_ids[i] for i in (0, 5, 23, 40, 41, 77, 99)]
    (tmp_path / "exclude.txt").write_text("# dedup output\n" + "\n".join(known[:5] + ["f" * 32]) + "\n\n")
    pq.write_table(pa.table({"sample_id": [known[4], known[5], known[6], "e" * 32]}), tmp_path / "exclude.parquet")
    return [str(tmp_path / "exclude.txt"), str(tmp_path / "exclude.parquet")], known


# ---------------------------------------------------------------- batches


def test_eval_batches_are_normalised_pixels_in_manifest_order(ray_local, shards):
    # crop_pct=1 on 32x32 images at image_size 32 is the identity crop, so pixels are exact.
    reader = ShardReader(config(shards, train=False, crop_pct=1.0))
    assert reader.num_samples == 100 and reader.classes == CLASSES and reader.num_excluded == 0
    batches = epoch_batches(reader, 16)
    assert [len(b["sample_id"]) for b in batches] == [16] * 6 + [4]  # eval keeps the partial batch
    b = batches[0]
    assert b["image"].dtype == torch.float32 and b["image"].shape == (16, 3, 32, 32)
    assert b["label"].dtype == torch.int64 and b["label"].shape == (16,)
    assert ids_of(batches) == shards.sample_ids
    assert torch.cat([b["label"] for b in batches]).tolist() == [it.label for it in shards.items]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(it.image)).convert("RGB")) for it in shards.items])
    got = np.concatenate([unnormalize(b["image"], augment.IMAGENET_MEAN, augment.IMAGENET_STD) for b in batches])
    np.testing.assert_allclose(got, pixels, atol=1e-3)
    # Channel statistics are those of standardised data, not of [0, 255] or [0, 1] values.
    assert -1.5 < float(b["image"].mean()) < 1.5 and float(b["image"].min()) < -0.5
    assert reader.state_dict() == {"epoch": 1, "sample_in_epoch": 0, "seed": 0}

    again = epoch_batches(reader, 16)  # eval is deterministic across epochs and runs
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(batches, again))


def test_uint8_batches_normalise_on_the_consumer_to_the_same_floats(ray_local, shards):
    floats = epoch_batches(ShardReader(config(shards, train=False)), 50)
    raw = epoch_batches(ShardReader(config(shards, train=False, normalize=False)), 50)
    assert raw[0]["image"].dtype == torch.uint8 and raw[0]["image"].shape == (50, 3, 32, 32)
    assert [b["sample_id"] for b in raw] == [b["sample_id"] for b in floats]
    for f, u in zip(floats, raw):
        assert torch.equal(f["image"], augment.normalize(u["image"]))


def test_train_order_and_pixels_are_pure_functions_of_seed_and_epoch(ray_local, shards):
    r1, r2 = ShardReader(config(shards, seed=3)), ShardReader(config(shards, seed=3))
    e0, e0_again = epoch_batches(r1, 16), epoch_batches(r2, 16)
    assert len(e0) == 6  # 100 // 16: the last partial global batch is dropped
    assert ids_of(e0) == ids_of(e0_again) == [shards.sample_ids[g] for g in r1.epoch_order(0)[:96]]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(e0, e0_again))
    assert ids_of(e0) != shards.sample_ids[:96]  # shuffled

    e1 = epoch_batches(r1, 16)  # the reader moved on to epoch 1
    assert ids_of(e1) != ids_of(e0)
    pix0 = {s: img for b in e0 for s, img in zip(b["sample_id"], b["image"])}
    pix1 = {s: img for b in e1 for s, img in zip(b["sample_id"], b["image"])}
    common = sorted(set(pix0) & set(pix1))
    assert sum(not torch.equal(pix0[s], pix1[s]) for s in common) > 0.8 * len(common)  # new crops

    assert list(ShardReader(config(shards, seed=4)).epoch_order(0)) != list(r1.epoch_order(0))


def test_epoch_order_is_a_windowed_permutation(shards):
    reader = ShardReader(config(shards, seed=1))
    orders = [reader.epoch_order(e) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(100))
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[0], ShardReader(config(shards, seed=1)).epoch_order(0))
    # Each window of rows comes from at most window_blocks (=3) blocks of 8 rows.
    offsets = np.cumsum([0] + SHARD_ROWS)
    block = [(s, (g - offsets[s]) // 8) for g in orders[0] for s in [np.searchsorted(offsets, g, side="right") - 1]]
    o = reader._epoch_order(0)
    for g in range(len(o.windows)):
        assert len(set(block[o.window_offset[g]:o.window_offset[g + 1]])) <= 3
    np.testing.assert_array_equal(ShardReader(config(shards, train=False)).epoch_order(5), np.arange(100))


# ---------------------------------------------------------------- exclusions


def test_exclusions_never_appear_and_counts_reconcile(ray_local, shards, tmp_path):
    files, excluded = write_exclusions(tmp_path, shards)
    reader = ShardReader(config(shards, exclude=files, train=False))
    assert reader.num_excluded == 7 and reader.num_exclusions_not_found == 2
    assert reader.num_samples == 100 - 7
    assert ids_of(epoch_batches(reader, 16)) == [s for s in shards.sample_ids if s not in excluded]

    train = ShardReader(config(shards, exclude=files, seed=9))
    order = train.epoch_order(0)
    assert len(order) == 93 and not set(shards.ids_of(order)) & set(excluded)
    assert not set(ids_of(epoch_batches(train, 8))) & set(excluded)


# ---------------------------------------------------------------- resume


def _assert_same_stream(expected: list[str], got: list[str], what: str):
    """mosaicml/streaming's resume checks."""
    missing = set(expected) - set(got)
    assert not missing, f"Missing samples ({what}): {sorted(missing)[:5]}"
    counts = collections.Counter(got)
    dup = [s for s, c in counts.items() if c > collections.Counter(expected)[s]]
    assert not dup, f"Duplicate samples ({what}): {dup[:5]}"
    assert got == expected, f"Incorrect sample order ({what})"


def test_resume_mid_epoch_continues_exactly(ray_local, shards, tmp_path):
    files, excluded = write_exclusions(tmp_path, shards)
    cfg = config(shards, exclude=files, seed=5)
    B, W = 4, 2  # global batch 8; 93 samples -> 11 steps, 5 dropped per epoch

    full = {r: [] for r in range(W)}
    images = {r: [] for r in range(W)}
    readers = [ShardReader(cfg) for _ in range(W)]
    for epoch in range(2):
        per_rank = {r: epoch_batches(readers[r], B, r, W) for r in range(W)}
        ranks_ids = {r: ids_of(per_rank[r]) for r in range(W)}
        assert len(ranks_ids[0]) == len(ranks_ids[1]) == 44
        assert not set(ranks_ids[0]) & set(ranks_ids[1])
        order = readers[0].epoch_order(epoch)
        assert set(ranks_ids[0]) | set(ranks_ids[1]) == set(shards.ids_of(order[:88]))  # all minus the tail
        assert not (set(ranks_ids[0]) | set(ranks_ids[1])) & set(excluded)
        for r in range(W):
            full[r] += ranks_ids[r]
            images[r] += [b["image"] for b in per_rank[r]]

    # Interrupted run: 5 steps into epoch 0, checkpoint, brand-new readers resume.
    first = [ShardReader(cfg) for _ in range(W)]
    head = {r: epoch_batches(first[r], B, r, W, limit=5) for r in range(W)}
    state = first[0].state_dict()
    assert state == first[1].state_dict() == {"epoch": 0, "sample_in_epoch": 40, "seed": 5}
    resumed = [ShardReader(cfg) for _ in range(W)]
    for r in range(W):
        resumed[r].load_state_dict(state)
        resumed[r].set_epoch(0)  # a loop calling set_epoch at the top of the epoch must not rewind
    tail = {r: [] for r in range(W)}
    for _ in range(2):
        for r in range(W):
            tail[r] += epoch_batches(resumed[r], B, r, W)
    for r in range(W):
        _assert_same_stream(full[r], ids_of(head[r]) + ids_of(tail[r]), f"rank {r}")
        got_images = [b["image"] for b in head[r] + tail[r]]
        assert all(torch.equal(x, y) for x, y in zip(images[r], got_images)), "augmentation differs after resume"
    assert resumed[0].state_dict() == {"epoch": 2, "sample_in_epoch": 0, "seed": 5}


def test_resume_does_not_decode_skipped_samples(ray_local, shards, cifar10_test_table, tmp_path):
    cfg = config(shards, seed=2)
    order = ShardReader(cfg).epoch_order(0)
    skipped = [int(g) for g in order[:40]]
    # Same rows, but the images of every sample a resumed reader skips are garbage.
    corrupt = write_shards(str(tmp_path / "corrupt"), shards.items, SHARD_ROWS,
                           replace_image={g: b"\xff\xd8 not a jpeg" for g in skipped})
    ccfg = config(corrupt, seed=2)
    resumed = ShardReader(ccfg)
    resumed.load_state_dict({"epoch": 0, "sample_in_epoch": 40, "seed": 2})
    got = ids_of(epoch_batches(resumed, 8))
    assert got == corrupt.ids_of(order[40:96])

    fresh = ShardReader(ccfg)  # proves the corrupt rows would fail if decoded
    with pytest.raises(Exception) as err:
        epoch_batches(fresh, 8)
    assert "cannot be decoded" in str(err.value)


# ---------------------------------------------------------------- multi-label, dataset(), errors


def test_multi_label_targets(ray_local, cifar10_test_table, tmp_path):
    rng = np.random.default_rng(0)
    items = cifar_items(cifar10_test_table, 24)
    for i, it in enumerate(items):
        if i % 3 == 0:
            it.labels = sorted(rng.choice(10, size=rng.integers(1, 4), replace=False).tolist())
        elif i % 3 == 1:
            it.label = None
    ss = write_shards(str(tmp_path / "ml"), items, [24])
    reader = ShardReader(config(ss, train=False, multi_label=True, num_classes=10))
    batches = epoch_batches(reader, 8)
    targets = torch.cat([b["targets"] for b in batches])
    assert targets.dtype == torch.float32 and targets.shape == (24, 10)
    for it, t in zip(items, targets):
        want = it.labels if it.labels is not None else ([] if it.label is None else [it.label])
        assert sorted(np.flatnonzero(t.numpy()).tolist()) == sorted(want)
    assert torch.cat([b["label"] for b in batches]).tolist() == [-1 if it.label is None else it.label for it in items]


def test_dataset_for_one_rank_feeds_iter_torch_batches(ray_local, shards):
    reader = ShardReader(config(shards, seed=7))
    ds = reader.dataset(0, start=8, stop=72, rank=1, world_size=2, batch_size=4)
    batches = list(ds.iter_torch_batches(batch_size=4, collate_fn=reader.collate))
    want = rank_positions(8, 72, 4, 1, 2)
    assert ids_of(batches) == shards.ids_of(reader.epoch_order(0)[want])
    assert batches[0]["image"].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("normalize", [False, True])
def test_pinned_batches_hold_the_same_values_and_are_pinned_only_with_cuda(normalize):
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8), "label": np.arange(4),
             "sample_id": np.array(["a", "b", "c", "d"]), "targets": rng.random((4, 5)).astype(np.float32),
             "position": np.arange(4)}
    kw = dict(mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD, multi_label=True, keep_position=True,
              normalize=normalize)
    plain, pinned = BatchCollate(**kw)(batch), BatchCollate(**kw, pin_memory=True)(batch)
    assert plain.keys() == pinned.keys() and pinned["sample_id"] == ["a", "b", "c", "d"]
    for key in ("image", "label", "targets"):
        assert torch.equal(plain[key], pinned[key]) and not plain[key].is_pinned()
        # page-locked where a CUDA device can use it; without one pinning is impossible and skipped
        assert pinned[key].is_pinned() == torch.cuda.is_available()
    assert np.array_equal(pinned["position"], np.arange(4))


def test_bad_inputs_have_clear_errors(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        ShardReader(ReaderConfig(shards=str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="num_classes"):
        ReaderConfig(shards=shards.uri, multi_label=True)
    with pytest.raises(ConfigError, match="crop_scale"):
        ReaderConfig(shards=shards.uri, crop_scale=(0.5, 0.1))
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="sample_id"):
        ShardReader(config(shards, exclude=[str(tmp_path / "bad.parquet")]))
    reader = ShardReader(config(shards))
    with pytest.raises(ValueError, match="sample_in_epoch"):
        reader.load_state_dict({"epoch": 0, "sample_in_epoch": 101, "seed": 0})


# ---------------------------------------------------------------- S3, GCS, Ray actors


def test_reads_shards_and_exclusions_from_s3(ray_local, s3, cifar10_test_table):
    items = cifar_items(cifar10_test_table, 30, start=200)
    ss = write_shards(s3.path("corpus", "shards"), items, [16, 14], storage=s3.options)
    s3.put("dedup/exclude.txt", "\n".join(ss.sample_ids[:3]).encode())
    reader = ShardReader(config(ss, train=False, exclude=[s3.path("dedup", "exclude.txt")]))
    assert reader.num_samples == 27 and reader.num_excluded == 3
    assert ids_of(epoch_batches(reader, 8)) == ss.sample_ids[3:]
    train = ShardReader(config(ss, seed=1, exclude=[s3.path("dedup", "exclude.txt")]))
    assert len(ids_of(epoch_batches(train, 8))) == 24


def test_reads_shards_and_exclusions_from_gcs(ray_local, gcs, cifar10_test_table):
    items = cifar_items(cifar10_test_table, 20, start=300)
    ss = write_shards(gcs.path("corpus", "shards"), items, [12, 8])
    gcs.put("dedup/exclude.txt", "\n".join(ss.sample_ids[-2:]).encode())
    reader = ShardReader(config(ss, train=False, exclude=[gcs.path("dedup", "exclude.txt")]))
    assert reader.num_samples == 18 and reader.num_excluded == 2
    assert ids_of(epoch_batches(reader, 8)) == ss.sample_ids[:-2]  # decoded in Ray Data tasks, from gs://


def test_reader_inside_a_ray_actor(ray_local, shards):
    """The reader lives in an actor (as in a Ray Train worker) and starts its Ray Data work from there."""
    import ray

    cfg = config(shards, seed=11)
    actor = ray.remote(num_cpus=0)(ShardReader).remote(cfg)
    refs = actor.iter_batches.options(num_returns="streaming").remote(4, 1, 2)
    batches = [ray.get(ref) for ref in refs]
    order = ShardReader(cfg).epoch_order(0)
    assert ids_of(batches) == shards.ids_of(order[rank_positions(0, 96, 4, 1, 2)])
    assert batches[0]["image"].shape == (4, 3, 32, 32)
    assert ray.get(actor.state_dict.remote()) == {"epoch": 1, "sample_in_epoch": 0, "seed": 11}
    ray.kill(actor)


# ---------------------------------------------------------------- augmentation (no Ray)


def test_reduced_scale_decode_matches_full_decode(photos_table):
    big = photo_items(photos_table, 6, min_side=1000)
    assert len(big) >= 3
    for train in (True, False):
        spec = augment.AugmentSpec(image_size=64, train=train)
        full = augment.AugmentSpec(image_size=64, train=train, reduced_decode=False)
        for i, it in enumerate(big):
            a = augment.decode_box(it.image, spec, augment.sample_rng(0, 0, i)).astype(np.float32)
            b = augment.decode_box(it.image, full, augment.sample_rng(0, 0, i)).astype(np.float32)
            assert a.shape == b.shape == (3, 64, 64)
            assert np.abs(a - b).mean() < 6.0, f"photo {i}: reduced decode drifted from the full decode"
    # The draft keeps at least image_size pixels across the crop.
    assert images.draft_scale(1000, 1000, 224) == 4 and images.draft_scale(447, 900, 224) == 1
    assert images.draft_scale(448, 448, 224) == 2 and images.draft_scale(5000, 6000, 64) == 8


def test_libjpeg_turbo_decode_gives_pillows_pixels(photos_table):
    """The fast path (simplejpeg) is Pillow's decode, pixel for pixel, at full and reduced scale."""
    checked = 0
    for it in photo_items(photos_table, 40):
        im = Image.open(io.BytesIO(it.image))
        if im.format != "JPEG" or im.mode != "RGB":
            continue
        for s in (1, 2, 4):
            fast = images.decode_jpeg_rgb(it.image, im.size, s)
            slow = augment._decode_pillow(Image.open(io.BytesIO(it.image)), s, None)
            assert fast is not None and fast.shape == slow.shape and np.array_equal(fast, slow), (it.source, s)
        checked += 1
    assert checked >= 20


def test_resize_box_is_pillows_bilinear_within_rounding(photos_table):
    for it in photo_items(photos_table, 8):
        arr = np.asarray(Image.open(io.BytesIO(it.image)).convert("RGB"))
        H, W = arr.shape[:2]
        # shrink a lot, shrink a little, enlarge, and a thin box
        for box in [(0, 0, W, H), (W // 4, H // 5, W // 4 + 90, H // 5 + 80), (10, 12, 50, 44), (0, 5, W, 25)]:
            got = augment.resize_box(arr, box, 64).transpose(1, 2, 0)  # (3, S, S) -> (S, S, 3)
            want = np.asarray(Image.fromarray(arr).resize((64, 64), Image.Resampling.BILINEAR, box=box))
            diff = np.abs(got.astype(np.int32) - want)
            assert got.shape == (64, 64, 3) and got.dtype == np.uint8
            # Inside, within rounding. At the edges Pillow's filter reads pixels beyond the box;
            # the crop here stops at the box, as torchvision's crop-then-resize does.
            assert diff.mean() < 0.5 and diff[3:-3, 3:-3].max() <= 1, (it.source, box, diff.mean(), diff.max())


def test_enlarging_without_antialias_gives_the_antialiased_pixels():
    import torch.nn.functional as F

    arr = np.random.default_rng(0).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    for box in [(0, 0, 90, 100), (5, 7, 60, 41), (0, 0, 64, 64)]:  # every side <= 64 -> 64: enlarging
        got = augment.resize_box(arr, box, 64)
        x = torch.from_numpy(np.ascontiguousarray(arr[box[1]:box[3], box[0]:box[2]])).permute(2, 0, 1)[None]
        want = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[0].numpy()
        if box[2] - box[0] <= 64 and box[3] - box[1] <= 64:
            assert np.array_equal(got, want), box


def test_jpegs_off_the_fast_path_decode_right_or_fail_clearly(photos_table):
    data = photo_items(photos_table, 1)[0].image
    spec = augment.AugmentSpec(64, train=False, crop_pct=1.0)
    with pytest.raises(images.ImageError, match="corrupt"):
        augment.decode_box(data[: len(data) // 2], spec, None)  # truncated: libjpeg-turbo warns, Pillow names it
    with pytest.raises(images.ImageError, match="corrupt"):
        augment.decode_box(data[:600] + bytes(len(data) - 600), spec, None)  # scan data zeroed
    rgb = Image.open(io.BytesIO(data)).convert("RGB").resize((96, 72))
    for mode in ("CMYK", "L"):  # Pillow's path, which converts to RGB
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, "JPEG", quality=95)
        shown = rgb.convert(mode).convert("RGB")
        want = np.asarray(shown.resize((64, 64), Image.Resampling.BILINEAR, box=(12, 0, 84, 72)))
        got = augment.decode_box(buf.getvalue(), spec, None).transpose(1, 2, 0)
        assert np.abs(got.astype(np.float32) - want).mean() < 6.0, mode


def test_random_resized_crop_box_follows_torchvision_bounds():
    for k in range(200):
        rng = np.random.default_rng(k)
        W, H = int(rng.integers(20, 900)), int(rng.integers(20, 900))
        left, top, w, h = augment.random_resized_crop_box(W, H, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and 0 <= top and left + w <= W and top + h <= H and w > 0 and h > 0
    box1 = augment.random_resized_crop_box(500, 375, (0.08, 1), (3 / 4, 4 / 3), augment.sample_rng(1, 2, 3))
    box2 = augment.random_resized_crop_box(500, 375, (0.08, 1), (3 / 4, 4 / 3), augment.sample_rng(1, 2, 3))
    assert box1 == box2


def test_exif_rotation_is_applied_before_cropping(photos_table):
    im = Image.open(io.BytesIO(photos_table.column("image")[3].as_py())).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    shown = im.transpose(Image.Transpose.ROTATE_270)  # what a viewer displays
    w, h = shown.size
    s = min(w, h)
    want = np.asarray(shown.resize((64, 64), Image.Resampling.BILINEAR, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)))
    got = augment.decode_box(buf.getvalue(), augment.AugmentSpec(64, train=False, crop_pct=1.0), None).transpose(1, 2, 0)
    assert np.abs(got.astype(np.float32) - want).mean() < 6.0
    W0, H0 = im.size  # stored orientation: the wrong one
    unrotated = np.asarray(im.resize((64, 64), Image.Resampling.BILINEAR,
                                     box=((W0 - s) / 2, (H0 - s) / 2, (W0 + s) / 2, (H0 + s) / 2)))
    assert np.abs(got.astype(np.float32) - unrotated).mean() > 15.0


@pytest.mark.slow
def test_reader_in_ray_train_workers(ray_local, shards, tmp_path):
    """Each Train worker builds its own reader and Ray Data pipeline for its rank."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = config(shards, seed=13)
    out_dir = str(tmp_path / "ranks")

    def loop(conf):
        import json as _json
        import os as _os

        import ray.train

        from vitray.pipeline.reader import ShardReader as _Reader

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        reader = _Reader(conf["cfg"])
        ids = [s for b in reader.iter_batches(4, rank, world) for s in b["sample_id"]]
        _os.makedirs(conf["out"], exist_ok=True)
        with open(_os.path.join(conf["out"], f"{rank}.json"), "w") as f:
            _json.dump(ids, f)

    trainer = TorchTrainer(loop, train_loop_config={"cfg": cfg, "out": out_dir},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="reader-train", storage_path=str(tmp_path / "runs")))
    trainer.fit()
    order = ShardReader(cfg).epoch_order(0)
    for rank in range(2):
        with open(f"{out_dir}/{rank}.json") as f:
            assert json.load(f) == shards.ids_of(order[rank_positions(0, 96, 4, rank, 2)])
