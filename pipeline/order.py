"""Sample order of the training reader: a pure function of (seed, epoch) and the shard list.

Vocabulary:

- *global row id*: ``shard_offset[shard] + row``, where shards are numbered in the
  manifest's order and ``shard_offset`` is the running sum of their row counts.
  Excluded rows keep their ids; they just never appear in an order.
- *block*: ``block_rows`` consecutive rows of one shard (match the shards' Parquet
  row-group size, 256 for ``vitray shard``, so a block is one row-group read).
- *window*: ``window_blocks`` consecutive blocks of the epoch's block permutation.
- *position*: index into an epoch's order, ``0 <= position < num_samples``.

Shuffled order for epoch ``e`` (what :meth:`EpochOrder.global_ids` returns):

1. permute all blocks of all shards with ``rng(seed, e)``;
2. cut the permutation into windows of ``window_blocks`` blocks;
3. permute the kept rows of window ``g`` with ``rng(seed, e, g)``; concatenate.

So every batch mixes rows of up to ``window_blocks`` row groups drawn from the
whole corpus (not from a few neighbouring shards, which for class-sorted sources
would mean a few classes), while a Ray Data task that decodes one window's rows
reads each of its row groups once. Unshuffled order (eval) is the manifest order.

Steps and ranks (what :func:`rank_positions` returns): from a start position,
each global step takes ``batch_size * world_size`` consecutive positions and
rank ``r`` takes the ``r``-th slice of ``batch_size`` of them. Resuming is
"start at ``sample_in_epoch``": positions before it are never listed, so never read.
"""

from __future__ import annotations

import numpy as np

_ORDER_STREAM = 0x4F524452  # separates the order's randomness from augmentation's


class Layout:
    """Shards as blocks of rows, minus excluded rows. Built once per reader.

    shard_rows: (S,) rows per shard, manifest order.
    excluded: per shard, sorted row indices to leave out (empty arrays if none).
    """

    def __init__(self, shard_rows: list[int], excluded: list[np.ndarray], block_rows: int):
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)  # (S,)
        self.shard_offset = np.concatenate([[0], np.cumsum(self.shard_rows)])  # (S+1,)
        self.excluded = [np.asarray(e, dtype=np.int64) for e in excluded]
        self.block_rows = block_rows
        shard, start = [], []
        for s, n in enumerate(self.shard_rows):
            starts = np.arange(0, n, block_rows, dtype=np.int64)
            shard.append(np.full(len(starts), s, dtype=np.int64))
            start.append(starts)
        self.block_shard = np.concatenate(shard) if shard else np.zeros(0, np.int64)  # (NB,)
        self.block_start = np.concatenate(start) if start else np.zeros(0, np.int64)  # (NB,)
        self.block_stop = np.minimum(self.block_start + block_rows, self.shard_rows[self.block_shard])
        # Kept rows per block: block length minus excluded rows falling inside it.
        self.block_kept = self.block_stop - self.block_start
        for s, ex in enumerate(self.excluded):
            if len(ex):
                blocks = np.flatnonzero(self.block_shard == s)
                lo = np.searchsorted(ex, self.block_start[blocks])
                hi = np.searchsorted(ex, self.block_stop[blocks])
                self.block_kept[blocks] -= hi - lo
        self.num_samples = int(self.block_kept.sum())

    @property
    def num_blocks(self) -> int:
        return len(self.block_shard)

    def block_ids(self, b: int) -> np.ndarray:
        """Global row ids of the kept rows of block ``b``, ascending."""
        s = self.block_shard[b]
        rows = np.arange(self.block_start[b], self.block_stop[b], dtype=np.int64)
        if len(self.excluded[s]):
            rows = rows[~np.isin(rows, self.excluded[s], assume_unique=True)]
        return rows + self.shard_offset[s]

    def locate(self, global_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row ids -> (shard index, row within shard)."""
        shard = np.searchsorted(self.shard_offset, global_ids, side="right") - 1
        return shard, global_ids - self.shard_offset[shard]


class EpochOrder:
    """The order of one epoch, computed window by window on demand."""

    def __init__(self, layout: Layout, seed: int, epoch: int, shuffle: bool, window_blocks: int):
        self.layout, self.seed, self.epoch, self.shuffle = layout, seed, epoch, shuffle
        if shuffle:
            rng = np.random.default_rng([_ORDER_STREAM, seed, epoch])
            perm = rng.permutation(layout.num_blocks)
            self.windows = [perm[i:i + window_blocks] for i in range(0, len(perm), window_blocks)]
        else:
            self.windows = [np.arange(layout.num_blocks)]  # one window, manifest order
        sizes = [int(layout.block_kept[w].sum()) for w in self.windows]
        self.window_offset = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (NW+1,)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.window_offset[-1])

    def window(self, g: int) -> np.ndarray:
        """Global row ids of window ``g`` in epoch order."""
        if g not in self._cache:
            blocks = self.windows[g]
            ids = np.concatenate([self.layout.block_ids(b) for b in blocks]) if len(blocks) else np.zeros(0, np.int64)
            if self.shuffle:
                ids = np.random.default_rng([_ORDER_STREAM, self.seed, self.epoch, g + 1]).permutation(ids)
            self._cache = {g: ids}  # callers walk windows in order; keep one
        return self._cache[g]

    def window_of(self, positions: np.ndarray) -> np.ndarray:
        """Window index of each position."""
        return np.searchsorted(self.window_offset, positions, side="right") - 1

    def global_ids(self, positions: np.ndarray | None = None) -> np.ndarray:
        """Global row ids at ``positions`` (ascending positions), or the whole order."""
        if positions is None:
            positions = np.arange(len(self), dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        win = self.window_of(positions)
        for g in np.unique(win):
            sel = win == g
            out[sel] = self.window(int(g))[positions[sel] - self.window_offset[g]]
        return out


def step_end(num_samples: int, start: int, global_batch: int, drop_last: bool) -> int:
    """Position where iteration from ``start`` stops: the end, or the last full global step."""
    if not drop_last:
        return num_samples
    return start + (num_samples - start) // global_batch * global_batch


def rank_positions(start: int, stop: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Positions in ``[start, stop)`` that rank ``rank`` consumes, in order.

    Global step k covers ``[start + k*G, start + (k+1)*G)`` with ``G = batch_size *
    world_size``; rank r takes ``batch_size`` positions at offset ``r * batch_size``.
    Returns (n,) int64.
    """
    G = batch_size * world_size
    steps = np.arange(start, stop, G, dtype=np.int64)  # (K,) first position of each step
    pos = steps[:, None] + rank * batch_size + np.arange(batch_size, dtype=np.int64)[None, :]  # (K, B)
    pos = pos.reshape(-1)
    return pos[pos < stop]  # only the last (eval) step can be partial


def chunk_positions(order: EpochOrder, positions: np.ndarray, task_samples: int) -> list[np.ndarray]:
    """Split a rank's positions into task-sized chunks that never straddle a window.

    Keeping a chunk inside one window bounds what a task reads to that window's
    row groups (each read once per chunk).
    """
    if len(positions) == 0:
        return []
    win = order.window_of(positions)
    cuts = np.flatnonzero(np.diff(win)) + 1
    chunks = []
    for part in np.split(positions, cuts):
        chunks.extend(part[i:i + task_samples] for i in range(0, len(part), task_samples))
    return chunks
